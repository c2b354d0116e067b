//! The run configuration: one typed tree read from TOML, dotted overrides, validation with errors that name key, value and rule.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    #[serde(default)]
    pub parallel: ParallelConfig,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// Sharded checkpoints: where, how often, how many, and what to start from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Where step directories go; `RUN_DIR/checkpoints` when absent.
    pub dir: Option<PathBuf>,
    /// Save every this many steps (0: only at the end).
    #[serde(default)]
    pub every: i64,
    /// Complete checkpoints kept; older ones are removed after a newer one is published.
    #[serde(default = "default_keep_last")]
    pub keep_last: i64,
    /// Write in the background while training continues.
    #[serde(default = "yes")]
    pub async_save: bool,
    /// Save after the last step.
    #[serde(default = "yes")]
    pub save_final: bool,
    /// Continue from the newest complete checkpoint in `dir`, if there is one.
    #[serde(default = "yes")]
    pub resume: bool,
    /// Continue from this step directory instead (any parallel layout).
    pub load: Option<PathBuf>,
    /// Start (when not resuming) from the weights of a Hugging Face LLaMA directory.
    pub init_from_hf: Option<PathBuf>,
}

fn default_keep_last() -> i64 {
    2
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            dir: None,
            every: 0,
            keep_last: default_keep_last(),
            async_save: true,
            save_final: true,
            resume: true,
            load: None,
            init_from_hf: None,
        }
    }
}

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
        2 * v * d + layers * (attention + mlp + norms) + d
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
        (6 * (self.num_params() - self.vocab_size * self.dim) + attention) as f64
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParallelConfig {
    /// Tensor-parallel degree (ranks that split each layer); data parallelism takes the rest.
    #[serde(default = "one")]
    pub tensor: i64,
    /// ZeRO-1: shard optimizer state and master weights over the data-parallel ranks.
    #[serde(default = "yes")]
    pub zero: bool,
    /// Start each segment's data-parallel gradient reduction as soon as its backward is done,
    /// overlapping the rest of the backward pass (off: reduce everything after the backward).
    #[serde(default = "yes")]
    pub overlap_grad_reduce: bool,
    /// A collective that has not completed after this many seconds fails the rank.
    #[serde(default = "default_collective_timeout")]
    pub collective_timeout_s: f64,
}

fn one() -> i64 {
    1
}
fn yes() -> bool {
    true
}
fn default_collective_timeout() -> f64 {
    300.0
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self { tensor: 1, zero: true, overlap_grad_reduce: true, collective_timeout_s: default_collective_timeout() }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Float32,
    Float64,
    Bfloat16,
}

impl Dtype {
    pub fn kind(self) -> tch::Kind {
        match self {
            Dtype::Float32 => tch::Kind::Float,
            Dtype::Float64 => tch::Kind::Double,
            Dtype::Bfloat16 => tch::Kind::BFloat16,
        }
    }

    /// The name in configs (`train.dtype`) and in Hugging Face's `torch_dtype`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Float32 => "float32",
            Dtype::Float64 => "float64",
            Dtype::Bfloat16 => "bfloat16",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub steps: i64,
    pub seq_len: i64,
    /// Sequences per optimizer step, over all data-parallel ranks (or `global_batch_tokens`).
    #[serde(default)]
    pub global_batch: i64,
    /// The global batch in tokens (a multiple of `seq_len`), instead of `global_batch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_batch_tokens: Option<i64>,
    /// Sequences per forward/backward; `global_batch / (micro_batch * dp)` micro-batches
    /// are accumulated per step.
    pub micro_batch: i64,
    pub seed: u64,
    #[serde(default = "default_dtype")]
    pub dtype: Dtype,
    /// `cpu`, `cuda` (the local rank's GPU) or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Intra-op CPU threads; 0 keeps libtorch's default.
    #[serde(default)]
    pub threads: i64,
    /// Activation recomputation: keep only each block branch's input in the forward pass and
    /// recompute the branch in the backward pass.
    #[serde(default)]
    pub recompute: bool,
    #[serde(default = "default_log_every")]
    pub log_every: i64,
    /// Validation every this many steps (and after the last); 0 disables it.
    #[serde(default)]
    pub eval_every: i64,
    /// Sequences of the validation split evaluated each time (the same ones every time).
    #[serde(default = "default_eval_sequences")]
    pub eval_sequences: i64,
    /// Where the resolved config and the step log go.
    pub run_dir: PathBuf,
    /// Signals that make the run finish its step, save a checkpoint and exit with status 75
    /// (requeue): any of SIGTERM, SIGUSR1, SIGUSR2, SIGINT.
    #[serde(default = "default_preempt_signals")]
    pub preempt_signals: Vec<String>,
    /// Stop this process after this step (saving a checkpoint); the learning-rate schedule
    /// still spans `steps`. For allocations shorter than the run.
    pub stop_at_step: Option<i64>,
    /// When set, the final weights are written there in Hugging Face format.
    #[serde(default)]
    pub export_dir: Option<PathBuf>,
    /// Greedy sample printed after training: its prompt and length (0 disables it).
    #[serde(default)]
    pub sample_prompt: String,
    #[serde(default)]
    pub sample_tokens: i64,
}

