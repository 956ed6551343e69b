//! `ast-cli run`: train or resume a run, alone, on several devices or several machines.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use ast_train::RunOptions;
use clap::Args;

use crate::cli::{BackendArgs, BackendKind};
use crate::recipes::{apply_overrides, load_recipe, Overrides};
use crate::{backend, report};

#[derive(Args, Debug)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) backend: BackendArgs,
    /// A shipped recipe name (see `ast-cli recipes`) or a JSON file.
    #[arg(long)]
    pub(crate) recipe: Option<String>,
    /// Run directory (default: runs/RECIPE, the recipe's name).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long, conflicts_with = "overwrite")]
    pub(crate) resume: bool,
    /// Replace a run already in --out.
    #[arg(long)]
    pub(crate) overwrite: bool,
    /// Start from the weights, masks and BatchNorms of this run directory's last checkpoint
    /// (fine-tuning; a run of `ast-cli import`), with the same model, classes and number of
    /// sub-nets; the optimizer, the schedules and the data order start afresh.
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    pub(crate) init_from: Option<PathBuf>,
    /// No progress output.
    #[arg(long)]
    pub(crate) quiet: bool,
    /// Stop abruptly after this many iterations, writing nothing more (tests a kill).
    #[arg(long, hide = true)]
    pub(crate) stop_after_iterations: Option<usize>,
    /// Stop gracefully (as on SIGINT) after this many iterations (tests).
    #[arg(long, hide = true)]
    pub(crate) stop_gracefully_after: Option<usize>,
    /// Data-parallel training on these devices, e.g. `0,1,2`: one worker each, on an equal
    /// shard of every batch (the batch size stays the global one). CUDA: GPU indices; CPU
    /// backends: workers sharing the CPU (at most 16). One device here (`--devices 0`) runs
    /// the data-parallel machinery with one worker (to measure what it costs).
    #[arg(long, value_name = "LIST", value_parser = parse_devices, conflicts_with = "device")]
    pub(crate) devices: Option<DeviceList>,
    /// Several machines: this process is one of N started by `mpirun -np N` (one per machine,
    /// each with the same --devices count); needs a binary built with `--features mpi`.
    #[arg(long, value_name = "N")]
    pub(crate) nodes: Option<usize>,
    #[command(flatten)]
    pub(crate) overrides: Overrides,
}

/// Most workers `--devices` starts on a CPU backend.
pub(crate) const MAX_CPU_WORKERS: usize = 16;

/// The other processes of a run on several machines (`--nodes`), checked against `mpirun`'s.
pub(crate) fn nodes(
    requested: Option<usize>,
) -> Result<Option<std::sync::Arc<dyn ast_train::parallel::CrossNode>>> {
    let Some(n) = requested else {
        return Ok(None);
    };
    if n == 0 {
        bail!("--nodes 0: give the number of processes (machines), at least 1");
    }
    #[cfg(feature = "mpi")]
    {
        use ast_train::parallel::CrossNode;
        if !mpi::environment::is_initialized() {
            bail!("--nodes: MPI could not be initialised; launch with `mpirun -np {n}`");
        }
        if mpi::environment::threading_support() < mpi::Threading::Serialized {
            bail!(
                "--nodes: this MPI library gives no thread support (MPI_THREAD_SERIALIZED is \
                 needed); use an MPI built with threads (Debian's Open MPI is)"
            );
        }
        let world = ast_train::mpi::MpiNodes::world();
        if world.size() != n {
            bail!(
                "--nodes {n}, but mpirun started {} process(es): launch with `mpirun -np {n} \
                 ast-cli run --nodes {n} …` (one process per machine)",
                world.size()
            );
        }
        Ok(Some(std::sync::Arc::new(world)))
    }
    #[cfg(not(feature = "mpi"))]
    bail!(
        "--nodes needs a binary built with MPI: `cargo build --release -p ast-cli --features mpi` \
         (Debian: apt install libopenmpi-dev libclang-dev), launched by `mpirun -np {n}`"
    )
}

/// Ends a process of a run on several machines that cannot go on: the others would wait for
/// it for ever, so it prints `message` and asks MPI to end the whole job (`MPI_Abort`).
pub(crate) fn abort_nodes(message: &str) {
    #[cfg(feature = "mpi")]
    {
        use mpi::traits::Communicator;
        eprintln!(
            "{message}; ending the other processes of the run (resume them all with --resume)"
        );
        mpi::topology::SimpleCommunicator::world().abort(1);
    }
    #[cfg(not(feature = "mpi"))]
    let _ = message;
}

/// The indices of `--devices`.
#[derive(Debug, Clone)]
pub(crate) struct DeviceList(Vec<usize>);

/// Parses `--devices`: distinct indices separated by commas.
pub(crate) fn parse_devices(text: &str) -> std::result::Result<DeviceList, String> {
    let mut devices = Vec::new();
    for part in text.split(',') {
        let index: usize = part.trim().parse().map_err(|_| {
            format!("`{part}` is not a device index: give distinct indices separated by commas, e.g. 0,1,2")
        })?;
        if devices.contains(&index) {
            return Err(format!(
                "device {index} is listed twice: give each device once"
            ));
        }
        devices.push(index);
    }
    Ok(DeviceList(devices))
}

/// The run directory of `run`.
fn out_dir(args: &RunArgs) -> Result<PathBuf> {
    Ok(match (&args.out, &args.recipe) {
        (Some(out), _) => out.clone(),
        (None, Some(recipe)) if !args.resume => {
            let stem = Path::new(recipe)
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("run");
            PathBuf::from("runs").join(stem)
        }
        _ => bail!("--out is required (the run directory)"),
    })
}

