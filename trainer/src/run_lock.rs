//! One job per run directory: rank 0 holds an exclusive lock on `RUN_DIR/.lock` for the job's life; the kernel drops it when the process dies, so a crashed job leaves no stale lock.
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Takes the lock of `run_dir` (created if missing), or names the job that holds it.
    pub fn acquire(run_dir: &Path) -> Result<RunLock> {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("cannot create run directory {}", run_dir.display()))?;
        let path = run_dir.join(".lock");
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock takes the descriptor of a file this function keeps open, and flags.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::WouldBlock {
                return Err(error).with_context(|| format!("cannot lock {}", path.display()));
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            bail!(
                "run directory {} is in use by another job ({}); wait for it to end, or choose another train.run_dir",
                run_dir.display(),
                holder.trim()
            );
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let holder = format!("pid {} on {}", std::process::id(), host.trim());
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(holder.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(RunLock { _file: file })
    }
}
