//! Per-epoch metrics: top-k counting, the JSONL / CSV files of a run, and progress output.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ast_core::schedule::ScheduledEvent;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// How many of `labels` are among the `k` largest logits of their row (`logits` is row-major
/// `[rows, classes]`). Ties rank the lower class first.
pub fn top_k_correct(logits: &[f32], classes: usize, labels: &[i64], k: usize) -> usize {
    labels
        .iter()
        .enumerate()
        .filter(|&(row, &label)| {
            let scores = &logits[row * classes..(row + 1) * classes];
            if scores.iter().any(|s| !s.is_finite()) {
                // A NaN compares false with everything: it would rank first. Such a row is
                // never a correct prediction.
                return false;
            }
            let target = scores[label as usize];
            let better = scores
                .iter()
                .enumerate()
                .filter(|&(c, &s)| s > target || (s == target && c < label as usize))
                .count();
            better < k
        })
        .count()
}

/// Evaluation of one sub-net.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubnetMetrics {
    /// Sub-net index.
    pub subnet: usize,
    /// Density of its masks over all prunable weights.
    pub density: f64,
    /// Mean cross-entropy on the evaluation set.
    pub loss: f64,
    /// Top-1 accuracy in `[0, 1]`.
    pub top1: f64,
    /// Top-5 accuracy in `[0, 1]`.
    pub top5: f64,
}

/// The per-epoch metrics file of a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch (from 0).
    pub epoch: usize,
    /// Learning rate used in the epoch.
    pub lr: f64,
    /// Mean training loss of the epoch (over all sub-nets' iterations).
    pub train_loss: f64,
    /// Seconds the epoch took (training and evaluation).
    pub seconds: f64,
    /// Every sub-net's evaluation.
    pub subnets: Vec<SubnetMetrics>,
    /// Best top-1 so far of the sparsest sub-net.
    pub best_sparsest_top1: f64,
    /// Every sub-net's training loss and top-1 over its own iterations of the epoch (absent in
    /// records written before they were kept).
    #[serde(default)]
    pub train: Vec<SubnetTraining>,
}

/// One sub-net's training figures over an epoch (its own iterations, with augmentation).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SubnetTraining {
    /// Sub-net index.
    pub subnet: usize,
    /// Mean training loss.
    pub loss: f64,
    /// Top-1 accuracy on its training batches, in `[0, 1]`.
    pub top1: f64,
}

/// Appends epoch records to `metrics.jsonl` and `metrics.csv` in a run directory.
#[derive(Debug)]
pub struct MetricsWriter {
    jsonl: PathBuf,
    csv: PathBuf,
}

const CSV_HEADER: &str =
    "epoch,lr,train_loss,seconds,subnet,density,loss,top1,top5,subnet_train_loss,subnet_train_top1\n";

impl MetricsWriter {
    /// Writer for `dir`; keeps only the records of epochs before `keep_before` (a resumed run
    /// drops what the interrupted run wrote after its last checkpoint).
    pub fn open(dir: &Path, keep_before: usize) -> Result<Self> {
        let writer = Self {
            jsonl: dir.join(METRICS_FILE),
            csv: dir.join("metrics.csv"),
        };
        // Kept lines are kept byte for byte: re-serialising them would not round-trip every
        // float exactly, and a resumed run must equal an uninterrupted one.
        keep_json_lines(&writer.jsonl, "epoch", keep_before)?;
        // The CSV is rebuilt from the JSON records it repeats, so the two always agree (a torn
        // row, or a record dropped above, cannot leave them apart). The same records give the
        // same rows, byte for byte: serde_json reads back every float it wrote exactly.
        let mut csv = String::from(CSV_HEADER);
        for record in writer.read()? {
            csv.push_str(&csv_lines(&record));
        }
        write_atomic(&writer.csv, csv.as_bytes())?;
        Ok(writer)
    }

    /// The records written so far.
    pub fn read(&self) -> Result<Vec<EpochRecord>> {
        let text = match std::fs::read_to_string(&self.jsonl) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(TrainError::io(&self.jsonl, e)),
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| TrainError::io(&self.jsonl, e)))
            .collect()
    }

    /// Appends one epoch.
    pub fn append(&self, record: &EpochRecord) -> Result<()> {
        append(&self.jsonl, &json_line(record))?;
        append(&self.csv, &csv_lines(record))
    }
}

/// One line of `events.jsonl`: a mask event as scheduled, and what it did.
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    /// The event as the schedule gives it (see `ast-cli schedule`).
    #[serde(flatten)]
    pub event: ScheduledEvent,
    /// The sub-net's density after the event.
    pub density: f64,
    /// Mask positions the event changed.
    pub changed: usize,
}

/// Appends mask events to `events.jsonl` in a run directory.
#[derive(Debug)]
pub struct EventsWriter {
    path: PathBuf,
}

impl EventsWriter {
    /// Writer for `dir`; keeps only the events of iterations before `keep_before` (a resumed
    /// run drops what the interrupted run wrote after its last checkpoint).
    pub fn open(dir: &Path, keep_before: usize) -> Result<Self> {
        let path = dir.join("events.jsonl");
        keep_json_lines(&path, "iteration", keep_before)?;
        Ok(Self { path })
    }

