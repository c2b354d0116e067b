//! A trained model made ready for inference on this rank, from a checkpoint (saved under any layout) or a Hugging Face directory, split over the tensor-parallel group: what `trainer generate` (and eval and serving after it) load.
use crate::checkpoint::{load_params, Checkpointer, Reader};
use crate::comm::Comm;
use crate::config::{invalid_config, read_model_config, Config, DataConfig, Dtype, InvalidConfig, ModelConfig};
use crate::engine::Engine;
use crate::hf::HfWeights;
use crate::model::{segment_specs, TpShard};
use crate::params::FlatParams;
use anyhow::{Context, Result};
use data_shards::ChatTemplate;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Device;
use tokenizers::Tokenizer;

/// A model loaded for inference.
#[derive(Debug)]
pub struct LoadedModel {
    /// This rank's part of the weights (no gradient buffer), in the dtype asked for.
    pub engine: Engine,
    /// The model's configuration (`train.dtype`: the dtype loaded). From a Hugging Face
    /// directory: `[model]` from its config.json, defaults elsewhere.
    pub config: Config,
    /// The directory the weights came from (a checkpoint's step directory).
    pub dir: PathBuf,
    /// Its `tokenizer.json`, when it has one.
    pub tokenizer: Option<PathBuf>,
    /// The end-of-sequence ids the model's files name (Hugging Face `eos_token_id`), if any.
    pub eos_token_ids: Vec<i64>,
}

impl LoadedModel {
    /// The model's chat template: its own files (a Hugging Face directory), else those of the
    /// Hugging Face model its training started from.
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        let candidates = std::iter::once(self.dir.as_path()).chain(self.config.checkpoint.init_from_hf.as_deref());
        let mut errors = Vec::new();
        for candidate in candidates {
            match ChatTemplate::from_model_dir(candidate) {
                Ok(template) => return Ok(template),
                Err(error) => errors.push(format!("{error}")),
            }
        }
        Err(anyhow::anyhow!("the model has no chat template ({})", errors.join("; ")))
    }

    /// The tokens that end a generation by default: the model's end-of-sequence ids, else the
    /// tokenizer's `<|endoftext|>`.
    pub fn default_stop_token_ids(&self, tokenizer: Option<&Tokenizer>) -> Vec<i64> {
        if !self.eos_token_ids.is_empty() {
            return self.eos_token_ids.clone();
        }
        let eos = tokenizer.and_then(|t| t.token_to_id(data_shards::tokenize::DEFAULT_EOS));
        eos.map(i64::from).into_iter().collect()
    }
}

/// `text`'s token ids, with the tokenizer's special tokens when `special` (as `transformers`
/// encodes a plain prompt; a rendered chat template writes its own).
pub fn encode(tokenizer: &Tokenizer, text: &str, special: bool) -> Result<Vec<i64>> {
    let encoding =
        tokenizer.encode(text, special).map_err(|e| anyhow::anyhow!("cannot encode the prompt {text:?}: {e}"))?;
    Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
}

/// Loads the model at `source` onto `device`, split over `comm`'s tensor-parallel group:
/// `source` is a checkpoint step directory, a checkpoint directory or run directory (its newest
/// checkpoint), or a Hugging Face LLaMA directory. `dtype`: the compute dtype (`None`: the
/// model's own: the training dtype, or the Hugging Face `torch_dtype`). No collectives: each
/// rank reads its own part.
pub fn load_model(source: &Path, comm: Arc<Comm>, device: Device, dtype: Option<Dtype>) -> Result<LoadedModel> {
    if source.join("manifest.json").is_file() {
        return from_checkpoint(source, comm, device, dtype);
    }
    if source.join("config.json").is_file() {
        return from_hf_dir(source, comm, device, dtype);
    }
    for root in [source.to_path_buf(), source.join("checkpoints")] {
        if let Some(step) = Checkpointer::latest(&root, false)? {
            return from_checkpoint(&step, comm, device, dtype);
        }
    }
    Err(invalid_config(format!(
        "(model): {} is neither a checkpoint (a step directory with manifest.json, or a directory of them) nor a \
         Hugging Face directory (config.json and model.safetensors)",
        source.display()
    )))
}

