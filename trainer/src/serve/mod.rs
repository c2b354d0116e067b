//! `trainer serve`: an OpenAI-compatible HTTP server of a trained model with continuous batching, on one rank or tensor-parallel over every rank of the job (rank 0 serves HTTP and schedules).
mod api;
mod http;
mod metrics;
mod scheduler;

use crate::comm::Comm;
use crate::config::{invalid_config, Dtype, TrainDevice};
use crate::decode::{Decoder, Mode};
use crate::inference::load_model;
use anyhow::Result;
use launcher::protocol;
use metrics::ServeMetrics;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tracing::info;

/// The command line of `trainer serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// A checkpoint (step directory, or a directory of them: the newest) or a Hugging Face LLaMA directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The name clients give as `model` [default: --model as given].
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// The address to listen on (0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 requests.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Requests decoded together (the KV cache holds this many sequences).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch: u32,
    /// Requests that may wait for a place in the batch; more are refused with 429.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_waiting: u32,
    /// The most prompt and output tokens of one request [default: the model's max_seq_len].
    #[arg(long)]
    pub max_model_len: Option<i64>,
    /// The largest request body accepted (413 beyond).
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// `cpu`, `cuda` (each rank's node-local GPU) or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: TrainDevice,
    /// Compute dtype [default: the model's own].
    #[arg(long, value_parser = Dtype::parse)]
    pub dtype: Option<Dtype>,
    /// CPU threads of each rank (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
}

/// Runs `trainer serve` until it is killed: every rank of the job is one tensor-parallel rank.
pub fn run(args: &ServeArgs) -> Result<()> {
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let world = protocol::world_size().unwrap_or(1);
    let comm = Arc::new(Comm::init(world, Duration::from_secs(300))?);
    serve_on_ranks(args, &comm).map_err(|error| comm.end_job_on_error(error))
}

fn serve_on_ranks(args: &ServeArgs, comm: &Arc<Comm>) -> Result<()> {
    let leader = comm.topology.rank == 0;
    // Rank 0 listens before loading: /health answers 503 until the model is ready.
    let serving = match leader {
        true => {
            let listener = http::bind(&args.host, args.port)?;
            let metrics = Arc::new(ServeMetrics::new()?);
            let (queue, jobs) = std::sync::mpsc::sync_channel(args.max_waiting as usize);
            let shared = Arc::new(http::Shared {
                model: args.served_model_name.clone().unwrap_or_else(|| args.model.display().to_string()),
                api_key: args.api_key.clone(),
                body_limit: args.max_body_bytes,
                ready: OnceLock::new(),
                queue,
                metrics: metrics.clone(),
                next_id: AtomicU64::new(0),
            });
            http::start(listener, shared.clone())?;
            Some((shared, jobs, metrics))
        }
        false => None,
    };
    let device = args.device.of_local_rank(comm.topology.local_rank);
    if device.is_cuda() && !tch::Cuda::is_available() {
        return Err(invalid_config(format!("--device {}: no CUDA device is visible", args.device)));
    }
    let model = load_model(&args.model, comm.clone(), device, args.dtype)?;
    let Some(path) = &model.tokenizer else {
        return Err(invalid_config(format!("{}: serving needs the model's tokenizer.json", model.dir.display())));
    };
    let tokenizer = data_shards::load_tokenizer(path)?;
    let max_seq_len = model.config.model.max_seq_len;
    let capacity = args.max_model_len.unwrap_or(max_seq_len);
    if !(1..=max_seq_len).contains(&capacity) {
        return Err(invalid_config(format!(
            "--max-model-len {capacity} must be in 1..={max_seq_len} (the model's max_seq_len)"
        )));
    }
    let decoder = Decoder::new(&model.engine, Some(&tokenizer), args.max_batch as usize, capacity, Mode::KvCache)?;
    let Some((shared, jobs, metrics)) = serving else { return scheduler::follow(decoder, comm) };
    let ready = http::Ready {
        tokenizer: tokenizer.clone(),
        template: model.chat_template().ok(),
        limits: decoder.limits(),
        eos: model.default_stop_token_ids(Some(&tokenizer)),
    };
    info!(
        "serving {} (dtype {}, {} tensor-parallel ranks, batch {}, context {capacity}, chat template: {})",
        model.dir.display(),
        model.config.train.dtype.name(),
        comm.topology.tensor.size,
        args.max_batch,
        if ready.template.is_some() { "yes" } else { "no" }
    );
    let _ = shared.ready.set(ready);
    scheduler::lead(decoder, jobs, comm, &metrics)
}