    /// Appends one event.
    pub fn append(&self, record: &EventRecord) -> Result<()> {
        let mut line = serde_json::to_string(record).expect("events serialise");
        line.push('\n');
        append(&self.path, &line)
    }
}

/// Keeps, byte for byte, the lines of the JSON-lines file `path` whose integer field `key` is
/// below `keep_before`. A torn last line (a write cut short by a kill) is dropped with a
/// warning; an unreadable line before it is an error naming its number.
fn keep_json_lines(path: &Path, key: &str, keep_before: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TrainError::io(path, e)),
    };
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut kept = String::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .filter(|_| line.ends_with('\n'))
            .and_then(|v| v[key].as_u64());
        match value {
            Some(v) => {
                if (v as usize) < keep_before {
                    kept.push_str(line);
                }
            }
            None if i + 1 == lines.len() => eprintln!(
                "warning: {}: dropped its torn last line {} (a write cut short)",
                path.display(),
                i + 1
            ),
            None => {
                return Err(TrainError::io(
                    path,
                    std::io::Error::other(format!(
                        "line {} is not a record with `{key}`; fix or remove that line",
                        i + 1
                    )),
                ))
            }
        }
    }
    write_atomic(path, kept.as_bytes())
}

fn json_line(r: &EpochRecord) -> String {
    let mut line = serde_json::to_string(r).expect("records serialise");
    line.push('\n');
    line
}

fn csv_lines(r: &EpochRecord) -> String {
    r.subnets
        .iter()
        .map(|s| {
            let train = r.train.iter().find(|t| t.subnet == s.subnet);
            let (loss, top1) = train.map_or((String::new(), String::new()), |t| {
                (t.loss.to_string(), t.top1.to_string())
            });
            format!(
                "{},{},{},{:.3},{},{},{},{},{},{loss},{top1}\n",
                r.epoch, r.lr, r.train_loss, r.seconds, s.subnet, s.density, s.loss, s.top1, s.top5
            )
        })
        .collect()
}

fn append(path: &Path, text: &str) -> Result<()> {
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| TrainError::io(path, e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| TrainError::io(path, e))
}

/// Writes `bytes` to `path` through a temporary file and a rename: a crash leaves the old or the
/// new content, never a torn file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_of(path);
    let mut file = File::create(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    file.write_all(bytes).map_err(|e| TrainError::io(&tmp, e))?;
    file.sync_all().map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

/// The temporary file [`write_atomic`] writes `path` through (`metrics.jsonl.tmp`).
pub(crate) fn temporary_of(path: &Path) -> PathBuf {
    path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ))
}

/// Progress of an epoch: a redrawn bar with ETA on a terminal, a plain line every tenth of the
/// epoch otherwise.
#[derive(Debug)]
pub struct Progress {
    epoch: usize,
    epochs: usize,
    total: usize,
    start: Instant,
    done_at_start: usize,
    terminal: bool,
    enabled: bool,
}

impl Progress {
    /// Progress of epoch `epoch` of `epochs` with `total` iterations, starting at `start`.
    pub fn new(epoch: usize, epochs: usize, total: usize, start: usize, enabled: bool) -> Self {
        Self {
            epoch,
            epochs,
            total,
            start: Instant::now(),
            done_at_start: start,
            terminal: std::io::stderr().is_terminal(),
            enabled,
        }
    }