/// The data-parallel devices `run` trains on: `--devices`, else those of the run being
/// resumed (its worker count is part of its trajectory); `None` for one device.
pub(crate) fn chosen_devices(args: &RunArgs) -> Option<Vec<usize>> {
    let listed = args.devices.as_ref().map(|DeviceList(list)| list.clone());
    let saved = || {
        let out = out_dir(args).ok()?;
        ast_train::read_run_config(&out).ok()?.devices
    };
    match args.resume {
        true => listed.or_else(saved),
        false => listed,
    }
}

/// Says how the devices of a resumed run compare with those it trained on.
fn note_devices(listed: bool, saved: Option<&Vec<usize>>, chosen: Option<&Vec<usize>>) {
    let workers = |d: Option<&Vec<usize>>| d.map_or(1, Vec::len);
    match (listed, saved) {
        (false, Some(list)) => eprintln!(
            "resuming on the run's devices {} (--devices changes them)",
            list.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
        (true, _) if workers(saved) != workers(chosen) => eprintln!(
            "note: the run trained on {} worker(s) and goes on with {}: each worker normalises \
             its own shard, so it will not equal a run that kept {0}",
            workers(saved),
            workers(chosen)
        ),
        _ => {}
    }
}

pub(crate) fn run(args: RunArgs) -> Result<()> {
    let chosen = chosen_devices(&args);
    let devices = chosen.clone().unwrap_or(vec![args.backend.device]);
    if args.backend.backend != BackendKind::Cuda && devices.len() > MAX_CPU_WORKERS {
        bail!(
            "--devices lists {} workers; the CPU backends take at most {MAX_CPU_WORKERS}",
            devices.len()
        );
    }
    let nodes = nodes(args.nodes)?;
    for &device in &devices {
        backend::check(&BackendArgs {
            device,
            ..args.backend.clone()
        })?;
    }
    let out = out_dir(&args)?;
    let listed = args.devices.is_some();
    let mut config = if args.resume {
        if let Some(recipe) = &args.recipe {
            bail!("--recipe {recipe} with --resume: a resumed run keeps its own configuration");
        }
        // The flags given are applied to the saved configuration; the library refuses the
        // ones a resumed run cannot change.
        match ast_train::read_run_config(&out) {
            Ok(saved) => Some(apply_overrides(saved, args.overrides)?),
            Err(_) => None,
        }
    } else {
        let recipe = args.recipe.as_deref().unwrap_or("quickstart");
        Some(apply_overrides(load_recipe(recipe)?, args.overrides)?)
    };
    if let Some(c) = &mut config {
        if args.resume {
            note_devices(listed, c.devices.as_ref(), chosen.as_ref());
        }
        c.devices = chosen.clone();
        if !args.resume {
            c.init_from = args.init_from.clone();
        }
    }
    let (first_step_note, first_step_marker) = match &config {
        Some(c) => backend::first_step_note(&args.backend, &c.model.to_string(), c.batch_size),
        None => (None, None),
    };
    let opts = RunOptions {
        first_step_note,
        first_step_marker,
        dir: out,
        resume: args.resume,
        overwrite: args.overwrite,
        progress: !args.quiet,
        stop_after: args.stop_after_iterations,
        stop: Some(graceful_stop()?),
        stop_gracefully_after: args.stop_gracefully_after,
    };
    // The lock on the run directory is held until this function returns.
    let (config, _lock) = match ast_train::prepare_run_dir(config, &opts) {
        Err(e @ ast_train::TrainError::RunFinished { .. }) => {
            eprintln!("{e}");
            return Ok(());
        }
        prepared => prepared?,
    };
    if !args.quiet {
        eprintln!(
            "run {}: {} on {} ({}), {} sub-nets, {} epochs, backend {:?}",
            opts.dir.display(),
            config.model,
            config.data.kind.name(),
            config.data.path.display(),
            config.ast.subnets.len(),
            config.epochs,
            args.backend.backend
        );
    }
    let several_nodes = nodes.is_some();
    let summary = match backend::dispatch(
        &args.backend,
        backend::Train {
            config,
            opts: &opts,
            devices: chosen,
            nodes,
        },
    ) {
        Ok(summary) => summary,
        Err(e) => {
            if !opts.resume {
                // A new run that failed before its first checkpoint leaves nothing behind.
                ast_train::discard_unstarted_run(&opts.dir)?;
            }
            if several_nodes {
                abort_nodes(&format!("error: {e:#}"));
            }
            return Err(e);
        }
    };
    if summary.interrupted {
        if several_nodes {
            abort_nodes("stopped after the requested number of iterations");
        }
        eprintln!("stopped after the requested number of iterations");
        return Ok(());
    }
    report::print_summary(&summary);
    println!("run directory: {}", opts.dir.display());
    Ok(())
}

/// The flag SIGINT and SIGTERM raise: the run finishes its iteration, checkpoints and stops.
/// A second signal, with the flag already raised, exits at once (status 130).
pub(crate) fn graceful_stop() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Registered first, so that it sees the flag as the previous signal left it.
        signal_hook::flag::register_conditional_shutdown(signal, 130, flag.clone())
            .context("cannot install the signal handler")?;
        signal_hook::flag::register(signal, flag.clone())
            .context("cannot install the signal handler")?;
    }
    Ok(flag)
}
