//! `[model]`: the LLaMA architecture's shape, the counts derived from it (parameters, FLOPs) and its rules.
use super::rules::{positive, positive_f, MAX_PARAMS, MAX_SEQ_LEN};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The LLaMA architecture's shape.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub dim: i64,
    pub n_layers: i64,
    pub n_heads: i64,
    /// Key/value heads for grouped-query attention; equals `n_heads` when absent.
    pub n_kv_heads: Option<i64>,
    pub ffn_dim: i64,
    pub vocab_size: i64,
    pub max_seq_len: i64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Standard deviation of the normal init of every matrix; output projections are
    /// further scaled by 1/sqrt(2 * n_layers).
    #[serde(default = "default_init_std")]
    pub init_std: f64,
    /// The output head is the token embedding (one tensor, `model.embed_tokens.weight`), as in
    /// SmolLM2 and Gemma; under tensor parallelism both are split by vocabulary rows alike.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_init_std() -> f64 {
    0.02
}

impl ModelConfig {
    pub fn kv_heads(&self) -> i64 {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }
    pub fn head_dim(&self) -> i64 {
        self.dim / self.n_heads
    }
    /// Number of parameters, computed from the shape alone (nothing is allocated).
    pub fn num_params(&self) -> i64 {
        self.num_params_wide() as i64
    }

    /// The parameter count without overflow, whatever the sizes (validation bounds it).
    fn num_params_wide(&self) -> i128 {
        let (d, f, v, layers) =
            (self.dim as i128, self.ffn_dim as i128, self.vocab_size as i128, self.n_layers as i128);
        let kv = (self.kv_heads() * self.head_dim()) as i128;
        let attention = d * d + 2 * kv * d + d * d;
        let mlp = 3 * d * f;
        let norms = 2 * d;
        let vocabulary_matrices = if self.tie_word_embeddings { 1 } else { 2 };
        vocabulary_matrices * v * d + layers * (attention + mlp + norms) + d
    }

    /// Checks that `tp` tensor-parallel ranks can split the model: heads, KV heads, FFN and
    /// vocabulary rows are divided among them.
    pub fn check_tensor_split(&self, tp: i64) -> Result<()> {
        for (key, value) in [
            ("model.n_heads", self.n_heads),
            ("model.n_kv_heads", self.kv_heads()),
            ("model.ffn_dim", self.ffn_dim),
            ("model.vocab_size", self.vocab_size),
        ] {
            if value % tp != 0 {
                bail!("parallel.tensor = {tp} must divide {key} = {value}");
            }
        }
        Ok(())
    }

    /// Floating-point operations of one training step per token (forward + backward),
    /// PaLM's 6N + attention estimate, used for MFU.
    pub fn train_flops_per_token(&self, seq_len: i64) -> f64 {
        let attention = 12 * self.n_layers * self.dim * seq_len;
        // Every parameter but the embedding lookup's is one multiply-add per token; a tied
        // head's matrix is still multiplied.
        let lookup = if self.tie_word_embeddings { 0 } else { self.vocab_size * self.dim };
        (6 * (self.num_params() - lookup) + attention) as f64
    }

    /// Checks the shape: positive sizes, heads that divide the width, sizes far from overflow.
    pub fn validate(&self) -> Result<()> {
        positive("model.dim", self.dim)?;
        positive("model.n_layers", self.n_layers)?;
        positive("model.n_heads", self.n_heads)?;
        positive("model.ffn_dim", self.ffn_dim)?;
        positive("model.vocab_size", self.vocab_size)?;
        positive("model.max_seq_len", self.max_seq_len)?;
        positive("model.n_kv_heads", self.kv_heads())?;
        if self.dim % self.n_heads != 0 {
            bail!("model.n_heads = {} must divide model.dim = {} (head size = dim / n_heads)", self.n_heads, self.dim);
        }
        if self.head_dim() % 2 != 0 {
            bail!("model.dim / model.n_heads = {} must be even for rotary embeddings", self.head_dim());
        }
        if self.n_heads % self.kv_heads() != 0 {
            bail!(
                "model.n_kv_heads = {} must divide model.n_heads = {} (grouped-query attention)",
                self.kv_heads(),
                self.n_heads
            );
        }
        positive_f("model.rope_theta", self.rope_theta)?;
        positive_f("model.norm_eps", self.norm_eps)?;
        positive_f("model.init_std", self.init_std)?;
        if self.max_seq_len > MAX_SEQ_LEN {
            bail!("model.max_seq_len = {} is more than {MAX_SEQ_LEN} tokens", self.max_seq_len);
        }
        // Sizes are multiplied together (parameters, FLOPs, bytes): keep them far from overflow.
        let params = self.num_params_wide();
        if params > MAX_PARAMS {
            bail!(
                "the model has {params} parameters (model.dim = {}, model.n_layers = {}, model.ffn_dim = {}, \
                   model.vocab_size = {}); this trainer handles up to {MAX_PARAMS}",
                self.dim,
                self.n_layers,
                self.ffn_dim,
                self.vocab_size
            );
        }
        Ok(())
    }
}
