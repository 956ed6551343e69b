//! A run's report: one self-contained HTML page (`report.html` in the run directory) with the
//! run's plots inline, its state, the last evaluation of every sub-net, how much the sub-nets'
//! masks overlap, the configuration and the mask-event timeline. A run writes it after every
//! epoch and at its end; while the run is going the page reloads itself every 30 s, so a browser
//! left open on it follows the run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::checkpoint::{self, MASKS_FILE};
use crate::error::{Result, TrainError};
use crate::metrics::write_atomic;
use crate::plot::{self, RunPlotData, PLOTS_DIR, PLOT_FILES};

/// The report's file in a run directory.
pub const REPORT_FILE: &str = "report.html";

/// Seconds between reloads of the page of a run that is going.
const RELOAD_S: u32 = 30;

/// Draws the plots of run `dir` into its `plots/` and writes its report to `out` (default:
/// `report.html` in the run); `finished` says whether the run is done (then the page does not
/// reload). A run without a finished epoch gets a page that says so (and reloads).
pub fn write_report(dir: &Path, out: Option<&Path>, finished: bool) -> Result<PathBuf> {
    let out = out.map_or_else(|| dir.join(REPORT_FILE), Path::to_path_buf);
    let config = std::fs::read_to_string(dir.join("config.json"))
        .map_err(|_| TrainError::NoRun(dir.to_path_buf()))?;
    let run = match plot::read_run(dir) {
        Ok(run) => Some(run),
        // Nothing evaluated yet: the page says so and waits.
        Err(TrainError::NoEpochYet(_)) => None,
        Err(e) => return Err(e),
    };
    let svgs: Vec<String> = match &run {
        Some(run) => plot::write_plots(std::slice::from_ref(run), &dir.join(PLOTS_DIR))?
            .into_iter()
            .map(|(_, svg)| svg)
            .collect(),
        None => Vec::new(),
    };
    let overlap = match checkpoint::latest(dir)? {
        Some(latest) if latest.join(MASKS_FILE).is_file() => mask_overlap(&latest)?,
        _ => Vec::new(),
    };
    let html = page(dir, &config, run.as_ref(), &svgs, &overlap, finished);
    write_atomic(&out, html.as_bytes())?;
    Ok(out)
}

/// `overlap[i][j]`: the share of sub-net `j`'s active weights that sub-net `i` keeps too, over
/// every masked layer of checkpoint `dir`.
pub fn mask_overlap(dir: &Path) -> Result<Vec<Vec<f64>>> {
    let path = dir.join(MASKS_FILE);
    let bytes = std::fs::read(&path).map_err(|e| TrainError::io(&path, e))?;
    let masks =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| TrainError::io(&path, e))?;
    // Per layer, every sub-net's packed bits.
    let mut layers: std::collections::BTreeMap<String, Vec<(usize, Vec<u8>)>> = Default::default();
    for (name, view) in masks.tensors() {
        if let Some((layer, k)) = name.rsplit_once(".masks.") {
            let k: usize = k.parse().map_err(|_| TrainError::Io {
                path: path.clone(),
                reason: format!("`{name}` names no sub-net"),
            })?;
            layers
                .entry(layer.to_string())
                .or_default()
                .push((k, view.data().to_vec()));
        }
    }
    let subnets = layers.values().map(|l| l.len()).max().unwrap_or(0);
    let mut both = vec![vec![0u64; subnets]; subnets];
    for masks in layers.values_mut() {
        masks.sort_by_key(|(k, _)| *k);
        for (i, (_, a)) in masks.iter().enumerate() {
            for (j, (_, b)) in masks.iter().enumerate() {
                both[i][j] += (a.iter().zip(b))
                    .map(|(x, y)| u64::from((x & y).count_ones()))
                    .sum::<u64>();
            }
        }
    }
    Ok((0..subnets)
        .map(|i| {
            (0..subnets)
                .map(|j| both[i][j] as f64 / both[j][j].max(1) as f64)
                .collect()
        })
        .collect())
}

