//! Plots of run directories as SVG, drawn by plotters' SVG backend (no fonts and no system
//! libraries: the text is written as SVG text and drawn by whatever shows the file).
//!
//! [`read_run`] gathers what a run directory holds (per-epoch metrics, mask events, the latest
//! checkpoint's masks), tolerating what a run that is still going or was killed leaves (a torn
//! last line is left out and said so); [`write_plots`] draws:
//! - `top1_vs_density.svg`: every sub-net's last top-1 against its density, one line per run
//!   (the paper's main figure; several runs overlaid);
//! - `top1_per_epoch.svg`, `loss_per_epoch.svg` (test loss solid, training loss dashed) and
//!   `lr.svg`: per epoch, every sub-net of every run;
//! - `density.svg`: each sub-net's density over the iterations from `events.jsonl`, its ramp
//!   and regrow events marked (the first run);
//! - `layers.svg`: each masked layer's density per sub-net in the latest checkpoint (the first
//!   run).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Deserialize;

use crate::checkpoint::{self, MASKS_FILE};
use crate::error::{Result, TrainError};
use crate::metrics::{write_atomic, EpochRecord, METRICS_FILE};

/// One mask event of `events.jsonl`, as far as the plots need it.
#[derive(Debug, Clone, Deserialize)]
pub struct MaskEvent {
    /// Global iteration.
    pub iteration: usize,
    /// The sub-net it changed.
    pub subnet: usize,
    /// `"ramp"` or `"regrow"`.
    pub kind: String,
    /// The sub-net's density after it.
    pub density: f64,
}

/// One masked layer's density in every sub-net.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerDensity {
    /// The layer's path in the model.
    pub layer: String,
    /// Its density in sub-net 0, 1, ….
    pub densities: Vec<f64>,
}

/// What the plots show of one run directory.
#[derive(Debug, Clone)]
pub struct RunPlotData {
    /// The run's name in legends (its directory's name).
    pub name: String,
    /// Its per-epoch records.
    pub epochs: Vec<EpochRecord>,
    /// Its mask events.
    pub events: Vec<MaskEvent>,
    /// Per-layer densities of its latest checkpoint (empty without one).
    pub layers: Vec<LayerDensity>,
    /// What was left out, said on the plots.
    pub notes: Vec<String>,
}

/// The directory of a run that holds its plots.
pub const PLOTS_DIR: &str = "plots";

/// The files [`write_plots`] writes.
pub const PLOT_FILES: [&str; 6] = [
    "top1_vs_density.svg",
    "top1_per_epoch.svg",
    "loss_per_epoch.svg",
    "lr.svg",
    "density.svg",
    "layers.svg",
];

/// Reads what the plots need from run directory `dir`. A run without a finished epoch is an
/// error (nothing to plot); a torn last line of `metrics.jsonl` or `events.jsonl` (a run
/// being written or killed) is left out and noted; any other unreadable line is an error
/// that names it.
pub fn read_run(dir: &Path) -> Result<RunPlotData> {
    if !dir.is_dir() {
        return Err(TrainError::NoRun(dir.to_path_buf()));
    }
    let mut notes = Vec::new();
    let metrics = dir.join(METRICS_FILE);
    let epochs: Vec<EpochRecord> = read_lines(&metrics, &mut notes)?;
    if epochs.is_empty() {
        return Err(TrainError::NoEpochYet(dir.to_path_buf()));
    }
    let events = read_lines(&dir.join("events.jsonl"), &mut notes)?;
    let layers = match checkpoint::latest(dir)? {
        Some(latest) if latest.join(MASKS_FILE).is_file() => layer_densities(&latest)?,
        _ => {
            notes.push("no checkpoint with packed masks: no per-layer densities".into());
            Vec::new()
        }
    };
    let name = (dir.canonicalize().ok())
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    Ok(RunPlotData {
        name,
        epochs,
        events,
        layers,
        notes,
    })
}

