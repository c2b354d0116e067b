//! The `data-shards` command-line tool: train a tokenizer, prepare (text or fine-tuning data), inspect, verify and decode datasets, render chat templates.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

mod cli;

use data_shards::{
    load_tokenizer, prepare, prepare_sft, train_tokenizer, CorpusOptions, DtypeChoice, PrepareOptions, SftFormat,
    SftOptions, Split, TokenDataset, TrainOptions,
};

#[derive(Parser, Debug)]
#[command(name = "data-shards", version, about = "Tokenized training-data shards for the LLaMA trainer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct CorpusArgs {
    /// Input files or directories (directories are searched recursively, in sorted order).
    #[arg(long = "input", required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Skip files matching this glob (`*`, `?`; matched against the file name, or the whole
    /// path if the pattern contains `/`). Repeatable.
    #[arg(long)]
    exclude: Vec<String>,
    /// In text files, lines equal to this separate documents (default: one document per file).
    #[arg(long)]
    doc_separator: Option<String>,
    /// Field holding the text in .jsonl files [default: text].
    #[arg(long)]
    jsonl_field: Option<String>,
}

impl CorpusArgs {
    fn options(&self) -> CorpusOptions {
        CorpusOptions {
            inputs: self.input.clone(),
            exclude: self.exclude.clone(),
            doc_separator: self.doc_separator.clone(),
            jsonl_field: self.jsonl_field.clone().unwrap_or_else(|| "text".into()),
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum DtypeArg {
    Auto,
    U16,
    U32,
}

/// What the inputs of `prepare` hold.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum FormatArg {
    /// Text files and JSONL text fields: every token is trained (format version 1).
    Text,
    /// JSONL {"messages": [{"role", "content"}, ...]}: rendered with the model's chat template, assistant turns
    /// trained (format version 2).
    Chat,
    /// JSONL {"prompt": str, "completion": str}: the completion trained (format version 2).
    PromptCompletion,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum SplitArg {
    Train,
    Valid,
}

impl From<SplitArg> for Split {
    fn from(s: SplitArg) -> Split {
        match s {
            SplitArg::Train => Split::Train,
            SplitArg::Valid => Split::Valid,
        }
    }
}

/// A data-shards directory (with a split) or a Megatron-LM prefix.
#[derive(Args, Debug, Clone)]
struct Source {
    /// Dataset directory written by `prepare`.
    #[arg(required_unless_present = "megatron", conflicts_with = "megatron")]
    dir: Option<PathBuf>,
    /// Read a Megatron-LM indexed dataset (PREFIX.bin + PREFIX.idx) instead.
    #[arg(long, value_name = "PREFIX")]
    megatron: Option<PathBuf>,
}

impl Source {
    fn open(&self, split: Split) -> Result<TokenDataset> {
        Ok(match (&self.megatron, &self.dir) {
            (Some(prefix), _) => TokenDataset::open_megatron(prefix)?,
            (None, Some(dir)) => TokenDataset::open(dir, split)?,
            (None, None) => bail!("give a dataset directory or --megatron PREFIX"),
        })
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a byte-level BPE tokenizer (special token <|endoftext|> = id 0).
    TrainTokenizer {
        #[command(flatten)]
        corpus: CorpusArgs,
        #[arg(long)]
        vocab_size: usize,
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
    },
    /// Tokenize a corpus (or fine-tuning data, --format chat|prompt-completion) into train/valid shard files
    /// with a manifest.
    Prepare {
        #[command(flatten)]
        corpus: CorpusArgs,
        /// What the inputs hold: text (pretraining), chat or prompt-completion JSONL (fine-tuning, with a loss mask).
        #[arg(long, value_enum, default_value = "text")]
        format: FormatArg,
        /// Any Hugging Face tokenizer.json (required for --format text; default: MODEL_DIR/tokenizer.json).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// A Hugging Face model directory (--format chat, prompt-completion): tokenizer.json, the chat template
        /// (chat_template.jinja or tokenizer_config.json) and the end-of-turn token (eos_token).
        #[arg(long)]
        model_dir: Option<PathBuf>,
        /// Output directory (must not exist unless --force).
        #[arg(long)]
        output: PathBuf,
        /// Fraction of documents (chosen by content hash) for the validation split.
        #[arg(long, default_value_t = 0.005)]
        valid_fraction: f64,
        /// Start a new shard file once one holds this many tokens.
        #[arg(long, default_value_t = 1 << 28)]
        shard_tokens: u64,
        /// Token appended after every document [default: <|endoftext|>]; with --model-dir the end of an
        /// assistant turn or completion [default: its eos_token].
        #[arg(long)]
        eos_token: Option<String>,
        #[arg(long, value_enum, default_value = "auto")]
        dtype: DtypeArg,
        /// Replace an existing output directory, if it is a dataset written by `prepare` (a data-shards
        /// manifest.json and only the files prepare writes) that contains no input; nothing else is ever deleted.
        #[arg(long)]
        force: bool,
        /// Let the tokenizer's post-processor add its special tokens (e.g. BOS) per document (not with --format
        /// chat: the template writes them).
        #[arg(long)]
        add_special_tokens: bool,
    },
    /// Print statistics of a dataset.
    Inspect {
        #[command(flatten)]
        source: Source,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check every shard's checksum, header and document table against the manifest.
    Verify {
        #[command(flatten)]
        source: Source,
    },
    /// Decode a window of tokens back to text.
    Decode {
        #[command(flatten)]
        source: Source,
        #[arg(long, value_enum, default_value = "train")]
        split: SplitArg,
        /// First token (counted over the whole split).
        #[arg(long, default_value_t = 0)]
        offset: u64,
        #[arg(long, default_value_t = 256)]
        len: u64,
        /// Tokenizer to use (default: the one in the dataset directory).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Print the token ids too.
        #[arg(long)]
        ids: bool,
    },
    /// Render chat JSONL ({"messages": [...]} per line) with a model's chat template: one JSON string per line,
    /// what transformers' apply_chat_template(messages, tokenize=False) gives.
    RenderChat {
        /// A Hugging Face model directory (chat_template.jinja or tokenizer_config.json).
        #[arg(long)]
        model_dir: PathBuf,
        /// Chat JSONL file.
        #[arg(long)]
        input: PathBuf,
        /// End with the header of an assistant turn.
        #[arg(long)]
        add_generation_prompt: bool,
    },
    /// Print each document's token ids as one JSON array per line.
    DumpDocs {
        #[command(flatten)]
        source: Source,
        #[arg(long, value_enum, default_value = "train")]
        split: SplitArg,
        /// Print {"tokens": [...], "loss_mask": [...]} per document instead (all ones without a mask).
        #[arg(long)]
        mask: bool,
    },
    /// Measure RankLoader::next_batch throughput against a plain memcpy of the same bytes.
    BenchLoader {
        #[command(flatten)]
        source: Source,
        #[arg(long, value_enum, default_value = "train")]
        split: SplitArg,
        #[arg(long, default_value_t = 1024)]
        seq_len: usize,
        #[arg(long, default_value_t = 32)]
        global_batch: usize,
        /// Seconds to run each measurement for.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("error: {e}");
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(&format!("\n  caused by: {c}"));
                }
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::TrainTokenizer { corpus, vocab_size, output, min_frequency } => {
            let t = Instant::now();
            let report = train_tokenizer(&TrainOptions {
                corpus: corpus.options(),
                vocab_size,
                output: output.clone(),
                min_frequency,
                show_progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            })?;
            eprintln!(
                "trained {} tokens on {} documents ({} bytes) in {:.1}s -> {}",
                report.vocab_size,
                report.documents,
                report.bytes,
                t.elapsed().as_secs_f64(),
                output.display()
            );
        }
        Command::Prepare {
            corpus,
            format,
            tokenizer,
            model_dir,
            output,
            valid_fraction,
            shard_tokens,
            eos_token,
            dtype,
            force,
            add_special_tokens,
        } => {
            let dtype = match dtype {
                DtypeArg::Auto => DtypeChoice::Auto,
                DtypeArg::U16 => DtypeChoice::U16,
                DtypeArg::U32 => DtypeChoice::U32,
            };
            let sft_format = match format {
                FormatArg::Text => None,
                FormatArg::Chat => Some(SftFormat::Chat),
                FormatArg::PromptCompletion => Some(SftFormat::PromptCompletion),
            };
            let r = match sft_format {
                None => {
                    if model_dir.is_some() {
                        bail!("--model-dir is for --format chat and prompt-completion; give --tokenizer for text");
                    }
                    let tokenizer = tokenizer.context("--format text needs --tokenizer PATH")?;
                    let mut opts = PrepareOptions::new(corpus.options(), tokenizer, output.clone());
                    opts.valid_fraction = valid_fraction;
                    opts.shard_tokens = shard_tokens;
                    if let Some(eos) = eos_token {
                        opts.eos_token = eos;
                    }
                    opts.dtype = dtype;
                    opts.force = force;
                    opts.add_special_tokens = add_special_tokens;
                    opts.progress = true;
                    prepare(&opts)?
                }
                Some(sft_format) => {
                    if corpus.jsonl_field.is_some() {
                        bail!("--jsonl-field is for --format text; fine-tuning lines have fixed fields");
                    }
                    let mut opts = SftOptions::new(sft_format, corpus.options(), model_dir, output.clone());
                    opts.tokenizer = tokenizer;
                    opts.valid_fraction = valid_fraction;
                    opts.shard_tokens = shard_tokens;
                    opts.eos_token = eos_token;
                    opts.dtype = dtype;
                    opts.force = force;
                    opts.add_special_tokens = add_special_tokens;
                    opts.progress = true;
                    prepare_sft(&opts)?
                }
            };
            let secs = r.elapsed.as_secs_f64().max(1e-9);
            let train = r.manifest.split(Split::Train);
            let valid = r.manifest.split(Split::Valid);
            let tokens = train.num_tokens + valid.num_tokens;
            let trained = match (train.num_loss_tokens, valid.num_loss_tokens) {
                (Some(t), Some(v)) => format!(", {} tokens trained (loss mask)", t + v),
                _ => String::new(),
            };
            eprintln!(
                "prepared {} -> train {} tokens / {} docs / {} shards, valid {} tokens / {} docs / {} shards ({}{trained}), {:.1} MB in {:.2}s: {:.2} MB/s, {:.0} tokens/s",
                output.display(),
                train.num_tokens,
                train.num_documents,
                train.shards.len(),
                valid.num_tokens,
                valid.num_documents,
                valid.shards.len(),
                r.manifest.dtype,
                r.input_bytes as f64 / 1e6,
                secs,
                r.input_bytes as f64 / 1e6 / secs,
                tokens as f64 / secs
            );
        }
        Command::Inspect { source, json } => cli::inspect(&source, json)?,
        Command::RenderChat { model_dir, input, add_generation_prompt } => {
            cli::render_chat(&model_dir, &input, add_generation_prompt)?
        }
        Command::Verify { source } => {
            let splits: Vec<Split> = if source.megatron.is_some() { vec![Split::Train] } else { Split::ALL.to_vec() };
            for split in splits {
                let ds = source.open(split)?;
                ds.verify_checksums()?;
                println!(
                    "ok: {} ({} shards, {} tokens, {} documents)",
                    ds.label(),
                    ds.num_shards(),
                    ds.num_tokens(),
                    ds.num_documents()
                );
            }
        }
        Command::Decode { source, split, offset, len, tokenizer, ids } => {
            let ds = source.open(split.into())?;
            let tok_path = tokenizer
                .or_else(|| ds.tokenizer_path())
                .context("this dataset has no tokenizer; pass --tokenizer PATH")?;
            let tok = load_tokenizer(&tok_path)?;
            if offset >= ds.num_tokens() {
                bail!("--offset {offset} is past the end of the {} ({} tokens)", ds.label(), ds.num_tokens());
            }
            let len = len.min(ds.num_tokens() - offset);
            let window = ds.tokens(offset, len);
            if ids {
                println!("{window:?}");
            }
            let text =
                tok.decode(&window, false).map_err(|e| anyhow::anyhow!("decoding with {}: {e}", tok_path.display()))?;
            println!("{text}");
        }
        Command::DumpDocs { source, split, mask } => {
            let ds = source.open(split.into())?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            for i in 0..ds.num_documents() {
                if mask {
                    let doc = serde_json::json!({"tokens": ds.document(i)?, "loss_mask": ds.document_loss_mask(i)?});
                    serde_json::to_writer(&mut out, &doc)?;
                } else {
                    serde_json::to_writer(&mut out, &ds.document(i)?)?;
                }
                out.write_all(b"\n")?;
            }
            out.flush()?;
        }
        Command::BenchLoader { source, split, seq_len, global_batch, seconds } => {
            cli::bench_loader(&source, split.into(), seq_len, global_batch, seconds)?
        }
    }
    Ok(())
}
