//! Plots (`ast_train::plot`, `ast-cli plot`): a finished run draws them into `plots/`; each is
//! a valid SVG document holding the run's series (one line per sub-net with one point per
//! epoch, event or layer, in the order of the run's values); `--compare` overlays runs; runs
//! that are going, torn or of another version are handled as said.

use std::path::Path;

use ast_tests::{cli, parallel_run_args, stderr, tiny_idx_data};

/// The data lines of an SVG document (polylines of more than two points: a legend's sample
/// line has two), each as its points.
fn lines(svg: &Path) -> Vec<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(svg).unwrap();
    let doc = roxmltree::Document::parse(&text)
        .unwrap_or_else(|e| panic!("{} is not XML: {e}", svg.display()));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .map(|n| {
            n.attribute("points")
                .unwrap()
                .split_whitespace()
                .map(|p| {
                    let (x, y) = p.split_once(',').unwrap();
                    (x.parse().unwrap(), y.parse().unwrap())
                })
                .collect::<Vec<(f64, f64)>>()
        })
        .filter(|points| points.len() > 2)
        .collect()
}

fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Whether the points' heights on the page rank as `values` do (SVG's y grows downwards).
fn ranks_as(points: &[(f64, f64)], values: &[f64]) -> bool {
    points.len() == values.len()
        && (0..values.len())
            .all(|i| (0..values.len()).all(|j| values[i] <= values[j] || points[i].1 < points[j].1))
}

/// A report page parsed as XML (it is written XHTML-clean: every element closed, text
/// escaped), its `<!DOCTYPE html>` allowed.
fn parse(text: &str) -> roxmltree::Document<'_> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    roxmltree::Document::parse_with_options(text, options)
        .unwrap_or_else(|e| panic!("the report does not parse: {e}"))
}

/// A report page's text, checked to parse, and whether it reloads itself.
fn report(path: &Path) -> (String, bool) {
    let text = std::fs::read_to_string(path).unwrap();
    let doc = parse(&text);
    let reloads = doc
        .descendants()
        .any(|n| n.has_tag_name("meta") && n.attribute("http-equiv") == Some("refresh"));
    (text, reloads)
}

/// A finished 3-epoch run of three sub-nets in `root/run`; returns its data and directory.
fn finished_run(root: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = tiny_idx_data(root, 96, 40);
    let run = root.join("run");
    let args = parallel_run_args(&data, &run, &[]);
    let output = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", stderr(&output));
    (data, run)
}

