//! The file format against its documentation, read with the `safetensors` crate alone (not
//! our loader), and every kind of bad file or call refused with its own error.

use std::collections::HashMap;

use ast_infer::{
    export, ConvSpec, Graph, Header, InferError, InferenceModel, NormRef, Op, Params, SubnetInfo,
    Values,
};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// conv (2 → 3 channels, 3×3, padding 1, switchable BatchNorm, ReLU) on 4×4 images, global
/// pooling, masked linear 3 → 2 with a bias; three sub-nets.
fn graph() -> Graph {
    Graph {
        input: [2, 4, 4],
        classes: 2,
        ops: vec![
            Op::Conv {
                input: 0,
                output: 1,
                layer: "conv".into(),
                masked: true,
                conv: ConvSpec {
                    c_in: 2,
                    c_out: 3,
                    in_hw: [4, 4],
                    kernel: [3, 3],
                    stride: [1, 1],
                    padding: [1, 1],
                    dilation: [1, 1],
                    groups: 1,
                    bias: false,
                },
                norm: Some(NormRef {
                    path: "bn".into(),
                    switchable: true,
                    epsilon: 1e-5,
                }),
                residual: None,
                relu: true,
            },
            Op::GlobalAvgPool {
                input: 1,
                output: 2,
                channels: 3,
            },
            Op::Linear {
                input: 2,
                output: 3,
                layer: "fc".into(),
                masked: true,
                d_in: 3,
                d_out: 2,
                bias: true,
            },
        ],
    }
}

fn params() -> Params {
    let mut p = Params::default();
    let values = |n: usize, seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 + seed * 11) % 17) as f32 / 8.0 - 1.0)
            .collect()
    };
    p.floats.insert("conv.weight".into(), values(54, 1));
    p.floats.insert("fc.weight".into(), values(6, 2));
    p.floats.insert("fc.bias".into(), vec![0.25, -0.5]);
    for k in 0..3 {
        // Sub-net 0 keeps every other weight, 1 every third, 2 a single conv weight.
        let conv: Vec<bool> = (0..54)
            .map(|i| match k {
                0 => i % 2 == 0,
                1 => i % 3 == 0,
                _ => i == 5,
            })
            .collect();
        p.masks.insert(format!("conv.masks.{k}"), conv);
        p.masks.insert(
            format!("fc.masks.{k}"),
            (0..6).map(|i| (i + k) % 2 == 0).collect(),
        );
        for (name, base) in [
            ("gamma", 1.0),
            ("beta", 0.1),
            ("running_mean", -0.2),
            ("running_var", 0.5),
        ] {
            let v = (0..3).map(|c| base + 0.1 * (c + k) as f32).collect();
            p.floats.insert(format!("bn.norms.{k}.{name}"), v);
        }
    }
    p
}

fn subnets(indices: &[usize]) -> Vec<SubnetInfo> {
    indices
        .iter()
        .map(|&k| SubnetInfo {
            trained_index: k,
            target: "0.5".into(),
            density: 0.0,
            top1: Some(90.0 - k as f64),
            top5: None,
            evaluated_on: Some("test".into()),
        })
        .collect()
}

/// The tiny model with parameters `p`, sub-nets `indices` of the run, f32 values.
fn export_tiny(p: &Params, indices: &[usize]) -> Result<(Vec<u8>, Header), InferError> {
    export(
        "tiny",
        &graph(),
        p,
        subnets(indices),
        Values::F32,
        serde_json::Value::Null,
    )
}

fn file(indices: &[usize]) -> Vec<u8> {
    export_tiny(&params(), indices).unwrap().0
}

