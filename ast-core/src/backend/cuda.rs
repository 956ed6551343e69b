//! CUDA through burn-cuda: the backend types (kernel fusion on or off) and the cubecl
//! configuration that keeps compiled kernels and autotune results between runs.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cubecl::config::cache::CacheConfig;
use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};

/// CUDA with burn's kernel fusion (element-wise chains compiled into one kernel).
pub type CudaFused = burn_cuda::Cuda<f32, i32>;
/// CUDA without fusion: every tensor operation launches its own kernel.
pub type CudaUnfused = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
pub use burn_cuda::CudaDevice;

/// Whether conv and matmul kernels are autotuned (chosen at build time by the `cuda-autotune`
/// feature).
pub const AUTOTUNE: bool = cfg!(feature = "cuda-autotune");

/// The default directory of the kernel and autotune caches: `$AST_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/ast/cuda`, else `~/.cache/ast/cuda`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("AST_KERNEL_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("ast").join("cuda")))
        .or_else(|| env("HOME").map(|d| d.join(".cache").join("ast").join("cuda")))
}

static CONFIGURED: OnceLock<PathBuf> = OnceLock::new();

/// Points cubecl's compiled-kernel cache (PTX) and autotune cache at `dir`, keeping every other
/// setting of a `cubecl.toml` found above the working directory and of the `CUBECL_*`
/// environment variables. Must run before the first CUDA tensor exists; a second call with the
/// same directory does nothing, with another one it is an error. Nothing is created here (cubecl
/// creates the directory when it first stores a kernel), but a directory that could not be
/// created is refused.
pub fn configure_caches(dir: &Path) -> Result<(), String> {
    let refuse = |why: &str| {
        format!(
            "the GPU kernel cache {} {why}; pass --kernel-cache DIR with a writable directory",
            dir.display()
        )
    };
    let existing = dir
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or(Path::new("/"));
    match std::fs::metadata(existing) {
        Ok(m) if !m.is_dir() => {
            return Err(refuse(&format!("is under a file ({})", existing.display())))
        }
        Ok(m) if m.permissions().readonly() => return Err(refuse("is not writable")),
        Ok(_) => {}
        Err(e) => return Err(refuse(&format!("cannot be read ({e})"))),
    }
    let mut first = false;
    let chosen = CONFIGURED.get_or_init(|| {
        first = true;
        dir.to_path_buf()
    });
    if !first {
        return if chosen == dir {
            Ok(())
        } else {
            Err(format!(
                "the GPU kernel cache is already {} in this process",
                chosen.display()
            ))
        };
    }
    let dir = dir.to_path_buf();
    let set = std::panic::catch_unwind(move || {
        // A malformed `cubecl.toml` panics while it is read: the error below names it.
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        config.autotune.cache = CacheConfig::File(dir.clone());
        config.compilation.cache = Some(CacheConfig::File(dir));
        CubeClRuntimeConfig::set(config)
    });
    set.map_err(|_| {
        "cannot configure cubecl: a cubecl.toml above the working directory is malformed, or \
         cubecl was already in use"
            .to_string()
    })
}

/// Bytes cubecl's memory pools hold on `device` for this thread's stream: pools grow to the
/// largest working set and do not shrink, so after a run this is its peak device memory (the
/// CUDA context itself not counted). `None` when the device cannot be asked.
pub fn memory_reserved(device: &CudaDevice) -> Option<u64> {
    use cubecl::Runtime;
    cubecl::cuda::CudaRuntime::client(device)
        .memory_usage()
        .ok()
        .map(|m| m.bytes_reserved)
}
