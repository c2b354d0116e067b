//! Writers for shard files and whole dataset directories (shards + manifest).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::DataError;
use crate::format::{
    digest_hex, shard_file_name, Dtype, Manifest, ShardHeader, ShardInfo, Split, SplitInfo, FORMAT_VERSION,
    FORMAT_VERSION_MASKED, HEADER_LEN, MANIFEST_FILE, MANIFEST_FORMAT,
};

/// Writes one shard file: header placeholder, tokens, then the document table, the loss mask (format version 2)
/// and the final header.
pub struct ShardWriter {
    path: PathBuf,
    out: BufWriter<File>,
    dtype: Dtype,
    num_tokens: u64,
    doc_ends: Vec<u64>,
    scratch: Vec<u8>,
    /// The loss mask so far, one bit per token (format version 2), and how many bits are 1.
    mask: Option<Vec<u8>>,
    num_loss_tokens: u64,
}

impl ShardWriter {
    /// Creates (truncates) `path` for a shard of format version 1 (no loss mask).
    pub fn create(path: &Path, dtype: Dtype) -> Result<Self, DataError> {
        Self::create_with(path, dtype, false)
    }

    /// Creates (truncates) `path` for a shard of format version 2, with a loss mask.
    pub fn create_masked(path: &Path, dtype: Dtype) -> Result<Self, DataError> {
        Self::create_with(path, dtype, true)
    }

    fn create_with(path: &Path, dtype: Dtype, masked: bool) -> Result<Self, DataError> {
        if dtype.shard_code().is_none() {
            return Err(DataError::InvalidArgument(format!(
                "dtype {dtype} cannot be written to shards; use u16 or u32"
            )));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| DataError::io(path, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; HEADER_LEN]).map_err(|e| DataError::io(path, e))?;
        Ok(ShardWriter {
            path: path.to_path_buf(),
            out,
            dtype,
            num_tokens: 0,
            doc_ends: Vec::new(),
            scratch: Vec::new(),
            mask: masked.then(Vec::new),
            num_loss_tokens: 0,
        })
    }

    /// Appends tokens to the current document with their loss mask (`mask[i] != 0`: token `i` is trained as a
    /// target). A shard without a loss mask (version 1) takes only all-ones masks.
    pub fn push_masked_tokens(&mut self, tokens: &[u32], mask: &[u8]) -> Result<(), DataError> {
        assert_eq!(tokens.len(), mask.len(), "one mask value per token");
        if self.mask.is_none() && mask.contains(&0) {
            return Err(DataError::InvalidArgument(format!(
                "{} has no loss mask (format version 1): it cannot leave tokens out of the loss",
                self.path.display()
            )));
        }
        let start = self.num_tokens;
        self.push_tokens(tokens)?;
        if let Some(bits) = &mut self.mask {
            for (i, &m) in mask.iter().enumerate() {
                if m == 0 {
                    let at = start + i as u64;
                    bits[(at / 8) as usize] &= !(1 << (at % 8));
                    self.num_loss_tokens -= 1;
                }
            }
        }
        Ok(())
    }

    /// Appends one document's tokens (the caller includes any EOS).
    pub fn push_document(&mut self, tokens: &[u32]) -> Result<(), DataError> {
        self.push_tokens(tokens)?;
        self.end_document();
        Ok(())
    }

    /// Appends tokens to the current document (trained: loss-mask bits 1).
    pub fn push_tokens(&mut self, tokens: &[u32]) -> Result<(), DataError> {
        self.scratch.clear();
        match self.dtype {
            Dtype::U16 => {
                for &t in tokens {
                    let v = u16::try_from(t).map_err(|_| {
                        DataError::InvalidArgument(format!(
                            "token id {t} does not fit in u16 while writing {}; use --dtype u32",
                            self.path.display()
                        ))
                    })?;
                    self.scratch.extend_from_slice(&v.to_le_bytes());
                }
            }
            _ => {
                for &t in tokens {
                    self.scratch.extend_from_slice(&t.to_le_bytes());
                }
            }
        }
        self.out.write_all(&self.scratch).map_err(|e| DataError::io(&self.path, e))?;
        let start = self.num_tokens;
        self.num_tokens += tokens.len() as u64;
        if let Some(bits) = &mut self.mask {
            // Tokens pushed without a mask are trained: their bits are 1.
            bits.resize(self.num_tokens.div_ceil(8) as usize, 0);
            for at in start..self.num_tokens {
                bits[(at / 8) as usize] |= 1 << (at % 8);
            }
            self.num_loss_tokens += tokens.len() as u64;
        }
        Ok(())
    }

