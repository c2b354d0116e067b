//! `trainer eval`: judge a trained model (a checkpoint or a Hugging Face directory) on held-out text, a token dataset or multiple-choice tasks, on one rank or any layout of the job's ranks; rank 0 prints one JSON line per source.
use crate::comm::Comm;
use crate::config::{invalid_config, Dtype, TrainDevice};
use crate::inference::{load_model, LoadedModel};
use crate::scoring::{choice_report, loss_report, read_choice_items, read_texts, text_documents, Document};
use anyhow::{Context, Result};
use data_shards::{Split, TokenDataset};
use launcher::protocol;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokenizers::Tokenizer;

/// The command line of `trainer eval`.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// A checkpoint (step directory, or a directory of them: the newest) or a Hugging Face LLaMA directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Text to score: a UTF-8 file is one document; in a `.jsonl` file each line's "text" is one (repeatable).
    #[arg(long = "text", value_name = "FILE")]
    pub texts: Vec<PathBuf>,
    /// A token dataset (`data-shards prepare`) to score, document by document.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// The dataset's split.
    #[arg(long, default_value = "valid", value_parser = ["valid", "train"])]
    pub split: String,
    /// Score at most this many of the dataset's documents (the first ones).
    #[arg(long, default_value_t = 1000)]
    pub max_documents: u64,
    /// A multiple-choice task: JSONL of {"context", "choices", "answer"} (repeatable).
    #[arg(long = "choices", value_name = "FILE.jsonl")]
    pub choices: Vec<PathBuf>,
    /// Tokens predicted per window [default: the model's context less one token, at most 2048].
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// The token a document follows (the context of its first token), as in the training data.
    #[arg(long, default_value = data_shards::tokenize::DEFAULT_EOS)]
    pub prefix_token: String,
    /// Tensor-parallel ranks (the job's other ranks split the sequences as data parallelism).
    #[arg(long, default_value_t = 1)]
    pub tensor: usize,
    /// `cpu`, `cuda` (each rank's node-local GPU) or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: TrainDevice,
    /// Compute dtype [default: the model's own].
    #[arg(long, value_parser = Dtype::parse)]
    pub dtype: Option<Dtype>,
    /// CPU threads of each rank (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Also write the results (a JSON list, one object per source; a multiple-choice task's with
    /// every item's per-choice log-likelihoods) to this file, replaced by rename when every
    /// evaluation is done.
    #[arg(long, value_name = "FILE.json")]
    pub output: Option<PathBuf>,
}

/// Runs `trainer eval` on every rank of the job.
pub fn run(args: &EvalArgs) -> Result<()> {
    if args.texts.is_empty() && args.data.is_none() && args.choices.is_empty() {
        return Err(invalid_config("nothing to evaluate: give --text FILE, --data DIR or --choices FILE.jsonl"));
    }
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let world = protocol::world_size().unwrap_or(1);
    if args.tensor == 0 || world % args.tensor != 0 {
        return Err(invalid_config(format!("--tensor {} must divide the {world} ranks of the job", args.tensor)));
    }
    let comm = Arc::new(Comm::init(args.tensor, Duration::from_secs(300))?);
    eval_on_ranks(args, &comm).map_err(|error| comm.end_job_on_error(error))
}

fn eval_on_ranks(args: &EvalArgs, comm: &Arc<Comm>) -> Result<()> {
    let device = args.device.of_local_rank(comm.topology.local_rank);
    if device.is_cuda() && !tch::Cuda::is_available() {
        return Err(invalid_config(format!("--device {}: no CUDA device is visible", args.device)));
    }
    let LoadedModel { engine, config, tokenizer, .. } = load_model(&args.model, comm.clone(), device, args.dtype)?;
    let tokenizer_path = tokenizer.context(invalid_config("(model): it has no tokenizer.json to encode text with"))?;
    let tokenizer = data_shards::load_tokenizer(&tokenizer_path)?;
    let prefix = tokenizer.token_to_id(&args.prefix_token).map(i64::from).ok_or_else(|| {
        invalid_config(format!("--prefix-token {:?} is not a token of {}", args.prefix_token, tokenizer_path.display()))
    })?;
    // A window of seq_len predicted tokens takes seq_len + 1 positions.
    let seq_len = args.seq_len.unwrap_or((config.model.max_seq_len - 1).min(2048) as usize);
    if seq_len == 0 || seq_len as i64 >= config.model.max_seq_len {
        return Err(invalid_config(format!(
            "--seq-len {seq_len} must be 1 to {} (the model's context less one token)",
            config.model.max_seq_len - 1
        )));
    }
    let leader = comm.topology.rank == 0;
    let mut results = Vec::new();
    let mut print = |source: &Path, kind: &str, report: serde_json::Value| {
        let mut line = json!({"source": source, "kind": kind});
        line.as_object_mut().expect("an object").extend(report.as_object().cloned().unwrap_or_default());
        if leader {
            // The per-item scores go to --output only: one line per source stays readable.
            let mut shown = line.clone();
            shown.as_object_mut().expect("an object").remove("per_item");
            println!("{shown}");
        }
        results.push(line);
    };
    for path in &args.texts {
        let documents = text_documents(&read_texts(path)?, &tokenizer, prefix)?;
        print(path, "text", serde_json::to_value(loss_report(&engine, &documents, seq_len)?)?);
    }
    if let Some(dir) = &args.data {
        let split = if args.split == "train" { Split::Train } else { Split::Valid };
        let documents = dataset_documents(dir, split, args.max_documents, &tokenizer, prefix)?;
        print(dir, "tokens", serde_json::to_value(loss_report(&engine, &documents, seq_len)?)?);
    }
    for path in &args.choices {
        let items = read_choice_items(path).map_err(|e| invalid_config(format!("--choices: {e:#}")))?;
        print(path, "choices", serde_json::to_value(choice_report(&engine, &items, &tokenizer, prefix, seq_len)?)?);
    }
    match &args.output {
        Some(path) if leader => write_results(path, &results),
        _ => Ok(()),
    }
}

/// Writes the results as a JSON list, published by rename (a reader never sees half of it).
fn write_results(path: &Path, results: &[serde_json::Value]) -> Result<()> {
    let partial = path.with_extension("json.partial");
    std::fs::write(&partial, serde_json::to_string_pretty(results)?)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("cannot write {}", path.display()))
}

/// The first `limit` documents of a token dataset's split, each after `prefix`, with the bytes
/// of their decoded text.
fn dataset_documents(
    dir: &Path,
    split: Split,
    limit: u64,
    tokenizer: &Tokenizer,
    prefix: i64,
) -> Result<Vec<Document>> {
    let dataset = TokenDataset::open(dir, split)?;
    (0..dataset.num_documents().min(limit))
        .map(|i| {
            let ids = dataset.document(i)?;
            let text = tokenizer.decode(&ids, true).map_err(|e| anyhow::anyhow!("cannot decode: {e}"))?;
            let ids = std::iter::once(prefix).chain(ids.iter().map(|&id| i64::from(id))).collect();
            Ok(Document { ids, bytes: text.len() as u64 })
        })
        .collect()
}
