//! On-disk layout of shard files and `manifest.json` (see docs/DATA_FORMAT.md).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::DataError;

/// Magic bytes at the start of every shard file.
pub const SHARD_MAGIC: [u8; 8] = *b"LLMSHRD\0";
/// Version of the shard file layout and of the manifest for data without a loss mask (every token is trained):
/// what `prepare` writes for text.
pub const FORMAT_VERSION: u32 = 1;
/// Version of shards that carry a per-token loss mask (a bit array after the document table) and of their
/// manifest: what `prepare` writes for chat and prompt/completion data.
pub const FORMAT_VERSION_MASKED: u32 = 2;
/// The versions this build reads, for messages.
const SUPPORTED_VERSIONS: &str = "1 or 2";
/// Size of the fixed shard header in bytes; tokens start right after it.
pub const HEADER_LEN: usize = 64;
/// Name of the manifest inside a dataset directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Name of the copied tokenizer inside a dataset directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Value of the manifest's `format` field.
pub const MANIFEST_FORMAT: &str = "data-shards";

/// Token storage type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    U8,
    U16,
    I16,
    U32,
    I32,
    I64,
}

impl Dtype {
    /// Bytes per token.
    pub fn width(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::U16 | Dtype::I16 => 2,
            Dtype::U32 | Dtype::I32 => 4,
            Dtype::I64 => 8,
        }
    }

    /// Code stored in a data-shards header (only u16 and u32 are written).
    pub fn shard_code(self) -> Option<u32> {
        match self {
            Dtype::U16 => Some(1),
            Dtype::U32 => Some(2),
            _ => None,
        }
    }

    /// Inverse of [`Dtype::shard_code`].
    pub fn from_shard_code(code: u32) -> Option<Dtype> {
        match code {
            1 => Some(Dtype::U16),
            2 => Some(Dtype::U32),
            _ => None,
        }
    }

    /// Dtype for a Megatron-LM `.idx` dtype code (`megatron.core.datasets.indexed_dataset.DType`);
    /// float codes (6, 7) are not token ids and are rejected.
    pub fn from_megatron_code(code: u8) -> Option<Dtype> {
        match code {
            1 => Some(Dtype::U8),
            3 => Some(Dtype::I16),
            4 => Some(Dtype::I32),
            5 => Some(Dtype::I64),
            8 => Some(Dtype::U16),
            _ => None,
        }
    }

    /// Smallest writable dtype that holds ids `0..vocab_size`.
    pub fn for_vocab(vocab_size: u64) -> Dtype {
        if vocab_size <= 1 << 16 {
            Dtype::U16
        } else {
            Dtype::U32
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Dtype::U8 => "u8",
            Dtype::U16 => "u16",
            Dtype::I16 => "i16",
            Dtype::U32 => "u32",
            Dtype::I32 => "i32",
            Dtype::I64 => "i64",
        };
        f.write_str(s)
    }
}

/// Which part of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    Train,
    Valid,
}

impl Split {
    /// Name used in file names and in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
        }
    }

    /// Both splits, in manifest order.
    pub const ALL: [Split; 2] = [Split::Train, Split::Valid];
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "valid" | "validation" | "val" => Ok(Split::Valid),
            other => Err(format!("unknown split {other:?}; use train or valid")),
        }
    }
}

/// Decoded fixed header of a shard file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    pub version: u32,
    pub dtype_code: u32,
    pub num_tokens: u64,
    pub num_documents: u64,
}

