//! Data-parallel training (`--devices`, `ast_train::parallel`) on Flex.
//!
//! With BatchNorm, `N` workers of batch `b` cannot equal one worker of batch `N·b`: each worker
//! normalises with its own shard's statistics (as PyTorch's DDP without SyncBatchNorm; every
//! model here has BatchNorm). What they must equal is one worker that takes the same `N` shards
//! one after the other and steps with the mean of their gradients (gradient accumulation):
//! that is the reference below, written with `AstStep` alone, without any collective operation.

use std::path::Path;

use ast_core::rng::MaskRng;
use ast_core::subnet::{mask_vec, read_masks};
use ast_core::{AstConfig, AstStep, MaskScheduleConfig, SubnetTarget};
use ast_models::CifarResNet;
use ast_tests::{cli, parallel_run_args, run_results as results, stderr, tiny_idx_data, write_idx};
use ast_train::consistency::small_resnet;
use ast_train::parallel::{session, Team};
use burn::backend::{Autodiff, Flex};
use burn::module::{ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::prelude::*;

type AD = Autodiff<Flex>;

const STEPS: usize = 12;
const STEPS_PER_EPOCH: usize = 4;
const SHARD: usize = 4;

/// Three sub-nets pruned over the first two epochs, mask events every 3 iterations.
fn config() -> AstConfig {
    let mut config = AstConfig::new(vec![
        SubnetTarget::Density(0.5),
        SubnetTarget::Density(0.2),
        SubnetTarget::Density(0.05),
    ]);
    config.schedule = MaskScheduleConfig {
        update_frequency: 3,
        init_prune_epoch: 0,
        final_prune_epoch: 2,
        subnet_offset: 1,
        ..MaskScheduleConfig::default()
    };
    config
}

/// Shard `rank` of `workers` of every step's global batch (`workers · SHARD` samples).
fn shard(step: usize, rank: usize, workers: usize) -> (Tensor<AD, 4>, Tensor<AD, 1, Int>) {
    let mut rng = MaskRng::new(11, (step * workers + rank) as u64);
    let side = 16;
    let pixels: Vec<f32> = (0..SHARD * 3 * side * side)
        .map(|_| rng.next_f64() as f32 * 2.0 - 1.0)
        .collect();
    let labels: Vec<i64> = (0..SHARD).map(|_| (rng.next_u64() % 10) as i64).collect();
    let device = Default::default();
    (
        Tensor::from_data(TensorData::new(pixels, [SHARD, 3, side, side]), &device),
        Tensor::from_data(TensorData::new(labels, [SHARD]), &device),
    )
}

/// What a run leaves: per step and shard the loss, the mask events, the trained weights and
/// every sub-net's masks.
#[derive(Debug, PartialEq)]
struct Outcome {
    losses: Vec<Vec<f32>>,
    events: usize,
    weights: Vec<Vec<f32>>,
    masks: Vec<Vec<Vec<bool>>>,
    /// BatchNorm running statistics.
    buffers: Vec<Vec<f32>>,
}

/// The trained weights and (apart) the tensors without gradient, the running statistics.
#[derive(Default)]
struct Weights(Vec<Vec<f32>>, Vec<Vec<f32>>);

impl<B: Backend> ModuleVisitor<B> for Weights {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let values = param.val().into_data().to_vec().unwrap();
        match param.val().is_require_grad() {
            true => self.0.push(values),
            false => self.1.push(values),
        }
    }
}

fn outcome(model: &CifarResNet<AD>, losses: Vec<Vec<f32>>, events: usize) -> Outcome {
    ast_core::subnet::sync_running_stats(model);
    let mut weights = Weights::default();
    model.visit(&mut weights);
    let masks = (0..3)
        .map(|k| {
            read_masks(model, k)
                .unwrap()
                .into_iter()
                .map(mask_vec)
                .collect()
        })
        .collect();
    Outcome {
        losses,
        events,
        weights: weights.0,
        masks,
        buffers: weights.1,
    }
}