/// The records of a JSON-lines file (none when it is missing); a last line that does not
/// parse is left out with a note.
fn read_lines<T: for<'de> Deserialize<'de>>(
    path: &Path,
    notes: &mut Vec<String>,
) -> Result<Vec<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainError::io(path, e)),
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut records = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(record) => records.push(record),
            Err(_) if i + 1 == lines.len() => {
                let file = path.file_name().unwrap_or_default().to_string_lossy();
                notes.push(format!("the torn last line of {file} is left out"));
            }
            Err(e) => {
                return Err(TrainError::Io {
                    path: path.to_path_buf(),
                    reason: format!(
                        "line {} is not a record this version of ast writes ({e}); a run of \
                         another version cannot be plotted",
                        i + 1
                    ),
                })
            }
        }
    }
    Ok(records)
}

/// Each masked layer's density per sub-net in checkpoint `dir`: the set bits of its packed
/// masks over the size of the layer's weight (from the model file's header).
fn layer_densities(dir: &Path) -> Result<Vec<LayerDensity>> {
    let masks_path = dir.join(MASKS_FILE);
    let bytes = std::fs::read(&masks_path).map_err(|e| TrainError::io(&masks_path, e))?;
    let masks = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| TrainError::io(&masks_path, e))?;
    let model_path = dir.join(checkpoint::MODEL_FILE);
    let shapes = header_shapes(&model_path)?;
    let mut layers: BTreeMap<(usize, String), Vec<(usize, f64)>> = BTreeMap::new();
    for (name, view) in masks.tensors() {
        let Some((layer, k)) = name.rsplit_once(".masks.") else {
            continue;
        };
        let (Ok(k), Some(shape)) = (k.parse::<usize>(), shapes.get(&format!("{layer}.weight")))
        else {
            return Err(TrainError::Io {
                path: masks_path.clone(),
                reason: format!("mask `{name}` belongs to no weight of the model file"),
            });
        };
        let numel: usize = shape.1.iter().product();
        let set: u32 = view.data().iter().map(|b| b.count_ones()).sum();
        // Layers in the model file's order (the order of its header offsets).
        layers
            .entry((shape.0, layer.to_string()))
            .or_default()
            .push((k, set as f64 / numel.max(1) as f64));
    }
    Ok(layers
        .into_iter()
        .map(|((_, layer), mut by_subnet)| {
            by_subnet.sort_by_key(|&(k, _)| k);
            LayerDensity {
                layer,
                densities: by_subnet.into_iter().map(|(_, d)| d).collect(),
            }
        })
        .collect())
}

/// Every tensor's (offset in the file, shape) from a safetensors file's header, without
/// reading its data.
fn header_shapes(path: &Path) -> Result<BTreeMap<String, (usize, Vec<usize>)>> {
    use std::io::Read;
    let bad = |reason: String| TrainError::Io {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| bad(format!("no safetensors header: {e}")))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(format!(
            "a header of {len} bytes is not a safetensors file's"
        )));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| bad(format!("truncated header: {e}")))?;
    #[derive(Deserialize)]
    struct Entry {
        shape: Vec<usize>,
        data_offsets: [usize; 2],
    }
    let entries: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("unreadable header: {e}")))?;
    Ok(entries
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .filter_map(|(name, value)| {
            let entry: Entry = serde_json::from_value(value).ok()?;
            Some((name, (entry.data_offsets[0], entry.shape)))
        })
        .collect())
}

const WIDTH: u32 = 760;
const HEIGHT: u32 = 460;

/// Line colours, one per series (Tableau's ten).
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// One line of a plot: its legend label, colour, points, and whether it is dashed.
struct Series {
    label: String,
    colour: RGBColor,
    points: Vec<(f64, f64)>,
    dashed: bool,
}

/// Marks drawn without a line (events): label, points, and whether crosses (else circles).
struct Marks {
    label: String,
    points: Vec<(f64, f64)>,
    crosses: bool,
}

/// A plot's texts and axes.
struct Frame<'a> {
    title: String,
    x_desc: &'a str,
    y_desc: &'a str,
    log_x: bool,
    /// Label only whole numbers on x (epochs, layers).
    integer_x: bool,
}

