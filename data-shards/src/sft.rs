//! `prepare --format chat|prompt-completion`: supervised fine-tuning JSONL into loss-masked shards (format version 2), published like `prepare`'s.

mod encode;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

use crate::chat_template::{model_special_tokens, ChatTemplate};
use crate::corpus::{discover, CorpusOptions, InputFile};
use crate::error::DataError;
use crate::format::{Split, TOKENIZER_FILE};
use crate::prepare::{
    eos_id_of, finish_dataset, hash_in_valid_split, load_checked, progress_bar, staging_dir, DtypeChoice, PrepareReport,
};
use crate::tokenize::{special_tokens_around, DEFAULT_EOS};
use crate::writer::{DatasetWriter, ManifestMeta};

pub use encode::{parse_chat_line, parse_prompt_completion_line, MaskedExample, SftEncoder, ROLES};

/// What the lines of a fine-tuning input hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SftFormat {
    /// `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`: rendered with the model's
    /// chat template; the assistant turns are trained.
    Chat,
    /// `{"prompt": str, "completion": str}`: the completion (and the end-of-turn token after it) is trained.
    PromptCompletion,
}

/// Options of [`prepare_sft`].
#[derive(Clone, Debug)]
pub struct SftOptions {
    pub format: SftFormat,
    /// Input files or directories and `--exclude` globs; every file is read as JSONL, one example per line.
    /// `doc_separator` must be unset and `jsonl_field` is not used.
    pub corpus: CorpusOptions,
    /// A Hugging Face model directory: its `tokenizer.json`, chat template and `eos_token`
    /// (`tokenizer_config.json`). Required for [`SftFormat::Chat`].
    pub model_dir: Option<PathBuf>,
    /// The tokenizer; default `model_dir/tokenizer.json`.
    pub tokenizer: Option<PathBuf>,
    pub output: PathBuf,
    /// Fraction of examples (by the hash of their text) for the validation split, in [0, 1).
    pub valid_fraction: f64,
    /// A shard file is closed once it holds at least this many tokens.
    pub shard_tokens: u64,
    /// The end of an assistant turn / of a completion; default the model directory's `eos_token`, else
    /// `<|endoftext|>` (prompt/completion without a model directory).
    pub eos_token: Option<String>,
    pub dtype: DtypeChoice,
    /// Replace an existing output directory, if it is a dataset that `prepare` wrote.
    pub force: bool,
    /// Prompt/completion only: the tokenizer post-processor's special tokens (e.g. BOS) around each example.
    pub add_special_tokens: bool,
    /// Show a progress bar on stderr (only drawn when stderr is a terminal).
    pub progress: bool,
}

impl SftOptions {
    /// Defaults for everything but the format, inputs, model directory and output.
    pub fn new(format: SftFormat, corpus: CorpusOptions, model_dir: Option<PathBuf>, output: PathBuf) -> Self {
        SftOptions {
            format,
            corpus,
            model_dir,
            tokenizer: None,
            output,
            valid_fraction: 0.005,
            shard_tokens: 1 << 28,
            eos_token: None,
            dtype: DtypeChoice::Auto,
            force: false,
            add_special_tokens: false,
            progress: false,
        }
    }
}

/// Lines per parallel batch, and bytes: enough to keep every core busy, little enough to bound memory.
const BATCH_LINES: usize = 4096;
const BATCH_BYTES: usize = 8 << 20;