/// A copy of `initial` with its own sub-net switch, BatchNorm statistics and autodiff leaves.
fn copy_of(initial: &CifarResNet<AD>) -> CifarResNet<AD> {
    let device = Default::default();
    small_resnet::<AD>(&device)
        .load_record(initial.clone().into_record())
        .fork(&device)
}

/// Adds `others`' gradients to `sum` parameter by parameter, in order, then divides by their
/// count (what `Team::mean` does to the flat gradient).
struct MeanInto<'a> {
    sum: &'a mut GradientsParams,
    others: &'a mut [GradientsParams],
}

impl ModuleVisitor<AD> for MeanInto<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
        let Some(mut g) = self.sum.remove::<Flex, D>(param.id) else {
            return;
        };
        for other in self.others.iter_mut() {
            g = g + other.remove::<Flex, D>(param.id).expect("same parameters");
        }
        let g = g.div_scalar((self.others.len() + 1) as f32);
        self.sum.register::<Flex, D>(param.id, g);
    }
}

/// One worker taking the `workers` shards of every step one after the other.
fn accumulated(initial: &CifarResNet<AD>, workers: usize) -> Outcome {
    let model = copy_of(initial);
    let switch = model.switch().clone();
    let mut ast = AstStep::<AD>::new(config(), &model, &switch, STEPS_PER_EPOCH, STEPS).unwrap();
    let mut model = ast.init_masks(model);
    let loss_fn = CrossEntropyLossConfig::new().init(&Default::default());
    let (mut losses, mut events) = (Vec::new(), 0);
    for step in 0..STEPS {
        let iteration = ast.begin();
        let mut grads = Vec::new();
        let mut step_losses = Vec::new();
        for rank in 0..workers {
            let (x, y) = shard(step, rank, workers);
            let loss = loss_fn.forward(model.forward(x), y);
            step_losses.push(loss.clone().into_scalar());
            grads.push(GradientsParams::from_grads(loss.backward(), &model));
        }
        let (first, others) = grads.split_at_mut(1);
        model.visit(&mut MeanInto {
            sum: &mut first[0],
            others,
        });
        let mean = grads.swap_remove(0);
        let (stepped, report) = ast.step_params(model, mean, iteration, 0.05);
        model = stepped;
        events += usize::from(report.mask_update.is_some());
        losses.push(step_losses);
    }
    outcome(&model, losses, events)
}