fn f32s(t: &TensorView<'_>) -> Vec<f32> {
    assert_eq!(t.dtype(), Dtype::F32);
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Bit `p` of packed bits, least significant first (docs/model-format.md).
fn bit(bytes: &[u8], p: usize) -> bool {
    bytes[p / 8] >> (p % 8) & 1 == 1
}

/// The file's header (`__metadata__["ast"]`) as JSON.
fn header_json(bytes: &[u8]) -> serde_json::Value {
    let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
    serde_json::from_str(&meta.metadata().as_ref().unwrap()["ast"]).unwrap()
}

/// Sub-net `j`'s dense weight of masked layer `layer` (`len` weights) in file `bytes`, rebuilt
/// as docs/model-format.md says, with the `safetensors` crate alone.
fn rebuild(bytes: &[u8], layer: &str, len: usize, j: usize) -> Vec<f32> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let report = header_json(bytes)["report"].clone();
    let report = report
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["layer"] == layer)
        .unwrap()
        .clone();
    let u8s = |key: &str| {
        st.tensor(&format!("{layer}.{key}"))
            .map(|t| t.data().to_vec())
    };
    let u32s = |t: TensorView<'_>| -> Vec<usize> {
        assert_eq!(t.dtype(), Dtype::U32);
        t.data()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
            .collect()
    };
    let positions: Vec<usize> = if let Ok(union) = u8s("union") {
        (0..len).filter(|&q| bit(&union, q)).collect()
    } else if let Ok(gaps) = u8s("union_gaps") {
        // Gap bytes: skip that many positions, keep the next; 255 skips 255.
        let (mut next, mut kept) = (0, Vec::new());
        for b in gaps {
            if b == 255 {
                next += 255;
            } else {
                kept.push(next + b as usize);
                next += b as usize + 1;
            }
        }
        kept
    } else {
        // In-group indices: N per group of M along C of the weight viewed as [A, C, B],
        // groups in (a, c / M, b) order, ⌈log2 M⌉ bits each.
        let stream = u8s("union_nm").unwrap();
        let pattern = u32s(st.tensor(&format!("{layer}.union_nm_pattern")).unwrap());
        let [n, m, a, c, b] = pattern[..] else {
            panic!("{pattern:?}")
        };
        assert_eq!(a * c * b, len);
        let width = (m as f64).log2().ceil() as usize;
        let (mut q, mut kept) = (0, Vec::new());
        for ai in 0..a {
            for g in 0..c / m {
                for bi in 0..b {
                    for _ in 0..n {
                        let i: usize = (0..width)
                            .map(|t| usize::from(bit(&stream, q + t)) << t)
                            .sum();
                        q += width;
                        kept.push((ai * c + g * m + i) * b + bi);
                    }
                }
            }
        }
        kept.sort();
        kept
    };
    let values = f32s(&st.tensor(&format!("{layer}.values")).unwrap());
    assert_eq!(values.len(), positions.len());
    let keep: Vec<bool> = match u8s(&format!("subnet.{j}.bits")) {
        _ if report["encoding"][j] == "all" => vec![true; positions.len()],
        Ok(bits) => (0..positions.len()).map(|i| bit(&bits, i)).collect(),
        Err(_) => {
            let index = st.tensor(&format!("{layer}.subnet.{j}.index")).unwrap();
            let mut keep = vec![false; positions.len()];
            for i in u32s(index) {
                keep[i] = true;
            }
            keep
        }
    };
    let mut rebuilt = vec![0.0f32; len];
    for ((&q, &v), &k) in positions.iter().zip(&values).zip(&keep) {
        if k {
            rebuilt[q] = v;
        }
    }
    rebuilt
}

#[test]
fn every_sub_net_rebuilds_from_the_documented_layout_with_safetensors_alone() {
    // Sub-nets 2 and 0 of the run, in that order: file index j = 0 is run sub-net 2.
    let bytes = file(&[2, 0]);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let header = header_json(&bytes);
    assert_eq!(header["format"], "ast-subnets");
    // The fc's union is its even positions, which both keep: "all", so version 2.
    assert_eq!(header["version"], 2);
    assert_eq!(
        header["report"][1]["encoding"],
        serde_json::json!(["all", "all"])
    );
    assert!(st.tensor("fc.subnet.0.bits").is_err() && st.tensor("fc.subnet.0.index").is_err());
    assert_eq!(header["subnets"][0]["trained_index"], 2);
    let p = params();
    for (layer, len) in [("conv", 54), ("fc", 6)] {
        for (j, k) in [2, 0].into_iter().enumerate() {
            let rebuilt = rebuild(&bytes, layer, len, j);
            let (w, m) = (
                &p.floats[&format!("{layer}.weight")],
                &p.masks[&format!("{layer}.masks.{k}")],
            );
            let expected: Vec<f32> = w
                .iter()
                .zip(m)
                .map(|(&w, &m)| if m { w } else { 0.0 })
                .collect();
            assert_eq!(rebuilt, expected, "{layer}, sub-net {k}");
        }
    }
    // The union of run sub-nets 2 (position 5) and 0 (even positions) holds 28 positions;
    // sub-net 2's one position takes 4 bytes as an index, as many as bits: bits are kept.
    let report = &header["report"][0];
    assert_eq!(report["layer"], "conv");
    assert_eq!(report["union"], 28);
    assert_eq!(report["encoding"], serde_json::json!(["bits", "bits"]));
    assert_eq!(report["union_encoding"], "bits");
    // The folded BatchNorm of run sub-net 2: scale = γ/√(σ² + ε), shift = β − μ·scale.
    let scale = f32s(&st.tensor("bn.subnet.0.scale").unwrap());
    let shift = f32s(&st.tensor("bn.subnet.0.shift").unwrap());
    for c in 0..3 {
        let g = p.floats["bn.norms.2.gamma"][c];
        let (b, m, v) = (
            p.floats["bn.norms.2.beta"][c],
            p.floats["bn.norms.2.running_mean"][c],
            p.floats["bn.norms.2.running_var"][c],
        );
        let s = g / (v + 1e-5).sqrt();
        assert!((scale[c] - s).abs() < 1e-6 && (shift[c] - (b - m * s)).abs() < 1e-6);
    }
}