impl ShardHeader {
    /// Serializes the header to its 64-byte form.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&SHARD_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.dtype_code.to_le_bytes());
        b[16..24].copy_from_slice(&self.num_tokens.to_le_bytes());
        b[24..32].copy_from_slice(&self.num_documents.to_le_bytes());
        b
    }

    /// Parses and checks magic, version and dtype; `bytes` is the whole file.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<(ShardHeader, Dtype), DataError> {
        if bytes.len() < HEADER_LEN {
            if bytes.len() >= 8 && bytes[0..8] != SHARD_MAGIC {
                return Err(bad_magic(path, &bytes[0..8]));
            }
            return Err(DataError::Corrupt {
                path: path.to_path_buf(),
                message: format!("file is {} bytes, shorter than the {HEADER_LEN}-byte header", bytes.len()),
            });
        }
        if bytes[0..8] != SHARD_MAGIC {
            return Err(bad_magic(path, &bytes[0..8]));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        let header = ShardHeader {
            version: u32_at(8),
            dtype_code: u32_at(12),
            num_tokens: u64_at(16),
            num_documents: u64_at(24),
        };
        if !is_supported_version(header.version) {
            return Err(DataError::UnsupportedVersion {
                path: path.to_path_buf(),
                got: header.version.into(),
                supported: SUPPORTED_VERSIONS.into(),
            });
        }
        let dtype = Dtype::from_shard_code(header.dtype_code)
            .ok_or(DataError::BadDtype { path: path.to_path_buf(), code: header.dtype_code })?;
        Ok((header, dtype))
    }

    /// Whether the shard carries a loss mask (version 2).
    pub fn has_loss_mask(&self) -> bool {
        self.version == FORMAT_VERSION_MASKED
    }

    /// Total file size implied by this header: header, tokens, document table and (version 2) the loss mask.
    pub fn file_len(&self, dtype: Dtype) -> Option<u64> {
        let mask = if self.has_loss_mask() { loss_mask_len(self.num_tokens) } else { 0 };
        (HEADER_LEN as u64)
            .checked_add(self.num_tokens.checked_mul(dtype.width() as u64)?)?
            .checked_add(self.num_documents.checked_mul(8)?)?
            .checked_add(mask)
    }
}

/// Bytes of the loss mask of `num_tokens` tokens: one bit per token, bit `i % 8` of byte `i / 8`.
pub fn loss_mask_len(num_tokens: u64) -> u64 {
    num_tokens.div_ceil(8)
}

/// Whether this build reads shards and manifests of this version.
fn is_supported_version(version: u32) -> bool {
    version == FORMAT_VERSION || version == FORMAT_VERSION_MASKED
}

fn bad_magic(path: &Path, got: &[u8]) -> DataError {
    DataError::BadMagic {
        path: path.to_path_buf(),
        expected: String::from_utf8_lossy(&SHARD_MAGIC).into_owned(),
        got: String::from_utf8_lossy(got).into_owned(),
    }
}

/// One shard file as listed in the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name relative to the dataset directory.
    pub file: String,
    pub num_tokens: u64,
    pub num_documents: u64,
    /// xxh3-128 of the whole file, 32 lowercase hex digits.
    pub xxh3_128: String,
    /// Tokens whose loss-mask bit is 1 (format version 2 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_loss_tokens: Option<u64>,
}

/// All shards of one split.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitInfo {
    pub num_tokens: u64,
    pub num_documents: u64,
    /// Tokens whose loss-mask bit is 1 (format version 2 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_loss_tokens: Option<u64>,
    pub shards: Vec<ShardInfo>,
}

/// Contents of `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    pub format_version: u32,
    /// Tokenizer file name relative to the dataset directory, if any.
    pub tokenizer: Option<String>,
    /// One more than the largest token id the tokenizer can produce.
    pub vocab_size: u32,
    pub eos_token: Option<String>,
    pub eos_id: Option<u32>,
    pub dtype: Dtype,
    pub valid_fraction: f64,
    /// Keyed by split name (`train`, `valid`).
    pub splits: BTreeMap<String, SplitInfo>,
}

impl Manifest {
    /// Whether the dataset's shards carry a loss mask (format version 2).
    pub fn has_loss_mask(&self) -> bool {
        self.format_version == FORMAT_VERSION_MASKED
    }

    /// The split's info; an absent split is empty.
    pub fn split(&self, split: Split) -> SplitInfo {
        self.splits.get(split.name()).cloned().unwrap_or_default()
    }

