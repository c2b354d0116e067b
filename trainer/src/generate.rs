//! `trainer generate`: continue prompts with a trained model (a checkpoint or a Hugging Face directory), on one rank or tensor-parallel over every rank of the job; rank 0 prints.
use crate::comm::{Comm, GroupKind};
use crate::config::{invalid_config, Dtype, TrainDevice};
use crate::decode::{generate, Completion, Mode, Request};
use crate::inference::{encode, load_model, LoadedModel};
use crate::sampling::SamplingParams;
use anyhow::{Context, Result};
use data_shards::{ChatTemplate, Message};
use launcher::protocol;
use serde::Deserialize;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokenizers::Tokenizer;
use tracing::info;

/// The command line of `trainer generate`.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// A checkpoint (step directory, or a directory of them: the newest) or a Hugging Face LLaMA directory.
    #[arg(long)]
    pub model: PathBuf,
    /// A prompt (repeatable).
    #[arg(long = "prompt", value_name = "TEXT")]
    pub prompts: Vec<String>,
    /// Prompts, one JSON object per line: {"prompt": "text"} or {"prompt_token_ids": [ids]}.
    #[arg(long, value_name = "FILE.jsonl")]
    pub prompts_file: Option<PathBuf>,
    /// The most tokens to generate per prompt.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: i64,
    /// 0 is greedy (the most likely token every time).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Draw among the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub top_k: i64,
    /// Draw among the fewest most likely tokens holding this much probability (1: all).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f64,
    /// Drop tokens less likely than this times the most likely one (0: none).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub min_p: f64,
    /// Above 1, discourage tokens already in the prompt or the output (1: off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f64,
    /// Seed of every prompt's generator: the same seed and prompt give the same tokens [default: random].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the output contains this text, which is left out (repeatable).
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Stop at this token id (repeatable) [default: the model's end-of-sequence token].
    #[arg(long = "stop-token-id", value_name = "ID")]
    pub stop_token_ids: Vec<i64>,
    /// Do not stop at the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// `cpu`, `cuda` (each rank's node-local GPU) or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: TrainDevice,
    /// Compute dtype [default: the model's own].
    #[arg(long, value_parser = Dtype::parse)]
    pub dtype: Option<Dtype>,
    /// Prompts generated at once (continuous batching: a finished one's place goes to the next).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// CPU threads of each rank (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Print one JSON object per prompt (with token ids) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Chat: each `--prompt` is a user message, and each line of `--prompts-file` may hold
    /// `{"messages": [{"role", "content"}, ...]}`; they are rendered with the model's chat
    /// template (its `chat_template.jinja` or `tokenizer_config.json`), the assistant's turn
    /// opened.
    #[arg(long)]
    pub chat: bool,
    /// Recompute the whole sequence at every step instead of using the KV cache (the reference
    /// the cache is checked against; slow).
    #[arg(long)]
    pub no_kv_cache: bool,
}

/// One prompt: text (tokenized with the model's tokenizer), token ids, or (with `--chat`) chat
/// messages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Prompt {
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    prompt_token_ids: Option<Vec<i64>>,
    #[serde(default)]
    messages: Option<Vec<Message>>,
}

impl GenerateArgs {
    /// The sampling parameters of every prompt, before the model's stop tokens are known.
    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop_token_ids: self.stop_token_ids.clone(),
            stop: self.stop.clone(),
        }
    }

    fn prompts(&self) -> Result<Vec<Prompt>> {
        let mut prompts: Vec<Prompt> = self
            .prompts
            .iter()
            .map(|p| match self.chat {
                true => Prompt { prompt: None, prompt_token_ids: None, messages: Some(vec![Message::new("user", p)]) },
                false => Prompt { prompt: Some(p.clone()), prompt_token_ids: None, messages: None },
            })
            .collect();
        if let Some(path) = &self.prompts_file {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            for (number, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let prompt: Prompt = serde_json::from_str(line).map_err(|e| {
                    invalid_config(format!(
                        "{} line {}: {e} (expected {{\"prompt\": TEXT}})",
                        path.display(),
                        number + 1
                    ))
                })?;
                let given = [prompt.prompt.is_some(), prompt.prompt_token_ids.is_some(), prompt.messages.is_some()];
                if given.iter().filter(|&&g| g).count() != 1 || (prompt.messages.is_some() && !self.chat) {
                    return Err(invalid_config(format!(
                        "{} line {}: give one of \"prompt\", \"prompt_token_ids\" or (with --chat) \"messages\"",
                        path.display(),
                        number + 1
                    )));
                }
                prompts.push(prompt);
            }
        }
        if prompts.is_empty() {
            return Err(invalid_config("no prompt: give --prompt TEXT or --prompts-file FILE.jsonl"));
        }
        Ok(prompts)
    }
}

/// Runs `trainer generate`: every rank of the job is one tensor-parallel rank of the model.
pub fn run(args: &GenerateArgs) -> Result<()> {
    args.sampling().validate()?;
    let prompts = args.prompts()?;
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let world = protocol::world_size().unwrap_or(1);
    let comm = Arc::new(Comm::init(world, Duration::from_secs(300))?);
    generate_on_ranks(args, prompts, &comm).map_err(|error| comm.end_job_on_error(error))
}