#[test]
fn a_sparse_union_is_stored_as_gaps_and_rebuilds() {
    let mut p = params();
    // One sub-net keeping conv positions 1 and 50 of 54: 2 gap bytes against 7 of bits.
    p.masks.insert(
        "conv.masks.0".into(),
        (0..54).map(|i| i == 1 || i == 50).collect(),
    );
    let (bytes, _) = export_tiny(&p, &[0]).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("conv.union_gaps").unwrap().data(), [1, 48]);
    assert!(st.tensor("conv.union").is_err());
    let model = InferenceModel::from_bytes(&bytes).unwrap();
    assert_eq!(model.forward(&[1.0; 32], 1).unwrap().len(), 2);
}

/// The tiny model with 32 input channels, and its parameters: run sub-net 0 is 1:8 and 1 is
/// 2:8 in the conv (its 3·32·9 weights are 108 groups of 8 input channels), targets `1:8` and
/// `2:8` (or `0.125` and `0.25` when `nm` is false); the fc is as in `params`.
fn nm_model(nm: bool) -> (Graph, Params, Vec<SubnetInfo>) {
    let mut graph = graph();
    graph.input = [32, 4, 4];
    if let Op::Conv { conv, .. } = &mut graph.ops[0] {
        conv.c_in = 32;
    }
    let mut p = params();
    let len = 3 * 32 * 9;
    let weight = (0..len).map(|i| ((i * 37) % 17) as f32 / 8.0 - 1.0);
    p.floats.insert("conv.weight".into(), weight.collect());
    for (k, keep) in [[0, 0], [0, 3]].into_iter().enumerate() {
        // Group (o, c / 8, r) keeps input channels (o + r + keep) mod 8 of its eight.
        let mask = (0..len).map(|q| {
            let (o, c, r) = (q / (32 * 9), q / 9 % 32, q % 9);
            keep.iter().any(|t| c % 8 == (o + r + t) % 8)
        });
        p.masks.insert(format!("conv.masks.{k}"), mask.collect());
    }
    let mut infos = subnets(&[0, 1]);
    let targets = if nm {
        ["1:8", "2:8"]
    } else {
        ["0.125", "0.25"]
    };
    for (info, target) in infos.iter_mut().zip(targets) {
        info.target = target.into();
    }
    (graph, p, infos)
}

fn export_nm(nm: bool, chosen: &[usize]) -> (Vec<u8>, Header) {
    let (graph, p, infos) = nm_model(nm);
    let infos = chosen.iter().map(|&k| infos[k].clone()).collect();
    export(
        "tiny",
        &graph,
        &p,
        infos,
        Values::F32,
        serde_json::Value::Null,
    )
    .unwrap()
}

