//! `config.json` of a Hugging Face LLaMA, written from our model config (`config::from_hf` reads it back).
use crate::config::ModelConfig;
use serde_json::json;

/// The `config.json` of `LlamaForCausalLM` for this shape (both the `rope_theta` of
/// transformers 4 and the `rope_parameters` of transformers 5).
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
        "tie_word_embeddings": m.tie_word_embeddings,
        "torch_dtype": torch_dtype,
    })
}
