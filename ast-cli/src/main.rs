//! `ast-cli`: run, evaluate and inspect Alternating Sparse Training runs.
//!
//! `cli` holds the command line's types, `recipes` the shipped recipes and the flags that
//! override them, `commands/` one file per command (`backend` runs a command on the chosen
//! backend; `report` prints results).

use std::process::ExitCode;

use anyhow::Result;
use ast_train::TrainConfig;
use clap::Parser;

mod backend;
mod cli;
mod commands;
mod recipes;
mod report;

pub(crate) use cli::{parse_budget, BackendArgs, BackendKind, Precision, Switch};
use cli::{Cli, Command};
use recipes::RECIPES;

/// Tensors are allocated and freed at a high rate, many of them megabytes large: glibc maps
/// each of those afresh (a page fault per 4 KiB touched); mimalloc reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc returns freed memory to the OS after a delay (`purge_delay`, 1 s in mimalloc 3),
/// and a training step frees and re-allocates the same large tensors: each return costs page
/// faults on the next use (sys time 10–20 % of the CPU time). mimalloc reads its options from
/// the environment once, when the process starts, and setting one from the program needs an
/// `unsafe` call; so the program starts itself again, in place (`exec`: same PID, arguments
/// and descriptors), with `MIMALLOC_PURGE_DELAY=-1` (never return freed memory; the peak stays
/// what it was). A value the user set is kept. Back to back on 2 cores: wide ResNet-32 at
/// density 0.1 245 → 263–265 img/s, sys time 1.1–2.2 → 0.1–0.3 s per 12 steps.
#[cfg(unix)]
fn keep_freed_memory_mapped() {
    use std::os::unix::process::CommandExt;
    const OPTION: &str = "MIMALLOC_PURGE_DELAY";
    if std::env::var_os(OPTION).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut again = std::process::Command::new(exe);
    if let Some(name) = args.next() {
        again.arg0(name);
    }
    // `exec` returns only when it failed: then this process goes on with mimalloc's default.
    let _failed = again.args(args).env(OPTION, "-1").exec();
}

fn main() -> ExitCode {
    #[cfg(unix)]
    keep_freed_memory_mapped();
    quiet_on_broken_pipe();
    let cli = Cli::parse();
    if let Err(e) = limit_simd_from_env() {
        return finish(Err(e));
    }
    // The command runs on a worker of the rayon pool the kernels use, not beside it: a
    // parallel region then starts on the calling worker, and no third thread competes with the
    // pool's for the cores between regions (Flex training step +4–8 % on 2 cores, measured
    // back to back). Workers get the main thread's stack size (burn's backward recurses).
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("ast-worker-{i}"))
        .stack_size(8 << 20)
        .build_global();
    // Data-parallel workers are threads of their own that block in their exchanges: none of
    // them may hold a pool thread, so that command stays outside (its workers use the pool).
    let data_parallel = matches!(&cli.command, Command::Run(r)
        if commands::run::chosen_devices(r).is_some() || r.nodes.is_some());
    // MPI lives for the whole process; each process's worker 0 calls it from its own thread.
    #[cfg(feature = "mpi")]
    let _mpi = match &cli.command {
        Command::Run(r) if r.nodes.is_some() => {
            mpi::initialize_with_threading(mpi::Threading::Serialized)
        }
        _ => None,
    };
    let result = if pool.is_ok() && !data_parallel {
        rayon::scope(|_| command(cli))
    } else {
        // No threads to be had: the command runs on the main thread, the kernels serially.
        command(cli)
    };
    finish(result)
}

fn command(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => commands::run::run(*args),
        Command::Eval(args) => backend::dispatch(
            &args.backend,
            backend::Eval {
                run: &args.run,
                data_path: args.data_path.as_deref(),
                json: args.json.as_deref(),
                latency: args
                    .latency_budget_ms
                    .map(|ms| (ms / 1000.0, args.latency_batch as usize)),
            },
        ),
        Command::Bench(args) => commands::bench::bench(args),
        Command::Schedule(args) => commands::schedule::schedule(*args),
        Command::CheckBackend(args) => commands::check::check_backend(args),
        Command::Stats(args) => backend::stats(&args.run, args.csv.as_deref()),
        Command::Plot(args) => commands::plot::plot(args),
        Command::Report(args) => commands::report::report(args),
        Command::Export(args) => backend::dispatch(&args.backend, commands::deploy::Export(&args)),
        Command::Infer(args) => commands::deploy::infer(&args),
        Command::BenchInfer(args) => commands::deploy::bench_infer(&args),
        Command::Calibrate(args) => commands::deploy::calibrate(&args),
        Command::Import(args) => commands::import::import(args),
        Command::Recipes => {
            for (name, json, launch) in RECIPES {
                let c: TrainConfig = serde_json::from_str(json).expect("shipped recipes parse");
                println!(
                    "{name:<22} {} on {}, {} sub-nets, {} epochs{launch}",
                    c.model,
                    c.data.kind.name(),
                    c.ast.subnets.len(),
                    c.epochs
                );
            }
            Ok(())
        }
    }
}

/// `AST_SIMD=avx2|scalar|native` limits the kernels' SIMD level (to measure a narrower level
/// on a CPU that has a wider one; `bench` and `bench-infer` print the level they ran at).
fn limit_simd_from_env() -> Result<()> {
    let Some(value) = std::env::var_os("AST_SIMD") else {
        return Ok(());
    };
    match value.to_str().and_then(ast_kernels::SimdLimit::from_name) {
        Some(limit) => {
            ast_kernels::limit_simd(limit);
            Ok(())
        }
        None => anyhow::bail!(
            "AST_SIMD={}: give native, avx2 or scalar (or leave it unset)",
            value.to_string_lossy()
        ),
    }
}

/// `ast-cli stats --run R | head`: once the reader has gone, printing fails with a broken pipe,
/// which `println!` turns into a panic (Rust ignores SIGPIPE). The process ends instead as one
/// that SIGPIPE killed would: silently, status 141.
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let text = (payload.downcast_ref::<String>().map(String::as_str))
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if text.starts_with("failed printing to stdout") && text.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn finish(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A stop the user asked for is not an error; the status says the run is not done
        // (130, as a shell reports an interrupted command).
        Err(e)
            if matches!(
                e.downcast_ref(),
                Some(ast_train::TrainError::Stopped { .. })
            ) =>
        {
            eprintln!("{e:#}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