/// Writes every plot of `runs` (the first is the main run; runs without an epoch are left
/// out) into `out` (created if missing); returns each file written with its SVG document
/// (none without a run).
pub fn write_plots(runs: &[RunPlotData], out: &Path) -> Result<Vec<(PathBuf, String)>> {
    let runs: &[&RunPlotData] = &runs
        .iter()
        .filter(|r| !r.epochs.is_empty())
        .collect::<Vec<_>>();
    let Some(&main) = runs.first() else {
        return Ok(Vec::new());
    };
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    let notes: Vec<&String> = runs.iter().flat_map(|r| &r.notes).collect();
    let note = match notes.is_empty() {
        true => String::new(),
        false => format!(
            " ({})",
            notes
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        ),
    };
    let named = |run: &RunPlotData, label: String| match runs.len() {
        1 => label,
        _ => format!("{}: {label}", run.name),
    };
    let mut plots: Vec<(&str, Frame, Vec<Series>, Vec<Marks>)> = Vec::new();

    let final_points = runs
        .iter()
        .enumerate()
        .map(|(i, run)| {
            let last = run
                .epochs
                .last()
                .expect("runs without epochs were left out");
            let mut points: Vec<(f64, f64)> = (last.subnets.iter())
                .map(|s| (s.density, 100.0 * s.top1))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series {
                label: format!("{} (epoch {})", run.name, last.epoch + 1),
                colour: colour(i),
                points,
                dashed: false,
            }
        })
        .collect();
    plots.push((
        PLOT_FILES[0],
        Frame {
            title: format!("top-1 against density, last epoch{note}"),
            x_desc: "density (log scale)",
            y_desc: "test top-1 %",
            log_x: true,
            integer_x: false,
        },
        final_points,
        Vec::new(),
    ));

    let per_epoch = |value: &dyn Fn(&EpochRecord, usize) -> Option<f64>, dashed: bool| {
        let mut series = Vec::new();
        for run in runs {
            let subnets = run.epochs.last().map_or(0, |r| r.subnets.len());
            for k in 0..subnets {
                let points: Vec<(f64, f64)> = (run.epochs.iter())
                    .filter_map(|r| value(r, k).map(|v| ((r.epoch + 1) as f64, v)))
                    .collect();
                if points.is_empty() {
                    continue;
                }
                let density = run.epochs.last().map_or(0.0, |r| r.subnets[k].density);
                series.push(Series {
                    label: named(run, format!("sub-net {k} ({density:.3})")),
                    colour: colour(series.len()),
                    points,
                    dashed,
                });
            }
        }
        series
    };
    let subnet = |r: &EpochRecord, k: usize| r.subnets.iter().find(|s| s.subnet == k).cloned();
    plots.push((
        PLOT_FILES[1],
        Frame {
            title: format!("test top-1 per epoch{note}"),
            x_desc: "epoch",
            y_desc: "test top-1 %",
            log_x: false,
            integer_x: true,
        },
        per_epoch(&|r, k| subnet(r, k).map(|s| 100.0 * s.top1), false),
        Vec::new(),
    ));
    let mut losses = per_epoch(&|r, k| subnet(r, k).map(|s| s.loss), false);
    let mut train = per_epoch(
        &|r, k| r.train.iter().find(|t| t.subnet == k).map(|t| t.loss),
        true,
    );
    for (t, s) in train.iter_mut().zip(&losses) {
        t.colour = s.colour;
        t.label = format!("{} training", s.label);
    }
    losses.extend(train);
    plots.push((
        PLOT_FILES[2],
        Frame {
            title: format!("loss per epoch: test solid, training dashed{note}"),
            x_desc: "epoch",
            y_desc: "cross-entropy",
            log_x: false,
            integer_x: true,
        },
        losses,
        Vec::new(),
    ));
    let lr = (runs.iter().enumerate())
        .map(|(i, run)| Series {
            label: run.name.clone(),
            colour: colour(i),
            points: (run.epochs.iter())
                .map(|r| ((r.epoch + 1) as f64, r.lr))
                .collect(),
            dashed: false,
        })
        .collect();
    plots.push((
        PLOT_FILES[3],
        Frame {
            title: format!("learning rate per epoch{note}"),
            x_desc: "epoch",
            y_desc: "learning rate",
            log_x: false,
            integer_x: true,
        },
        lr,
        Vec::new(),
    ));

    let subnets = main.epochs.last().map_or(0, |r| r.subnets.len());
    let density_series = (0..subnets)
        .map(|k| Series {
            label: format!("sub-net {k}"),
            colour: colour(k),
            points: (main.events.iter())
                .filter(|e| e.subnet == k)
                .map(|e| (e.iteration as f64, e.density))
                .collect(),
            dashed: false,
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    let marks = ["ramp", "regrow"]
        .iter()
        .map(|&kind| Marks {
            label: format!("{kind} event"),
            points: (main.events.iter())
                .filter(|e| e.kind == kind)
                .map(|e| (e.iteration as f64, e.density))
                .collect(),
            crosses: kind == "regrow",
        })
        .filter(|m| !m.points.is_empty())
        .collect();
    plots.push((
        PLOT_FILES[4],
        Frame {
            title: format!("{}: density over iterations (mask events){note}", main.name),
            x_desc: "iteration",
            y_desc: "density",
            log_x: false,
            integer_x: false,
        },
        density_series,
        marks,
    ));
    let layer_series = (0..main.layers.first().map_or(0, |l| l.densities.len()))
        .map(|k| Series {
            label: format!("sub-net {k}"),
            colour: colour(k),
            points: (main.layers.iter().enumerate())
                .map(|(i, l)| (i as f64, l.densities[k]))
                .collect(),
            dashed: false,
        })
        .collect();
    plots.push((
        PLOT_FILES[5],
        Frame {
            title: format!(
                "{}: density per masked layer, latest checkpoint{note}",
                main.name
            ),
            x_desc: "masked layer (model order)",
            y_desc: "density",
            log_x: false,
            integer_x: true,
        },
        layer_series,
        Vec::new(),
    ));

    let mut written = Vec::new();
    for (file, frame, series, marks) in plots {
        let path = out.join(file);
        let svg = draw(&frame, &series, &marks).map_err(|reason| TrainError::Io {
            path: path.clone(),
            reason,
        })?;
        write_atomic(&path, svg.as_bytes())?;
        written.push((path, svg));
    }
    Ok(written)
}

/// The axis range covering `values` with a margin (a unit range around a single value).
fn span(values: impl Iterator<Item = f64>, log: bool) -> Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && (!log || *v > 0.0))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    match (lo.is_finite(), log) {
        (false, true) => 0.01..1.0,
        (false, false) => 0.0..1.0,
        (true, true) => lo / 1.3..hi * 1.3,
        (true, false) if hi - lo < 1e-12 => lo - 0.5..hi + 0.5,
        (true, false) => {
            let pad = (hi - lo) * 0.06;
            lo - pad..hi + pad
        }
    }
}