    /// Ends the current document after the tokens pushed so far.
    pub fn end_document(&mut self) {
        self.doc_ends.push(self.num_tokens);
    }

    /// Tokens written so far.
    pub fn num_tokens(&self) -> u64 {
        self.num_tokens
    }

    /// Writes the document table and header, syncs the file and returns its manifest entry.
    pub fn finish(mut self) -> Result<ShardInfo, DataError> {
        let path = self.path.clone();
        let io = |e| DataError::io(&path, e);
        let mut table = Vec::with_capacity(self.doc_ends.len() * 8);
        for e in &self.doc_ends {
            table.extend_from_slice(&e.to_le_bytes());
        }
        self.out.write_all(&table).map_err(io)?;
        if let Some(bits) = &self.mask {
            self.out.write_all(bits).map_err(io)?;
        }
        let header = ShardHeader {
            version: if self.mask.is_some() { FORMAT_VERSION_MASKED } else { FORMAT_VERSION },
            dtype_code: self.dtype.shard_code().expect("checked in create"),
            num_tokens: self.num_tokens,
            num_documents: self.doc_ends.len() as u64,
        };
        self.out.seek(SeekFrom::Start(0)).map_err(io)?;
        self.out.write_all(&header.to_bytes()).map_err(io)?;
        let mut file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(ShardInfo {
            file: path.file_name().expect("shard path has a file name").to_string_lossy().into_owned(),
            num_tokens: header.num_tokens,
            num_documents: header.num_documents,
            xxh3_128: digest_hex(hasher.digest128()),
            num_loss_tokens: self.mask.is_some().then_some(self.num_loss_tokens),
        })
    }
}

/// Dataset-level fields of the manifest that the writer does not compute itself.
#[derive(Clone, Debug)]
pub struct ManifestMeta {
    /// Tokenizer file name relative to the dataset directory (already copied there), if any.
    pub tokenizer: Option<String>,
    pub vocab_size: u32,
    pub eos_token: Option<String>,
    pub eos_id: Option<u32>,
    pub valid_fraction: f64,
}

struct SplitWriter {
    split: Split,
    shards: Vec<ShardInfo>,
    current: Option<ShardWriter>,
}

/// Writes the shards of both splits into an existing directory, rolling over to a new shard
/// file once the current one holds at least `shard_tokens` tokens (documents are never split
/// across shard files), then the manifest.
pub struct DatasetWriter {
    dir: PathBuf,
    dtype: Dtype,
    shard_tokens: u64,
    /// Shards carry a loss mask (format version 2).
    masked: bool,
    splits: Vec<SplitWriter>,
}

impl DatasetWriter {
    /// A dataset of format version 1 (no loss mask); `dir` must exist; shard files are named
    /// `{split}-{index:05}.bin`.
    pub fn new(dir: &Path, dtype: Dtype, shard_tokens: u64) -> Self {
        DatasetWriter {
            dir: dir.to_path_buf(),
            dtype,
            shard_tokens: shard_tokens.max(1),
            masked: false,
            splits: Split::ALL.iter().map(|&split| SplitWriter { split, shards: Vec::new(), current: None }).collect(),
        }
    }

    /// Like [`DatasetWriter::new`], for a dataset of format version 2: its shards carry a loss mask.
    pub fn new_masked(dir: &Path, dtype: Dtype, shard_tokens: u64) -> Self {
        DatasetWriter { masked: true, ..Self::new(dir, dtype, shard_tokens) }
    }

    /// Appends tokens with their loss mask to the current document of `split` (see
    /// [`ShardWriter::push_masked_tokens`]).
    pub fn push_masked_tokens(&mut self, split: Split, tokens: &[u32], mask: &[u8]) -> Result<(), DataError> {
        self.current(split)?.push_masked_tokens(tokens, mask)
    }

