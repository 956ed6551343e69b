//! The sub-nets of a run outside the run: `export` writes them into one file, `infer` runs a
//! file on a labelled test set (every sub-net, one, or the most accurate within a latency
//! budget), `bench-infer` times each sub-net and the same model dense through the runtime.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use ast_core::density::{erk_densities, random_masks};
use ast_core::mask::nm::{nm_mask, GroupLayout};
use ast_core::rng::MaskRng;
use ast_core::subnet::{masked_layers, read_params, replace_masks};
use ast_core::SubnetTarget;
use ast_infer::{InferenceModel, Latency, SubnetInfo, Values};
use ast_models::{AstModel, ModelKind};
use ast_train::data::CifarTransform;
use ast_train::metrics::{top_k_correct, EpochRecord, METRICS_FILE};
use ast_train::{DatasetKind, TrainConfig};
use burn::module::AutodiffModule;
use burn::prelude::{Backend, TensorData};
use burn::tensor::backend::AutodiffBackend;
use clap::{Args, ValueEnum};

use crate::backend::BackendJob;
use crate::BackendArgs;

/// How `export` stores the weight values.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    /// 32-bit floats (exact).
    F32,
    /// IEEE half precision (half the bytes).
    F16,
    /// bfloat16 (half the bytes, f32's range).
    Bf16,
}

impl From<ValueKind> for Values {
    fn from(v: ValueKind) -> Self {
        match v {
            ValueKind::F32 => Values::F32,
            ValueKind::F16 => Values::F16,
            ValueKind::Bf16 => Values::Bf16,
        }
    }
}

/// What `export` writes.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// Every chosen sub-net, each layer's weights once (docs/model-format.md): for `infer`,
    /// `bench-infer` and the ast-infer library.
    Ast,
    /// One sub-net as a dense state dict in the original code's key names (its CIFAR
    /// ResNet-20/32/56), plus a check input and our logits for it under `__check__.*`.
    Pytorch,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Run directory (its last checkpoint is exported).
    #[arg(long)]
    pub run: PathBuf,
    /// Sub-nets to export: `all`, or indices such as `0,2`.
    #[arg(long, default_value = "all")]
    pub subnets: String,
    /// How the weight values are stored.
    #[arg(long, value_enum, default_value_t = ValueKind::F32)]
    pub values: ValueKind,
    /// The file to write (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// The file's layout.
    #[arg(long, value_enum, default_value_t = ExportFormat::Ast)]
    pub format: ExportFormat,
    /// Replace --out when it exists.
    #[arg(long)]
    pub overwrite: bool,
}

/// The chosen sub-net indices of `spec` (`all` or `0,2`) among `count`.
fn parse_subnets(spec: &str, count: usize) -> Result<Vec<usize>> {
    if spec == "all" {
        return Ok((0..count).collect());
    }
    let mut chosen = Vec::new();
    for part in spec.split(',') {
        let k: usize = part.trim().parse().map_err(|_| {
            anyhow!("--subnets `{spec}`: give `all` or sub-net indices such as 0,2")
        })?;
        if k >= count {
            bail!(
                "--subnets: the run has {count} sub-nets (0 to {}), not {k}",
                count - 1
            );
        }
        if chosen.contains(&k) {
            bail!("--subnets: sub-net {k} is listed twice");
        }
        chosen.push(k);
    }
    Ok(chosen)
}

fn target_name(target: &SubnetTarget) -> String {
    match target {
        SubnetTarget::Density(d) => format!("{d}"),
        SubnetTarget::Nm { n, m } => format!("{n}:{m}"),
    }
}

/// The evaluation of the epoch a checkpoint closes (`epochs` done), from `metrics.jsonl`.
fn last_evaluation(run: &Path, epochs: usize) -> Result<Option<EpochRecord>> {
    let path = run.join(METRICS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow!("cannot read {}: {e}", path.display())),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<EpochRecord>(l).ok())
        .find(|r| r.epoch + 1 == epochs))
}

/// Refuses an existing `out` without `--overwrite`.
fn check_out(out: &Path, overwrite: bool) -> Result<()> {
    if out.is_dir() {
        bail!("--out {} is a directory: give a file name", out.display());
    }
    if out.exists() && !overwrite {
        bail!(
            "{} exists: pass --overwrite to replace it, or another --out",
            out.display()
        );
    }
    Ok(())
}

/// Exports sub-nets of a run's last checkpoint.
pub struct Export<'a>(pub &'a ExportArgs);