/// `v` as an axis label: whole numbers without decimals, others with at most four
/// significant digits (no `0.30000000000000004`).
fn number(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 && v.abs() < 1e9 {
        return format!("{}", v.round() as i64);
    }
    let digits = (3 - v.abs().log10().floor() as i32).clamp(0, 8) as usize;
    let text = format!("{v:.digits$}");
    match text.contains('.') {
        true => text.trim_end_matches('0').trim_end_matches('.').to_string(),
        false => text,
    }
}

/// The corner of the plot with the fewest points near it, for the legend.
fn emptiest_corner<'p>(
    points: impl Iterator<Item = &'p (f64, f64)>,
    x: &Range<f64>,
    y: &Range<f64>,
    log_x: bool,
) -> SeriesLabelPosition {
    let scale = |v: f64| match log_x {
        true => (v.ln() - x.start.ln()) / (x.end.ln() - x.start.ln()),
        false => (v - x.start) / (x.end - x.start),
    };
    let mut counts = [0usize; 4];
    for &(px, py) in points {
        let (u, w) = (scale(px), (py - y.start) / (y.end - y.start));
        for (i, (right, top)) in [(true, false), (true, true), (false, true), (false, false)]
            .into_iter()
            .enumerate()
        {
            let near_x = if right { u > 0.55 } else { u < 0.45 };
            let near_y = if top { w > 0.6 } else { w < 0.4 };
            counts[i] += usize::from(near_x && near_y);
        }
    }
    let best = (0..4).min_by_key(|&i| counts[i]).unwrap_or(0);
    [
        SeriesLabelPosition::LowerRight,
        SeriesLabelPosition::UpperRight,
        SeriesLabelPosition::UpperLeft,
        SeriesLabelPosition::LowerLeft,
    ][best]
        .clone()
}

