//! A Hugging Face model directory as an export writes it: config, weights, tokenizer files, published by rename, replacing only a previous export.
use super::config::config_json;
use super::weights::{write_weights, INDEX_FILE, MAX_SHARD_BYTES, SINGLE_FILE};
use crate::config::Config;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// The tokenizer's files a model directory may hold besides the weights, copied with them.
pub const TOKENIZER_FILES: [&str; 4] =
    ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"];

/// Whether an export writes a file of this name (the config, the weights, their shards and
/// index, the tokenizer's files): a directory holding nothing else is a previous export that a
/// new one may replace.
fn is_export_file(name: &str) -> bool {
    let shard = name.starts_with("model-") && name.ends_with(".safetensors") && name.contains("-of-");
    ["config.json", "generation_config.json", SINGLE_FILE, INDEX_FILE].contains(&name)
        || TOKENIZER_FILES.contains(&name)
        || shard
}

/// Refuses to replace `dir` unless it is missing, empty or a previous export (nothing but
/// files an export writes): an export never deletes what it did not write.
pub fn check_replaceable(dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read the export directory {}", dir.display())),
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !is_export_file(&name) {
            bail!(
                "{} holds {name:?}, so it is not a previous export; exporting there would delete it: choose a new \
                 or empty directory (an export holds only config.json, generation_config.json, the weights and \
                 {})",
                dir.display(),
                TOKENIZER_FILES.join(", ")
            );
        }
    }
    Ok(())
}

/// Writes `config.json`, `generation_config.json`, the weights (sharded above
/// [`MAX_SHARD_BYTES`]) and the tokenizer's files (`tokenizer`: files to copy, by their names)
/// into `dir`, published by rename so a crash never leaves a half-written export. `dir` must be
/// missing, empty or a previous export ([`check_replaceable`]), checked before any work.
pub fn write_dir(weights: &[(String, Tensor)], config: &Config, tokenizer: &[PathBuf], dir: &Path) -> Result<()> {
    check_replaceable(dir)?;
    let name = dir.file_name().context("the export directory needs a name")?.to_string_lossy();
    let staging = dir.with_file_name(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    let dtype = config.train.dtype.name();
    let (mut model_json, mut generation) =
        (config_json(&config.model, dtype), json!({"do_sample": false, "max_length": config.model.max_seq_len}));
    for (key, id) in config.checkpoint.init_from_hf.as_deref().map(special_token_ids).unwrap_or_default() {
        model_json[key] = id.clone();
        generation[key] = id;
    }
    std::fs::write(staging.join("config.json"), serde_json::to_string_pretty(&model_json)?)?;
    std::fs::write(staging.join("generation_config.json"), serde_json::to_string_pretty(&generation)?)?;
    write_weights(weights, &staging, MAX_SHARD_BYTES)?;
    for file in tokenizer {
        let name = file.file_name().context("a tokenizer file needs a name")?;
        std::fs::copy(file, staging.join(name)).with_context(|| format!("cannot copy {}", file.display()))?;
    }
    // The previous export goes aside first and only after the new one is in place is it removed.
    let previous = dir.with_file_name(format!(".{name}.previous"));
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&previous);
        std::fs::rename(dir, &previous).with_context(|| format!("cannot move the previous {} aside", dir.display()))?;
    }
    std::fs::rename(&staging, dir).with_context(|| format!("cannot publish {}", dir.display()))?;
    if previous.exists() {
        std::fs::remove_dir_all(&previous).with_context(|| format!("cannot remove {}", previous.display()))?;
    }
    tracing::info!("exported the model in Hugging Face format to {}", dir.display());
    Ok(())
}

/// The special token ids of a Hugging Face directory (`generation_config.json`'s, else
/// `config.json`'s), which an export of a model started from it keeps: without `eos_token_id`,
/// `transformers`' `generate` would not stop at the end of a chat turn.
fn special_token_ids(dir: &Path) -> Vec<(&'static str, serde_json::Value)> {
    let read = |name: &str| -> serde_json::Value {
        std::fs::read_to_string(dir.join(name))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    };
    let (generation, model) = (read("generation_config.json"), read("config.json"));
    ["bos_token_id", "eos_token_id", "pad_token_id"]
        .into_iter()
        .filter_map(|key| {
            let id = [&generation[key], &model[key]].into_iter().find(|id| !id.is_null())?;
            Some((key, id.clone()))
        })
        .collect()
}

/// The tokenizer's files to export with a model: those of the Hugging Face directory it
/// started from (`checkpoint.init_from_hf`, with its chat template), else the training data's
/// `tokenizer.json`, when they exist.
pub fn tokenizer_files(config: &Config, data_tokenizer: Option<&Path>) -> Vec<PathBuf> {
    let from_model: Vec<PathBuf> = config
        .checkpoint
        .init_from_hf
        .iter()
        .flat_map(|dir| TOKENIZER_FILES.map(|name| dir.join(name)))
        .filter(|path| path.exists())
        .collect();
    if !from_model.is_empty() {
        return from_model;
    }
    data_tokenizer.filter(|path| path.exists()).map(Path::to_path_buf).into_iter().collect()
}
