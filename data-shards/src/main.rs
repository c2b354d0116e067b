//! The `data-shards` command-line tool: train a tokenizer, prepare, inspect, verify and decode datasets.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use data_shards::{
    load_tokenizer, prepare, train_tokenizer, CorpusOptions, DataCursor, DtypeChoice, PrepareOptions, RankLoader,
    Split, TokenDataset, TrainOptions, WindowSampler,
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
    /// Field holding the text in .jsonl files.
    #[arg(long, default_value = "text")]
    jsonl_field: String,
}

impl CorpusArgs {
    fn options(&self) -> CorpusOptions {
        CorpusOptions {
            inputs: self.input.clone(),
            exclude: self.exclude.clone(),
            doc_separator: self.doc_separator.clone(),
            jsonl_field: self.jsonl_field.clone(),
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum DtypeArg {
    Auto,
    U16,
    U32,
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
    /// Tokenize a corpus into train/valid shard files with a manifest.
    Prepare {
        #[command(flatten)]
        corpus: CorpusArgs,
        /// Any Hugging Face tokenizer.json.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Output directory (must not exist unless --force).
        #[arg(long)]
        output: PathBuf,
        /// Fraction of documents (chosen by content hash) for the validation split.
        #[arg(long, default_value_t = 0.005)]
        valid_fraction: f64,
        /// Start a new shard file once one holds this many tokens.
        #[arg(long, default_value_t = 1 << 28)]
        shard_tokens: u64,
        /// Token appended after every document.
        #[arg(long, default_value = "<|endoftext|>")]
        eos_token: String,
        #[arg(long, value_enum, default_value = "auto")]
        dtype: DtypeArg,
        /// Replace an existing output directory, if it is a dataset written by `prepare` (a data-shards
        /// manifest.json and only the files prepare writes) that contains no input; nothing else is ever deleted.
        #[arg(long)]
        force: bool,
        /// Let the tokenizer's post-processor add its special tokens (e.g. BOS) per document.
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
    /// Print each document's token ids as one JSON array per line.
    DumpDocs {
        #[command(flatten)]
        source: Source,
        #[arg(long, value_enum, default_value = "train")]
        split: SplitArg,
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
            tokenizer,
            output,
            valid_fraction,
            shard_tokens,
            eos_token,
            dtype,
            force,
            add_special_tokens,
        } => {
            let mut opts = PrepareOptions::new(corpus.options(), tokenizer, output.clone());
            opts.valid_fraction = valid_fraction;
            opts.shard_tokens = shard_tokens;
            opts.eos_token = eos_token;
            opts.dtype = match dtype {
                DtypeArg::Auto => DtypeChoice::Auto,
                DtypeArg::U16 => DtypeChoice::U16,
                DtypeArg::U32 => DtypeChoice::U32,
            };
            opts.force = force;
            opts.add_special_tokens = add_special_tokens;
            opts.progress = true;
            let r = prepare(&opts)?;
            let secs = r.elapsed.as_secs_f64().max(1e-9);
            let train = r.manifest.split(Split::Train);
            let valid = r.manifest.split(Split::Valid);
            let tokens = train.num_tokens + valid.num_tokens;
            eprintln!(
                "prepared {} -> train {} tokens / {} docs / {} shards, valid {} tokens / {} docs / {} shards ({}), {:.1} MB in {:.2}s: {:.2} MB/s, {:.0} tokens/s",
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
        Command::Inspect { source, json } => inspect(&source, json)?,
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
        Command::DumpDocs { source, split } => {
            let ds = source.open(split.into())?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            for i in 0..ds.num_documents() {
                serde_json::to_writer(&mut out, &ds.document(i)?)?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
        }
        Command::BenchLoader { source, split, seq_len, global_batch, seconds } => {
            bench_loader(&source, split.into(), seq_len, global_batch, seconds)?
        }
    }
    Ok(())
}

fn inspect(source: &Source, json: bool) -> Result<()> {
    let splits: Vec<Split> = if source.megatron.is_some() { vec![Split::Train] } else { Split::ALL.to_vec() };
    let mut report = serde_json::Map::new();
    for split in splits {
        let ds = source.open(split)?;
        let name = if source.megatron.is_some() { "megatron" } else { split.name() };
        if json {
            report.insert(
                name.into(),
                serde_json::json!({
                    "num_tokens": ds.num_tokens(),
                    "num_documents": ds.num_documents(),
                    "num_shards": ds.num_shards(),
                    "dtype": ds.dtype().to_string(),
                    "vocab_size": ds.vocab_size(),
                    "eos_id": ds.eos_id(),
                    "tokenizer": ds.tokenizer_path().map(|p| p.display().to_string()),
                }),
            );
        } else {
            let mean = ds.num_tokens() as f64 / ds.num_documents().max(1) as f64;
            println!(
                "{name}: {} tokens, {} documents ({mean:.1} tokens/doc), {} shards, dtype {}, vocab {}, eos {}",
                ds.num_tokens(),
                ds.num_documents(),
                ds.num_shards(),
                ds.dtype(),
                opt(ds.vocab_size()),
                opt(ds.eos_id()),
            );
            for p in ds.shard_paths() {
                println!("  {}", display_name(&p));
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

fn opt(v: Option<u32>) -> String {
    v.map_or_else(|| "unknown".into(), |v| v.to_string())
}

fn display_name(p: &Path) -> String {
    p.display().to_string()
}

fn bench_loader(source: &Source, split: Split, seq_len: usize, global_batch: usize, seconds: f64) -> Result<()> {
    let ds = Arc::new(source.open(split)?);
    let sampler = WindowSampler::new(ds.clone(), seq_len, 1234)?;
    let check = WindowSampler::new(ds.clone(), seq_len, 1234)?;
    let mut loader = RankLoader::new(sampler, 0, 1, DataCursor::default());
    let mut out = vec![0i64; global_batch * (seq_len + 1)];
    let budget = std::time::Duration::from_secs_f64(seconds);

    // Loader: windows decoded to i64 through the permutation.
    let t = Instant::now();
    let mut batches = 0u64;
    let mut sink = 0i64;
    while t.elapsed() < budget {
        loader.next_batch_into(global_batch, &mut out);
        sink = sink.wrapping_add(out[batches as usize % out.len()]);
        batches += 1;
    }
    let loader_secs = t.elapsed().as_secs_f64();
    let loader_tokens = batches * (global_batch * (seq_len + 1)) as u64;

    // Baseline: memcpy of the same windows' raw bytes, same order.
    let mut raw = vec![0u8; global_batch * (seq_len + 1) * ds.dtype().width()];
    let row = (seq_len + 1) * ds.dtype().width();
    let t = Instant::now();
    let mut copied = 0u64;
    let mut gi = 0u64;
    while t.elapsed() < budget {
        for dst in raw.chunks_exact_mut(row) {
            let (shard, start) = check.window_location(check.window_id(gi));
            dst.copy_from_slice(ds.raw_shard_bytes(shard, start, (seq_len + 1) as u64));
            gi += 1;
        }
        sink = sink.wrapping_add(raw[copied as usize % raw.len()] as i64);
        copied += 1;
    }
    let memcpy_secs = t.elapsed().as_secs_f64();
    let memcpy_tokens = copied * (global_batch * (seq_len + 1)) as u64;

    let loader_tps = loader_tokens as f64 / loader_secs;
    let memcpy_tps = memcpy_tokens as f64 / memcpy_secs;
    println!(
        "loader: {:.3e} tokens/s ({} batches of {}x{} from {} tokens, {}); memcpy of the same {} bytes: {:.3e} tokens/s; loader/memcpy = {:.2} (checksum {sink})",
        loader_tps,
        batches,
        global_batch,
        seq_len + 1,
        ds.num_tokens(),
        ds.dtype(),
        ds.dtype(),
        memcpy_tps,
        loader_tps / memcpy_tps
    );
    Ok(())
}
