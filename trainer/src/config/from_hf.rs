//! A `[model]` section from a Hugging Face LLaMA's `config.json`, and the check that a configured model is that one.
use super::ModelConfig;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// The keys of a LLaMA `config.json` this trainer reads.
#[derive(Debug, Deserialize)]
struct LlamaJson {
    model_type: Option<String>,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    vocab_size: i64,
    max_position_embeddings: i64,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeJson>,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    initializer_range: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct RopeJson {
    rope_type: Option<String>,
    rope_theta: Option<f64>,
}

/// The model config of the Hugging Face LLaMA in `dir`, from its `config.json`; what this
/// trainer cannot compute (biases, another activation, RoPE scaling) is refused by name.
pub fn read_model_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (a Hugging Face model directory has one)", path.display()))?;
    let json: LlamaJson =
        serde_json::from_str(&text).with_context(|| format!("{} is not a LLaMA config.json", path.display()))?;
    let unsupported = |what: String| anyhow::anyhow!("{}: {what}; this trainer computes plain LLaMA", path.display());
    if let Some(model_type) = json.model_type.as_deref().filter(|t| !matches!(*t, "llama" | "mistral")) {
        return Err(unsupported(format!("model_type = {model_type:?}")));
    }
    if json.attention_bias || json.mlp_bias {
        return Err(unsupported("attention_bias or mlp_bias is true".into()));
    }
    if let Some(act) = json.hidden_act.as_deref().filter(|a| !matches!(*a, "silu" | "swish")) {
        return Err(unsupported(format!("hidden_act = {act:?}")));
    }
    let rope_type = json.rope_parameters.as_ref().and_then(|r| r.rope_type.as_deref()).unwrap_or("default");
    if rope_type != "default" || json.rope_scaling.as_ref().is_some_and(|s| !s.is_null()) {
        return Err(unsupported(format!("RoPE scaling ({rope_type:?}, rope_scaling = {:?})", json.rope_scaling)));
    }
    let head_dim = json.hidden_size / json.num_attention_heads.max(1);
    if json.head_dim.is_some_and(|d| d != head_dim) {
        return Err(unsupported(format!(
            "head_dim = {:?} is not hidden_size / num_attention_heads = {head_dim}",
            json.head_dim
        )));
    }
    let rope_theta = json.rope_parameters.and_then(|r| r.rope_theta).or(json.rope_theta).unwrap_or(10000.0);
    Ok(ModelConfig {
        dim: json.hidden_size,
        n_layers: json.num_hidden_layers,
        n_heads: json.num_attention_heads,
        n_kv_heads: json.num_key_value_heads,
        ffn_dim: json.intermediate_size,
        vocab_size: json.vocab_size,
        max_seq_len: json.max_position_embeddings,
        rope_theta,
        norm_eps: json.rms_norm_eps,
        init_std: json.initializer_range.unwrap_or(0.02),
        tie_word_embeddings: json.tie_word_embeddings,
    })
}

/// Refuses a configured model that is not the one in `dir`: every key that shapes the
/// computation must be equal (`model.max_seq_len` may be shorter), and each difference is
/// named with both values.
pub fn check_model_config(dir: &Path, ours: &ModelConfig) -> Result<()> {
    let theirs = read_model_config(dir)?;
    let numbers = [
        ("dim", "hidden_size", ours.dim as f64, theirs.dim as f64),
        ("n_layers", "num_hidden_layers", ours.n_layers as f64, theirs.n_layers as f64),
        ("n_heads", "num_attention_heads", ours.n_heads as f64, theirs.n_heads as f64),
        ("n_kv_heads", "num_key_value_heads", ours.kv_heads() as f64, theirs.kv_heads() as f64),
        ("ffn_dim", "intermediate_size", ours.ffn_dim as f64, theirs.ffn_dim as f64),
        ("vocab_size", "vocab_size", ours.vocab_size as f64, theirs.vocab_size as f64),
        ("rope_theta", "rope_theta", ours.rope_theta, theirs.rope_theta),
        ("norm_eps", "rms_norm_eps", ours.norm_eps, theirs.norm_eps),
    ];
    // config.json often holds a float32's value (SmolLM2: rms_norm_eps = 9.999999747378752e-06).
    let differ = |a: f64, b: f64| (a - b).abs() > 1e-6 * a.abs().max(b.abs());
    let mut differences: Vec<String> = numbers
        .into_iter()
        .filter(|(_, _, a, b)| differ(*a, *b))
        .map(|(key, hf_key, a, b)| format!("model.{key} = {a} in the config, {hf_key} = {b} in config.json"))
        .collect();
    if ours.tie_word_embeddings != theirs.tie_word_embeddings {
        differences.push(format!(
            "model.tie_word_embeddings = {} in the config, tie_word_embeddings = {} in config.json",
            ours.tie_word_embeddings, theirs.tie_word_embeddings
        ));
    }
    if ours.max_seq_len > theirs.max_seq_len {
        differences.push(format!(
            "model.max_seq_len = {} in the config is more than max_position_embeddings = {} in config.json",
            ours.max_seq_len, theirs.max_seq_len
        ));
    }
    if !differences.is_empty() {
        bail!(
            "{} holds another model: {}; leave [model] out to take the model from config.json",
            dir.display(),
            differences.join("; ")
        );
    }
    Ok(())
}
