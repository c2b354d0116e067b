//! The training loop: batches in, AdamW steps out, with validation, a per-step log and a greedy sample at the end.
use crate::config::Config;
use crate::data::{load_tokenizer, TrainData};
use crate::engine::Engine;
use crate::model::segment_specs;
use crate::optim::{clip_scale, learning_rate, squared_norm, AdamW};
use crate::params::FlatParams;
use anyhow::{Context, Result};
use serde::Serialize;
use std::io::Write;
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use tracing::info;

/// One line of the run's `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepRecord {
    pub step: i64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub step_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

pub fn device_of(config: &Config) -> Result<Device> {
    Ok(match config.train.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => Device::Cuda(
            other["cuda:".len()..]
                .parse()
                .with_context(|| format!("train.device = {other:?}"))?,
        ),
    })
}

/// Builds the model with its initial weights (from `train.seed`) on the configured device.
pub fn build_engine(config: &Config) -> Result<Engine> {
    let device = device_of(config)?;
    if device.is_cuda() && !tch::Cuda::is_available() {
        anyhow::bail!(
            "train.device = {:?} but no CUDA device is visible; use train.device = \"cpu\"",
            config.train.device
        );
    }
    let mut params = FlatParams::new(segment_specs(&config.model), config.train.dtype.kind(), device);
    params.init(config.train.seed);
    Ok(Engine::new(params, &config.model, false))
}

/// Trains as configured and returns the per-step records.
pub fn train(config: &Config) -> Result<Vec<StepRecord>> {
    config.validate_layout(1)?;
    if config.train.threads > 0 {
        tch::set_num_threads(config.train.threads as i32);
    }
    let run_dir = &config.train.run_dir;
    std::fs::create_dir_all(run_dir).with_context(|| format!("cannot create run directory {}", run_dir.display()))?;
    std::fs::write(run_dir.join("config.toml"), config.to_toml())?;
    let mut log = std::fs::File::create(run_dir.join("metrics.jsonl"))?;

    let engine = build_engine(config)?;
    let mut data = TrainData::open(config, 0, 1, device_of(config)?)?;
    let mut optimizer = AdamW::new(&config.optim, engine.params.values(), engine.params.decay_ranges());
    let t = &config.train;
    let step_tokens = (t.global_batch * t.seq_len) as f64;
    info!(
        params = engine.params.numel(),
        threads = tch::get_num_threads(),
        accumulation = config.accumulation_steps(1),
        "training {} steps of {} tokens",
        t.steps,
        step_tokens
    );

    let mut records = Vec::with_capacity(t.steps as usize);
    for step in 0..t.steps {
        let start = Instant::now();
        let batch = data.next_batch(t.global_batch);
        let (loss, grad_norm) = train_step(&engine, &batch, t.micro_batch, step_tokens);
        let scale = clip_scale(grad_norm, config.optim.grad_clip);
        if scale < 1.0 {
            engine.params.scale_grads(scale);
        }
        let lr = learning_rate(&config.optim, step, t.steps);
        optimizer.step(&mut engine.params.values().shallow_clone(), engine.params.grads(), lr);
        let step_seconds = start.elapsed().as_secs_f64();

        let last = step + 1 == t.steps;
        let val_loss = (t.eval_every > 0 && ((step + 1) % t.eval_every == 0 || last))
            .then(|| validation_loss(&engine, &data, config));
        let record = StepRecord {
            step: step + 1,
            loss,
            lr,
            grad_norm,
            tokens_per_s: step_tokens / step_seconds,
            step_seconds,
            val_loss,
        };
        if (step + 1) % t.log_every == 0 || last || val_loss.is_some() {
            log_step(&record, t.steps);
        }
        writeln!(log, "{}", serde_json::to_string(&record)?)?;
        records.push(record);
    }
    log.flush()?;

    if t.sample_tokens > 0 {
        let path = data
            .tokenizer_path
            .as_ref()
            .context("the dataset names no tokenizer, so no sample can be decoded")?;
        let text = greedy_sample(&engine, &load_tokenizer(path)?, &t.sample_prompt, t.sample_tokens)?;
        info!("sample: {text}");
        println!("{text}");
    }
    Ok(records)
}

/// Forward and backward over the step's micro-batches; returns the step's mean loss and
/// the global gradient norm before clipping.
fn train_step(engine: &Engine, batch: &Tensor, micro_batch: i64, step_tokens: f64) -> (f64, f64) {
    engine.params.zero_grads();
    let loss = batch
        .split(micro_batch, 0)
        .iter()
        .map(|micro| engine.forward_backward(micro, step_tokens))
        .sum();
    (loss, squared_norm(engine.params.grads()).sqrt())
}

fn validation_loss(engine: &Engine, data: &TrainData, config: &Config) -> f64 {
    let t = &config.train;
    let batches = data.validation_batches(t.eval_sequences, t.micro_batch);
    let total: f64 = batches.iter().map(|b| engine.eval_loss_sum(b)).sum();
    total / (t.eval_sequences * t.seq_len) as f64
}

fn log_step(r: &StepRecord, steps: i64) {
    match r.val_loss {
        Some(val) => info!(
            "step {}/{steps} loss {:.4} val_loss {val:.4} lr {:.3e} grad_norm {:.3} tokens/s {:.0}",
            r.step, r.loss, r.lr, r.grad_norm, r.tokens_per_s
        ),
        None => info!(
            "step {}/{steps} loss {:.4} lr {:.3e} grad_norm {:.3} tokens/s {:.0}",
            r.step, r.loss, r.lr, r.grad_norm, r.tokens_per_s
        ),
    }
}

/// Continues `prompt` by `tokens` greedy steps (stops early at the end-of-text token).
pub fn greedy_sample(engine: &Engine, tokenizer: &tokenizers::Tokenizer, prompt: &str, tokens: i64) -> Result<String> {
    let encoding = tokenizer
        .encode(prompt, false)
        .map_err(|e| anyhow::anyhow!("cannot encode the sample prompt: {e}"))?;
    let mut ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i64::from(i)).collect();
    let prompt_len = ids.len();
    let max_seq = engine.model.config().max_seq_len as usize;
    let device = engine.params.values().device();
    let eos = tokenizer.token_to_id("<|endoftext|>").map(i64::from);
    for _ in 0..tokens {
        let context = &ids[ids.len().saturating_sub(max_seq)..];
        let input = Tensor::from_slice(context).view([1, -1]).to_device(device);
        let logits = engine.logits(&input);
        let next = logits
            .select(1, -1)
            .argmax(-1, false)
            .to_kind(Kind::Int64)
            .int64_value(&[0]);
        if Some(next) == eos {
            break;
        }
        ids.push(next);
    }
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let continuation = tokenizer
        .decode(&ids[prompt_len..], true)
        .map_err(|e| anyhow::anyhow!("cannot decode the sample: {e}"))?;
    Ok(format!("{prompt}{continuation}"))
}