#[test]
fn n_m_sub_nets_are_stored_as_in_group_indices_and_rebuild() {
    let (_, p, _) = nm_model(true);
    let len = 3 * 32 * 9;
    // Both: the union is 2:8 (108 groups × 2 × 3 bits = 81 bytes and a 20-byte pattern
    // against 108 bytes of bits); the 1:8 one alone: 41 + 20 bytes.
    for (chosen, n, bytes) in [(vec![0, 1], 2, 81), (vec![0], 1, 41)] {
        let (file, header) = export_nm(true, &chosen);
        assert_eq!(header.version, 2, "in-group indices: version 2");
        assert_eq!(header.report[0].union_encoding, format!("{n}:8"));
        assert_eq!(
            header.report[1].union_encoding, "bits",
            "d_in 3: not groups of 8"
        );
        let st = SafeTensors::deserialize(&file).unwrap();
        assert_eq!(st.tensor("conv.union_nm").unwrap().data().len(), bytes);
        let pattern: Vec<u8> = [n, 8, 3, 32, 9]
            .iter()
            .flat_map(|&x| (x as u32).to_le_bytes())
            .collect();
        assert_eq!(st.tensor("conv.union_nm_pattern").unwrap().data(), pattern);
        assert!(st.tensor("conv.union").is_err() && st.tensor("conv.union_gaps").is_err());
        for (j, &k) in chosen.iter().enumerate() {
            let expected: Vec<f32> = p.floats["conv.weight"]
                .iter()
                .zip(&p.masks[&format!("conv.masks.{k}")])
                .map(|(&w, &m)| if m { w } else { 0.0 })
                .collect();
            assert_eq!(rebuild(&file, "conv", len, j), expected, "sub-net {k}");
        }
    }
    // The runtime gives the same logits as from the same model stored as bits.
    let (nm, _) = export_nm(true, &[0, 1]);
    let (plain, header) = export_nm(false, &[0, 1]);
    assert_eq!(header.report[0].union_encoding, "bits");
    let (mut nm, mut plain) = (
        InferenceModel::from_bytes(&nm).unwrap(),
        InferenceModel::from_bytes(&plain).unwrap(),
    );
    let image: Vec<f32> = (0..32 * 16).map(|i| (i % 7) as f32 - 3.0).collect();
    for k in 0..2 {
        nm.set_subnet(k).unwrap();
        plain.set_subnet(k).unwrap();
        assert_eq!(
            nm.forward(&image, 1).unwrap(),
            plain.forward(&image, 1).unwrap()
        );
    }
}

/// `bytes` with tensor `key`'s data replaced by `data` and the checksum made to match.
fn with_tensor(bytes: &[u8], key: &str, data: &[u8]) -> Vec<u8> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
    let mut header: Header =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["ast"]).unwrap();
    let mut tensors: Vec<(String, TensorView<'_>)> = st.tensors();
    for (name, t) in &mut tensors {
        if name == key {
            *t = TensorView::new(t.dtype(), vec![data.len() * 8 / t.dtype().bitsize()], data)
                .unwrap();
        }
    }
    header.checksum = ast_infer::format::checksum(
        tensors
            .iter()
            .map(|(k, t)| (k.as_str(), t.dtype(), t.shape(), t.data())),
    );
    let json = serde_json::to_string(&header).unwrap();
    safetensors::serialize(tensors, Some(HashMap::from([("ast".to_string(), json)]))).unwrap()
}

#[test]
fn damaged_in_group_indices_are_refused() {
    let (file, _) = export_nm(true, &[0]);
    let st = SafeTensors::deserialize(&file).unwrap();
    let stream = st.tensor("conv.union_nm").unwrap().data().to_vec();
    let corrupt = |bytes: Vec<u8>| match error_of(&bytes) {
        InferError::Corrupt(why) => why,
        e => panic!("{e}"),
    };
    // A pattern whose view is not the layer's 864 weights.
    let pattern: Vec<u8> = [1u32, 8, 3, 32, 8]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let why = corrupt(with_tensor(&file, "conv.union_nm_pattern", &pattern));
    assert_eq!(why, "`conv.union_nm_pattern` does not fit 864 weights");
    // One index byte short; a bit set past the stream (108 × 3 = 324 bits: byte 40 holds 4).
    let why = corrupt(with_tensor(&file, "conv.union_nm", &stream[1..]));
    assert_eq!(why, "`conv.union_nm` is not 1:8 in-group indices");
    let mut past = stream.clone();
    past[40] |= 0x80;
    corrupt(with_tensor(&file, "conv.union_nm", &past));
    // 2:8 whose two indices in a group are not ascending: the first group's (3 bits each)
    // written as 5 then 2.
    let (file, _) = export_nm(true, &[0, 1]);
    let st = SafeTensors::deserialize(&file).unwrap();
    let mut stream = st.tensor("conv.union_nm").unwrap().data().to_vec();
    stream[0] = (stream[0] & !0b11_1111) | 0b010_101;
    let why = corrupt(with_tensor(&file, "conv.union_nm", &stream));
    assert_eq!(why, "`conv.union_nm` is not 2:8 in-group indices");
}

#[test]
fn a_sparse_enough_sub_net_is_stored_as_indices() {
    let mut p = params();
    // Sub-net 1 keeps one weight of a union of 54: 4 bytes of index against 7 of bits.
    p.masks.insert("conv.masks.0".into(), vec![true; 54]);
    p.masks
        .insert("conv.masks.1".into(), (0..54).map(|i| i == 40).collect());
    let (bytes, header) = export_tiny(&p, &[0, 1]).unwrap();
    assert_eq!(header.report[0].encoding, vec!["all", "index"]);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("conv.subnet.1.index").unwrap().data(),
        40u32.to_le_bytes()
    );
    let model = InferenceModel::from_bytes(&bytes).unwrap();
    assert_eq!(model.subnets(), 2);
}