/// One plot as an SVG document.
fn draw(frame: &Frame, series: &[Series], marks: &[Marks]) -> std::result::Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let points =
            || (series.iter().flat_map(|s| &s.points)).chain(marks.iter().flat_map(|m| &m.points));
        let x = span(points().map(|p| p.0), frame.log_x);
        let y = span(points().map(|p| p.1), false);
        let corner = emptiest_corner(points(), &x, &y, frame.log_x);
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(&frame.title, ("sans-serif", 17))
            .margin(14)
            .x_label_area_size(42)
            .y_label_area_size(64);
        if frame.log_x {
            let mut chart = builder
                .build_cartesian_2d(x.log_scale(), y)
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_desc(frame.x_desc)
                .y_desc(frame.y_desc)
                .x_label_formatter(&|v| number(*v))
                .y_label_formatter(&|v| number(*v))
                .draw()
                .map_err(|e| e.to_string())?;
            draw_series(&mut chart, series, marks, corner)?;
        } else {
            let mut chart = builder
                .build_cartesian_2d(x, y)
                .map_err(|e| e.to_string())?;
            let whole = |v: &f64| match (v - v.round()).abs() < 1e-9 {
                true => number(*v),
                false => String::new(),
            };
            let x_format: &dyn Fn(&f64) -> String = match frame.integer_x {
                true => &whole,
                false => &|v| number(*v),
            };
            chart
                .configure_mesh()
                .x_desc(frame.x_desc)
                .y_desc(frame.y_desc)
                .x_label_formatter(x_format)
                .y_label_formatter(&|v| number(*v))
                .draw()
                .map_err(|e| e.to_string())?;
            draw_series(&mut chart, series, marks, corner)?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

fn draw_series<'a, DB, X>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, plotters::coord::types::RangedCoordf64>>,
    series: &[Series],
    marks: &[Marks],
    corner: SeriesLabelPosition,
) -> std::result::Result<(), String>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    for s in series {
        let style = s.colour.stroke_width(2);
        let colour = s.colour;
        let legend = move |(x, y): (i32, i32)| PathElement::new(vec![(x, y), (x + 18, y)], style);
        if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(s.points.iter().copied(), 6, 4, style))
                .map_err(err)?
                .label(&s.label)
                .legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (6, 0)], style)
                        + PathElement::new(vec![(10, 0), (16, 0)], style)
                });
        } else {
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), style))
                .map_err(err)?
                .label(&s.label)
                .legend(legend);
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(err)?;
        }
    }
    for m in marks {
        let legend_cross = m.crosses;
        if m.crosses {
            chart
                .draw_series(
                    m.points
                        .iter()
                        .map(|&p| Cross::new(p, 4, BLACK.stroke_width(1))),
                )
                .map_err(err)?
        } else {
            chart
                .draw_series(
                    m.points
                        .iter()
                        .map(|&p| Circle::new(p, 4, BLACK.stroke_width(1))),
                )
                .map_err(err)?
        }
        .label(&m.label)
        .legend(move |(x, y)| -> DynElement<'static, DB, (i32, i32)> {
            match legend_cross {
                true => Cross::new((x + 9, y), 4, BLACK.stroke_width(1)).into_dyn(),
                false => Circle::new((x + 9, y), 4, BLACK.stroke_width(1)).into_dyn(),
            }
        });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .position(corner)
        .draw()
        .map_err(err)
}
