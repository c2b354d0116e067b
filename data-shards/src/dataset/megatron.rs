//! The reader of Megatron-LM indexed datasets (`prefix.bin` + `prefix.idx`, "MMIDIDX" version 1), as one shard.

use std::path::{Path, PathBuf};

use super::{map_file, DocEnds, Shard, TokenDataset};
use crate::error::DataError;
use crate::format::Dtype;

/// Header of a Megatron-LM `.idx` file (`MMIDIDX\0\0`).
pub const MEGATRON_INDEX_MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";

impl TokenDataset {
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
            return Err(DataError::UnsupportedVersion { path: idx_path.clone(), got: version, supported: "1".into() });
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
            mask_at: None,
            token_base: 0,
            doc_base: 0,
            checksum: None,
            num_loss_tokens: None,
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
}