/// An engine with zeroed weights for `model`, this rank's part of it under `comm`'s tensor
/// parallelism.
fn empty_engine(model: &ModelConfig, comm: Arc<Comm>, device: Device, dtype: Dtype) -> Result<Engine> {
    let tensor = comm.topology.tensor;
    model.check_tensor_split(tensor.size as i64).context(InvalidConfig(format!(
        "(model): the model cannot be split over {} tensor-parallel ranks",
        tensor.size
    )))?;
    let tp = TpShard { rank: tensor.rank as i64, size: tensor.size as i64 };
    let params = FlatParams::without_grads(segment_specs(model, tp), dtype.kind(), device);
    Ok(Engine::new(params, model, comm, false))
}

fn existing(path: PathBuf) -> Option<PathBuf> {
    path.is_file().then_some(path)
}

/// A checkpoint step directory of any saved layout: the configuration from its manifest, the
/// weights read under this rank's layout (a bf16 run's fp32 master weights when loading wider).
fn from_checkpoint(dir: &Path, comm: Arc<Comm>, device: Device, dtype: Option<Dtype>) -> Result<LoadedModel> {
    let mut reader = Reader::open(dir)?;
    let mut config = Config::parse(&reader.manifest().config, &[])
        .with_context(|| format!("checkpoint {}: its saved configuration cannot be read", dir.display()))?;
    config.train.dtype = dtype.unwrap_or(config.train.dtype);
    config.parallel.tensor = comm.topology.tensor.size as i64;
    let engine = empty_engine(&config.model, comm, device, config.train.dtype)?;
    load_params(&mut reader, &engine.params)?;
    let tokenizer = existing(dir.join("tokenizer.json"));
    Ok(LoadedModel { engine, config, dir: dir.to_path_buf(), tokenizer, eos_token_ids: Vec::new() })
}

/// A Hugging Face LLaMA directory (config.json, the weights in one file or shards, tokenizer.json):
/// the model's shape from config.json (`config::read_model_config`, which refuses what this
/// model does not compute), this rank's slices read out of the mapped weights.
fn from_hf_dir(dir: &Path, comm: Arc<Comm>, device: Device, dtype: Option<Dtype>) -> Result<LoadedModel> {
    let path = dir.join("config.json");
    let model = read_model_config(dir).context(InvalidConfig("(model)".into()))?;
    model.validate().map_err(|e| invalid_config(format!("(model): {}: {e:#}", path.display())))?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let json: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let named = |key: &str| {
        json[key].as_str().or(json["torch_dtype"].as_str()).and_then(|name| match name {
            "float32" => Some(Dtype::Float32),
            "bfloat16" => Some(Dtype::Bfloat16),
            "float64" => Some(Dtype::Float64),
            _ => None,
        })
    };
    let dtype = dtype.or(named("dtype")).unwrap_or(Dtype::Float32);
    let mut config = Config {
        model,
        parallel: Default::default(),
        train: Default::default(),
        optim: Default::default(),
        data: DataConfig { path: dir.to_path_buf(), format: Default::default() },
        checkpoint: Default::default(),
        metrics: Default::default(),
        eval: Default::default(),
    };
    config.train.dtype = dtype;
    config.parallel.tensor = comm.topology.tensor.size as i64;
    let engine = empty_engine(&config.model, comm, device, dtype)?;
    let weights = HfWeights::open(dir)?;
    engine.params.load_hf(&weights).with_context(|| format!("cannot load the weights of {}", dir.display()))?;
    let generation: Value = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    let eos = [&generation["eos_token_id"], &json["eos_token_id"]].into_iter().find(|v| !v.is_null());
    let eos_token_ids = match eos {
        Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_i64).collect(),
        Some(id) => id.as_i64().into_iter().collect(),
        None => Vec::new(),
    };
    let tokenizer = existing(dir.join("tokenizer.json"));
    Ok(LoadedModel { engine, config, dir: dir.to_path_buf(), tokenizer, eos_token_ids })
}
