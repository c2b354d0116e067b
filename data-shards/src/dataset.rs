//! Memory-mapped token datasets: [`TokenDataset`], read from data-shards directories (`native`) or Megatron-LM indexed datasets (`megatron`).

mod megatron;
mod native;

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;

use crate::error::DataError;
use crate::format::{checksum_hex, Dtype, TOKENIZER_FILE};

pub use megatron::MEGATRON_INDEX_MAGIC;

/// Where a shard's per-document end offsets live.
enum DocEnds {
    /// u64 little-endian table inside the mapped file, at this byte offset.
    Table(usize),
    /// Decoded up front (Megatron datasets).
    Owned(Vec<u64>),
}

/// One memory-mapped token file.
struct Shard {
    path: PathBuf,
    map: Mmap,
    dtype: Dtype,
    /// Byte offset of the first token.
    tokens_at: usize,
    num_tokens: u64,
    num_documents: u64,
    doc_ends: DocEnds,
    /// Byte offset of the loss mask (one bit per token; format version 2), if the shard has one.
    mask_at: Option<usize>,
    /// Index of this shard's first token / document within the dataset.
    token_base: u64,
    doc_base: u64,
    /// Expected xxh3-128 of the whole file, from the manifest.
    checksum: Option<String>,
    /// Tokens with loss-mask bit 1, from the manifest (format version 2).
    num_loss_tokens: Option<u64>,
}

impl Shard {
    fn doc_end(&self, i: u64) -> u64 {
        match &self.doc_ends {
            DocEnds::Table(at) => {
                let o = at + 8 * i as usize;
                u64::from_le_bytes(self.map[o..o + 8].try_into().expect("8 bytes"))
            }
            DocEnds::Owned(v) => v[i as usize],
        }
    }

    fn doc_range(&self, i: u64) -> (u64, u64) {
        let start = if i == 0 { 0 } else { self.doc_end(i - 1) };
        (start, self.doc_end(i))
    }

    /// Index of the document that holds local token `t` (the first whose end is past it); `num_documents` if
    /// none does (only in a damaged table).
    fn document_of(&self, t: u64) -> u64 {
        let (mut lo, mut hi) = (0u64, self.num_documents);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.doc_end(mid) <= t {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Loss-mask bit of local token `t` (1 in a shard without a mask).
    fn mask_bit(&self, t: u64) -> u8 {
        match self.mask_at {
            Some(at) => (self.map[at + (t / 8) as usize] >> (t % 8)) & 1,
            None => 1,
        }
    }

    fn bytes(&self, start: u64, len: u64) -> &[u8] {
        let w = self.dtype.width();
        let a = self.tokens_at + start as usize * w;
        &self.map[a..a + len as usize * w]
    }
}

/// Decodes little-endian tokens of `dtype` from `bytes` into `out` (same count).
macro_rules! decode_into {
    ($bytes:expr, $dtype:expr, $out:expr, $to:ty) => {{
        let bytes: &[u8] = $bytes;
        let out: &mut [$to] = $out;
        match $dtype {
            Dtype::U8 => {
                for (o, &b) in out.iter_mut().zip(bytes) {
                    *o = b as $to;
                }
            }
            Dtype::U16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = u16::from_le_bytes([c[0], c[1]]) as $to;
                }
            }
            Dtype::I16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = i16::from_le_bytes([c[0], c[1]]) as $to;
                }
            }
            Dtype::U32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as $to;
                }
            }
            Dtype::I32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as $to;
                }
            }
            Dtype::I64 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                    *o = i64::from_le_bytes(c.try_into().expect("8 bytes")) as $to;
                }
            }
        }
    }};
}

/// All shards of one split (or one Megatron dataset), memory-mapped.
pub struct TokenDataset {
    /// Dataset directory or Megatron prefix, for messages.
    source: PathBuf,
    /// e.g. "train split of data/" for messages.
    label: String,
    shards: Vec<Shard>,
    num_tokens: u64,
    num_documents: u64,
    dtype: Dtype,
    vocab_size: Option<u32>,
    eos_id: Option<u32>,
    tokenizer_path: Option<PathBuf>,
}

impl std::fmt::Debug for TokenDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenDataset")
            .field("source", &self.source)
            .field("shards", &self.shards.len())
            .field("num_tokens", &self.num_tokens)
            .field("num_documents", &self.num_documents)
            .field("dtype", &self.dtype)
            .finish()
    }
}

fn map_file(path: &Path) -> Result<Mmap, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    // SAFETY: the file is opened read-only and shard files are never modified in place after
    // `prepare` publishes them (it writes to a temporary directory and renames). Truncating or
    // rewriting a mapped file from another process while it is open is documented as unsupported.
    unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(path, e))
}