/// `text` with HTML's special characters escaped.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page(
    dir: &Path,
    config: &str,
    run: Option<&RunPlotData>,
    svgs: &[String],
    overlap: &[Vec<f64>],
    finished: bool,
) -> String {
    let name = run.map_or_else(|| dir.display().to_string(), |r| r.name.clone());
    let epochs = serde_json::from_str::<serde_json::Value>(config)
        .ok()
        .and_then(|c| c["epochs"].as_u64());
    let done = run.map_or(0, |r| r.epochs.len());
    let state = match (finished, epochs) {
        (true, _) => format!("finished: {done} epochs"),
        (false, Some(e)) => {
            format!("running: {done} of {e} epochs evaluated; this page reloads every {RELOAD_S} s")
        }
        (false, None) => format!("running; this page reloads every {RELOAD_S} s"),
    };
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n{}<title>AST run \
         {}</title>\n<style>\nbody {{ font-family: sans-serif; margin: 24px auto; max-width: \
         1600px; color: #222; }}\nh1 {{ font-size: 22px; }} h2 {{ font-size: 18px; margin-top: \
         28px; }}\n.state {{ padding: 6px 10px; background: #eef4fb; display: inline-block; }}\n\
         table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 3px \
         9px; text-align: right; }}\n.plots {{ display: flex; flex-wrap: wrap; gap: 12px; }}\n\
         .plots figure {{ margin: 0; }} .plots svg {{ border: 1px solid #ddd; }}\npre {{ background: #f6f6f6; padding: 10px; \
         font-size: 12px; }}\n.note {{ color: #a33; }}\n</style>\n</head>\n<body>\n<h1>AST run \
         {}</h1>\n<p class=\"state\">{}</p>\n",
        match finished {
            true => String::new(),
            false => format!("<meta http-equiv=\"refresh\" content=\"{RELOAD_S}\"/>\n"),
        },
        escape(&name),
        escape(&name),
        escape(&state)
    );
    let Some(run) = run else {
        h.push_str("<p>No epoch has been evaluated yet: nothing to plot.</p>\n");
        let _ = write!(h, "<h2>Configuration</h2>\n<pre>{}</pre>\n", escape(config));
        h.push_str("</body>\n</html>\n");
        return h;
    };
    for note in &run.notes {
        let _ = writeln!(h, "<p class=\"note\">Left out: {}</p>", escape(note));
    }
    if let Some(last) = run.epochs.last() {
        let _ = write!(
            h,
            "<h2>Sub-nets after epoch {}</h2>\n<table>\n<tr><th>sub-net</th><th>density</th>\
             <th>sparsity</th><th>test loss</th><th>top-1</th><th>top-5</th></tr>\n",
            last.epoch + 1
        );
        for s in &last.subnets {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{:.4}</td><td>{:.2} %</td><td>{:.4}</td><td>{:.2} %</td>\
                 <td>{:.2} %</td></tr>",
                s.subnet,
                s.density,
                100.0 * (1.0 - s.density),
                s.loss,
                100.0 * s.top1,
                100.0 * s.top5
            );
        }
        h.push_str("</table>\n");
    }
    h.push_str("<h2>Plots</h2>\n<div class=\"plots\">\n");
    for (file, svg) in PLOT_FILES.iter().zip(svgs) {
        let _ = writeln!(
            h,
            "<figure id=\"{}\">{svg}</figure>",
            file.trim_end_matches(".svg")
        );
    }
    h.push_str("</div>\n");
    if !overlap.is_empty() {
        h.push_str(
            "<h2>Mask overlap</h2>\n<p>Row i, column j: the share of sub-net j's active weights \
             that sub-net i keeps too (latest checkpoint).</p>\n<table>\n<tr><th></th>",
        );
        for j in 0..overlap.len() {
            let _ = write!(h, "<th>sub-net {j}</th>");
        }
        h.push_str("</tr>\n");
        for (i, row) in overlap.iter().enumerate() {
            let _ = write!(h, "<tr><th>sub-net {i}</th>");
            for v in row {
                let _ = write!(h, "<td>{:.1} %</td>", 100.0 * v);
            }
            h.push_str("</tr>\n");
        }
        h.push_str("</table>\n");
    }
    let _ = write!(
        h,
        "<h2>Mask events</h2>\n<details><summary>{} events (iteration, sub-net, kind, density \
         after)</summary>\n<table>\n<tr><th>iteration</th><th>sub-net</th><th>kind</th>\
         <th>density</th></tr>\n",
        run.events.len()
    );
    for e in &run.events {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.4}</td></tr>",
            e.iteration,
            e.subnet,
            escape(&e.kind),
            e.density
        );
    }
    h.push_str("</table>\n</details>\n");
    let _ = write!(h, "<h2>Configuration</h2>\n<pre>{}</pre>\n", escape(config));
    h.push_str("</body>\n</html>\n");
    h
}
