//! A run that starts sparse (`--init-density 0.5`): every sub-net's masks are drawn with ERK at
//! the start, so the whole model is at 0.5 while small layers are denser than large ones, and
//! the schedule (nothing to prune: targets equal the start) keeps it there.

use ast_tests::{cli, stderr, write_idx};

#[test]
fn an_erk_start_keeps_its_density_with_denser_small_layers() {
    let dir = tempfile::tempdir().unwrap();
    write_idx(dir.path(), "train", 64, 28);
    write_idx(dir.path(), "t10k", 16, 28);
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let data = dir.path().to_str().unwrap();
    let output = cli(&[
        "run",
        "--recipe",
        "quickstart",
        "--quiet",
        "--data-path",
        data,
        "--out",
        out_s,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--init-density",
        "0.5",
        "--densities",
        "0.5,0.5,0.5",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for s in summary["subnets"].as_array().unwrap() {
        let density = s["density"].as_f64().unwrap();
        assert!((density - 0.5).abs() < 0.005, "{s}");
    }
    let output = cli(&["stats", "--run", out_s]);
    assert!(output.status.success(), "{}", stderr(&output));
    // layer,weights,density_0,…: ERK gives the smallest layer a higher density than the largest.
    let stats = std::fs::read_to_string(out.join("stats.csv")).unwrap();
    let rows: Vec<(usize, f64)> = stats
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    let smallest = rows.iter().min_by_key(|r| r.0).unwrap();
    let largest = rows.iter().max_by_key(|r| r.0).unwrap();
    assert!(smallest.1 > largest.1 + 0.1, "{stats}");
    assert!(largest.1 < 0.5 && smallest.1 > 0.5, "{stats}");
}