    /// Reports that iteration `done` (1-based within the epoch) finished with `loss`.
    pub fn update(&self, done: usize, loss: f32) {
        if !self.enabled {
            return;
        }
        let elapsed = self.start.elapsed().as_secs_f64();
        let rate = (done - self.done_at_start) as f64 / elapsed.max(1e-9);
        let eta = (self.total - done) as f64 / rate.max(1e-9);
        if self.terminal {
            let width = 30;
            let filled = width * done / self.total.max(1);
            eprint!(
                "\repoch {}/{} [{}{}] {done}/{} loss {loss:.4} {rate:.2} it/s ETA {eta:.0}s   ",
                self.epoch + 1,
                self.epochs,
                "#".repeat(filled),
                "-".repeat(width - filled),
                self.total
            );
            if done == self.total {
                eprintln!();
            }
        } else {
            let step = (self.total / 10).max(1);
            if done.is_multiple_of(step) || done == self.total {
                eprintln!(
                    "epoch {}/{} iteration {done}/{} loss {loss:.4} {rate:.2} it/s ETA {eta:.0}s",
                    self.epoch + 1,
                    self.epochs,
                    self.total
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(epoch: usize) -> EpochRecord {
        EpochRecord {
            epoch,
            lr: 0.1 / (epoch + 1) as f64,
            train_loss: 2.0 / 3.0 + epoch as f64,
            seconds: 1.25,
            subnets: (0..2)
                .map(|subnet| SubnetMetrics {
                    subnet,
                    density: 0.1 * (subnet + 1) as f64,
                    loss: 1.0 / 7.0,
                    top1: 0.3 + 0.01 * epoch as f64,
                    top5: 0.9,
                })
                .collect(),
            best_sparsest_top1: 0.3,
            train: vec![SubnetTraining {
                subnet: 1,
                loss: 0.123_456_789,
                top1: 0.5,
            }],
        }
    }

    #[test]
    fn the_csv_is_rebuilt_from_the_json_records_and_always_agrees_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let writer = MetricsWriter::open(dir.path(), 0).unwrap();
        for epoch in 0..3 {
            writer.append(&record(epoch)).unwrap();
        }
        let whole = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        // A torn CSV row: rebuilt, byte for byte as written.
        std::fs::write(dir.path().join("metrics.csv"), &whole[..whole.len() - 7]).unwrap();
        MetricsWriter::open(dir.path(), 3).unwrap();
        let rebuilt = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        assert_eq!(rebuilt, whole);
        // A torn last JSON line: that epoch leaves both files.
        let jsonl = dir.path().join(METRICS_FILE);
        let text = std::fs::read_to_string(&jsonl).unwrap();
        std::fs::write(&jsonl, &text[..text.len() - 5]).unwrap();
        let writer = MetricsWriter::open(dir.path(), 3).unwrap();
        assert_eq!(writer.read().unwrap().len(), 2);
        let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        assert_eq!(csv.lines().count(), 1 + 2 * 2);
        assert!(whole.starts_with(&csv), "{csv}");
    }

    #[test]
    fn top_k_counts_hand_computed_rows() {
        // Row 0: label 2 is the largest; row 1: label 0 is third; row 2: tie with a lower class.
        let logits = [0.1, 0.2, 0.9, 0.5, 0.9, 0.7, 0.3, 0.3, 0.0];
        let labels = [2, 0, 1];
        assert_eq!(top_k_correct(&logits, 3, &labels, 1), 1);
        assert_eq!(top_k_correct(&logits, 3, &labels, 2), 2);
        assert_eq!(top_k_correct(&logits, 3, &labels, 3), 3);
    }

    #[test]
    fn rows_with_non_finite_logits_are_never_correct() {
        // All-NaN rows used to rank their label first (NaN compares false with everything).
        let nan = f32::NAN;
        let logits = [nan, nan, nan, 0.1, f32::INFINITY, 0.3, 0.0, 0.0, 1.0];
        let labels = [0, 1, 2];
        assert_eq!(top_k_correct(&logits, 3, &labels, 1), 1);
        assert_eq!(top_k_correct(&logits, 3, &labels, 3), 1);
    }

    #[test]
    fn metrics_files_append_and_truncate_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let w = MetricsWriter::open(dir.path(), 0).unwrap();
        for epoch in 0..3 {
            w.append(&EpochRecord {
                epoch,
                lr: 0.1,
                train_loss: 1.0,
                seconds: 2.0,
                subnets: vec![SubnetMetrics {
                    subnet: 0,
                    density: 0.5,
                    loss: 0.3,
                    top1: 0.9,
                    top5: 1.0,
                }],
                best_sparsest_top1: 0.9,
                train: vec![SubnetTraining {
                    subnet: 0,
                    loss: 0.25,
                    top1: 0.75,
                }],
            })
            .unwrap();
        }
        assert_eq!(w.read().unwrap().len(), 3);
        let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        assert!(csv.lines().nth(1).unwrap().ends_with(",0.25,0.75"), "{csv}");
        // A record written before the per-sub-net training figures were kept still reads.
        let old = r#"{"epoch":0,"lr":0.1,"train_loss":1.0,"seconds":2.0,"subnets":[],"best_sparsest_top1":0.5}"#;
        let record: EpochRecord = serde_json::from_str(old).unwrap();
        assert!(record.train.is_empty());
        let w = MetricsWriter::open(dir.path(), 2).unwrap();
        assert_eq!(
            w.read()
                .unwrap()
                .iter()
                .map(|r| r.epoch)
                .collect::<Vec<_>>(),
            vec![0, 1]
        );
        let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        assert_eq!(csv.lines().count(), 3, "{csv}");
        assert!(csv.starts_with("epoch,lr,train_loss"));
    }

    #[test]
    fn resuming_keeps_lines_byte_for_byte_and_drops_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        // 0.1 + 0.2 has 17 significant digits; a parse-and-rewrite could change its last one.
        let kept = "{\"epoch\":0,\"x\":0.30000000000000004,\"y\":1e-7}\n{\"epoch\":1}\n";
        std::fs::write(&path, format!("{kept}{{\"epoch\":2}}\n{{\"epo")).unwrap();
        keep_json_lines(&path, "epoch", 2).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), kept);
        // A broken line that is not the last is an error naming it.
        std::fs::write(&path, "{\"epoch\":0}\nnot json\n{\"epoch\":1}\n").unwrap();
        let err = keep_json_lines(&path, "epoch", 2).unwrap_err().to_string();
        assert!(err.contains("line 2 is not a record"), "{err}");
    }
}