    /// Appends a document (tokens including EOS) to `split`.
    pub fn push_document(&mut self, split: Split, tokens: &[u32]) -> Result<(), DataError> {
        self.push_tokens(split, tokens)?;
        self.end_document(split)
    }

    /// Appends tokens to the current document of `split`, which [`DatasetWriter::end_document`] ends.
    pub fn push_tokens(&mut self, split: Split, tokens: &[u32]) -> Result<(), DataError> {
        self.current(split)?.push_tokens(tokens)
    }

    /// Ends the current document of `split`; closes its shard file once it holds `shard_tokens` tokens.
    pub fn end_document(&mut self, split: Split) -> Result<(), DataError> {
        let shard_tokens = self.shard_tokens;
        let shard = self.current(split)?;
        shard.end_document();
        if shard.num_tokens() >= shard_tokens {
            let sw = self.splits.iter_mut().find(|s| s.split == split).expect("both splits exist");
            let done = sw.current.take().expect("current shard");
            sw.shards.push(done.finish()?);
        }
        Ok(())
    }

    /// The shard file being written for `split`, created if there is none.
    fn current(&mut self, split: Split) -> Result<&mut ShardWriter, DataError> {
        let sw = self.splits.iter_mut().find(|s| s.split == split).expect("both splits exist");
        if sw.current.is_none() {
            let name = shard_file_name(split, sw.shards.len());
            sw.current = Some(ShardWriter::create_with(&self.dir.join(name), self.dtype, self.masked)?);
        }
        Ok(sw.current.as_mut().expect("just created"))
    }

    /// Finishes all shards and writes `manifest.json`; returns the manifest.
    pub fn finish(mut self, meta: ManifestMeta) -> Result<Manifest, DataError> {
        let mut splits = BTreeMap::new();
        for sw in &mut self.splits {
            if let Some(cur) = sw.current.take() {
                sw.shards.push(cur.finish()?);
            }
            let info = SplitInfo {
                num_tokens: sw.shards.iter().map(|s| s.num_tokens).sum(),
                num_documents: sw.shards.iter().map(|s| s.num_documents).sum(),
                num_loss_tokens: self.masked.then(|| sw.shards.iter().filter_map(|s| s.num_loss_tokens).sum()),
                shards: std::mem::take(&mut sw.shards),
            };
            splits.insert(sw.split.name().to_string(), info);
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT.to_string(),
            format_version: if self.masked { FORMAT_VERSION_MASKED } else { FORMAT_VERSION },
            tokenizer: meta.tokenizer,
            vocab_size: meta.vocab_size,
            eos_token: meta.eos_token,
            eos_id: meta.eos_id,
            dtype: self.dtype,
            valid_fraction: meta.valid_fraction,
            splits,
        };
        let path = self.dir.join(MANIFEST_FILE);
        let mut text = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
        text.push('\n');
        let mut f = File::create(&path).map_err(|e| DataError::io(&path, e))?;
        f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| DataError::io(&path, e))?;
        Ok(manifest)
    }
}

/// Writes a dataset of `documents` documents of random tokens (20 to 79 tokens in
/// `1..vocab_size`, then EOS = 0; every tenth document in the validation split), the same for
/// the same seed: for smoke tests and benchmarks that need data but not language.
pub fn write_random_dataset(dir: &Path, documents: usize, vocab_size: u32, seed: u64) -> Result<Manifest, DataError> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let mut writer = DatasetWriter::new(dir, Dtype::for_vocab(u64::from(vocab_size)), 1 << 28);
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    for doc in 0..documents {
        let len = 20 + next() % 60;
        let tokens: Vec<u32> = (0..len).map(|_| 1 + next() % (vocab_size - 1)).chain([0]).collect();
        let split = if doc % 10 == 0 { Split::Valid } else { Split::Train };
        writer.push_document(split, &tokens)?;
    }
    writer.finish(ManifestMeta { tokenizer: None, vocab_size, eos_token: None, eos_id: Some(0), valid_fraction: 0.1 })
}