fn error_of(bytes: &[u8]) -> InferError {
    InferenceModel::from_bytes(bytes).unwrap_err()
}

#[test]
fn bad_files_are_refused_each_with_its_own_error() {
    let bytes = file(&[0, 1, 2]);
    // Truncated.
    assert!(matches!(
        error_of(&bytes[..bytes.len() / 2]),
        InferError::NotSafetensors(_)
    ));
    assert!(matches!(
        error_of(b"not a model"),
        InferError::NotSafetensors(_)
    ));
    // A value changed.
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    assert_eq!(error_of(&flipped), InferError::Checksum);
    // Another program's safetensors file.
    let data = [0u8; 4];
    let view = TensorView::new(Dtype::F32, vec![1], &data).unwrap();
    let foreign = safetensors::serialize([("w", view)], None).unwrap();
    assert_eq!(error_of(&foreign), InferError::Foreign);
    // A newer format version: the same tensors under a header saying version 3. (Three
    // sub-nets of which none keeps a whole union, no N:M: written as version 1.)
    assert_eq!(header_json(&bytes)["version"], 1);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let json = meta.metadata().as_ref().unwrap()["ast"].replace("\"version\":1", "\"version\":3");
    let tensors: Vec<(String, TensorView<'_>)> = st.tensors();
    let newer =
        safetensors::serialize(tensors, Some(HashMap::from([("ast".to_string(), json)]))).unwrap();
    assert_eq!(
        error_of(&newer),
        InferError::Version {
            found: 3,
            supported: 2
        }
    );
    for e in [
        InferError::Checksum,
        InferError::Foreign,
        InferError::Version {
            found: 3,
            supported: 2,
        },
    ] {
        let text = e.to_string();
        assert!(!text.contains('\n') && text.contains("export"), "{text}");
    }
}

#[test]
fn bad_calls_are_refused() {
    let mut model = InferenceModel::from_bytes(&file(&[0, 1, 2])).unwrap();
    assert_eq!(
        model.set_subnet(3),
        Err(InferError::NoSubnet { index: 3, count: 3 })
    );
    assert_eq!(model.subnet(), 0);
    model.set_subnet(2).unwrap();
    let err = model.forward(&[0.0; 31], 1).unwrap_err();
    assert_eq!(
        err,
        InferError::Input {
            values: 31,
            batch: 1,
            shape: [2, 4, 4]
        }
    );
    assert!(err
        .to_string()
        .contains("31 input values are not a batch of 1 images of 2×4×4"));
    assert!(model.forward(&[], 0).is_err());
    assert_eq!(model.forward(&[0.5; 64], 2).unwrap().len(), 4);
}

#[test]
fn an_export_missing_a_parameter_names_it() {
    let mut p = params();
    p.floats.remove("bn.norms.1.running_var");
    let err = export_tiny(&p, &[0, 1]).unwrap_err();
    assert_eq!(
        err,
        InferError::Export("the model has no `bn.norms.1.running_var`".into())
    );
    let err = export_tiny(&params(), &[3]).unwrap_err();
    assert_eq!(
        err,
        InferError::Export("the model has no `bn.norms.3.gamma`".into())
    );
}

#[test]
fn the_same_export_gives_the_same_bytes() {
    assert_eq!(file(&[0, 2]), file(&[0, 2]));
}

#[test]
fn multiply_adds_count_the_active_weights_at_every_output_position() {
    // The conv's 4×4 output (padding 1) applies each active weight 16 times; the linear
    // layer's once. Sub-net 0: 27 conv weights (every other of 54), 3 of 6 linear ones;
    // sub-net 1: 18 and 3; sub-net 2: 1 and 3; dense: 54 and 6.
    let (bytes, _) = export_tiny(&params(), &[0, 1, 2]).unwrap();
    let model = InferenceModel::from_bytes(&bytes).unwrap();
    let counts: Vec<u64> = (0..3).map(|k| model.multiply_adds(k).unwrap()).collect();
    assert_eq!(counts, [27 * 16 + 3, 18 * 16 + 3, 16 + 3]);
    let dense = InferenceModel::dense_reference(&bytes).unwrap();
    assert_eq!(dense.multiply_adds(0).unwrap(), 54 * 16 + 6);
    assert!(matches!(
        model.multiply_adds(3),
        Err(InferError::NoSubnet { index: 3, count: 3 })
    ));
}
