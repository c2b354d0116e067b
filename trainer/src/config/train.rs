//! `[train]`: steps, batch, precision, device, logging and run directory, with their defaults and rules.
use super::rules::{non_negative, positive, MAX_PARAMS};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub steps: i64,
    /// Tokens per sequence; `model.max_seq_len` when absent.
    pub seq_len: i64,
    /// Sequences per optimizer step, over all data-parallel ranks (or `global_batch_tokens`);
    /// when neither is set, the resumed checkpoint's, else `micro_batch` x data-parallel ranks
    /// (one micro-batch per rank and step, as Megatron-LM and torchtitan do).
    pub global_batch: i64,
    /// The global batch in tokens (a multiple of `seq_len`), instead of `global_batch`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global_batch_tokens: Option<i64>,
    /// Sequences per forward/backward; `global_batch / (micro_batch * dp)` micro-batches
    /// are accumulated per step.
    pub micro_batch: i64,
    pub seed: u64,
    pub dtype: Dtype,
    /// `cpu`, `cuda` (the local rank's GPU) or `cuda:N`.
    pub device: TrainDevice,
    /// Intra-op CPU threads; 0 keeps libtorch's default.
    pub threads: i64,
    /// Activation recomputation: keep only each block branch's input in the forward pass and
    /// recompute the branch in the backward pass.
    pub recompute: bool,
    pub log_every: i64,
    /// Validation every this many steps (and after the last); 0 disables it.
    pub eval_every: i64,
    /// Sequences of the validation split evaluated each time (the same ones every time).
    pub eval_sequences: i64,
    /// Where the resolved config and the step log go; `runs/NAME` for a config file NAME.toml
    /// when absent.
    pub run_dir: PathBuf,
    /// Signals that make the run finish its step, save a checkpoint and exit with status 75
    /// (requeue).
    pub preempt_signals: Vec<PreemptSignal>,
    /// Stop this process after this step (saving a checkpoint); the learning-rate schedule
    /// still spans `steps`. For allocations shorter than the run.
    pub stop_at_step: Option<i64>,
    /// When set, the final weights are written there in Hugging Face format.
    pub export_dir: Option<PathBuf>,
    /// Greedy sample printed after training: its prompt and length (0 disables it).
    pub sample_prompt: String,
    pub sample_tokens: i64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 1000,
            seq_len: 0,
            global_batch: 0,
            global_batch_tokens: None,
            micro_batch: 1,
            seed: 1234,
            dtype: Dtype::Float32,
            device: TrainDevice::Cpu,
            threads: 0,
            recompute: false,
            log_every: 1,
            eval_every: 0,
            eval_sequences: 16,
            run_dir: PathBuf::from("runs/run"),
            preempt_signals: vec![PreemptSignal::Sigterm, PreemptSignal::Sigusr1],
            stop_at_step: None,
            export_dir: None,
            sample_prompt: String::new(),
            sample_tokens: 0,
        }
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

    /// A dtype by its name (`float32`, `bfloat16`, `float64`), as command lines give it.
    pub fn parse(text: &str) -> Result<Dtype, String> {
        [Dtype::Float32, Dtype::Bfloat16, Dtype::Float64]
            .into_iter()
            .find(|dtype| dtype.name() == text)
            .ok_or_else(|| format!("{text:?}: one of float32, bfloat16, float64"))
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

/// Where a rank computes: `cpu`, `cuda` (the GPU of the rank's node-local index) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainDevice {
    Cpu,
    LocalGpu,
    Gpu(usize),
}

impl TrainDevice {
    /// The libtorch device of the rank with node-local rank `local_rank`.
    pub fn of_local_rank(self, local_rank: usize) -> tch::Device {
        match self {
            TrainDevice::Cpu => tch::Device::Cpu,
            TrainDevice::LocalGpu => tch::Device::Cuda(local_rank),
            TrainDevice::Gpu(index) => tch::Device::Cuda(index),
        }
    }
}

impl std::fmt::Display for TrainDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrainDevice::Cpu => f.write_str("cpu"),
            TrainDevice::LocalGpu => f.write_str("cuda"),
            TrainDevice::Gpu(index) => write!(f, "cuda:{index}"),
        }
    }
}

impl std::str::FromStr for TrainDevice {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "cpu" => Ok(TrainDevice::Cpu),
            "cuda" => Ok(TrainDevice::LocalGpu),
            _ => text
                .strip_prefix("cuda:")
                .and_then(|index| index.parse().ok())
                .map(TrainDevice::Gpu)
                .ok_or_else(|| format!("train.device = {text:?} must be \"cpu\", \"cuda\" or \"cuda:N\"")),
        }
    }
}

impl Serialize for TrainDevice {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TrainDevice {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A signal that asks the run to finish its step, save a checkpoint and exit 75.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum PreemptSignal {
    Sigterm,
    Sigusr1,
    Sigusr2,
    Sigint,
}

impl PreemptSignal {
    /// The signal's number.
    pub fn number(self) -> i32 {
        match self {
            PreemptSignal::Sigterm => libc::SIGTERM,
            PreemptSignal::Sigusr1 => libc::SIGUSR1,
            PreemptSignal::Sigusr2 => libc::SIGUSR2,
            PreemptSignal::Sigint => libc::SIGINT,
        }
    }
}

impl TrainConfig {
    /// Checks `[train]` against itself and the model's sequence length.
    pub fn validate(&self, max_seq_len: i64) -> Result<()> {
        positive("train.steps", self.steps)?;
        positive("train.seq_len", self.seq_len)?;
        non_negative("train.global_batch", self.global_batch)?;
        positive("train.micro_batch", self.micro_batch)?;
        positive("train.log_every", self.log_every)?;
        non_negative("train.eval_every", self.eval_every)?;
        non_negative("train.threads", self.threads)?;
        non_negative("train.sample_tokens", self.sample_tokens)?;
        if self.eval_every > 0 {
            positive("train.eval_sequences", self.eval_sequences)?;
        }
        let step_tokens = self.global_batch as i128 * self.seq_len as i128;
        if step_tokens > MAX_PARAMS {
            bail!("train.global_batch x train.seq_len = {step_tokens} tokens per step; at most {MAX_PARAMS}");
        }
        if self.seq_len > max_seq_len {
            bail!(
                "train.seq_len = {} exceeds model.max_seq_len = {max_seq_len}; lower train.seq_len or raise \
                 model.max_seq_len",
                self.seq_len
            );
        }
        if self.global_batch % self.micro_batch != 0 {
            bail!(
                "train.global_batch = {} must be a multiple of train.micro_batch = {}",
                self.global_batch,
                self.micro_batch
            );
        }
        if let Some(step) = self.stop_at_step {
            positive("train.stop_at_step", step)?;
        }
        if self.sample_tokens > 0 && self.sample_prompt.is_empty() {
            bail!("train.sample_tokens = {} needs a non-empty train.sample_prompt", self.sample_tokens);
        }
        Ok(())
    }
}