    /// Reads and sanity-checks `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest, DataError> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataError::Manifest {
                    path,
                    message: "file not found (is this a `data-shards prepare` output directory?)".into(),
                })
            }
            Err(e) => return Err(DataError::io(path, e)),
        };
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| DataError::Manifest { path: path.clone(), message: e.to_string() })?;
        if m.format != MANIFEST_FORMAT {
            return Err(DataError::Manifest {
                path,
                message: format!("format is {:?}, expected {MANIFEST_FORMAT:?}", m.format),
            });
        }
        if !is_supported_version(m.format_version) {
            return Err(DataError::UnsupportedVersion {
                path,
                got: m.format_version.into(),
                supported: SUPPORTED_VERSIONS.into(),
            });
        }
        if let Some(name) = m.tokenizer.as_deref().filter(|name| !is_plain_file_name(name)) {
            return Err(DataError::Manifest {
                path,
                message: format!("tokenizer file name {name:?} is not a plain name"),
            });
        }
        if let Some(eos) = m.eos_id.filter(|&eos| eos >= m.vocab_size) {
            return Err(DataError::Manifest {
                path,
                message: format!("eos_id {eos} is outside the vocabulary of {}", m.vocab_size),
            });
        }
        if m.dtype.shard_code().is_none() {
            return Err(DataError::Manifest { path, message: format!("dtype {} cannot be stored in shards", m.dtype) });
        }
        for (name, s) in &m.splits {
            if name.parse::<Split>().is_err() {
                return Err(DataError::Manifest { path, message: format!("unknown split {name:?}") });
            }
            let total =
                |count: fn(&ShardInfo) -> u64| s.shards.iter().try_fold(0u64, |sum, x| sum.checked_add(count(x)));
            if total(|x| x.num_tokens) != Some(s.num_tokens) || total(|x| x.num_documents) != Some(s.num_documents) {
                return Err(DataError::Manifest {
                    path,
                    message: format!("split {name}: totals do not add up over its shards"),
                });
            }
            for sh in &s.shards {
                if !is_plain_file_name(&sh.file) {
                    return Err(DataError::Manifest {
                        path,
                        message: format!("shard file name {:?} is not a plain name", sh.file),
                    });
                }
            }
            if m.has_loss_mask() {
                let loss = s.shards.iter().try_fold(0u64, |sum, x| {
                    x.num_loss_tokens.filter(|&n| n <= x.num_tokens).and_then(|n| sum.checked_add(n))
                });
                if loss.is_none() || loss != s.num_loss_tokens {
                    return Err(DataError::Manifest {
                        path,
                        message: format!(
                            "split {name}: num_loss_tokens is missing, larger than num_tokens or does not add up over its shards (format version 2)"
                        ),
                    });
                }
            }
        }
        Ok(m)
    }
}

/// Whether a file name from a manifest names a file inside the dataset directory (no separator, not hidden).
fn is_plain_file_name(name: &str) -> bool {
    !(name.is_empty() || name.contains('/') || name.contains('\\') || name.starts_with('.'))
}

/// File name of shard `index` of `split`: `train-00000.bin`, `valid-00012.bin`.
pub fn shard_file_name(split: Split, index: usize) -> String {
    format!("{}-{index:05}.bin", split.name())
}

/// Whether `name` is a file that `prepare` writes into a dataset directory (the manifest, the tokenizer, shards).
pub fn is_dataset_file(name: &str) -> bool {
    let is_shard = |split: Split| {
        name.strip_prefix(split.name())
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.strip_suffix(".bin"))
            .is_some_and(|index| index.len() >= 5 && index.bytes().all(|b| b.is_ascii_digit()))
    };
    name == MANIFEST_FILE || name == TOKENIZER_FILE || Split::ALL.into_iter().any(is_shard)
}

/// xxh3-128 of `bytes` as 32 lowercase hex digits (the checksums of shards and of checkpoint files).
pub fn checksum_hex(bytes: &[u8]) -> String {
    digest_hex(xxhash_rust::xxh3::xxh3_128(bytes))
}

/// An xxh3-128 digest (of [`xxhash_rust::xxh3::xxh3_128`] or a streaming `Xxh3::digest128`) as 32 lowercase hex
/// digits, as [`checksum_hex`] writes it.
pub fn digest_hex(digest: u128) -> String {
    format!("{digest:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_32_hex_digits_and_streaming_gives_the_same() {
        assert_eq!(digest_hex(0xab), format!("{}ab", "0".repeat(30)));
        assert_eq!(digest_hex(u128::MAX), "f".repeat(32));
        let bytes: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        bytes.chunks(1000).for_each(|chunk| hasher.update(chunk));
        assert_eq!(digest_hex(hasher.digest128()), checksum_hex(&bytes));
        assert_eq!(checksum_hex(b""), "99aa06d3014798d86001c324468d497f");
    }
}