fn default_dtype() -> Dtype {
    Dtype::Float32
}
fn default_device() -> String {
    "cpu".into()
}
fn default_preempt_signals() -> Vec<String> {
    vec!["SIGTERM".into(), "SIGUSR1".into()]
}
fn default_log_every() -> i64 {
    1
}
fn default_eval_sequences() -> i64 {
    16
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: i64,
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    #[serde(default)]
    pub grad_clip: f64,
    /// Stop the run (with an error, saving nothing) after this many consecutive steps whose
    /// gradient norm was not finite (their updates are skipped); 0: never stop.
    #[serde(default = "default_max_skipped_steps")]
    pub max_skipped_steps: i64,
}

fn default_max_skipped_steps() -> i64 {
    10
}

fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_eps() -> f64 {
    1e-8
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A directory written by `data-shards prepare`, or a Megatron-LM dataset prefix.
    pub path: PathBuf,
    #[serde(default)]
    pub format: DataFormat,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    #[default]
    Shards,
    Megatron,
}

impl Config {
    /// Reads a TOML file, applies `key.path=value` overrides, and validates the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text, overrides).with_context(|| format!("invalid config {}", path.display()))
    }

    pub fn parse(text: &str, overrides: &[String]) -> Result<Config> {
        let mut tree: toml::Table = toml::from_str(text).context("not valid TOML")?;
        for item in overrides {
            apply_override(&mut tree, item)?;
        }
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(tree))
            .map_err(|e| anyhow::anyhow!("key `{}`: {}", e.path(), e.inner()))?;
        config.resolve_global_batch()?;
        config.validate()?;
        Ok(config)
    }

    /// Turns `train.global_batch_tokens` into `train.global_batch` (sequences).
    fn resolve_global_batch(&mut self) -> Result<()> {
        let t = &mut self.train;
        match t.global_batch_tokens.take() {
            Some(_) if t.global_batch != 0 => {
                bail!("set train.global_batch (sequences) or train.global_batch_tokens, not both")
            }
            Some(tokens) if t.seq_len <= 0 || tokens <= 0 || tokens % t.seq_len != 0 => {
                bail!(
                    "train.global_batch_tokens = {tokens} must be a positive multiple of train.seq_len = {}",
                    t.seq_len
                )
            }
            Some(tokens) => t.global_batch = tokens / t.seq_len,
            None if t.global_batch == 0 => {
                bail!("set train.global_batch (sequences per step) or train.global_batch_tokens")
            }
            None => {}
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a Config always serializes")
    }

    /// Where checkpoints go.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.checkpoint.dir.clone().unwrap_or_else(|| self.train.run_dir.join("checkpoints"))
    }

    /// Data-parallel degree for a world of `world` ranks.
    pub fn data_parallel(&self, world: i64) -> i64 {
        world / self.parallel.tensor
    }

    /// Micro-batches accumulated per step on each rank.
    pub fn accumulation_steps(&self, world: i64) -> i64 {
        self.train.global_batch / (self.train.micro_batch * self.data_parallel(world))
    }

    /// Checks every rule that does not depend on the data or the world size.
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        positive("model.dim", m.dim)?;
        positive("model.n_layers", m.n_layers)?;
        positive("model.n_heads", m.n_heads)?;
        positive("model.ffn_dim", m.ffn_dim)?;
        positive("model.vocab_size", m.vocab_size)?;
        positive("model.max_seq_len", m.max_seq_len)?;
        positive("model.n_kv_heads", m.kv_heads())?;
        if m.dim % m.n_heads != 0 {
            bail!("model.n_heads = {} must divide model.dim = {} (head size = dim / n_heads)", m.n_heads, m.dim);
        }
        if m.head_dim() % 2 != 0 {
            bail!("model.dim / model.n_heads = {} must be even for rotary embeddings", m.head_dim());
        }
        if m.n_heads % m.kv_heads() != 0 {
            bail!(
                "model.n_kv_heads = {} must divide model.n_heads = {} (grouped-query attention)",
                m.kv_heads(),
                m.n_heads
            );
        }
        positive_f("model.rope_theta", m.rope_theta)?;
        positive_f("model.norm_eps", m.norm_eps)?;
        positive_f("model.init_std", m.init_std)?;

        // Sizes are multiplied together (parameters, FLOPs, bytes): keep them far from overflow.
        let params = m.num_params_wide();
        if params > MAX_PARAMS {
            bail!(
                "the model has {params} parameters (model.dim = {}, model.n_layers = {}, model.ffn_dim = {}, \
                   model.vocab_size = {}); this trainer handles up to {MAX_PARAMS}",
                m.dim,
                m.n_layers,
                m.ffn_dim,
                m.vocab_size
            );
        }

        positive("parallel.tensor", self.parallel.tensor)?;
        positive_f("parallel.collective_timeout_s", self.parallel.collective_timeout_s)?;
        if self.parallel.collective_timeout_s > MAX_SECONDS {
            bail!(
                "parallel.collective_timeout_s = {:e} is more than {MAX_SECONDS:e} s (about 30 years)",
                self.parallel.collective_timeout_s
            );
        }

        let t = &self.train;
        positive("train.steps", t.steps)?;
        positive("train.seq_len", t.seq_len)?;
        positive("train.global_batch", t.global_batch)?;
        positive("train.micro_batch", t.micro_batch)?;
        positive("train.log_every", t.log_every)?;
        non_negative("train.eval_every", t.eval_every)?;
        non_negative("train.threads", t.threads)?;
        non_negative("train.sample_tokens", t.sample_tokens)?;
        if t.eval_every > 0 {
            positive("train.eval_sequences", t.eval_sequences)?;
        }
        if m.max_seq_len > MAX_SEQ_LEN {
            bail!("model.max_seq_len = {} is more than {MAX_SEQ_LEN} tokens", m.max_seq_len);
        }
        let step_tokens = t.global_batch as i128 * t.seq_len as i128;
        if step_tokens > MAX_PARAMS {
            bail!("train.global_batch x train.seq_len = {step_tokens} tokens per step; at most {MAX_PARAMS}");
        }
        if t.seq_len > m.max_seq_len {
            bail!(
                "train.seq_len = {} exceeds model.max_seq_len = {}; lower train.seq_len or raise model.max_seq_len",
                t.seq_len,
                m.max_seq_len
            );
        }
        if t.global_batch % t.micro_batch != 0 {
            bail!(
                "train.global_batch = {} must be a multiple of train.micro_batch = {}",
                t.global_batch,
                t.micro_batch
            );
        }
        if !(t.device == "cpu" || t.device == "cuda" || t.device.starts_with("cuda:")) {
            bail!("train.device = {:?} must be \"cpu\", \"cuda\" or \"cuda:N\"", t.device);
        }

        crate::preempt::check_signal_names(&t.preempt_signals)?;
        if let Some(step) = t.stop_at_step {
            positive("train.stop_at_step", step)?;
        }
        non_negative("checkpoint.every", self.checkpoint.every)?;
        positive("checkpoint.keep_last", self.checkpoint.keep_last)?;
        if t.sample_tokens > 0 && t.sample_prompt.is_empty() {
            bail!("train.sample_tokens = {} needs a non-empty train.sample_prompt", t.sample_tokens);
        }

        self.metrics.validate()?;

        let o = &self.optim;
        positive_f("optim.lr", o.lr)?;
        if !(0.0..=o.lr).contains(&o.min_lr) {
            bail!("optim.min_lr = {} must be between 0 and optim.lr = {}", o.min_lr, o.lr);
        }
        non_negative("optim.warmup_steps", o.warmup_steps)?;
        if o.weight_decay < 0.0 || !o.weight_decay.is_finite() {
            bail!("optim.weight_decay = {} must be >= 0", o.weight_decay);
        }
        for (key, beta) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                bail!("{key} = {beta} must be in [0, 1)");
            }
        }
        positive_f("optim.eps", o.eps)?;
        if o.grad_clip < 0.0 || !o.grad_clip.is_finite() {
            bail!("optim.grad_clip = {} must be >= 0 (0 disables clipping)", o.grad_clip);
        }
        non_negative("optim.max_skipped_steps", o.max_skipped_steps)?;
        Ok(())
    }

    /// Checks the rules that need the world size (number of ranks).
    pub fn validate_layout(&self, world: i64) -> Result<()> {
        let tp = self.parallel.tensor;
        if world % tp != 0 {
            bail!("world size {world} is not divisible by parallel.tensor = {tp}");
        }
        self.model.check_tensor_split(tp)?;
        let dp = self.data_parallel(world);
        if self.train.eval_every > 0 && self.train.eval_sequences % dp != 0 {
            bail!(
                "train.eval_sequences = {} must be a multiple of the {dp} data-parallel ranks",
                self.train.eval_sequences
            );
        }
        let per_step = self.train.micro_batch * dp;
        if self.train.global_batch % per_step != 0 {
            bail!(
                "train.global_batch = {} must be a multiple of train.micro_batch x data-parallel ranks = {} x {dp}",
                self.train.global_batch,
                self.train.micro_batch
            );
        }
        Ok(())
    }
}

