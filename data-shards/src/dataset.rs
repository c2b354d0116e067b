//! Memory-mapped readers: [`TokenDataset`] over data-shards directories and Megatron-LM indexed datasets.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;

use crate::error::DataError;
use crate::format::{checksum_hex, Dtype, Manifest, ShardHeader, Split, HEADER_LEN, TOKENIZER_FILE};

/// Header of a Megatron-LM `.idx` file (`MMIDIDX\0\0`).
pub const MEGATRON_INDEX_MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";

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
    /// Index of this shard's first token / document within the dataset.
    token_base: u64,
    doc_base: u64,
    /// Expected xxh3-128 of the whole file, from the manifest.
    checksum: Option<String>,
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
    /// Opens all shards of `split` in a `data-shards prepare` output directory.
    ///
    /// Checks the manifest and every shard's header (magic, version, dtype, counts and file size
    /// against the manifest). Does not read the token data; see [`TokenDataset::verify_checksums`].
    pub fn open(dir: &Path, split: Split) -> Result<Self, DataError> {
        let manifest = Manifest::load(dir)?;
        let info = manifest.split(split);
        let mut shards = Vec::with_capacity(info.shards.len());
        let (mut token_base, mut doc_base) = (0u64, 0u64);
        for sh in &info.shards {
            let path = dir.join(&sh.file);
            let map = match map_file(&path) {
                Err(DataError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    return Err(DataError::ManifestMismatch {
                        path,
                        message: "listed in manifest.json but missing".into(),
                    })
                }
                other => other?,
            };
            let (header, dtype) = ShardHeader::parse(&path, &map)?;
            if dtype != manifest.dtype {
                return Err(DataError::ManifestMismatch {
                    path,
                    message: format!("dtype {dtype} in header, {} in manifest", manifest.dtype),
                });
            }
            if header.num_tokens != sh.num_tokens || header.num_documents != sh.num_documents {
                return Err(DataError::ManifestMismatch {
                    path,
                    message: format!(
                        "header has {} tokens / {} documents, manifest {} / {}",
                        header.num_tokens, header.num_documents, sh.num_tokens, sh.num_documents
                    ),
                });
            }
            let expected_len = header.file_len(dtype);
            if expected_len != Some(map.len() as u64) {
                return Err(DataError::Corrupt {
                    path,
                    message: format!(
                        "file is {} bytes but its header implies {} bytes",
                        map.len(),
                        expected_len.map_or("an impossible number of".into(), |l| l.to_string())
                    ),
                });
            }
            let table_at = HEADER_LEN + header.num_tokens as usize * dtype.width();
            let shard = Shard {
                path,
                map,
                dtype,
                tokens_at: HEADER_LEN,
                num_tokens: header.num_tokens,
                num_documents: header.num_documents,
                doc_ends: DocEnds::Table(table_at),
                token_base,
                doc_base,
                checksum: Some(sh.xxh3_128.clone()),
            };
            let last = if shard.num_documents == 0 { 0 } else { shard.doc_end(shard.num_documents - 1) };
            if last != shard.num_tokens {
                return Err(DataError::Corrupt {
                    path: shard.path,
                    message: format!(
                        "document table ends at token {last}, but the shard has {} tokens",
                        shard.num_tokens
                    ),
                });
            }
            token_base += shard.num_tokens;
            doc_base += shard.num_documents;
            shards.push(shard);
        }
        let tokenizer_path = manifest.tokenizer.as_ref().map(|t| dir.join(t));
        if let Some(path) = tokenizer_path.as_ref().filter(|p| !p.is_file()) {
            return Err(DataError::MissingTokenizer { path: path.clone() });
        }
        Ok(TokenDataset {
            source: dir.to_path_buf(),
            label: format!("{} split of {}", split, dir.display()),
            shards,
            num_tokens: token_base,
            num_documents: doc_base,
            dtype: manifest.dtype,
            vocab_size: Some(manifest.vocab_size),
            eos_id: manifest.eos_id,
            tokenizer_path,
        })
    }

    /// Opens a Megatron-LM indexed dataset (`prefix.bin` + `prefix.idx`, "MMIDIDX" version 1).
    ///
    /// `prefix` may also be given with a `.bin` or `.idx` extension. A Megatron "document" (a
    /// run of sequences delimited by `document_indices`) is one document here.
    pub fn open_megatron(prefix: &Path) -> Result<Self, DataError> {
        let prefix = match prefix.extension().and_then(|e| e.to_str()) {
            Some("bin") | Some("idx") => prefix.with_extension(""),
            _ => prefix.to_path_buf(),
        };
        let idx_path = PathBuf::from(format!("{}.idx", prefix.display()));
        let bin_path = PathBuf::from(format!("{}.bin", prefix.display()));
        for p in [&idx_path, &bin_path] {
            if !p.exists() {
                return Err(DataError::Megatron { path: p.clone(), message: "file not found".into() });
            }
        }
        let idx = map_file(&idx_path)?;
        let bad = |message: String| DataError::Megatron { path: idx_path.clone(), message };
        if idx.len() < 34 || &idx[0..9] != MEGATRON_INDEX_MAGIC {
            return Err(bad(format!(
                "bad header (expected magic {:?})",
                String::from_utf8_lossy(MEGATRON_INDEX_MAGIC)
            )));
        }
        let u64_at = |o: usize| u64::from_le_bytes(idx[o..o + 8].try_into().expect("8 bytes"));
        let version = u64_at(9);
        if version != 1 {
            return Err(DataError::UnsupportedVersion { path: idx_path.clone(), got: version, supported: 1 });
        }
        let code = idx[17];
        let dtype = Dtype::from_megatron_code(code)
            .ok_or_else(|| bad(format!("unsupported dtype code {code} (float or unknown)")))?;
        let seq_count = u64_at(18);
        let doc_index_count = u64_at(26);
        let body = seq_count
            .checked_mul(12)
            .and_then(|x| x.checked_add(doc_index_count.checked_mul(8)?))
            .and_then(|x| x.checked_add(34))
            .ok_or_else(|| bad("impossible sequence/document counts".into()))?;
        // Multimodal datasets append one int8 mode per sequence.
        if idx.len() as u64 != body && idx.len() as u64 != body + seq_count {
            return Err(bad(format!(
                "file is {} bytes, but {seq_count} sequences and {doc_index_count} document indices need {body}; it is truncated or corrupted",
                idx.len()
            )));
        }
        let s = seq_count as usize;
        let lens_at = 34;
        let ptrs_at = lens_at + 4 * s;
        let docs_at = ptrs_at + 8 * s;
        let len_of = |i: usize| i32::from_le_bytes(idx[lens_at + 4 * i..lens_at + 4 * i + 4].try_into().expect("4"));
        let ptr_of = |i: usize| u64_at(ptrs_at + 8 * i);
        // Sequences must be laid out back to back in the .bin (as IndexedDatasetBuilder does).
        let width = dtype.width() as u64;
        let mut seq_ends = Vec::with_capacity(s);
        let mut total = 0u64;
        for i in 0..s {
            let len = len_of(i);
            if len < 0 {
                return Err(bad(format!("sequence {i} has negative length {len}")));
            }
            if ptr_of(i) != total * width {
                return Err(bad(format!(
                    "sequence {i} starts at byte {} instead of {}; non-contiguous datasets are not supported",
                    ptr_of(i),
                    total * width
                )));
            }
            total += len as u64;
            seq_ends.push(total);
        }
        let d = doc_index_count as usize;
        if d == 0 || u64_at(docs_at) != 0 {
            return Err(bad("document_indices must start with 0".into()));
        }
        let mut doc_ends = Vec::with_capacity(d.saturating_sub(1));
        let mut prev = 0u64;
        for j in 1..d {
            let e = u64_at(docs_at + 8 * j);
            if e < prev || e > seq_count {
                return Err(bad(format!(
                    "document_indices[{j}] = {e} is out of order or past the {seq_count} sequences"
                )));
            }
            doc_ends.push(if e == 0 { 0 } else { seq_ends[e as usize - 1] });
            prev = e;
        }
        if prev != seq_count {
            return Err(bad(format!("the last document ends at sequence {prev}, but there are {seq_count} sequences")));
        }
        let bin_len = std::fs::metadata(&bin_path).map_err(|e| DataError::io(&bin_path, e))?.len();
        if bin_len != total * width {
            return Err(DataError::Megatron {
                path: bin_path,
                message: format!(
                    "file is {bin_len} bytes, but the index describes {total} tokens of {dtype} ({} bytes)",
                    total * width
                ),
            });
        }
        if total == 0 {
            return Err(DataError::Megatron { path: bin_path, message: "dataset has no tokens".into() });
        }
        let map = map_file(&bin_path)?;
        let num_documents = doc_ends.len() as u64;
        let shard = Shard {
            path: bin_path,
            map,
            dtype,
            tokens_at: 0,
            num_tokens: total,
            num_documents,
            doc_ends: DocEnds::Owned(doc_ends),
            token_base: 0,
            doc_base: 0,
            checksum: None,
        };
        Ok(TokenDataset {
            label: format!("megatron dataset {}", prefix.display()),
            source: prefix,
            shards: vec![shard],
            num_tokens: total,
            num_documents,
            dtype,
            vocab_size: None,
            eos_id: None,
            tokenizer_path: None,
        })
    }

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
        let mut out = vec![0u32; (b - a) as usize];
        decode_into!(s.bytes(a, b - a), s.dtype, &mut out[..], u32);
        Ok(out)
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
