//! The crate's error type: every variant names the file involved and says how to fix it.

use std::path::PathBuf;

use thiserror::Error;

/// Errors from preparing, verifying and reading token shards.
#[derive(Debug, Error)]
pub enum DataError {
    #[error("{}: {source}; check the path and its permissions", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("input {}: no such file or directory; check the --input path", path.display())]
    MissingInput { path: PathBuf },

    #[error("input {}: {what}; add text to it, fix the --exclude/--doc-separator options, or leave it out", path.display())]
    EmptyInput { path: PathBuf, what: String },

    #[error("input {}: not valid UTF-8 at byte {offset} (line {line}); convert the file to UTF-8 or leave it out with --exclude", path.display())]
    NotUtf8 { path: PathBuf, offset: u64, line: u64 },

    #[error("input {}: line {line}: {message}; fix the line or choose the right --jsonl-field", path.display())]
    Jsonl { path: PathBuf, line: u64, message: String },

    #[error("input {}: line {line}: {message}; fix the example or leave the line out", path.display())]
    Example { path: PathBuf, line: u64, message: String },

    #[error("chat template {}: {message}", path.display())]
    ChatTemplate { path: PathBuf, message: String },

    #[error("tokenizer {}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },

    #[error("output {}: already exists; pass --force to replace it (only a dataset written by `data-shards prepare` can be replaced) or choose another --output", path.display())]
    OutputExists { path: PathBuf },

    #[error("output {}: {reason}; --force replaces only a dataset directory written by `data-shards prepare`, so choose another --output or move it away yourself", path.display())]
    OutputNotReplaceable { path: PathBuf, reason: String },

    #[error("output {}: the new dataset is in place, but the one it replaced, moved to {}, now holds files that `prepare` did not write; they were kept there", path.display(), kept.display())]
    ReplacedOutputKept { path: PathBuf, kept: PathBuf },

    #[error("tokenizer {}: vocabulary of {vocab_size} tokens does not fit in u16 (max 65536); use --dtype u32 or --dtype auto", path.display())]
    VocabTooLargeForU16 { path: PathBuf, vocab_size: u64 },

    #[error("{}: invalid manifest: {message}; the dataset is incomplete or from another tool, re-run `data-shards prepare`", path.display())]
    Manifest { path: PathBuf, message: String },

    #[error("tokenizer {}: named in manifest.json but missing; copy the tokenizer.json that `prepare` used there, or re-run `data-shards prepare`", path.display())]
    MissingTokenizer { path: PathBuf },

    #[error("shard {}: bad magic bytes (expected {expected:?}, got {got:?}); this is not a data-shards file, re-run `data-shards prepare`", path.display())]
    BadMagic { path: PathBuf, expected: String, got: String },

    #[error("shard {}: format version {got} is not supported (this build reads version {supported}); re-run `data-shards prepare` with this build or upgrade", path.display())]
    UnsupportedVersion { path: PathBuf, got: u64, supported: String },

    #[error("shard {}: unknown or unsupported token dtype code {code}; the file is corrupted or from another tool, re-run `data-shards prepare`", path.display())]
    BadDtype { path: PathBuf, code: u32 },

    #[error("shard {}: {message}; the file is truncated or corrupted, re-run `data-shards prepare`", path.display())]
    Corrupt { path: PathBuf, message: String },

    #[error("shard {}: does not match the manifest ({message}); the dataset directory mixes files from different runs, re-run `data-shards prepare`", path.display())]
    ManifestMismatch { path: PathBuf, message: String },

    #[error("shard {}: checksum mismatch (expected {expected}, got {got}); the file is corrupted, re-run `data-shards prepare`", path.display())]
    Checksum { path: PathBuf, expected: String, got: String },

    #[error("megatron dataset {}: {message}; rebuild it with megatron's IndexedDatasetBuilder / preprocess_data.py", path.display())]
    Megatron { path: PathBuf, message: String },

    #[error("seq_len {seq_len} is longer than the data ({num_tokens} tokens in {}; largest shard has {largest_shard} tokens, a window needs seq_len+1); use a shorter seq_len or more data", path.display())]
    SeqLenTooLong { seq_len: usize, num_tokens: u64, largest_shard: u64, path: PathBuf },

    #[error("{0}")]
    InvalidArgument(String),
}

impl DataError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }
}