#[test]
fn a_finished_run_draws_its_plots_with_its_series() {
    let root = tempfile::tempdir().unwrap();
    let (data, run) = finished_run(root.path());
    let plots = run.join("plots");
    let metrics = records(&run.join("metrics.jsonl"));
    let last = &metrics.last().unwrap()["subnets"];
    let k = last.as_array().unwrap().len();
    assert_eq!((metrics.len(), k), (3, 3));

    // The main figure: one line through the sub-nets, by density, at their last top-1.
    let main = lines(&plots.join("top1_vs_density.svg"));
    assert_eq!(main.len(), 1);
    let mut finals: Vec<(f64, f64)> = (0..k)
        .map(|s| {
            let v = &last[s];
            (v["density"].as_f64().unwrap(), v["top1"].as_f64().unwrap())
        })
        .collect();
    finals.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(main[0].windows(2).all(|w| w[0].0 < w[1].0), "{main:?}");
    let top1: Vec<f64> = finals.iter().map(|f| f.1).collect();
    assert!(ranks_as(&main[0], &top1), "{main:?} vs {finals:?}");

    // Per epoch: one line per sub-net, one point per epoch.
    let per_epoch = lines(&plots.join("top1_per_epoch.svg"));
    assert_eq!(per_epoch.len(), k);
    for (s, line) in per_epoch.iter().enumerate() {
        let values: Vec<f64> = (metrics.iter())
            .map(|r| r["subnets"][s]["top1"].as_f64().unwrap())
            .collect();
        assert!(
            ranks_as(line, &values),
            "sub-net {s}: {line:?} vs {values:?}"
        );
    }
    // Test and training loss: two lines per sub-net.
    let loss = std::fs::read_to_string(plots.join("loss_per_epoch.svg")).unwrap();
    assert_eq!(
        lines(&plots.join("loss_per_epoch.svg")).len(),
        k,
        "test loss lines"
    );
    assert!(loss.contains("training"), "training loss in the legend");
    assert_eq!(lines(&plots.join("lr.svg")).len(), 1);

    // Density over iterations: one line per sub-net through its events.
    let events = records(&run.join("events.jsonl"));
    let density = lines(&plots.join("density.svg"));
    assert_eq!(density.len(), k);
    for (s, line) in density.iter().enumerate() {
        let own: Vec<f64> = (events.iter())
            .filter(|e| e["subnet"] == s)
            .map(|e| e["density"].as_f64().unwrap())
            .collect();
        assert_eq!(line.len(), own.len(), "sub-net {s}");
    }
    let svg = std::fs::read_to_string(plots.join("density.svg")).unwrap();
    assert!(svg.contains("ramp event") && svg.contains("regrow event"));

    // Per layer: one line per sub-net, one point per masked layer (small-cnn has four).
    let layers = lines(&plots.join("layers.svg"));
    assert_eq!(layers.len(), k);
    assert!(layers.iter().all(|l| l.len() == 4), "{layers:?}");

    // The report: one XHTML-clean page with every plot inline and the last evaluation; a
    // finished run's page does not reload.
    let (doc_text, reloads) = report(&run.join("report.html"));
    let doc = parse(&doc_text);
    let figures: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("figure"))
        .collect();
    assert_eq!(figures.len(), 6);
    assert!(figures
        .iter()
        .all(|f| f.children().any(|c| c.has_tag_name("svg"))));
    let first_table = doc.descendants().find(|n| n.has_tag_name("table")).unwrap();
    let rows = first_table
        .children()
        .filter(|n| n.has_tag_name("tr"))
        .count();
    assert_eq!(rows, k + 1, "a header and one row per sub-net");
    let top1 = format!("{:.2} %", 100.0 * last[2]["top1"].as_f64().unwrap());
    assert!(doc_text.contains(&top1), "{top1}");
    assert!(doc_text.contains("Mask overlap") && doc_text.contains("100.0 %"));
    assert!(!reloads, "a finished run's page reloads");
    // A run that is going (no summary yet): its page reloads.
    let summary = run.join("summary.json");
    std::fs::rename(&summary, run.join("summary.kept")).unwrap();
    let page = root.path().join("going.html");
    let output = cli(&[
        "report",
        "--run",
        run.to_str().unwrap(),
        "--out",
        page.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let (text, reloads) = report(&page);
    assert!(
        reloads && text.contains("running: 3 of 3 epochs evaluated"),
        "{text}"
    );
    std::fs::rename(run.join("summary.kept"), &summary).unwrap();

    // `plot` again with another run overlaid, into a directory of our choosing.
    let other = root.path().join("other");
    let mut args = parallel_run_args(&data, &other, &["--seed", "7"]);
    args.retain(|a| a != "--quiet");
    let output = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", stderr(&output));
    let out = root.path().join("compared");
    let (r, o, d) = (
        run.to_str().unwrap(),
        other.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let output = cli(&["plot", "--run", r, "--compare", o, "--out", d]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(lines(&out.join("top1_vs_density.svg")).len(), 2);
    assert_eq!(lines(&out.join("top1_per_epoch.svg")).len(), 2 * k);
    let legend = std::fs::read_to_string(out.join("top1_per_epoch.svg")).unwrap();
    assert!(legend.contains("run: sub-net 0") && legend.contains("other: sub-net 2"));
}

#[test]
fn runs_going_torn_or_foreign_are_plotted_partly_or_refused_in_one_line() {
    let root = tempfile::tempdir().unwrap();
    let (_, run) = finished_run(root.path());
    let r = run.to_str().unwrap();
    let metrics = run.join("metrics.jsonl");
    let whole = std::fs::read_to_string(&metrics).unwrap();
    let fail = |args: &[&str], expect: &str| {
        let output = cli(args);
        let err = stderr(&output);
        assert!(!output.status.success(), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!err.contains("panicked"), "{err}");
    };

    // A torn last line (a run being written, or killed): the rest is plotted, and said so.
    std::fs::write(&metrics, format!("{whole}{{\"epoch\":3,\"lr\"")).unwrap();
    let output = cli(&["plot", "--run", r]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("the torn last line of metrics.jsonl is left out"));
    let title = std::fs::read_to_string(run.join("plots/top1_per_epoch.svg")).unwrap();
    assert!(
        title.contains("torn last line"),
        "the plot says what it left out"
    );
    assert_eq!(lines(&run.join("plots/top1_per_epoch.svg"))[0].len(), 3);

    // A line of another version in the middle: refused, naming the line.
    let mut foreign: Vec<&str> = whole.lines().collect();
    foreign.insert(1, "{\"epoch\":1,\"accuracy\":0.5}");
    std::fs::write(&metrics, foreign.join("\n")).unwrap();
    fail(
        &["plot", "--run", r],
        "line 2 is not a record this version of ast writes",
    );

    // No finished epoch yet, and no run at all: plot refuses, the report says so and waits.
    std::fs::write(&metrics, "").unwrap();
    fail(&["plot", "--run", r], "has no finished epoch yet");
    let output = cli(&["report", "--run", r]);
    assert!(output.status.success(), "{}", stderr(&output));
    let (text, _) = report(&run.join("report.html"));
    assert!(text.contains("No epoch has been evaluated yet"), "{text}");
    let none = root.path().join("none");
    fail(&["plot", "--run", none.to_str().unwrap()], "holds no run");
    fail(&["report", "--run", none.to_str().unwrap()], "holds no run");
    // Output onto a file.
    std::fs::write(&metrics, &whole).unwrap();
    let file = root.path().join("a_file");
    std::fs::write(&file, "x").unwrap();
    fail(
        &["plot", "--run", r, "--out", file.to_str().unwrap()],
        "is not a directory",
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}