/// Prometheus metrics served by every rank (`metrics/`; checked by `MetricsConfig::validate` below).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` over HTTP.
    #[serde(default)]
    pub enabled: bool,
    /// IP address to listen on (`0.0.0.0` for scrapes from other hosts).
    #[serde(default = "default_metrics_address")]
    pub address: String,
    /// The rank with node-local rank r listens on `port + r`.
    #[serde(default = "default_metrics_port")]
    pub port: u16,
    /// The `run_id` label; the run directory's name when absent.
    pub run_id: Option<String>,
    /// Peak FLOP/s of one rank for MFU; when absent 1e11 per CPU thread, or 989e12 on CUDA.
    pub peak_flops: Option<f64>,
}

fn default_metrics_address() -> String {
    "127.0.0.1".into()
}
fn default_metrics_port() -> u16 {
    9400
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: false,
            address: default_metrics_address(),
            port: default_metrics_port(),
            run_id: None,
            peak_flops: None,
        }
    }
}

/// Sets `a.b.c = value` in the TOML tree; the value is read as TOML (so `3`, `1e-3`,
/// `true`, `"x"`, `[1, 2]` keep their types) or, failing that, as a bare string.
fn apply_override(tree: &mut toml::Table, item: &str) -> Result<()> {
    let (key, raw) =
        item.split_once('=').with_context(|| format!("override {item:?} must look like section.key=value"))?;
    let key = key.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut parts: Vec<&str> = key.split('.').collect();
    let leaf = parts.pop().filter(|l| !l.is_empty()).with_context(|| format!("override {item:?} has an empty key"))?;
    let mut table = tree;
    for part in parts {
        table = table
            .entry(part)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .with_context(|| format!("override {item:?}: `{part}` is not a section"))?;
    }
    table.insert(leaf.to_string(), value);
    Ok(())
}