fn generate_on_ranks(args: &GenerateArgs, prompts: Vec<Prompt>, comm: &Arc<Comm>) -> Result<()> {
    let device = args.device.of_local_rank(comm.topology.local_rank);
    if device.is_cuda() && !tch::Cuda::is_available() {
        return Err(invalid_config(format!("--device {}: no CUDA device is visible", args.device)));
    }
    let model = load_model(&args.model, comm.clone(), device, args.dtype)?;
    let tokenizer = model.tokenizer.as_ref().map(|path| data_shards::load_tokenizer(path)).transpose()?;
    let leader = comm.topology.rank == 0;
    let mut sampling = args.sampling();
    if args.stop_token_ids.is_empty() && !args.ignore_eos {
        sampling.stop_token_ids = model.default_stop_token_ids(tokenizer.as_ref());
    }
    let template =
        args.chat.then(|| model.chat_template().map_err(|e| invalid_config(format!("--chat: {e}")))).transpose()?;
    let LoadedModel { engine, config, dir, .. } = model;
    let requests = prompts
        .iter()
        .map(|p| {
            Ok(Request { prompt: prompt_ids(p, tokenizer.as_ref(), template.as_ref())?, params: sampling.clone() })
        })
        .collect::<Result<Vec<_>>>()?;
    if leader {
        info!(
            "generating for {} prompts with {} (dtype {}, {} tensor-parallel ranks, threads {})",
            requests.len(),
            dir.display(),
            config.train.dtype.name(),
            comm.topology.tensor.size,
            tch::get_num_threads()
        );
    }
    let mode = if args.no_kv_cache { Mode::Recompute } else { Mode::KvCache };
    let (completions, stats) = generate(&engine, tokenizer.as_ref(), requests.clone(), args.batch, mode)?;
    if leader {
        for (prompt, (request, completion)) in prompts.iter().zip(requests.iter().zip(&completions)) {
            print_completion(prompt, &request.prompt, completion, args.json);
        }
        info!(
            "prefill {} tokens in {:.3}s ({:.0} tokens/s); decode {} tokens in {} steps, {:.3}s ({:.1} tokens/s)",
            stats.prefill_tokens,
            stats.prefill_seconds,
            stats.prefill_tokens as f64 / stats.prefill_seconds.max(1e-9),
            stats.decode_tokens,
            stats.decode_steps,
            stats.decode_seconds,
            stats.decode_tokens as f64 / stats.decode_seconds.max(1e-9)
        );
    }
    crate::comm::wait_all([comm.barrier(GroupKind::World)])
}

/// A prompt's token ids: given, or text encoded as transformers does (with the tokenizer's
/// special tokens), or chat messages rendered by the template (which writes the special tokens).
fn prompt_ids(prompt: &Prompt, tokenizer: Option<&Tokenizer>, template: Option<&ChatTemplate>) -> Result<Vec<i64>> {
    if let Some(ids) = &prompt.prompt_token_ids {
        return Ok(ids.clone());
    }
    let tokenizer = tokenizer.ok_or_else(|| {
        invalid_config(
            "the model has no tokenizer.json: give prompts as {\"prompt_token_ids\": [...]} in --prompts-file",
        )
    })?;
    match (&prompt.messages, template) {
        (Some(messages), Some(template)) => encode(tokenizer, &template.render(messages, true)?, false),
        _ => encode(tokenizer, prompt.prompt.as_deref().unwrap_or_default(), true),
    }
}

fn print_completion(prompt: &Prompt, ids: &[i64], completion: &Completion, as_json: bool) {
    if as_json {
        let line = json!({
            "prompt": prompt.prompt,
            "messages": prompt.messages,
            "prompt_token_ids": ids,
            "text": completion.text,
            "token_ids": completion.token_ids,
            "finish_reason": completion.finish_reason,
            "stop_reason": completion.stop_reason,
        });
        println!("{line}");
        return;
    }
    match (&prompt.prompt, &completion.text) {
        (Some(prompt), Some(text)) => println!("{prompt}{text}"),
        (_, Some(text)) => println!("{text}"),
        _ => println!("{:?}", completion.token_ids),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::InvalidConfig;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GenerateArgs,
    }

    #[test]
    fn arguments_parse_and_bad_values_are_named() {
        let cli = Cli::try_parse_from(["g", "--model", "m", "--prompt", "a", "--prompt", "b", "--temperature", "-1"]);
        let args = cli.unwrap().args;
        assert_eq!(args.prompts, ["a", "b"]);
        let error = args.sampling().validate().unwrap_err();
        assert!(InvalidConfig::is_cause_of(&error) && error.to_string().contains("temperature = -1"), "{error}");
        let cli = Cli::try_parse_from(["g", "--model", "m", "--dtype", "bfloat16"]).unwrap();
        assert_eq!(cli.args.dtype, Some(Dtype::Bfloat16));
        assert!(Cli::try_parse_from(["g", "--model", "m", "--dtype", "half"]).is_err());
        assert!(cli.args.prompts().unwrap_err().to_string().contains("no prompt"));
    }
}
