//! Does burn-collective 0.21's multi-node path carry a training loop, i.e. several sequential
//! all-reduces? One orchestrator process and two node processes (one peer each) on loopback;
//! each node all-reduces (Mean) a small tensor `rounds` times and prints every result.
use burn::backend::Flex;
use burn::collective::{self, AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation};
use burn::prelude::*;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args[1].as_str() {
        "orchestrator" => {
            let port: u16 = args[2].parse().unwrap();
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(burn_collective::start_global_orchestrator(port));
        }
        _ => {
            let (global, data): (u16, u16) = (args[2].parse().unwrap(), args[3].parse().unwrap());
            let rounds: usize = args[4].parse().unwrap();
            let config = CollectiveConfig::default()
                .with_num_devices(1)
                .with_num_nodes(2)
                .with_global_address(format!("ws://127.0.0.1:{global}").parse().unwrap())
                .with_node_address(format!("ws://127.0.0.1:{data}").parse().unwrap())
                .with_data_service_port(data)
                .with_global_all_reduce_strategy(AllReduceStrategy::Centralized);
            let start = Instant::now();
            let peer = PeerId::from(0u32);
            collective::register::<Flex>(peer, Default::default(), config).unwrap();
            println!("node {data}: registered after {:.1} s", start.elapsed().as_secs_f64());
            for round in 0..rounds {
                let t = Tensor::<Flex, 1>::from_floats([data as f32, round as f32], &Default::default());
                let r = collective::all_reduce::<Flex>(peer, t.into_primitive().tensor(), ReduceOperation::Mean);
                match r {
                    Ok(r) => {
                        let r = Tensor::<Flex, 1>::from_primitive(burn::tensor::TensorPrimitive::Float(r));
                        println!(
                            "node {data}: all-reduce {round} = {:?} after {:.1} s",
                            r.into_data().to_vec::<f32>().unwrap(),
                            start.elapsed().as_secs_f64()
                        );
                    }
                    Err(e) => println!("node {data}: all-reduce {round} failed: {e:?}"),
                }
            }
            collective::finish_collective::<Flex>(peer).unwrap();
            println!("node {data}: done");
        }
    }
}
