//! `ast-cli` end to end on real Fashion-MNIST (Debian's `dataset-fashion-mnist`, installed by
//! `.ci/run`): a short AST run with three sub-nets, then `eval` and `stats` on its run directory.

use ast_tests::{cli, fashion_mnist_available, stderr};

/// Runs `ast-cli args`, which must fail with one error line containing `expected`.
fn fails_with(args: &[&str], expected: &str) {
    let output = cli(args);
    let err = stderr(&output);
    assert!(
        !output.status.success() && err.contains(expected),
        "{args:?}: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn run_eval_and_stats_on_real_fashion_mnist() {
    if !fashion_mnist_available("run_eval_and_stats_on_real_fashion_mnist") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    // The run's recipe flags, shared with `schedule` below.
    let recipe = [
        "--recipe",
        "quickstart",
        "--train-subset",
        "1536",
        "--epochs",
        "2",
        "--final-prune-epoch",
        "1",
        "--update-frequency",
        "4",
        "--subnet-offset",
        "1",
        "--densities",
        "0.5,0.2,0.1",
    ];
    let mut args = vec!["run", "--out", out_s, "--quiet", "--test-subset", "500"];
    args.extend(recipe);
    let output = cli(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("sub-net"), "{stdout}");

    // Every sub-net reached its density and beats chance (10 classes) after this tiny schedule.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let subnets = summary["subnets"].as_array().unwrap();
    assert_eq!(subnets.len(), 3);
    for (s, target) in subnets.iter().zip([0.5, 0.2, 0.1]) {
        let density = s["density"].as_f64().unwrap();
        assert!((density - target).abs() < 0.01, "{s}");
        assert!(s["top1"].as_f64().unwrap() > 0.15, "{s}"); // chance is 0.10
    }
    // Per-epoch metrics, both formats; the resolved config; checkpoints.
    let jsonl = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), 2);
    // events.jsonl holds exactly the events `ast-cli schedule` predicts for these flags, with
    // what each did.
    let mut args = vec!["schedule", "--json"];
    args.extend(recipe);
    let schedule = cli(&args);
    assert!(schedule.status.success(), "{}", stderr(&schedule));
    let events = std::fs::read_to_string(out.join("events.jsonl")).unwrap();
    let planned: Vec<serde_json::Value> = String::from_utf8_lossy(&schedule.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let happened: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(planned.len() >= 6, "{planned:?}");
    assert_eq!(happened.len(), planned.len());
    for (h, p) in happened.iter().zip(&planned) {
        for field in [
            "iteration",
            "subnet",
            "kind",
            "target_density",
            "prune_rate",
        ] {
            assert_eq!(h[field], p[field], "{field}: {h} vs {p}");
        }
        assert!(
            h["density"].as_f64().unwrap() > 0.0 && h["changed"].is_u64(),
            "{h}"
        );
    }
    // Each record has every sub-net's training loss and top-1 over its own iterations.
    let last: serde_json::Value = serde_json::from_str(jsonl.lines().last().unwrap()).unwrap();
    let train = last["train"].as_array().unwrap();
    assert_eq!(train.len(), 3, "{last}");
    for (k, t) in train.iter().enumerate() {
        assert_eq!(t["subnet"], k);
        assert!(t["loss"].as_f64().unwrap() > 0.0, "{t}");
        let top1 = t["top1"].as_f64().unwrap();
        assert!(top1 > 0.15 && top1 <= 1.0, "{t}"); // chance is 0.10
    }
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 * 3);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["epochs"], 2);
    assert_eq!(config["ast"]["schedule"]["update_frequency"], 4);
    assert!(out
        .join("checkpoints/epoch-0002/model.safetensors")
        .exists());

    let output = cli(&["eval", "--run", out_s]);
    assert!(output.status.success(), "{}", stderr(&output));
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    for (e, s) in eval["subnets"].as_array().unwrap().iter().zip(subnets) {
        assert_eq!(
            e["top1"], s["top1"],
            "eval of the checkpoint reproduces the run's last evaluation"
        );
    }

    // The most accurate sub-net within a latency budget: every sub-net fits a generous one.
    let output = cli(&[
        "eval",
        "--run",
        out_s,
        "--latency-budget-ms",
        "100000",
        "--latency-batch",
        "2",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    let latency = &eval["latency"];
    let medians = latency["median_s"].as_array().unwrap();
    assert_eq!(medians.len(), 3, "{latency}");
    assert!(
        medians.iter().all(|t| t.as_f64().unwrap() > 0.0),
        "{latency}"
    );
    let top1: Vec<f64> = (eval["subnets"].as_array().unwrap().iter())
        .map(|s| s["top1"].as_f64().unwrap())
        .collect();
    let chosen = latency["chosen"].as_u64().unwrap() as usize;
    assert!(
        top1.iter().all(|&t| t <= top1[chosen]),
        "{top1:?} {latency}"
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains(&format!("sub-net {chosen} (density")),
        "{printed}"
    );
    // None fits a budget below the fastest: one error line, eval.json left as it was.
    let before = std::fs::read(out.join("eval.json")).unwrap();
    let args = ["eval", "--run", out_s, "--latency-budget-ms", "0.000001"];
    fails_with(&args, "no sub-net runs within 0.000001 ms");
    assert_eq!(std::fs::read(out.join("eval.json")).unwrap(), before);
    let output = cli(&["eval", "--run", out_s, "--latency-budget-ms", "-3"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("not a latency budget"),
        "{}",
        stderr(&output)
    );

    // The sub-nets leave the run: one file, the same predictions through the runtime.
    let file = dir.path().join("subnets.safetensors");
    let file_s = file.to_str().unwrap();
    let output = cli(&["export", "--run", out_s, "--out", file_s]);
    assert!(output.status.success(), "{}", stderr(&output));
    // The checkpoint's weights and masks (as bits): the three sub-nets take less.
    let size = |f: &str| {
        std::fs::metadata(out.join("checkpoints/epoch-0002").join(f))
            .unwrap()
            .len()
    };
    let (weights, masks) = (size("model.safetensors"), size("masks.safetensors"));
    let exported = std::fs::metadata(&file).unwrap().len();
    assert!(
        exported < weights + masks,
        "{exported} B against a checkpoint of {weights} + {masks} B"
    );
    // The masks take a bit per position: K = 3 bits per weight, against 32 bits a weight.
    assert!(
        masks * 8 < weights,
        "{masks} B of masks, {weights} B of weights"
    );
    let before = std::fs::read(&file).unwrap();
    let args = ["export", "--run", out_s, "--out", file_s, "--subnets", "0"];
    fails_with(&args, "exists: pass --overwrite");
    assert_eq!(std::fs::read(&file).unwrap(), before);

    let results = dir.path().join("infer.json");
    let output = cli(&[
        "infer",
        "--model",
        file_s,
        "--json",
        results.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let infer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&results).unwrap()).unwrap();
    assert_eq!(infer["images"], 500);
    let eval_top1: Vec<f64> = (eval["subnets"].as_array().unwrap().iter())
        .map(|s| 100.0 * s["top1"].as_f64().unwrap())
        .collect();
    for (k, r) in infer["subnets"].as_array().unwrap().iter().enumerate() {
        let top1 = r["top1"].as_f64().unwrap();
        // One image of 500 is 0.2 points: the runtime classifies every image as eval did.
        assert!(
            (top1 - eval_top1[k]).abs() < 0.05,
            "sub-net {k}: {top1} against {eval_top1:?}"
        );
        assert_eq!(r["exported_top1"].as_f64().unwrap(), eval_top1[k]);
    }
    // A directory of images (the first test images as PNG files): every sub-net's predicted
    // class is the runtime's on the same images read through the run's test pipeline.
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let n = 12;
    let (_, test) = ast_train::data::read_mnist_dir(ast_tests::FASHION_MNIST).unwrap();
    for i in 0..n {
        let pixels = test.images[i * 28 * 28..(i + 1) * 28 * 28].to_vec();
        let png = image::GrayImage::from_raw(28, 28, pixels).unwrap();
        png.save(images.join(format!("test-{i:02}.png"))).unwrap();
    }
    let predicted = dir.path().join("predicted.json");
    let args = [
        "infer",
        "--model",
        file_s,
        "--images",
        images.to_str().unwrap(),
        "--json",
        predicted.to_str().unwrap(),
    ];
    let output = cli(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let predicted: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&predicted).unwrap()).unwrap();
    let rows = predicted["predictions"].as_array().unwrap();
    assert_eq!(rows.len(), n);
    let config = ast_train::read_run_config(&out).unwrap();
    let kind: ast_models::ModelKind = config.model.parse().unwrap();
    let source = ast_train::load_data(&config, &kind).unwrap().test;
    let batch = ast_train::data::Loader::new(source, n, 0, false)
        .epoch(0, 0)
        .next()
        .unwrap()
        .unwrap();
    let runtime = ast_infer::InferenceModel::load(&file).unwrap();
    for k in 0..3 {
        let expected = runtime.forward_subnet(k, &batch.images, n).unwrap();
        let expected: Vec<usize> = expected.chunks(10).map(ast_infer::argmax).collect();
        let got: Vec<usize> = rows
            .iter()
            .map(|r| r["classes"][k].as_u64().unwrap() as usize)
            .collect();
        assert_eq!(got, expected, "sub-net {k}");
    }
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("test-00.png  sub-net 0: "), "{printed}");
    // An image of another size, or a directory without images: one line each.
    image::GrayImage::new(30, 28)
        .save(images.join("wide.png"))
        .unwrap();
    let mut wrong = args.to_vec();
    wrong.truncate(5);
    fails_with(
        &wrong,
        "wide.png: 30×28 pixels, but the model was trained on 28×28 images",
    );
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    wrong[4] = empty.to_str().unwrap();
    fails_with(&wrong, "no .png, .jpg or .jpeg files");

    let output = cli(&[
        "infer",
        "--model",
        file_s,
        "--subnet",
        "auto",
        "--budget-ms",
        "100000",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    // Every sub-net fits: the chosen one has the best top-1 (equal ones: the faster).
    let printed = String::from_utf8_lossy(&output.stdout);
    let best = eval_top1.iter().copied().fold(f64::MIN, f64::max);
    let chosen = (0..3).find(|k| printed.contains(&format!("per batch of 64: sub-net {k}")));
    assert!(
        chosen.is_some_and(|k| eval_top1[k] == best),
        "{printed} {eval_top1:?}"
    );

    let timings = dir.path().join("bench.json");
    let output = cli(&[
        "bench-infer",
        "--model",
        file_s,
        "--batch",
        "1,3",
        "--runs",
        "2",
        "--json",
        timings.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let bench: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&timings).unwrap()).unwrap();
    let rows = bench["timings"].as_array().unwrap();
    assert_eq!(
        rows.len(),
        2 * 4,
        "dense and 3 sub-nets at 2 batch sizes: {bench}"
    );
    assert!(
        rows.iter().all(|r| r["median_ms"].as_f64().unwrap() > 0.0),
        "{bench}"
    );

    // Calibrated on this machine, the pick reads the stored latencies instead of measuring.
    let output = cli(&[
        "calibrate",
        "--model",
        file_s,
        "--batch",
        "1",
        "--runs",
        "2",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let args = [
        "infer",
        "--model",
        file_s,
        "--subnet",
        "auto",
        "--budget-ms",
        "100000",
        "--batch",
        "1",
    ];
    let output = cli(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("from the file's calibration"), "{printed}");

    // The PyTorch-named export covers the original's CIFAR ResNets, one sub-net at a time.
    let torch_file = dir.path().join("torch.safetensors");
    let torch_s = torch_file.to_str().unwrap();
    for (extra, expected) in [
        (
            vec![],
            "--format pytorch writes one sub-net: give --subnets K",
        ),
        (
            vec!["--subnets", "1"],
            "--format pytorch: the original's names are mapped for its CIFAR models",
        ),
    ] {
        let mut args = vec![
            "export", "--run", out_s, "--format", "pytorch", "--out", torch_s,
        ];
        args.extend(extra);
        fails_with(&args, expected);
        assert!(!torch_file.exists());
    }

    // Not a sub-net file, or no such sub-net: one line each.
    for (args, expected) in [
        (
            vec![
                "infer",
                "--model",
                out.join("config.json").to_str().unwrap(),
            ],
            "not a readable safetensors file",
        ),
        (
            vec!["infer", "--model", file_s, "--subnet", "7"],
            "sub-net 7 does not exist: the file holds 3",
        ),
        (
            vec!["infer", "--model", file_s, "--subnet", "auto"],
            "--subnet auto needs --budget-ms",
        ),
        (
            vec![
                "infer",
                "--model",
                file_s,
                "--subnet",
                "auto",
                "--budget-ms",
                "0.000001",
            ],
            "no sub-net runs within",
        ),
    ] {
        fails_with(&args, expected);
    }

    let output = cli(&["stats", "--run", out_s]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stats = std::fs::read_to_string(out.join("stats.csv")).unwrap();
    assert!(
        stats.starts_with("layer,weights,density_0,density_1,density_2,iou_0_1"),
        "{stats}"
    );
    assert_eq!(
        stats.lines().count(),
        1 + 4,
        "header + the 4 masked layers of small-cnn"
    );
}