impl TokenDataset {
    /// Recomputes the xxh3-128 checksum of every shard file (in parallel) and checks the
    /// document tables and token ids. Returns the first problem, in shard order.
    pub fn verify_checksums(&self) -> Result<(), DataError> {
        let results: Vec<Result<(), DataError>> = self.shards.par_iter().map(|s| self.verify_shard(s)).collect();
        results.into_iter().collect()
    }

    fn verify_shard(&self, s: &Shard) -> Result<(), DataError> {
        if let Some(expected) = &s.checksum {
            let got = checksum_hex(&s.map);
            if &got != expected {
                return Err(DataError::Checksum { path: s.path.clone(), expected: expected.clone(), got });
            }
        }
        let mut prev = 0u64;
        for i in 0..s.num_documents {
            let e = s.doc_end(i);
            if e < prev || e > s.num_tokens {
                return Err(DataError::Corrupt {
                    path: s.path.clone(),
                    message: format!("document {i} ends at token {e}, before the previous one or past the end"),
                });
            }
            prev = e;
        }
        if let Some(at) = s.mask_at {
            let bits = &s.map[at..at + crate::format::loss_mask_len(s.num_tokens) as usize];
            let ones: u64 = bits.iter().map(|b| u64::from(b.count_ones())).sum();
            let tail = s.num_tokens % 8;
            if tail != 0 && bits[bits.len() - 1] >> tail != 0 {
                return Err(DataError::Corrupt {
                    path: s.path.clone(),
                    message: "the loss mask has bits set past the last token".into(),
                });
            }
            if s.num_loss_tokens.is_some_and(|n| n != ones) {
                return Err(DataError::Corrupt {
                    path: s.path.clone(),
                    message: format!(
                        "the loss mask marks {ones} tokens, the manifest says {}",
                        s.num_loss_tokens.unwrap_or_default()
                    ),
                });
            }
        }
        if let Some(vocab) = self.vocab_size {
            let mut buf = vec![0u32; 1 << 16];
            let mut at = 0u64;
            while at < s.num_tokens {
                let n = (s.num_tokens - at).min(buf.len() as u64);
                let out = &mut buf[..n as usize];
                decode_into!(s.bytes(at, n), s.dtype, &mut *out, u32);
                if let Some(pos) = out.iter().position(|&t| t >= vocab) {
                    return Err(DataError::Corrupt {
                        path: s.path.clone(),
                        message: format!(
                            "token {} at position {} is outside the vocabulary of {vocab}",
                            out[pos],
                            at + pos as u64
                        ),
                    });
                }
                at += n;
            }
        }
        Ok(())
    }

    /// Whether the shards carry a loss mask (format version 2: chat and prompt/completion data). Without one,
    /// every token is trained and [`TokenDataset::read_shard_loss_mask`] gives ones.
    pub fn has_loss_mask(&self) -> bool {
        self.shards.iter().any(|s| s.mask_at.is_some())
    }

    /// Tokens whose loss-mask bit is 1, from the manifest (`None` for data without a mask: all are trained).
    pub fn num_loss_tokens(&self) -> Option<u64> {
        if self.has_loss_mask() {
            self.shards.iter().map(|s| s.num_loss_tokens).sum()
        } else {
            None
        }
    }

    /// Copies the loss mask of `out.len()` tokens of shard `shard` from local token `start` into `out`: 1 where
    /// the token is trained as a target, 0 where it is not (prompts, system and user turns, chat-template
    /// headers); all ones for data without a mask. Panics if out of range.
    pub fn read_shard_loss_mask(&self, shard: usize, start: u64, out: &mut [u8]) {
        let s = &self.shards[shard];
        let end = start.checked_add(out.len() as u64).expect("range overflows");
        assert!(end <= s.num_tokens, "tokens {start}..{end} out of range ({} tokens)", s.num_tokens);
        for (o, t) in out.iter_mut().zip(start..end) {
            *o = s.mask_bit(t);
        }
    }

    /// Writes into `out` the position of each of `out.len()` tokens of shard `shard` from local token `start`
    /// within its document, counted from the document's start or from `start`, whichever is later: 0 where a
    /// document starts (and at `out[0]`), then 1, 2, ... So a window's positions restart at every document
    /// boundary inside it, and the documents are the runs that start at each 0. Panics if out of range.
    pub fn read_shard_positions(&self, shard: usize, start: u64, out: &mut [i64]) {
        let s = &self.shards[shard];
        let end = start.checked_add(out.len() as u64).expect("range overflows");
        assert!(end <= s.num_tokens, "tokens {start}..{end} out of range ({} tokens)", s.num_tokens);
        let mut doc = s.document_of(start);
        let mut doc_start = start;
        for (o, t) in out.iter_mut().zip(start..end) {
            // Every document that ends at or before `t` is behind us (several, if some are empty).
            while doc < s.num_documents && s.doc_end(doc) <= t {
                doc += 1;
                doc_start = t;
            }
            *o = (t - doc_start) as i64;
        }
    }

