//! The reader of data-shards directories: a split's shard files, checked against `manifest.json` (format: docs/DATA_FORMAT.md).

use std::path::Path;

use super::{map_file, DocEnds, Shard, TokenDataset};
use crate::error::DataError;
use crate::format::{Manifest, ShardHeader, Split, HEADER_LEN};

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
            if header.version != manifest.format_version {
                return Err(DataError::ManifestMismatch {
                    path,
                    message: format!(
                        "format version {} in header, {} in manifest",
                        header.version, manifest.format_version
                    ),
                });
            }
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
            let mask_at = header.has_loss_mask().then_some(table_at + 8 * header.num_documents as usize);
            let shard = Shard {
                path,
                map,
                dtype,
                tokens_at: HEADER_LEN,
                num_tokens: header.num_tokens,
                num_documents: header.num_documents,
                doc_ends: DocEnds::Table(table_at),
                mask_at,
                token_base,
                doc_base,
                checksum: Some(sh.xxh3_128.clone()),
                num_loss_tokens: sh.num_loss_tokens,
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
}
