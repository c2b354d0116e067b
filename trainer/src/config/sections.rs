//! `[parallel]`, `[optim]`, `[data]`, `[checkpoint]`, `[eval]` and `[metrics]`: their keys, defaults and rules.
use super::rules::{non_negative, positive, positive_f, MAX_SECONDS};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ParallelConfig {
    /// Tensor-parallel degree (ranks that split each layer); data parallelism takes the rest.
    pub tensor: i64,
    /// ZeRO-1: shard optimizer state and master weights over the data-parallel ranks.
    pub zero: bool,
    /// Start each segment's data-parallel gradient reduction as soon as its backward is done,
    /// overlapping the rest of the backward pass (off: reduce everything after the backward).
    pub overlap_grad_reduce: bool,
    /// A collective that has not completed after this many seconds fails the rank.
    pub collective_timeout_s: f64,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig { tensor: 1, zero: true, overlap_grad_reduce: true, collective_timeout_s: 300.0 }
    }
}

impl ParallelConfig {
    pub fn validate(&self) -> Result<()> {
        positive("parallel.tensor", self.tensor)?;
        positive_f("parallel.collective_timeout_s", self.collective_timeout_s)?;
        if self.collective_timeout_s > MAX_SECONDS {
            bail!(
                "parallel.collective_timeout_s = {:e} is more than {MAX_SECONDS:e} s (about 30 years)",
                self.collective_timeout_s
            );
        }
        Ok(())
    }
}

/// AdamW and its learning-rate schedule (linear warmup, cosine decay to `min_lr`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f64,
    /// The learning rate at the end of the cosine decay; `lr / 10` when absent.
    pub min_lr: f64,
    pub warmup_steps: i64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub grad_clip: f64,
    /// Stop the run (with an error, saving nothing) after this many consecutive steps whose
    /// gradient norm was not finite (their updates are skipped); 0: never stop.
    pub max_skipped_steps: i64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 3e-4,
            min_lr: 3e-5,
            warmup_steps: 100,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            max_skipped_steps: 10,
        }
    }
}

impl OptimConfig {
    pub fn validate(&self) -> Result<()> {
        positive_f("optim.lr", self.lr)?;
        if !(0.0..=self.lr).contains(&self.min_lr) {
            bail!("optim.min_lr = {} must be between 0 and optim.lr = {}", self.min_lr, self.lr);
        }
        non_negative("optim.warmup_steps", self.warmup_steps)?;
        if self.weight_decay < 0.0 || !self.weight_decay.is_finite() {
            bail!("optim.weight_decay = {} must be >= 0", self.weight_decay);
        }
        for (key, beta) in [("optim.beta1", self.beta1), ("optim.beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                bail!("{key} = {beta} must be in [0, 1)");
            }
        }
        positive_f("optim.eps", self.eps)?;
        if self.grad_clip < 0.0 || !self.grad_clip.is_finite() {
            bail!("optim.grad_clip = {} must be >= 0 (0 disables clipping)", self.grad_clip);
        }
        non_negative("optim.max_skipped_steps", self.max_skipped_steps)
    }
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

/// Sharded checkpoints: where, how often, how many, and what to start from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Where step directories go; `RUN_DIR/checkpoints` when absent.
    pub dir: Option<PathBuf>,
    /// Save every this many steps (0: only at the end).
    pub every: i64,
    /// Complete checkpoints kept; older ones are removed after a newer one is published.
    pub keep_last: i64,
    /// Write in the background while training continues.
    pub async_save: bool,
    /// Save after the last step.
    pub save_final: bool,
    /// Continue from the newest complete checkpoint in `dir`, if there is one.
    pub resume: bool,
    /// Continue from this step directory instead (any parallel layout).
    pub load: Option<PathBuf>,
    /// Start (when not resuming) from the weights of a Hugging Face LLaMA directory.
    pub init_from_hf: Option<PathBuf>,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            dir: None,
            every: 0,
            keep_last: 2,
            async_save: true,
            save_final: true,
            resume: true,
            load: None,
            init_from_hf: None,
        }
    }
}

impl CheckpointConfig {
    pub fn validate(&self) -> Result<()> {
        non_negative("checkpoint.every", self.every)?;
        positive("checkpoint.keep_last", self.keep_last)
    }
}

/// Held-out evaluations repeated during training, with the validation loss at every
/// `train.eval_every` steps and after the last one: the same scoring as `trainer eval`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Multiple-choice tasks: JSONL of `{"context", "choices", "answer"}`, scored by log-likelihood.
    pub choices: Vec<PathBuf>,
    /// Held-out text (a UTF-8 file is one document; in a `.jsonl` file each line's "text" is one),
    /// scored for loss, perplexity and bits per byte.
    pub texts: Vec<PathBuf>,
}

impl EvalConfig {
    /// A task's name in metrics.jsonl and Prometheus: its file's stem.
    pub fn task_name(path: &Path) -> String {
        path.file_stem().map_or_else(|| path.display().to_string(), |stem| stem.to_string_lossy().into())
    }

    pub fn validate(&self, eval_every: i64) -> Result<()> {
        let mut seen = std::collections::BTreeMap::new();
        for path in self.choices.iter().chain(&self.texts) {
            let name = Self::task_name(path);
            if let Some(other) = seen.insert(name.clone(), path) {
                bail!(
                    "eval: {} and {} are both named {name:?} in the metrics (a task is named by its file's stem); \
                     rename one of them",
                    other.display(),
                    path.display()
                );
            }
        }
        if !seen.is_empty() && eval_every == 0 {
            bail!("eval.choices or eval.texts is set but train.eval_every = 0, so they would never run; set train.eval_every");
        }
        Ok(())
    }
}

/// Prometheus metrics served by every rank (`metrics/`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` over HTTP.
    pub enabled: bool,
    /// IP address to listen on (`0.0.0.0` for scrapes from other hosts).
    pub address: String,
    /// The rank with node-local rank r listens on `port + r`.
    pub port: u16,
    /// The `run_id` label; the run directory's name when absent.
    pub run_id: Option<String>,
    /// Peak FLOP/s of one rank for MFU; when absent 1e11 per CPU thread, or 989e12 on CUDA.
    pub peak_flops: Option<f64>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { enabled: false, address: "127.0.0.1".into(), port: 9400, run_id: None, peak_flops: None }
    }
}

impl MetricsConfig {
    pub fn validate(&self) -> Result<()> {
        if self.address.parse::<IpAddr>().is_err() {
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
