//! Hugging Face LLaMA format: `config.json` from our model config, weights as safetensors under Hugging Face names, and export directories.
use crate::config::{Config, ModelConfig};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use tch::Tensor;

/// The `config.json` of `LlamaForCausalLM` for this shape.
pub fn config_json(m: &ModelConfig, torch_dtype: &str) -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.dim,
        "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads(),
        "head_dim": m.head_dim(),
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "tie_word_embeddings": false,
        "torch_dtype": torch_dtype,
    })
}

/// Writes named tensors to one safetensors file.
pub fn save_weights(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    Tensor::write_safetensors(tensors, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Reads every tensor of a safetensors file by name.
pub fn load_weights(path: &Path) -> Result<HashMap<String, Tensor>> {
    let tensors = Tensor::read_safetensors(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(tensors.into_iter().collect())
}

/// The files an export writes; a directory holding nothing else is a previous export that a new
/// one may replace.
const EXPORT_FILES: [&str; 4] = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"];

/// Refuses to replace `dir` unless it is missing, empty or a previous export (nothing but
/// [`EXPORT_FILES`]): an export never deletes what it did not write.
pub fn check_replaceable(dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read the export directory {}", dir.display())),
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !EXPORT_FILES.contains(&name.as_str()) {
            bail!(
                "{} holds {name:?}, so it is not a previous export; exporting there would delete it: choose a new \
                 or empty directory (an export holds only {})",
                dir.display(),
                EXPORT_FILES.join(", ")
            );
        }
    }
    Ok(())
}

/// Writes `config.json`, `generation_config.json`, `model.safetensors` and the tokenizer (when
/// known) into `dir`, published by rename so a crash never leaves a half-written export. `dir`
/// must be missing, empty or a previous export ([`check_replaceable`]), checked before any work.
pub fn write_dir(weights: &[(String, Tensor)], config: &Config, tokenizer: Option<&Path>, dir: &Path) -> Result<()> {
    check_replaceable(dir)?;
    let name = dir.file_name().context("the export directory needs a name")?.to_string_lossy();
    let staging = dir.with_file_name(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    let dtype = config.train.dtype.name();
    std::fs::write(staging.join("config.json"), serde_json::to_string_pretty(&config_json(&config.model, dtype))?)?;
    let generation = json!({"do_sample": false, "max_length": config.model.max_seq_len});
    std::fs::write(staging.join("generation_config.json"), serde_json::to_string_pretty(&generation)?)?;
    save_weights(weights, &staging.join("model.safetensors"))?;
    if let Some(tokenizer) = tokenizer {
        std::fs::copy(tokenizer, staging.join("tokenizer.json"))
            .with_context(|| format!("cannot copy {}", tokenizer.display()))?;
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
