//! An exclusive lock on a run directory, so that two processes never train, overwrite or resume
//! the same run at once.
//!
//! The lock is the OS's advisory file lock (`flock` on Unix, `LockFileEx` on Windows) on
//! `<run>/.lock`, which holds the PID of the process that took it; the OS releases it when the
//! process ends, however it ends, so a killed run never leaves a stale lock behind.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

use crate::error::{Result, TrainError};

/// The lock file inside a run directory.
pub const LOCK_FILE: &str = ".lock";

/// Holds the exclusive lock on a run directory until dropped.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Takes the lock on `dir` (which must exist) without waiting. Errors when another process
    /// holds it, naming that process's PID.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        // Opening follows a symbolic link (and creates a dangling one's target): the PID would
        // be written into whatever it points at. Refuse one, before opening and after.
        let plain = || std::fs::symlink_metadata(&path).map(|m| m.file_type().is_file());
        if plain().is_ok_and(|plain| !plain) {
            return Err(TrainError::LockNotAFile(path));
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        if !plain().unwrap_or(false) || !same_file(&file, &path) {
            return Err(TrainError::LockNotAFile(path));
        }
        match file.try_lock() {
            Ok(()) => {
                let pid = std::process::id().to_string();
                file.set_len(0)
                    .and_then(|()| file.rewind())
                    .and_then(|()| file.write_all(pid.as_bytes()))
                    .map_err(|e| TrainError::io(&path, e))?;
                Ok(Self { _file: file })
            }
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                // The holder may be writing its PID right now: an empty read says "unknown".
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "another process".to_string(),
                    pid => format!("process {pid}"),
                };
                Err(TrainError::RunLocked {
                    dir: dir.to_path_buf(),
                    holder,
                })
            }
            Err(TryLockError::Error(e)) => Err(TrainError::io(&path, e)),
        }
    }
}

/// Whether the open `file` is the file at `path` (not one that replaced it meanwhile).
#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Elsewhere the check before opening is the only one.
#[cfg(not(unix))]
fn same_file(_file: &File, _path: &Path) -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        let held = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(held, std::process::id().to_string());
        // Two open file descriptions conflict even within one process.
        let err = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("process {}", std::process::id())),
            "{err}"
        );
        drop(first);
        RunLock::acquire(dir.path()).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_lock_that_is_a_symbolic_link_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious.txt");
        std::fs::write(&target, "keep me").unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::os::unix::fs::symlink(&target, run.join(LOCK_FILE)).unwrap();
        let err = RunLock::acquire(&run).unwrap_err().to_string();
        assert!(
            err.contains("is a symbolic link or not a plain file"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
        // A dangling link: its target is not created.
        let dangling = dir.path().join("run2");
        std::fs::create_dir(&dangling).unwrap();
        let nowhere = dir.path().join("nowhere");
        std::os::unix::fs::symlink(&nowhere, dangling.join(LOCK_FILE)).unwrap();
        assert!(RunLock::acquire(&dangling).is_err());
        assert!(!nowhere.exists());
    }
}
