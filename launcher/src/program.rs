//! Finding the programs to run: the ranks' program (absolute, executable) and mpirun, on PATH.
use anyhow::{bail, Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Checks that `program` is an executable file and returns it as an absolute path; a bare name is looked up on PATH.
pub fn resolve(program: &Path) -> Result<PathBuf> {
    let is_bare_name = program.components().count() == 1 && !program.is_absolute();
    let path = if is_bare_name && !program.exists() {
        match find_in_path(program.as_os_str()) {
            Some(path) => path,
            None => bail!("program {} not found on PATH; build it with `scripts/setup`", program.display()),
        }
    } else {
        std::path::absolute(program).with_context(|| format!("invalid program path {}", program.display()))?
    };
    if !path.is_file() {
        bail!("program {} does not exist; build it with `scripts/setup` (or pass --program)", path.display());
    }
    if !is_executable(&path) {
        bail!("program {} is not executable", path.display());
    }
    Ok(path)
}

fn is_executable(path: &Path) -> bool {
    path.metadata().is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// The first executable called `name` in a directory of PATH.
pub fn find_in_path(name: impl AsRef<std::ffi::OsStr>) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name.as_ref())).find(|candidate| is_executable(candidate))
}
