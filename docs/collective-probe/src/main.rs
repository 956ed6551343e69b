//! Is burn-collective 0.21's local all-reduce deterministic on Flex? N peers (threads) each hold
//! a fixed tensor; they all-reduce (Sum) it R times; we count the distinct result bit patterns.
use burn::backend::Flex;
use burn::collective::{self, AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation};
use burn::prelude::*;
use std::collections::HashSet;

fn values(peer: u32, n: usize) -> Vec<f32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(peer);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 1000.0 - 500.0
        })
        .collect()
}

fn main() {
    let peers: u32 = std::env::args().nth(1).map_or(3, |a| a.parse().unwrap());
    let strategy = match std::env::args().nth(2).as_deref() {
        Some("centralized") => AllReduceStrategy::Centralized,
        _ => AllReduceStrategy::Tree(2),
    };
    let rounds = 20;
    let n = 4096;
    let handles: Vec<_> = (0..peers)
        .map(|p| {
            std::thread::spawn(move || {
                let device = Default::default();
                let config = CollectiveConfig::default()
                    .with_num_devices(peers as usize)
                    .with_local_all_reduce_strategy(strategy);
                collective::register::<Flex>(PeerId::from(p), device, config).unwrap();
                if std::env::args().nth(3).as_deref() == Some("die") && p == 0 {
                    return 0;
                }
                let mut seen = HashSet::new();
                for _ in 0..rounds {
                    let t = Tensor::<Flex, 1>::from_data(TensorData::new(values(p, n), [n]), &Default::default());
                    let r = collective::all_reduce::<Flex>(PeerId::from(p), t.into_primitive().tensor(), ReduceOperation::Sum).unwrap();
                    let r = Tensor::<Flex, 1>::from_primitive(burn::tensor::TensorPrimitive::Float(r));
                    let bits: Vec<u32> = r.into_data().to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect();
                    seen.insert(bits);
                }
                collective::finish_collective::<Flex>(PeerId::from(p)).unwrap();
                seen.len()
            })
        })
        .collect();
    let distinct: Vec<usize> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    println!("peers={peers} strategy={strategy:?} rounds={rounds}: distinct results per peer {distinct:?}");
}
