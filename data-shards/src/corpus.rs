//! Input discovery: files, recursive directories, `--exclude` globs.

use std::path::{Path, PathBuf};

use crate::error::DataError;

/// How to find and split input documents.
#[derive(Clone, Debug)]
pub struct CorpusOptions {
    /// Files or directories (searched recursively, in sorted order).
    pub inputs: Vec<PathBuf>,
    /// Glob patterns (`*`, `?`); a pattern without `/` is matched against the file name, one
    /// with `/` against the whole path.
    pub exclude: Vec<String>,
    /// In text files, lines equal to this (ignoring the line ending) separate documents.
    pub doc_separator: Option<String>,
    /// Field holding the text in `.jsonl` files.
    pub jsonl_field: String,
}

impl CorpusOptions {
    /// Options with no excludes, no separator and the `text` JSONL field.
    pub fn new(inputs: Vec<PathBuf>) -> Self {
        CorpusOptions { inputs, exclude: Vec::new(), doc_separator: None, jsonl_field: "text".into() }
    }
}

/// One input file.
#[derive(Clone, Debug)]
pub struct InputFile {
    pub path: PathBuf,
    pub len: u64,
    /// Named directly on the command line (rather than found in a directory).
    pub explicit: bool,
}

/// Matches `name` against a glob with `*` (any run of characters) and `?` (one character).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = name.chars().collect();
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

fn excluded(path: &Path, patterns: &[String]) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let full = path.to_string_lossy();
    patterns.iter().any(|p| if p.contains('/') { glob_match(p, &full) } else { glob_match(p, &name) })
}

fn walk(dir: &Path, patterns: &[String], out: &mut Vec<InputFile>) -> Result<(), DataError> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut entries = Vec::new();
    for e in rd {
        let e = e.map_err(|e| DataError::io(dir, e))?;
        entries.push(e.path());
    }
    entries.sort();
    for path in entries {
        if excluded(&path, patterns) {
            continue;
        }
        let link = std::fs::symlink_metadata(&path).map_err(|e| DataError::io(&path, e))?;
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            // Dangling symlink: nothing to read.
            Err(_) if link.file_type().is_symlink() => continue,
            Err(e) => return Err(DataError::io(&path, e)),
        };
        if meta.is_dir() {
            // Symlinked directories are not followed (avoids cycles).
            if !link.file_type().is_symlink() {
                walk(&path, patterns, out)?;
            }
        } else if meta.is_file() {
            out.push(InputFile { path, len: meta.len(), explicit: false });
        }
    }
    Ok(())
}

/// Lists the input files in deterministic order: inputs in the given order, directory
/// contents recursively in sorted path order, excluded files left out.
pub fn discover(opts: &CorpusOptions) -> Result<Vec<InputFile>, DataError> {
    if opts.inputs.is_empty() {
        return Err(DataError::InvalidArgument("no inputs given; pass --input PATH".into()));
    }
    let mut files = Vec::new();
    for input in &opts.inputs {
        let meta = match std::fs::metadata(input) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataError::MissingInput { path: input.clone() })
            }
            Err(e) => return Err(DataError::io(input, e)),
        };
        if meta.is_dir() {
            let before = files.len();
            walk(input, &opts.exclude, &mut files)?;
            if files.len() == before {
                return Err(DataError::EmptyInput {
                    path: input.clone(),
                    what: "directory contains no input files (after --exclude)".into(),
                });
            }
        } else if !excluded(input, &opts.exclude) {
            files.push(InputFile { path: input.clone(), len: meta.len(), explicit: true });
        }
    }
    if files.is_empty() {
        return Err(DataError::EmptyInput {
            path: opts.inputs[0].clone(),
            what: "every input is excluded by --exclude".into(),
        });
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*.dat", "art.dat"));
        assert!(!glob_match("*.dat", "art.dat.txt"));
        assert!(glob_match("a?c*", "abcdef"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("?", ""));
        assert!(glob_match("*/sub/*.u8", "/x/sub/a.u8"));
        assert!(excluded(Path::new("/usr/share/games/fortunes/art.u8"), &["*.u8".into()]));
        assert!(!excluded(Path::new("/usr/share/games/fortunes/art"), &["*.u8".into()]));
    }
}