    /// The loss mask of document `i` (see [`TokenDataset::read_shard_loss_mask`]), with the checks of
    /// [`TokenDataset::document`].
    pub fn document_loss_mask(&self, i: u64) -> Result<Vec<u8>, DataError> {
        let (si, a, b) = self.document_location(i)?;
        let mut out = vec![0u8; (b - a) as usize];
        self.read_shard_loss_mask(si, a, &mut out);
        Ok(out)
    }

    /// Total number of tokens (EOS included).
    pub fn num_tokens(&self) -> u64 {
        self.num_tokens
    }

    /// Total number of documents.
    pub fn num_documents(&self) -> u64 {
        self.num_documents
    }

    /// Tokens of document `i` (0-based over all shards, in order); an error if the shard's document table puts it
    /// out of order or past the shard's tokens ([`TokenDataset::open`] checks only the table's last entry, `verify`
    /// all of them). Panics if `i` is out of range.
    pub fn document(&self, i: u64) -> Result<Vec<u32>, DataError> {
        let (si, a, b) = self.document_location(i)?;
        let mut out = vec![0u32; (b - a) as usize];
        decode_into!(self.shards[si].bytes(a, b - a), self.shards[si].dtype, &mut out[..], u32);
        Ok(out)
    }

    /// (shard, first token, end token) of document `i`, checked against its shard. Panics if out of range.
    fn document_location(&self, i: u64) -> Result<(usize, u64, u64), DataError> {
        assert!(i < self.num_documents, "document {i} out of range ({} documents)", self.num_documents);
        let si = self.shards.partition_point(|s| s.doc_base <= i) - 1;
        let s = &self.shards[si];
        let local = i - s.doc_base;
        let (a, b) = s.doc_range(local);
        if a > b || b > s.num_tokens {
            return Err(DataError::Corrupt {
                path: s.path.clone(),
                message: format!(
                    "document {local} spans tokens {a}..{b}, out of order or past the shard's {} tokens",
                    s.num_tokens
                ),
            });
        }
        Ok((si, a, b))
    }

    /// Tokens `[start, start + len)` of the whole split (may cross shard files).
    /// Panics if the range is out of bounds.
    pub fn tokens(&self, start: u64, len: u64) -> Vec<u32> {
        let end = start.checked_add(len).expect("range overflows");
        assert!(end <= self.num_tokens, "tokens {start}..{end} out of range ({} tokens)", self.num_tokens);
        let mut out = vec![0u32; len as usize];
        let mut at = start;
        while at < end {
            let si = self.shards.partition_point(|s| s.token_base <= at) - 1;
            let s = &self.shards[si];
            let local = at - s.token_base;
            let n = (s.num_tokens - local).min(end - at);
            let o = (at - start) as usize;
            decode_into!(s.bytes(local, n), s.dtype, &mut out[o..o + n as usize], u32);
            at += n;
        }
        out
    }

    /// Copies `out.len()` tokens of shard `shard` starting at local token `start` into `out`.
    /// Panics if out of range. This is the loader's hot path.
    pub fn read_shard_tokens(&self, shard: usize, start: u64, out: &mut [i64]) {
        let s = &self.shards[shard];
        decode_into!(s.bytes(start, out.len() as u64), s.dtype, out, i64);
    }

    /// The raw little-endian bytes of `len` tokens of shard `shard` starting at local token
    /// `start` (for benchmarks and zero-copy consumers).
    pub fn raw_shard_bytes(&self, shard: usize, start: u64, len: u64) -> &[u8] {
        self.shards[shard].bytes(start, len)
    }

    /// Number of shard files.
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// Token count of each shard file, in order.
    pub fn shard_num_tokens(&self) -> Vec<u64> {
        self.shards.iter().map(|s| s.num_tokens).collect()
    }

    /// Paths of the shard files, in order.
    pub fn shard_paths(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.path.clone()).collect()
    }

    /// Storage type of the tokens.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Vocabulary size from the manifest (None for Megatron datasets).
    pub fn vocab_size(&self) -> Option<u32> {
        self.vocab_size
    }

    /// End-of-document token id from the manifest (None for Megatron datasets).
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Path of the tokenizer copied into the dataset directory, if the manifest names one ([`TokenDataset::open`]
    /// checked that it is there).
    pub fn tokenizer_path(&self) -> Option<PathBuf> {
        self.tokenizer_path.clone()
    }

    /// Dataset directory or Megatron prefix.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Human-readable description such as "train split of data/".
    pub fn label(&self) -> &str {
        &self.label
    }
}

/// Default tokenizer location inside a dataset directory.
pub fn default_tokenizer_path(dir: &Path) -> PathBuf {
    dir.join(TOKENIZER_FILE)
}
