//! Input discovery (files, recursive directories, `--exclude` globs) and streaming of documents.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
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

fn is_jsonl(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref(),
        Some("jsonl") | Some("ndjson")
    )
}

/// A document is dropped when it is empty or only whitespace.
fn is_blank(s: &str) -> bool {
    s.trim().is_empty()
}

fn utf8_error(path: &Path, base_offset: u64, line: u64, bytes: &[u8]) -> DataError {
    let valid = std::str::from_utf8(bytes).err().map_or(bytes.len(), |e| e.valid_up_to());
    let extra_lines = bytes[..valid].iter().filter(|&&b| b == b'\n').count() as u64;
    DataError::NotUtf8 { path: path.to_path_buf(), offset: base_offset + valid as u64, line: line + extra_lines }
}

enum Reader {
    /// Separator or JSONL mode: read line by line.
    Lines { input: BufReader<File>, jsonl: bool, line_no: u64, offset: u64, current: String },
    /// Whole-file mode, already emitted.
    Done,
}

/// Streams documents from the input files in order.
pub struct DocumentStream {
    files: Vec<InputFile>,
    opts: CorpusOptions,
    next_file: usize,
    reader: Option<(usize, Reader)>,
    docs_in_file: u64,
    /// Bytes of input consumed so far (for progress).
    pub bytes_read: u64,
    line_buf: Vec<u8>,
}

impl DocumentStream {
    /// Streams the documents of `files` (from [`discover`]).
    pub fn new(files: Vec<InputFile>, opts: CorpusOptions) -> Self {
        DocumentStream { files, opts, next_file: 0, reader: None, docs_in_file: 0, bytes_read: 0, line_buf: Vec::new() }
    }

    /// Total size of all input files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.len).sum()
    }

    fn finish_file(&mut self, fi: usize) -> Result<(), DataError> {
        let f = &self.files[fi];
        if f.explicit && self.docs_in_file == 0 {
            return Err(DataError::EmptyInput {
                path: f.path.clone(),
                what: if f.len == 0 {
                    "file is empty".into()
                } else {
                    "file contains no documents (only whitespace or separators)".into()
                },
            });
        }
        self.reader = None;
        Ok(())
    }

    /// The next non-empty document, or `None` at the end of the input.
    pub fn next_document(&mut self) -> Result<Option<String>, DataError> {
        loop {
            let Some((fi, reader)) = self.reader.as_mut() else {
                if self.next_file >= self.files.len() {
                    return Ok(None);
                }
                let fi = self.next_file;
                self.next_file += 1;
                self.docs_in_file = 0;
                let path = self.files[fi].path.clone();
                let file = File::open(&path).map_err(|e| DataError::io(&path, e))?;
                let jsonl = is_jsonl(&path);
                if jsonl || self.opts.doc_separator.is_some() {
                    self.reader = Some((
                        fi,
                        Reader::Lines {
                            input: BufReader::with_capacity(1 << 20, file),
                            jsonl,
                            line_no: 0,
                            offset: 0,
                            current: String::new(),
                        },
                    ));
                    continue;
                }
                let mut bytes = Vec::new();
                BufReader::new(file).read_to_end(&mut bytes).map_err(|e| DataError::io(&path, e))?;
                self.bytes_read += bytes.len() as u64;
                let text = String::from_utf8(bytes).map_err(|e| utf8_error(&path, 0, 1, e.as_bytes()))?;
                self.reader = Some((fi, Reader::Done));
                if !is_blank(&text) {
                    self.docs_in_file += 1;
                    return Ok(Some(text));
                }
                continue;
            };
            let fi = *fi;
            let path = &self.files[fi].path;
            let step = match reader {
                Reader::Done => Step::FileDone,
                Reader::Lines { input, jsonl, line_no, offset, current } => {
                    self.line_buf.clear();
                    let n = input.read_until(b'\n', &mut self.line_buf).map_err(|e| DataError::io(path, e))?;
                    if n == 0 {
                        Step::Eof(std::mem::take(current))
                    } else {
                        *line_no += 1;
                        let line = std::str::from_utf8(&self.line_buf)
                            .map_err(|_| utf8_error(path, *offset, *line_no, &self.line_buf))?;
                        *offset += n as u64;
                        self.bytes_read += n as u64;
                        if *jsonl {
                            if is_blank(line) {
                                Step::Continue
                            } else {
                                Step::Emit(parse_jsonl_line(path, *line_no, line, &self.opts.jsonl_field)?)
                            }
                        } else {
                            let sep = self.opts.doc_separator.as_deref().unwrap_or_default();
                            let bare = line.strip_suffix('\n').unwrap_or(line);
                            let bare = bare.strip_suffix('\r').unwrap_or(bare);
                            if bare == sep {
                                Step::Emit(std::mem::take(current))
                            } else {
                                current.push_str(line);
                                Step::Continue
                            }
                        }
                    }
                }
            };
            match step {
                Step::Continue => {}
                Step::FileDone => self.finish_file(fi)?,
                Step::Emit(doc) => {
                    if !is_blank(&doc) {
                        self.docs_in_file += 1;
                        return Ok(Some(doc));
                    }
                }
                Step::Eof(doc) => {
                    self.reader = Some((fi, Reader::Done));
                    if !is_blank(&doc) {
                        self.docs_in_file += 1;
                        return Ok(Some(doc));
                    }
                }
            }
        }
    }
}

enum Step {
    Continue,
    FileDone,
    Emit(String),
    Eof(String),
}

fn parse_jsonl_line(path: &Path, line_no: u64, line: &str, field: &str) -> Result<String, DataError> {
    let err = |message: String| DataError::Jsonl { path: path.to_path_buf(), line: line_no, message };
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| err(format!("invalid JSON ({e})")))?;
    let obj = value.as_object().ok_or_else(|| err("expected a JSON object".into()))?;
    match obj.get(field) {
        None => Err(err(format!("no field {field:?}"))),
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(err(format!(
            "field {field:?} is not a string (found {})",
            match other {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::Object(_) => "an object",
                serde_json::Value::String(_) => "a string",
            }
        ))),
    }
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

    #[test]
    fn separator_splitting_keeps_line_endings_and_drops_blank_documents() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.txt");
        std::fs::write(&f, "%\r\none\r\ntwo\n%\n \n%\nlast line no newline").unwrap();
        let mut opts = CorpusOptions::new(vec![f.clone()]);
        opts.doc_separator = Some("%".into());
        let mut s = DocumentStream::new(discover(&opts).unwrap(), opts);
        let mut docs = Vec::new();
        while let Some(d) = s.next_document().unwrap() {
            docs.push(d);
        }
        assert_eq!(docs, ["one\r\ntwo\n", "last line no newline"]);
        assert_eq!(s.bytes_read, std::fs::metadata(&f).unwrap().len());
    }
}