impl BackendJob for Export<'_> {
    type Output = ();

    fn run<B>(self, device: &B::Device) -> Result<()>
    where
        B: AutodiffBackend,
    {
        let args = self.0;
        check_out(&args.out, args.overwrite)?;
        let (config, model, epochs) = crate::backend::load_builtin::<B>(&args.run, device)?;
        if let Some(first) = ast_core::subnet::non_finite_params(&model).first() {
            bail!(
                "{}: the last checkpoint's weights are not finite (e.g. `{first}`): the run \
                 diverged; nothing to export",
                args.run.display()
            );
        }
        let model = model.valid();
        ast_core::subnet::sync_running_stats(&model);
        let chosen = parse_subnets(&args.subnets, config.ast.subnets.len())?;
        let side = crate::backend::builtin_model(&config)?.image_size();
        if args.format == ExportFormat::Pytorch {
            let [k] = chosen[..] else {
                bail!("--format pytorch writes one sub-net: give --subnets K");
            };
            return export_pytorch(&model, k, side, &args.out);
        }
        let graph = model
            .inference_graph([side, side])
            .map_err(|e| anyhow!("{e}"))?;
        let evaluation = last_evaluation(&args.run, epochs)?;
        let data = match config.data.test_subset {
            Some(n) => format!("the first {n} test images of {}", config.data.kind.name()),
            None => format!("the {} test set", config.data.kind.name()),
        };
        let subnets = chosen
            .iter()
            .map(|&k| {
                let metrics = evaluation.as_ref().and_then(|r| r.subnets.get(k));
                SubnetInfo {
                    trained_index: k,
                    target: target_name(&config.ast.subnets[k]),
                    density: 0.0,
                    top1: metrics.map(|m| 100.0 * m.top1),
                    top5: metrics.map(|m| 100.0 * m.top5),
                    evaluated_on: metrics.map(|_| format!("{data}, after epoch {epochs}")),
                }
            })
            .collect();
        let (bytes, header) = ast_infer::export(
            &config.model,
            &graph,
            &model.export_params(),
            subnets,
            args.values.into(),
            serde_json::to_value(&config)?,
        )?;
        ast_train::metrics::write_atomic(&args.out, &bytes)?;
        print_export_report(&header, bytes.len());
        println!("written to {}", args.out.display());
        Ok(())
    }
}