/// Renders, tokenizes and masks every example of the inputs into a dataset of format version 2 at
/// `opts.output` (atomically, as [`crate::prepare()`] does). An example is one document; documents are
/// written in input order, each to the split its text's hash picks. Output is byte-identical for the same
/// inputs and options whatever the number of threads. The first bad line is an error naming its file and line.
pub fn prepare_sft(opts: &SftOptions) -> Result<PrepareReport, DataError> {
    let started = Instant::now();
    if opts.corpus.doc_separator.is_some() {
        return Err(DataError::InvalidArgument(
            "--doc-separator is for --format text; fine-tuning inputs are JSONL, one example per line".into(),
        ));
    }
    if opts.format == SftFormat::Chat && opts.add_special_tokens {
        return Err(DataError::InvalidArgument(
            "--add-special-tokens does not go with --format chat: the chat template writes the special tokens".into(),
        ));
    }
    let template = match (&opts.model_dir, opts.format) {
        (Some(dir), SftFormat::Chat) => Some(ChatTemplate::from_model_dir(dir)?),
        (None, SftFormat::Chat) => {
            return Err(DataError::InvalidArgument(
                "--format chat needs --model-dir DIR: a Hugging Face model directory with the chat template".into(),
            ))
        }
        (_, SftFormat::PromptCompletion) => None,
    };
    let tokenizer_path = match (&opts.tokenizer, &opts.model_dir) {
        (Some(path), _) => path.clone(),
        (None, Some(dir)) => dir.join(TOKENIZER_FILE),
        (None, None) => {
            return Err(DataError::InvalidArgument("give --tokenizer PATH or --model-dir DIR".into()));
        }
    };
    let (tokenizer, vocab, dtype) = load_checked(&tokenizer_path, opts.dtype, opts.valid_fraction, opts.shard_tokens)?;
    let eos_token = match (&opts.eos_token, &opts.model_dir) {
        (Some(eos), _) => eos.clone(),
        (None, Some(dir)) => model_eos_token(dir)?,
        (None, None) => DEFAULT_EOS.to_string(),
    };
    let eos_id = eos_id_of(&tokenizer, &tokenizer_path, &eos_token)?;
    let (head, tail) = if opts.add_special_tokens {
        special_tokens_around(&tokenizer, &tokenizer_path)?
    } else {
        (Vec::new(), Vec::new())
    };
    let encoder = SftEncoder::new(tokenizer, template, eos_token.clone(), eos_id, head, tail);

    let files = discover(&opts.corpus)?;
    let inputs = opts.corpus.inputs.iter().chain(files.iter().map(|f| &f.path));
    let (tmp, parent) = staging_dir(&opts.output, opts.force, inputs.map(PathBuf::as_path))?;
    let bar = progress_bar(opts.progress, files.iter().map(|f| f.len).sum());
    let mut writer = DatasetWriter::new_masked(tmp.path(), dtype, opts.shard_tokens);
    let (mut examples, mut bytes_read) = (0u64, 0u64);
    let mut batch: Vec<Line> = Vec::new();
    for file in &files {
        let before = examples;
        let mut lines = Lines::open(file)?;
        loop {
            batch.clear();
            let mut batch_bytes = 0;
            while batch.len() < BATCH_LINES && batch_bytes < BATCH_BYTES {
                match lines.next_line()? {
                    Some(line) => {
                        batch_bytes += line.text.len();
                        batch.push(line);
                    }
                    None => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            let encoded: Vec<Result<MaskedExample, String>> =
                batch.par_iter().map(|line| encode_line(&encoder, opts.format, &line.text)).collect();
            for (line, example) in batch.iter().zip(encoded) {
                let example = example.map_err(|message| DataError::Example {
                    path: file.path.clone(),
                    line: line.number,
                    message,
                })?;
                let valid =
                    hash_in_valid_split(xxhash_rust::xxh3::xxh3_64(example.text.as_bytes()), opts.valid_fraction);
                let split = if valid { Split::Valid } else { Split::Train };
                writer.push_masked_tokens(split, &example.tokens, &example.loss_mask)?;
                writer.end_document(split)?;
                examples += 1;
            }
            bar.set_position(bytes_read + lines.offset);
            bar.set_message(format!("{examples} examples"));
        }
        bytes_read += lines.offset;
        if file.explicit && examples == before {
            return Err(DataError::EmptyInput {
                path: file.path.clone(),
                what: if file.len == 0 { "file is empty".into() } else { "file holds only blank lines".into() },
            });
        }
    }
    bar.finish_and_clear();
    if examples == 0 {
        return Err(DataError::EmptyInput {
            path: opts.corpus.inputs[0].clone(),
            what: "no examples in any input (only blank lines)".into(),
        });
    }
    let meta = ManifestMeta {
        tokenizer: Some(TOKENIZER_FILE.into()),
        vocab_size: vocab,
        eos_token: Some(eos_token),
        eos_id: Some(eos_id),
        valid_fraction: opts.valid_fraction,
    };
    let manifest = finish_dataset(tmp, &parent, &opts.output, writer, &tokenizer_path, meta)?;
    Ok(PrepareReport { manifest, input_bytes: bytes_read, elapsed: started.elapsed() })
}

/// The end-of-turn token of a model directory: the `eos_token` of its `tokenizer_config.json`.
fn model_eos_token(dir: &Path) -> Result<String, DataError> {
    model_special_tokens(dir)?.remove("eos_token").ok_or_else(|| DataError::Tokenizer {
        path: dir.join("tokenizer_config.json"),
        message: "names no eos_token (or there is no such file); pass the end-of-turn token with --eos-token".into(),
    })
}

/// One example: parsed, rendered, tokenized and masked.
fn encode_line(encoder: &SftEncoder, format: SftFormat, text: &str) -> Result<MaskedExample, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON ({e})"))?;
    match format {
        SftFormat::Chat => encoder.encode_chat(&parse_chat_line(value)?),
        SftFormat::PromptCompletion => {
            let (prompt, completion) = parse_prompt_completion_line(value)?;
            encoder.encode_prompt_completion(&prompt, &completion)
        }
    }
}

/// A non-blank line of a JSONL file.
struct Line {
    /// 1-based.
    number: u64,
    text: String,
}

/// The non-blank lines of a JSONL file, checked to be UTF-8.
struct Lines<'a> {
    file: &'a InputFile,
    input: BufReader<File>,
    buf: Vec<u8>,
    number: u64,
    /// Bytes read so far.
    offset: u64,
}

impl<'a> Lines<'a> {
    fn open(file: &'a InputFile) -> Result<Self, DataError> {
        let input = File::open(&file.path).map_err(|e| DataError::io(&file.path, e))?;
        Ok(Lines { file, input: BufReader::with_capacity(1 << 20, input), buf: Vec::new(), number: 0, offset: 0 })
    }

    fn next_line(&mut self) -> Result<Option<Line>, DataError> {
        loop {
            self.buf.clear();
            let n = self.input.read_until(b'\n', &mut self.buf).map_err(|e| DataError::io(&self.file.path, e))?;
            if n == 0 {
                return Ok(None);
            }
            self.number += 1;
            let text = std::str::from_utf8(&self.buf).map_err(|e| DataError::NotUtf8 {
                path: self.file.path.clone(),
                offset: self.offset + e.valid_up_to() as u64,
                line: self.number,
            })?;
            self.offset += n as u64;
            if !text.trim().is_empty() {
                return Ok(Some(Line { number: self.number, text: text.to_owned() }));
            }
        }
    }
}
