//! Hugging Face LLaMA format: `config.json` from our model config, and weights as safetensors under Hugging Face names.
use crate::config::ModelConfig;
use crate::params::FlatParams;
use anyhow::{Context, Result};
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

/// Writes every parameter under its Hugging Face name to one safetensors file.
pub fn save_weights(params: &FlatParams, path: &Path) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = params
        .hf_tensors()
        .into_iter()
        .map(|(name, t)| (name, t.to_device(tch::Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&tensors, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Reads every tensor of a safetensors file by name.
pub fn load_weights(path: &Path) -> Result<HashMap<String, Tensor>> {
    let tensors = Tensor::read_safetensors(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(tensors.into_iter().collect())
}