/// The most parameters a model may have: 2^48, far above any model that fits a cluster, and
/// far enough below i64's range that products of it (bytes, FLOPs per token) cannot overflow.
const MAX_PARAMS: i128 = 1 << 48;

/// The longest sequence a model may be configured for (16 Mi tokens).
const MAX_SEQ_LEN: i64 = 1 << 24;

/// The longest duration a setting may ask for (seconds); `Duration` cannot hold arbitrary f64s.
const MAX_SECONDS: f64 = 1e9;

fn positive(key: &str, value: i64) -> Result<()> {
    if value <= 0 {
        bail!("{key} = {value} must be > 0");
    }
    Ok(())
}

fn non_negative(key: &str, value: i64) -> Result<()> {
    if value < 0 {
        bail!("{key} = {value} must be >= 0");
    }
    Ok(())
}

fn positive_f(key: &str, value: f64) -> Result<()> {
    if !(value > 0.0 && value.is_finite()) {
        bail!("{key} = {value} must be a positive number");
    }
    Ok(())
}

impl MetricsConfig {
    /// Checks the `[metrics]` section.
    pub fn validate(&self) -> Result<()> {
        if self.address.parse::<std::net::IpAddr>().is_err() {
            bail!("metrics.address = {:?} must be an IP address such as \"127.0.0.1\" or \"0.0.0.0\"", self.address);
        }
        if self.port == 0 {
            bail!("metrics.port = 0 must be > 0 (rank with local rank r serves on metrics.port + r)");
        }
        if let Some(peak) = self.peak_flops {
            if !(peak > 0.0 && peak.is_finite()) {
                bail!("metrics.peak_flops = {peak} must be a positive number (FLOP/s of one rank's device)");
            }
        }
        if self.run_id.as_deref().is_some_and(|id| id.trim().is_empty()) {
            bail!("metrics.run_id must not be empty (leave it out to use the run directory's name)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA_7B: &str = include_str!("../../configs/llama-7b.toml");
    const TINY: &str = include_str!("../../configs/tiny.toml");

    fn error_of(text: &str, overrides: &[&str]) -> String {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        format!("{:#}", Config::parse(text, &overrides).unwrap_err())
    }

    #[test]
    fn llama_7b_has_llama2_parameter_count() {
        let config = Config::parse(LLAMA_7B, &[]).unwrap();
        assert_eq!(config.model.num_params(), 6_738_415_616);
    }

    #[test]
    fn overrides_keep_types_and_reach_nested_keys() {
        let overrides = ["train.steps=7".to_string(), "optim.lr=1e-3".to_string(), "data.path=/x y".to_string()];
        let config = Config::parse(TINY, &overrides).unwrap();
        assert_eq!(config.train.steps, 7);
        assert_eq!(config.optim.lr, 1e-3);
        assert_eq!(config.data.path, PathBuf::from("/x y"));
    }

    #[test]
    fn the_global_batch_can_be_given_in_tokens() {
        let overrides = ["train.global_batch=0".to_string(), "train.global_batch_tokens=4096".to_string()];
        let config = Config::parse(TINY, &overrides).unwrap();
        assert_eq!(config.train.global_batch, 4096 / config.train.seq_len);
        let error = error_of(TINY, &["train.global_batch_tokens=4096"]);
        assert!(error.contains("not both"), "{error}");
        let error = error_of(TINY, &["train.global_batch=0", "train.global_batch_tokens=100"]);
        assert!(error.contains("train.global_batch_tokens = 100 must be a positive multiple of train.seq_len = 128"));
    }

    #[test]
    fn resolved_config_round_trips() {
        let config = Config::parse(TINY, &[]).unwrap();
        assert_eq!(Config::parse(&config.to_toml(), &[]).unwrap(), config);
    }

    #[test]
    fn bad_configs_name_key_value_and_rule() {
        let cases: &[(&[&str], &str)] = &[
            (&["train.bogus=1"], "unknown field `bogus`"),
            (&["train.steps=\"many\""], "key `train.steps`: invalid type: string \"many\""),
            (&["model.n_heads=7"], "model.n_heads = 7 must divide model.dim = 256"),
            (&["optim.lr=-0.1"], "optim.lr = -0.1 must be a positive number"),
            (&["train.steps=0"], "train.steps = 0 must be > 0"),
            (&["model.n_kv_heads=3"], "model.n_kv_heads = 3 must divide model.n_heads = 8"),
            (&["train.seq_len=4096"], "train.seq_len = 4096 exceeds model.max_seq_len"),
            (&["train.global_batch=10", "train.micro_batch=4"], "must be a multiple of train.micro_batch = 4"),
            (&["optim.min_lr=1.0"], "optim.min_lr = 1 must be between 0 and optim.lr"),
        ];
        for (overrides, expected) in cases {
            let error = error_of(TINY, overrides);
            assert!(error.contains(expected), "{overrides:?}: got {error:?}, want {expected:?}");
        }
        assert!(error_of("model = [", &[]).contains("not valid TOML"));
    }

    #[test]
    fn layouts_are_checked_against_the_shape() {
        let config = Config::parse(TINY, &["parallel.tensor=3".into()]).unwrap();
        let error = format!("{:#}", config.validate_layout(6).unwrap_err());
        assert!(error.contains("parallel.tensor = 3 must divide model.n_heads = 8"), "{error}");
        let config = Config::parse(TINY, &["parallel.tensor=4".into()]).unwrap();
        let error = format!("{:#}", config.validate_layout(6).unwrap_err());
        assert!(error.contains("world size 6 is not divisible by parallel.tensor = 4"), "{error}");
    }
}
