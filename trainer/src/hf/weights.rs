//! Hugging Face weights in safetensors: read box by box from one file or from the shards of `model.safetensors.index.json`, and written sharded above a size.
use crate::mapped::MappedSafetensors;
use anyhow::{Context, Result};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// The index of a sharded checkpoint, as transformers writes it.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The single weights file of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Exports above this size are written in shards of at most this size (transformers' default
/// `max_shard_size` of 5 GB, which every loader handles).
pub const MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// The weights of a Hugging Face model directory, memory-mapped: a rank copies out only the
/// boxes it holds, so under tensor parallelism each reads about its share of the bytes.
#[derive(Debug)]
pub struct HfWeights {
    dir: PathBuf,
    files: Vec<MappedSafetensors>,
    /// Tensor name -> index into `files`.
    by_name: HashMap<String, usize>,
}

impl HfWeights {
    /// Opens `dir/model.safetensors.index.json` and its shards, or `dir/model.safetensors`.
    pub fn open(dir: &Path) -> Result<HfWeights> {
        let index = dir.join(INDEX_FILE);
        let shards: BTreeMap<String, Vec<String>> = if index.exists() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not JSON", index.display()))?;
            let map = json["weight_map"]
                .as_object()
                .with_context(|| format!("{} has no \"weight_map\" object", index.display()))?;
            let mut shards: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (name, file) in map {
                let file = file.as_str().filter(|f| !f.contains('/') && !f.contains("..")).with_context(|| {
                    format!("{}: {name} maps to {file}, not a file name in the directory", index.display())
                })?;
                shards.entry(file.to_string()).or_default().push(name.clone());
            }
            shards
        } else if dir.join(SINGLE_FILE).exists() {
            BTreeMap::from([(SINGLE_FILE.to_string(), Vec::new())])
        } else {
            anyhow::bail!("{} has neither {SINGLE_FILE} nor {INDEX_FILE}", dir.display());
        };
        let mut files = Vec::with_capacity(shards.len());
        let mut by_name = HashMap::new();
        for (file, indexed) in shards {
            let mapped = MappedSafetensors::open(&dir.join(&file))?;
            for name in &indexed {
                if mapped.shape(name).is_none() {
                    anyhow::bail!("{}: the index puts {name} in {file}, which does not hold it", index.display());
                }
            }
            let names: Vec<String> = if indexed.is_empty() { mapped.names().cloned().collect() } else { indexed };
            for name in names {
                by_name.insert(name, files.len());
            }
            files.push(mapped);
        }
        Ok(HfWeights { dir: dir.to_path_buf(), files, by_name })
    }

    /// A tensor's global shape.
    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.by_name.get(name).and_then(|&file| self.files[file].shape(name))
    }

    /// Copies the box at `start` (shaped as `target`) of tensor `name` into `target`.
    pub fn copy_box(&self, name: &str, start: &[i64], target: &Tensor) -> Result<()> {
        let file = self.by_name.get(name).with_context(|| format!("{} has no tensor {name}", self.dir.display()))?;
        self.files[*file].copy_box(name, start, target)
    }
}

/// Writes named tensors into `dir` as `model.safetensors`, or, above `max_shard_bytes`, as
/// `model-0000i-of-0000n.safetensors` with the index transformers reads. Returns the names
/// of the files written.
pub fn write_weights(tensors: &[(String, Tensor)], dir: &Path, max_shard_bytes: u64) -> Result<Vec<String>> {
    let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
    let total: u64 = tensors.iter().map(|(_, t)| bytes(t)).sum();
    let write = |part: &[(String, Tensor)], name: &str| {
        let path = dir.join(name);
        Tensor::write_safetensors(part, &path).with_context(|| format!("cannot write {}", path.display()))
    };
    if total <= max_shard_bytes {
        write(tensors, SINGLE_FILE)?;
        return Ok(vec![SINGLE_FILE.to_string()]);
    }
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut size = 0;
    for (name, tensor) in tensors {
        if size > 0 && size + bytes(tensor) > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes(tensor);
        shards.last_mut().expect("one shard at least").push((name.clone(), tensor.shallow_clone()));
    }
    let count = shards.len();
    let mut files = Vec::with_capacity(count + 1);
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        write(shard, &file)?;
        weight_map.extend(shard.iter().map(|(name, _)| (name.clone(), file.clone())));
        files.push(file);
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join(INDEX_FILE), serde_json::to_string_pretty(&index)?)
        .with_context(|| format!("cannot write {}", dir.join(INDEX_FILE).display()))?;
    files.push(INDEX_FILE.to_string());
    Ok(files)
}