/// Sub-net `k` of a CIFAR ResNet or ResNet-18/50 as the original code's state dict, with a check input (two
/// seeded images) and our logits for it, into `out`.
fn export_pytorch<B: Backend>(
    model: &AstModel<B>,
    k: usize,
    side: usize,
    out: &Path,
) -> Result<()> {
    use ast_models::original::{OriginalSubnets, StateTensor};
    use safetensors::tensor::{Dtype, TensorView};
    let mut tensors = (model.original_state_dict(OriginalSubnets::One(k)))
        .map_err(|e| anyhow!("--format pytorch: {e}; export this model with --format ast"))?;
    let device = Default::default();
    B::seed(&device, 7);
    let x = burn::tensor::Tensor::<B, 4>::random(
        [2, 3, side, side],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    model.switch().set(k);
    let logits = model.forward(x.clone());
    let host = |t: TensorData| t.convert::<f32>().to_vec::<f32>().expect("f32");
    let check = |shape: Vec<usize>, values| StateTensor::F32 { shape, values };
    let classes = logits.dims()[1];
    tensors.push((
        "__check__.input".into(),
        check(vec![2, 3, side, side], host(x.into_data())),
    ));
    tensors.push((
        "__check__.logits".into(),
        check(vec![2, classes], host(logits.into_data())),
    ));
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, t)| match t {
            StateTensor::F32 { shape, values } => {
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (name, Dtype::F32, shape, bytes)
            }
            StateTensor::I64 { shape, values } => {
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (name, Dtype::I64, shape, bytes)
            }
        })
        .collect();
    let views = encoded
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes).map(|v| (name.as_str(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let bytes = safetensors::serialize(views, None)?;
    ast_train::metrics::write_atomic(out, &bytes)?;
    println!(
        "sub-net {k} as a state dict of the original code's model (nspars=1): {} tensors, \
         written to {}",
        encoded.len() - 2,
        out.display()
    );
    Ok(())
}

fn print_export_report(header: &ast_infer::Header, file_bytes: usize) {
    let dense: usize = header.report.iter().map(|l| l.dense_f32_bytes).sum();
    let count = header.subnets.len();
    println!(
        "{}: {count} sub-net{}, values {}; masked layers {:.1} KiB against {:.1} KiB dense f32; file {:.1} KiB",
        header.model,
        if count == 1 { "" } else { "s" },
        header.values.name(),
        header.report.iter().map(|l| l.bytes).sum::<usize>() as f64 / 1024.0,
        dense as f64 / 1024.0,
        file_bytes as f64 / 1024.0
    );
    for (j, s) in header.subnets.iter().enumerate() {
        let accuracy = match (s.top1, s.top5) {
            (Some(t1), Some(t5)) => format!("top-1 {t1:.2} %, top-5 {t5:.2} %"),
            _ => "not evaluated".into(),
        };
        println!(
            "  sub-net {j} (run sub-net {}, target {}): density {:.4}, {accuracy}",
            s.trained_index, s.target, s.density
        );
    }
    println!("  layer                              weights  union (stored as)  density / form per sub-net");
    for l in &header.report {
        let per: Vec<String> = l
            .density
            .iter()
            .zip(&l.form)
            .map(|(d, f)| format!("{d:.3} {f}"))
            .collect();
        let union = format!("{} ({})", l.union, l.union_encoding);
        println!(
            "  {:<32} {:>8}  {:<17}  {}",
            l.layer,
            l.weights,
            union,
            per.join(", ")
        );
    }
}

#[derive(Args, Debug)]
pub struct InferArgs {
    /// A file written by `ast-cli export`.
    #[arg(long)]
    pub model: PathBuf,
    /// A sub-net index, or `auto`: the most accurate sub-net whose latency here is within
    /// --budget-ms. Default: every sub-net.
    #[arg(long)]
    pub subnet: Option<String>,
    /// The latency budget of `--subnet auto`, in milliseconds per batch of --batch images.
    #[arg(long, value_name = "MS", value_parser = crate::parse_budget, allow_hyphen_values = true)]
    pub budget_ms: Option<f64>,
    /// The dataset directory (default: the training run's).
    #[arg(long)]
    pub data_path: Option<PathBuf>,
    /// Instead of a labelled test set: predict the class of every PNG or JPEG image in this
    /// directory, in file-name order. The images must have the training images' size
    /// (Fashion-MNIST/MNIST 28×28, read as greyscale; CIFAR 32×32 RGB).
    #[arg(long, value_name = "DIR", conflicts_with = "data_path")]
    pub images: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub batch: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Which sub-nets `infer` runs.
fn infer_subnets(args: &InferArgs, model: &InferenceModel) -> Result<Vec<usize>> {
    match args.subnet.as_deref() {
        None => {
            if args.budget_ms.is_some() {
                bail!("--budget-ms chooses a sub-net with --subnet auto: add --subnet auto");
            }
            Ok((0..model.subnets()).collect())
        }
        Some("auto") => {
            let budget = args.budget_ms.ok_or_else(|| {
                anyhow!("--subnet auto needs --budget-ms: the latency to stay within")
            })?;
            let batch = args.batch as usize;
            let (k, latencies) = model.pick_within_budget(budget, batch, 20)?;
            if model.calibrated(batch).is_some() {
                println!("latencies of this machine from the file's calibration");
            }
            print_latencies(model, batch, &latencies);
            println!("within {budget} ms per batch of {batch}: sub-net {k}");
            Ok(vec![k])
        }
        Some(text) => {
            let k: usize = text
                .parse()
                .map_err(|_| anyhow!("--subnet `{text}`: give a sub-net index or `auto`"))?;
            if args.budget_ms.is_some() {
                bail!("--budget-ms applies to --subnet auto, not to a chosen sub-net");
            }
            if k >= model.subnets() {
                let count = model.subnets();
                return Err(ast_infer::InferError::NoSubnet { index: k, count }.into());
            }
            Ok(vec![k])
        }
    }
}

fn print_latencies(model: &InferenceModel, batch: usize, latencies: &[Latency]) {
    println!("latency here, batch {batch} (median / p90 of 20 passes):");
    for (k, (s, l)) in model.header().subnets.iter().zip(latencies).enumerate() {
        let top1 = s.top1.map_or("—".into(), |t| format!("{t:.2} %"));
        println!(
            "  sub-net {k}  density {:.4}  top-1 {top1:>8}  {:8.3} / {:8.3} ms",
            s.density, l.median_ms, l.p90_ms
        );
    }
}

/// Top-1 and top-5 of the chosen sub-nets of a model file on the test set of the run it came
/// from (or another directory of the same dataset).
pub fn infer(args: &InferArgs) -> Result<()> {
    let model = InferenceModel::load(&args.model)?;
    let subnets = infer_subnets(args, &model)?;
    let mut config: TrainConfig =
        serde_json::from_value(model.header().training.clone()).map_err(|_| {
            anyhow!(
                "{} does not say how its training data was read (no run configuration): \
                 export it again with this build",
                args.model.display()
            )
        })?;
    if let Some(dir) = &args.images {
        return classify_images(args, &model, &subnets, &config, dir);
    }
    if let Some(p) = &args.data_path {
        config.data.path = p.clone();
    }
    let sources = ast_train::load_data(&config, &crate::backend::builtin_model(&config)?)?;
    let loader =
        ast_train::data::Loader::new(sources.test, args.batch as usize, config.seed, false);
    let [c, h, w] = model.input_shape();
    let classes = model.classes();
    let (mut top1, mut top5, mut seen) =
        (vec![0usize; subnets.len()], vec![0usize; subnets.len()], 0);
    let start = Instant::now();
    for batch in loader.epoch(0, 0) {
        let batch = batch?;
        if batch.shape[1..] != [c, h, w] {
            bail!(
                "the data's images are {:?}, the model takes {c}×{h}×{w}: give the dataset it was \
                 trained on",
                &batch.shape[1..]
            );
        }
        let n = batch.labels.len();
        for (i, &k) in subnets.iter().enumerate() {
            let logits = model.forward_subnet(k, &batch.images, n)?;
            top1[i] += top_k_correct(&logits, classes, &batch.labels, 1);
            top5[i] += top_k_correct(&logits, classes, &batch.labels, 5.min(classes));
        }
        seen += n;
    }
    if seen == 0 {
        bail!("the test set is empty: nothing to evaluate (check --data-path)");
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{}: {seen} test images, {:.1} images/s per sub-net",
        args.model.display(),
        (seen * subnets.len()) as f64 / seconds
    );
    let mut results = Vec::new();
    for (i, &k) in subnets.iter().enumerate() {
        let s = &model.header().subnets[k];
        let (t1, t5) = (
            100.0 * top1[i] as f64 / seen as f64,
            100.0 * top5[i] as f64 / seen as f64,
        );
        println!(
            "  sub-net {k} (target {}, density {:.4}): top-1 {t1:.2} %, top-5 {t5:.2} %",
            s.target, s.density
        );
        results.push(serde_json::json!({
            "subnet": k, "target": s.target, "density": s.density,
            "top1": t1, "top5": t5, "exported_top1": s.top1,
        }));
    }
    if let Some(out) = &args.json {
        let json = serde_json::json!({
            "model": args.model, "data": config.data.path, "images": seen, "subnets": results,
        });
        std::fs::write(out, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
        println!("results written to {}", out.display());
    }
    Ok(())
}

/// The class names of a dataset, where they are fixed.
fn class_names(kind: DatasetKind) -> Option<&'static [&'static str]> {
    Some(match kind {
        DatasetKind::FashionMnist => &[
            "T-shirt/top",
            "trouser",
            "pullover",
            "dress",
            "coat",
            "sandal",
            "shirt",
            "sneaker",
            "bag",
            "ankle boot",
        ],
        DatasetKind::Mnist => &["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
        DatasetKind::Cifar10 => &[
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ],
        _ => return None,
    })
}

/// Reads `path` as the evaluation pipeline of `transform` takes its training images: `side`×
/// `side` pixels, `channels` 1 (greyscale) or 3 (RGB); one line naming the file otherwise.
fn read_image(
    path: &Path,
    side: usize,
    channels: usize,
    transform: &CifarTransform,
) -> Result<Vec<f32>> {
    let decoded = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .with_context(|| format!("cannot read {}", path.display()))?
        .decode()
        .map_err(|e| anyhow!("{}: not a readable image ({e})", path.display()))?;
    let (w, h) = (decoded.width() as usize, decoded.height() as usize);
    if [w, h] != [side, side] {
        bail!(
            "{}: {w}×{h} pixels, but the model was trained on {side}×{side} images: resize it \
             to {side}×{side} first",
            path.display()
        );
    }
    let pixels: Vec<u8> = match channels {
        1 => decoded.to_luma8().into_raw(),
        // HWC → CHW.
        _ => {
            let rgb = decoded.to_rgb8().into_raw();
            (0..3)
                .flat_map(|c| rgb.iter().skip(c).step_by(3).copied().collect::<Vec<_>>())
                .collect()
        }
    };
    let mut out = vec![0.0; transform.out_shape().iter().product()];
    let mut unused = MaskRng::new(0, 0);
    transform.apply_with(
        false,
        &pixels,
        [channels, side, side],
        &mut unused,
        &mut out,
    );
    Ok(out)
}

/// `infer --images DIR`: the predicted class of every image in `dir` by each chosen sub-net.
fn classify_images(
    args: &InferArgs,
    model: &InferenceModel,
    subnets: &[usize],
    config: &TrainConfig,
    dir: &Path,
) -> Result<()> {
    let kind = config.data.kind;
    let (side, channels, transform) = match kind {
        DatasetKind::FashionMnist | DatasetKind::Mnist => {
            (28, 1, CifarTransform::fashion_mnist(false, 3))
        }
        DatasetKind::Cifar10 | DatasetKind::Cifar100 | DatasetKind::Cifar100Coarse => {
            (32, 3, CifarTransform::cifar(false))
        }
        DatasetKind::Imagenet => bail!("--images: ImageNet models are not exported"),
    };
    if transform.out_shape() != model.input_shape() {
        bail!(
            "{}: the model takes {:?} inputs, not the {:?} of its training data's pipeline",
            args.model.display(),
            model.input_shape(),
            transform.out_shape()
        );
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the image directory {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot read the image directory {}", dir.display()))?;
    files.retain(|p| {
        p.is_file()
            && p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ["png", "jpg", "jpeg"].contains(&e.to_ascii_lowercase().as_str()))
    });
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no .png, .jpg or .jpeg files: give a directory of images",
            dir.display()
        );
    }
    let images = files
        .iter()
        .map(|f| read_image(f, side, channels, &transform))
        .collect::<Result<Vec<_>>>()?;
    let names = class_names(kind);
    let name = |c: usize| {
        names
            .and_then(|n| n.get(c))
            .map_or(String::new(), |n| format!(" ({n})"))
    };
    let mut predictions = vec![Vec::with_capacity(files.len()); subnets.len()];
    for chunk in images.chunks(args.batch as usize) {
        let flat: Vec<f32> = chunk.concat();
        for (i, &k) in subnets.iter().enumerate() {
            let logits = model.forward_subnet(k, &flat, chunk.len())?;
            let classes = model.classes();
            predictions[i].extend(logits.chunks_exact(classes).map(ast_infer::argmax));
        }
    }
    let mut rows = Vec::with_capacity(files.len());
    for (j, file) in files.iter().enumerate() {
        let shown = file.file_name().map_or(file.display().to_string(), |n| {
            n.to_string_lossy().into_owned()
        });
        let classes: Vec<usize> = predictions.iter().map(|p| p[j]).collect();
        let text: Vec<String> = subnets
            .iter()
            .zip(&classes)
            .map(|(k, &c)| format!("sub-net {k}: {c}{}", name(c)))
            .collect();
        println!("{shown}  {}", text.join(", "));
        rows.push(serde_json::json!({ "file": file, "classes": classes }));
    }
    if let Some(out) = &args.json {
        let json = serde_json::json!({
            "model": args.model, "images": files.len(), "subnets": subnets, "predictions": rows,
        });
        std::fs::write(out, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
        println!("results written to {}", out.display());
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// A file written by `ast-cli export`; its calibration for this machine is replaced.
    #[arg(long)]
    pub model: PathBuf,
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch: Vec<usize>,
    /// Timed passes per sub-net and batch size (after one warm-up pass).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub runs: u64,
}

/// Times each sub-net of a file on this machine and stores the medians in the file's header
/// (the tensors, and so the checksum, stay as they were), replacing an earlier calibration of
/// this machine, thread count and batch size.
pub fn calibrate(args: &CalibrateArgs) -> Result<()> {
    if args.batch.is_empty() || args.batch.contains(&0) {
        bail!("--batch: batch sizes must be at least 1");
    }
    let bytes = std::fs::read(&args.model)
        .with_context(|| format!("cannot read {}", args.model.display()))?;
    let model = InferenceModel::from_bytes(&bytes)?;
    let (cpu, simd, threads) = ast_infer::pick::this_machine();
    let mut header = model.header().clone();
    for &batch in &args.batch {
        let latencies = model.latencies(batch, args.runs as usize)?;
        let median_ms: Vec<f64> = latencies.iter().map(|l| l.median_ms).collect();
        println!("batch {batch}: {median_ms:.3?} ms per sub-net");
        header.calibration.retain(|c| {
            (c.cpu.as_str(), c.simd.as_str(), c.threads, c.batch)
                != (cpu.as_str(), simd.as_str(), threads, batch)
        });
        header.calibration.push(ast_infer::Calibration {
            cpu: cpu.clone(),
            simd: simd.clone(),
            threads,
            batch,
            median_ms,
        });
    }
    let calibrated = ast_infer::with_header(&bytes, &header)?;
    ast_train::metrics::write_atomic(&args.model, &calibrated)?;
    println!(
        "calibrated for {cpu} ({simd}, {threads} threads): {}",
        args.model.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct BenchInferArgs {
    /// A file written by `ast-cli export`.
    #[arg(
        long,
        required_unless_present = "synthetic",
        conflicts_with = "synthetic"
    )]
    pub model: Option<PathBuf>,
    /// Instead of a file: this model with random weights and one sub-net per --densities,
    /// each with seeded ERK-allocated masks (as training and `ast-cli bench` draw them), then
    /// one per --nm (each group's N largest weights, as training keeps them after the ramp).
    #[arg(long, value_name = "MODEL")]
    pub synthetic: Option<ModelKind>,
    /// The unstructured sub-nets' densities of --synthetic.
    #[arg(long, value_delimiter = ',', value_parser = parse_density)]
    pub densities: Option<Vec<f64>>,
    /// N:M sub-nets of --synthetic, comma-separated (e.g. 2:4,1:8).
    #[arg(long, value_delimiter = ',', value_parser = parse_nm_flag)]
    pub nm: Option<Vec<SubnetTarget>>,
    /// Seed of --synthetic's weights and masks.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How --synthetic stores its weight values.
    #[arg(long, value_enum, default_value_t = ValueKind::F32)]
    pub values: ValueKind,
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub batch: Vec<usize>,
    /// Timed passes per sub-net and batch size (after one warm-up pass).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub runs: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also print, per sub-net and for the dense model, where one image's pass spends its
    /// time: each layer's form (sparse, direct, im2col), multiply-adds and median time.
    #[arg(long)]
    pub layers: bool,
}

/// Prints [`InferenceModel::profile`] of sub-net `k` of `model`.
fn print_layers(title: &str, model: &InferenceModel, k: usize, runs: usize) -> Result<()> {
    let steps = model.profile(k, runs)?;
    let total: f64 = steps.iter().map(|s| s.median_us).sum();
    println!("{title}, one image, per layer: form, multiply-adds, median µs, GMAC/s");
    for s in &steps {
        println!(
            "  {:<36} {:<7} {:9.3} M {:9.1} µs {:7.1}",
            s.layer,
            s.form,
            s.multiply_adds as f64 / 1e6,
            s.median_us,
            s.multiply_adds as f64 / s.median_us / 1e3
        );
    }
    println!("  {:<36} {:<7} {:>11} {total:9.1} µs", "sum", "", "");
    Ok(())
}

/// Peak resident memory of this process in MiB (`VmHWM`), where the system says.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn parse_nm_flag(text: &str) -> std::result::Result<SubnetTarget, String> {
    crate::recipes::parse_nm(text).map_err(|e| e.to_string())
}

fn parse_density(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(d) if d > 0.0 && d <= 1.0 => Ok(d),
        _ => Err(format!(
            "`{text}` is not a density: give a number in (0, 1], e.g. 0.05"
        )),
    }
}

/// A model with random weights and one sub-net per target: seeded ERK masks for a density,
/// each group's N largest weights for N:M.
struct Synthetic {
    kind: ModelKind,
    targets: Vec<SubnetTarget>,
    seed: u64,
    values: Values,
}

impl BackendJob for Synthetic {
    /// The file, and the size of the dense model as an f32 safetensors file.
    type Output = (Vec<u8>, usize);

    fn run<B>(self, device: &B::Device) -> Result<(Vec<u8>, usize)>
    where
        B: AutodiffBackend,
    {
        B::seed(device, self.seed);
        let model = AstModel::<B::InnerBackend>::new(self.kind, 10, self.targets.len(), device);
        let layers = masked_layers(&model);
        let shapes: Vec<Vec<usize>> = layers.iter().map(|l| l.shape.clone()).collect();
        let sizes: Vec<usize> = layers.iter().map(|l| l.numel()).collect();
        let ids: Vec<_> = layers.iter().map(|l| l.weight_id).collect();
        let weights: Vec<Vec<f32>> = read_params(&model, &ids)
            .into_iter()
            .map(|w| w.convert::<f32>().to_vec().expect("f32 weights"))
            .collect();
        let mut model = model;
        for (k, &target) in self.targets.iter().enumerate() {
            let masks = match target {
                SubnetTarget::Density(d) => {
                    let densities = erk_densities(&shapes, d, 1.0);
                    random_masks(&sizes, &densities, &mut MaskRng::new(self.seed, k as u64))
                }
                SubnetTarget::Nm { n, m } => layers
                    .iter()
                    .zip(&weights)
                    .map(|(l, weight)| {
                        let layout =
                            GroupLayout::new(&l.shape, l.input_axis(), m).ok_or_else(|| {
                                let input = l.shape[l.input_axis()];
                                anyhow!("--nm {n}:{m}: layer `{}` has {input} input channels, not a multiple of {m}", l.path)
                            })?;
                        Ok(nm_mask(weight, &layout, n, &vec![false; layout.group_count()]))
                    })
                    .collect::<Result<Vec<_>>>()?,
            };
            let data = masks
                .into_iter()
                .zip(&shapes)
                .map(|(m, shape)| TensorData::new(m, shape.clone()))
                .collect();
            model = replace_masks(model, k, data)?;
        }
        let side = self.kind.image_size();
        let graph = model
            .inference_graph([side, side])
            .map_err(|e| anyhow!("{e}"))?;
        let subnets = (0..self.targets.len())
            .map(|k| SubnetInfo {
                trained_index: k,
                target: target_name(&self.targets[k]),
                density: 0.0,
                top1: None,
                top5: None,
                evaluated_on: None,
            })
            .collect();
        let params = model.export_params();
        let (bytes, _) = ast_infer::export(
            self.kind.name(),
            &graph,
            &params,
            subnets,
            self.values,
            serde_json::Value::Null,
        )?;
        Ok((bytes, dense_safetensors_len(&params)?))
    }
}

/// The size of the dense model as the f32 safetensors file one would ship without sparsity:
/// every float parameter and buffer, with one BatchNorm set (sub-net 0's) where each sub-net
/// has its own.
fn dense_safetensors_len(params: &ast_infer::Params) -> Result<usize> {
    use safetensors::tensor::{Dtype, TensorView};
    let bytes: Vec<(String, Vec<u8>)> = params
        .floats
        .iter()
        .filter(|(key, _)| !key.contains(".norms.") || key.contains(".norms.0."))
        .map(|(key, values)| {
            let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (key.replace(".norms.0.", "."), data)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(key, data)| {
            Ok((
                key,
                TensorView::new(Dtype::F32, vec![data.len() / 4], data)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::serialize(views, None)?.len())
}

/// Times every sub-net of a model file and the same model dense, per batch size.
pub fn bench_infer(args: &BenchInferArgs) -> Result<()> {
    if args.batch.contains(&0) {
        bail!("--batch: batch sizes must be at least 1");
    }
    let (bytes, name, dense_file) = match (&args.model, args.synthetic) {
        (Some(path), _) => (
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
            path.display().to_string(),
            None,
        ),
        (None, Some(kind)) => {
            let densities = args.densities.iter().flatten();
            let mut targets: Vec<SubnetTarget> =
                densities.map(|&d| SubnetTarget::Density(d)).collect();
            targets.extend(args.nm.iter().flatten());
            if let Some(SubnetTarget::Nm { n, m }) = targets
                .iter()
                .find(|t| matches!(t, SubnetTarget::Nm { n, m } if *n == 0 || n > m))
            {
                bail!("--nm {n}:{m}: N must be 1 to M");
            }
            if targets.is_empty() {
                bail!("--synthetic needs its sub-nets: give --densities (e.g. 0.1,0.05) or --nm (e.g. 1:8)");
            }
            let job = Synthetic {
                kind,
                targets,
                seed: args.seed,
                values: args.values.into(),
            };
            let (bytes, dense) = crate::backend::dispatch(&crate::BackendArgs::cpu(), job)?;
            (bytes, format!("random {}", kind.name()), Some(dense))
        }
        (None, None) => bail!("give --model FILE or --synthetic MODEL --densities …|--nm …"),
    };
    let start = Instant::now();
    let mut model = InferenceModel::from_bytes(&bytes)?;
    let load_ms = start.elapsed().as_secs_f64() * 1000.0;
    let dense = InferenceModel::dense_reference(&bytes)?;
    let switches = 100_000;
    let start = Instant::now();
    for i in 0..switches {
        model.set_subnet(i % model.subnets())?;
    }
    let switch_ns = start.elapsed().as_secs_f64() * 1e9 / switches as f64;
    println!(
        "{name} ({}, {} sub-nets), {} with {}, {} threads",
        model.header().model,
        model.subnets(),
        ast_infer::pick::this_machine().0,
        ast_kernels::simd_level(),
        rayon::current_num_threads()
    );
    let dense_bytes: usize = model
        .header()
        .report
        .iter()
        .map(|l| l.dense_f32_bytes)
        .sum();
    let dense_model = match dense_file {
        Some(n) => format!(
            "; the dense model as f32 safetensors: {:.1} KiB",
            n as f64 / 1024.0
        ),
        None => String::new(),
    };
    println!(
        "file {:.1} KiB (masked layers dense in f32: {:.1} KiB{dense_model}); load {load_ms:.1} \
         ms, switch {switch_ns:.0} ns",
        bytes.len() as f64 / 1024.0,
        dense_bytes as f64 / 1024.0
    );
    let runs = args.runs as usize;
    // The work of a pass, against the dense one: the speed-up that sparsity alone could give.
    let dense_work = dense.multiply_adds(0)?;
    let work: Vec<u64> = (0..model.subnets())
        .map(|k| model.multiply_adds(k))
        .collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    for &batch in &args.batch {
        let dense_latency = dense.latencies(batch, runs)?[0];
        let latencies = model.latencies(batch, runs)?;
        println!(
            "batch {batch}: median / p90 ms, images/s, speed-up over dense, multiply-adds \
             (share of dense)"
        );
        let line = |name: String, l: &Latency, work: u64| {
            println!(
                "  {name:<28} {:9.3} / {:9.3}  {:9.1}  {:5.2}×  {:7.1} M ({:5.3})",
                l.median_ms,
                l.p90_ms,
                batch as f64 * 1000.0 / l.median_ms,
                dense_latency.median_ms / l.median_ms,
                work as f64 / 1e6,
                work as f64 / dense_work as f64
            );
        };
        line("dense (all-ones masks)".into(), &dense_latency, dense_work);
        rows.push(serde_json::json!({
            "batch": batch, "subnet": "dense", "density": 1.0, "multiply_adds": dense_work,
            "median_ms": dense_latency.median_ms, "p90_ms": dense_latency.p90_ms,
        }));
        for (k, (s, l)) in model.header().subnets.iter().zip(&latencies).enumerate() {
            line(
                format!("sub-net {k} (density {:.4})", s.density),
                l,
                work[k],
            );
            rows.push(serde_json::json!({
                "batch": batch, "subnet": k, "density": s.density, "multiply_adds": work[k],
                "median_ms": l.median_ms, "p90_ms": l.p90_ms,
            }));
        }
    }
    if args.layers {
        print_layers("dense (all-ones masks)", &dense, 0, runs)?;
        for (k, s) in model.header().subnets.iter().enumerate() {
            print_layers(
                &format!("sub-net {k} (density {:.4})", s.density),
                &model,
                k,
                runs,
            )?;
        }
    }
    let peak = peak_rss_mib();
    if let Some(mib) = peak {
        println!("peak resident memory {mib:.0} MiB");
    }
    if let Some(out) = &args.json {
        let json = serde_json::json!({
            "model": name, "cpu": ast_infer::pick::this_machine().0, "simd": ast_kernels::simd_level(),
            "threads": rayon::current_num_threads(), "load_ms": load_ms,
            "file_bytes": bytes.len(), "masked_dense_f32_bytes": dense_bytes,
            "dense_safetensors_bytes": dense_file,
            "switch_ns": switch_ns, "peak_rss_mib": peak, "timings": rows,
        });
        std::fs::write(out, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
        println!("results written to {}", out.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_net_lists() {
        assert_eq!(parse_subnets("all", 3).unwrap(), vec![0, 1, 2]);
        assert_eq!(parse_subnets("2,0", 3).unwrap(), vec![2, 0]);
        let err = |s: &str| parse_subnets(s, 3).unwrap_err().to_string();
        assert!(err("3").contains("the run has 3 sub-nets (0 to 2), not 3"));
        assert!(err("0,0").contains("listed twice"));
        assert!(err("one").contains("give `all` or sub-net indices"));
    }
}