/// `workers` threads, each a `Team` member training its own copy on its shard.
fn data_parallel(initial: &CifarResNet<AD>, workers: usize) -> Vec<Outcome> {
    let _session = session();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|rank| {
                let model = copy_of(initial);
                s.spawn(move || {
                    let device = Default::default();
                    let team = Team::<Flex>::join(rank, workers, &device).unwrap();
                    let switch = model.switch().clone();
                    let mut ast =
                        AstStep::<AD>::new(config(), &model, &switch, STEPS_PER_EPOCH, STEPS)
                            .unwrap();
                    let mut model = ast.init_masks(model);
                    let loss_fn = CrossEntropyLossConfig::new().init(&device);
                    let (mut losses, mut events) = (Vec::new(), 0);
                    for step in 0..STEPS {
                        let iteration = ast.begin();
                        let (x, y) = shard(step, rank, workers);
                        let loss = loss_fn.forward(model.forward(x), y);
                        losses.push(vec![loss.clone().into_scalar()]);
                        let grads = GradientsParams::from_grads(loss.backward(), &model);
                        let grads = team.mean_gradients(&model, grads).unwrap();
                        let (stepped, report) = ast.step_params(model, grads, iteration, 0.05);
                        model = stepped;
                        events += usize::from(report.mask_update.is_some());
                    }
                    // Straight after training: the last update of the statistics is still
                    // pending in burn's per-thread store, and must be part of the mean.
                    let model = team.mean_buffers(model).unwrap();
                    team.finish().unwrap();
                    outcome(&model, losses, events)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn max_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(a, b)| {
            assert_eq!(a.len(), b.len());
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        })
        .fold(0.0, f32::max)
}

fn workers_equal_gradient_accumulation(workers: usize) {
    let device = Default::default();
    AD::seed(&device, 5);
    // Drawn once, here: every copy loads these values.
    let drawn = small_resnet::<AD>(&device);
    let initial = small_resnet::<AD>(&device).load_record(drawn.into_record());
    let reference = accumulated(&initial, workers);
    assert!(reference.events >= 3, "the run must cross mask events");
    let team = data_parallel(&initial, workers);
    for (rank, got) in team.iter().enumerate() {
        // The same masks on every worker and as the reference, bit for bit.
        assert_eq!(got.masks, reference.masks, "worker {rank}'s masks");
        assert_eq!(got.events, reference.events);
        assert_eq!(
            got.weights, team[0].weights,
            "worker {rank}'s weights differ from worker 0's"
        );
        let shard_losses: Vec<Vec<f32>> = reference.losses.iter().map(|l| vec![l[rank]]).collect();
        assert!(
            max_difference(&got.losses, &shard_losses) <= 1e-5,
            "worker {rank}'s losses"
        );
    }
    let d = max_difference(&team[0].weights, &reference.weights);
    assert!(d <= 1e-5, "weights differ from the reference by {d}");
    // Each worker's running statistics come from its own shards; averaged, they are the same
    // everywhere.
    for (rank, got) in team.iter().enumerate() {
        assert_eq!(
            got.buffers, team[0].buffers,
            "worker {rank}'s running statistics"
        );
    }
}

#[test]
fn two_workers_equal_one_accumulating_two_shards() {
    workers_equal_gradient_accumulation(2);
}

#[test]
fn three_workers_equal_one_accumulating_three_shards() {
    workers_equal_gradient_accumulation(3);
}

/// `ast-cli run` of [`parallel_run_args`].
fn run(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let args = parallel_run_args(data, out, extra);
    cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn three_workers_repeat_bit_for_bit_and_resume_exactly() {
    let root = tempfile::tempdir().unwrap();
    // 96 samples in batches of 18: five of 18 and a last of 6 (shards 2, 2, 2).
    let data = tiny_idx_data(root.path(), 96, 40);
    let work = tempfile::tempdir().unwrap();
    let [a, b, c] = ["a", "b", "c"].map(|n| work.path().join(n));
    for out in [&a, &b] {
        let output = run(&data, out, &["--devices", "0,1,2"]);
        assert!(output.status.success(), "{}", stderr(&output));
    }
    let first = results(&a);
    assert_eq!(first.1.len(), 3, "three epochs of metrics");
    assert_eq!(first, results(&b), "two runs with the same seed differ");
    assert!(
        std::fs::read(a.join("events.jsonl")).unwrap().len() > 10,
        "the run must cross mask events"
    );

    // Stopped as by SIGINT in the middle of the second epoch, then resumed.
    let output = run(
        &data,
        &c,
        &["--devices", "0,1,2", "--stop-gracefully-after", "9"],
    );
    let err = stderr(&output);
    assert!(!output.status.success(), "{err}");
    assert!(err.contains("stopped at iteration 9"), "{err}");
    // Resumed without --devices: on the run's own three workers, as it says.
    let output = cli(&["run", "--resume", "--quiet", "--out", c.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("resuming on the run's devices 0,1,2"),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        results(&c),
        first,
        "the resumed run differs from the uninterrupted one"
    );

    // Resumed on another worker count: said, and recorded.
    let d = work.path().join("d");
    let output = run(
        &data,
        &d,
        &["--devices", "0,1,2", "--stop-gracefully-after", "9"],
    );
    assert!(!output.status.success(), "{}", stderr(&output));
    let d_s = d.to_str().unwrap();
    let output = cli(&["run", "--resume", "--quiet", "--out", d_s, "--devices", "0"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("the run trained on 3 worker(s) and goes on with 1"),
        "{}",
        stderr(&output)
    );
    let saved = ast_train::read_run_config(&d).unwrap();
    assert_eq!(saved.devices, Some(vec![0]));
}

/// Two workers killed (exit 137, no cleanup, as by SIGKILL; the `AST_KILL_AT` hook) between
/// every two writes of a checkpoint, of an epoch's metrics and of the run's finish, then
/// resumed with and without `--devices`: every time the same run as the uninterrupted one, with
/// nothing left over. Each point is taken four times (40 kills), so a fault that shows in one
/// resume of 40 (as one once did: "worker 1 sent 242474 values where worker 0 sent 241610")
/// would likely fail it.
#[test]
fn two_workers_killed_inside_every_checkpoint_write_resume_exactly() {
    let root = tempfile::tempdir().unwrap();
    let data = tiny_idx_data(root.path(), 96, 40);
    let work = tempfile::tempdir().unwrap();
    let full = work.path().join("full");
    let output = run(&data, &full, &["--devices", "0,1"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let expected = results(&full);
    let listing = |dir: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    for round in 0..4 {
        for point in ast_tests::KILL_POINTS {
            let killed = work.path().join(format!("killed-{round}-{point}"));
            let args = parallel_run_args(&data, &killed, &["--devices", "0,1"]);
            let output = std::process::Command::new(ast_tests::cli_path())
                .args(&args)
                .env("AST_KILL_AT", point)
                .output()
                .unwrap();
            assert_eq!(
                output.status.code(),
                Some(137),
                "{point}: {}",
                stderr(&output)
            );
            let k = killed.to_str().unwrap();
            // Every other resume names the devices; the rest take the run's own.
            let output = match round % 2 {
                0 => cli(&["run", "--resume", "--quiet", "--out", k, "--devices", "0,1"]),
                _ => cli(&["run", "--resume", "--quiet", "--out", k]),
            };
            assert!(
                output.status.success(),
                "{point}, round {round}: {}",
                stderr(&output)
            );
            assert_eq!(results(&killed), expected, "{point}, round {round}");
            assert_eq!(listing(&killed), listing(&full), "{point}, round {round}");
            std::fs::remove_dir_all(&killed).unwrap();
        }
    }
}

#[test]
fn one_worker_equals_the_plain_loop_bit_for_bit() {
    let root = tempfile::tempdir().unwrap();
    let data = tiny_idx_data(root.path(), 96, 40);
    let work = tempfile::tempdir().unwrap();
    let [plain, team] = ["plain", "team"].map(|n| work.path().join(n));
    let output = run(&data, &plain, &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    // `--devices 0`: the data-parallel machinery (exchanges, shards, statistics) with one worker.
    let output = run(&data, &team, &["--devices", "0"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(results(&team), results(&plain));
}

#[test]
fn bad_device_lists_are_refused_with_one_line() {
    let root = tempfile::tempdir().unwrap();
    let data = tiny_idx_data(root.path(), 96, 40);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("run");
    for (devices, expected) in [
        ("0,1,0", "device 0 is listed twice"),
        ("0,,1", "is not a device index"),
        ("0,a", "`a` is not a device index"),
        ("0,1,2,3", "(18) is not divisible by the 4 workers"),
        (
            "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16",
            "the CPU backends take at most 16",
        ),
    ] {
        let output = run(&data, &out, &["--devices", devices]);
        let err = stderr(&output);
        assert!(!output.status.success(), "{devices}: {err}");
        assert!(err.contains(expected), "{devices}: {err}");
        assert!(
            !out.join("config.json").exists(),
            "{devices}: a refused run left files"
        );
    }
    // Two samples in the last batch of 18 (92 = 5·18 + 2) cannot feed three workers.
    write_idx(&data, "train", 92, 28);
    let output = run(&data, &out, &["--devices", "0,1,2"]);
    let err = stderr(&output);
    assert!(!output.status.success(), "{err}");
    assert!(err.contains("fewer than the 3 workers"), "{err}");
}
