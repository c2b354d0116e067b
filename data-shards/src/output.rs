//! Where `prepare` may publish: a new directory, or with `--force` a dataset it wrote before and nothing else.

use std::path::{Path, PathBuf};

use crate::error::DataError;
use crate::format::{is_dataset_file, MANIFEST_FILE, MANIFEST_FORMAT};

/// Checks that a dataset may be published at `output`: it must not exist, or (with `force`) be a directory that
/// `prepare` wrote: a `data-shards` manifest.json, nothing but the files `prepare` writes, and none of `inputs`.
pub fn check_output<'a>(
    output: &Path,
    force: bool,
    inputs: impl IntoIterator<Item = &'a Path>,
) -> Result<(), DataError> {
    let meta = match std::fs::symlink_metadata(output) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(DataError::io(output, e)),
        Ok(meta) => meta,
    };
    if !force {
        return Err(DataError::OutputExists { path: output.to_path_buf() });
    }
    let refuse = |reason: String| Err(DataError::OutputNotReplaceable { path: output.to_path_buf(), reason });
    if meta.file_type().is_symlink() {
        return refuse("is a symbolic link".into());
    }
    if !meta.is_dir() {
        return refuse("is not a directory".into());
    }
    let resolved = output.canonicalize().map_err(|e| DataError::io(output, e))?;
    for input in inputs {
        if input.canonicalize().is_ok_and(|p| p.starts_with(&resolved)) {
            return refuse(format!("contains the input {}", input.display()));
        }
    }
    if !has_dataset_manifest(output) {
        return refuse(format!("has no data-shards {MANIFEST_FILE}"));
    }
    let mut foreign = Vec::new();
    for entry in std::fs::read_dir(output).map_err(|e| DataError::io(output, e))? {
        let entry = entry.map_err(|e| DataError::io(output, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().map_err(|e| DataError::io(entry.path(), e))?.is_file();
        if !(is_file && is_dataset_file(&name)) {
            foreign.push(name);
        }
    }
    foreign.sort();
    match foreign.first() {
        Some(name) => refuse(format!("holds {name}, which `prepare` did not write")),
        None => Ok(()),
    }
}

/// Whether `dir/manifest.json` is a JSON object whose `format` is [`MANIFEST_FORMAT`] (any version).
fn has_dataset_manifest(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(MANIFEST_FILE)) else { return false };
    serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|v| v["format"] == MANIFEST_FORMAT)
}

/// Renames the finished `tmp` directory (in `parent`) to `output`. A dataset already there (accepted by
/// [`check_output`]) is first moved aside to a hidden sibling, and once the new one is in place its files are
/// deleted one by one: only the names `prepare` writes, so nothing that appeared in it meanwhile is lost.
pub fn publish(tmp: tempfile::TempDir, output: &Path, parent: &Path) -> Result<(), DataError> {
    let name = output.file_name().unwrap_or_default().to_string_lossy();
    let aside = if output.exists() {
        let aside = tempfile::Builder::new()
            .prefix(&format!(".{name}.old-"))
            .tempdir_in(parent)
            .map_err(|e| DataError::io(parent, e))?
            .keep();
        std::fs::rename(output, aside.join("old")).map_err(|e| DataError::io(output, e))?;
        Some(aside)
    } else {
        None
    };
    if let Err(e) = std::fs::rename(tmp.path(), output) {
        if let Some(aside) = &aside {
            let _ = std::fs::rename(aside.join("old"), output);
            let _ = std::fs::remove_dir(aside);
        }
        return Err(DataError::io(output, e));
    }
    // Renamed away: nothing left for the guard to delete.
    let _ = tmp.keep();
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    match aside {
        Some(aside) => remove_replaced(output, aside),
        None => Ok(()),
    }
}

/// Deletes the files `prepare` writes from `aside/old`, then the two directories; if anything else is left in them,
/// says where it was kept.
fn remove_replaced(output: &Path, aside: PathBuf) -> Result<(), DataError> {
    let old = aside.join("old");
    let entries = std::fs::read_dir(&old).map_err(|e| DataError::io(&old, e))?;
    for entry in entries.flatten() {
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && is_dataset_file(&entry.file_name().to_string_lossy()) {
            std::fs::remove_file(entry.path()).map_err(|e| DataError::io(entry.path(), e))?;
        }
    }
    if std::fs::remove_dir(&old).and_then(|()| std::fs::remove_dir(&aside)).is_err() {
        return Err(DataError::ReplacedOutputKept { path: output.to_path_buf(), kept: old });
    }
    Ok(())
}
