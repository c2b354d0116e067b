//! `prepare`: tokenize a corpus in parallel into shard files + manifest, published atomically.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use crate::corpus::{discover, CorpusOptions};
use crate::doc_tokens::DocumentTokens;
use crate::error::DataError;
use crate::format::{Dtype, Manifest, Split, TOKENIZER_FILE};
use crate::output::{check_output, publish};
use crate::stream::{DocEnd, DocumentStream, Piece};
use crate::tokenize::{load_tokenizer, special_tokens_around, vocab_size};
use crate::writer::{DatasetWriter, ManifestMeta};
use tokenizers::Tokenizer;

/// Requested token storage type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DtypeChoice {
    /// u16 when the vocabulary fits, else u32.
    #[default]
    Auto,
    U16,
    U32,
}

/// Options of `prepare`.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    pub corpus: CorpusOptions,
    pub tokenizer: PathBuf,
    pub output: PathBuf,
    /// Fraction of documents (by content hash) that go to the validation split, in [0, 1).
    pub valid_fraction: f64,
    /// A shard file is closed once it holds at least this many tokens.
    pub shard_tokens: u64,
    pub eos_token: String,
    pub dtype: DtypeChoice,
    /// Replace an existing output directory, if it is a dataset that `prepare` wrote (see [`check_output`]).
    pub force: bool,
    /// Let the tokenizer add its special tokens (e.g. BOS) to each document.
    pub add_special_tokens: bool,
    /// Show a progress bar on stderr (only drawn when stderr is a terminal).
    pub progress: bool,
}

impl PrepareOptions {
    /// Defaults for everything but the paths.
    pub fn new(corpus: CorpusOptions, tokenizer: PathBuf, output: PathBuf) -> Self {
        PrepareOptions {
            corpus,
            tokenizer,
            output,
            valid_fraction: 0.005,
            shard_tokens: 1 << 28,
            eos_token: crate::tokenize::DEFAULT_EOS.into(),
            dtype: DtypeChoice::Auto,
            force: false,
            add_special_tokens: false,
            progress: false,
        }
    }
}

/// What `prepare` did.
#[derive(Clone, Debug)]
pub struct PrepareReport {
    pub manifest: Manifest,
    pub input_bytes: u64,
    pub elapsed: Duration,
}

/// Pieces of text per parallel batch: large enough to keep all cores busy, small enough to bound memory.
const BATCH_BYTES: usize = 8 << 20;
const BATCH_PIECES: usize = 16384;

/// True when a document with this content goes to the validation split.
pub fn is_valid_document(text: &str, valid_fraction: f64) -> bool {
    hash_in_valid_split(xxhash_rust::xxh3::xxh3_64(text.as_bytes()), valid_fraction)
}

/// True when a document whose text has this xxh3-64 goes to the validation split.
pub(crate) fn hash_in_valid_split(hash: u64, valid_fraction: f64) -> bool {
    hash < (valid_fraction * 18_446_744_073_709_551_616.0) as u64
}

/// Tokenizes the corpus into `opts.output`. Output is byte-identical for the same inputs and
/// tokenizer regardless of thread count: documents are read in order, in pieces of bounded size
/// (see [`crate::stream`]), tokenized in parallel in batches, and written in order. Memory does
/// not grow with a document's length: a long document's ids beyond 16 MiB wait in a temporary file.
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareReport, DataError> {
    let started = Instant::now();
    let (tokenizer, vocab, dtype) = load_checked(&opts.tokenizer, opts.dtype, opts.valid_fraction, opts.shard_tokens)?;
    let eos_id = eos_id_of(&tokenizer, &opts.tokenizer, &opts.eos_token)?;
    let files = discover(&opts.corpus)?;
    let inputs = opts.corpus.inputs.iter().chain(files.iter().map(|f| &f.path));
    let (tmp, parent) = staging_dir(&opts.output, opts.force, inputs.map(PathBuf::as_path))?;

    let mut stream = DocumentStream::new(files, opts.corpus.clone());
    let bar = progress_bar(opts.progress, stream.total_bytes());

    let (head, mut tail) = if opts.add_special_tokens {
        special_tokens_around(&tokenizer, &opts.tokenizer)?
    } else {
        (Vec::new(), Vec::new())
    };
    tail.push(eos_id);
    let mut writer = DatasetWriter::new(tmp.path(), dtype, opts.shard_tokens);
    let mut doc = DocumentTokens::new(tmp.path());
    let mut total_tokens = 0u64;
    let mut batch: Vec<Piece> = Vec::new();
    loop {
        batch.clear();
        let mut batch_bytes = 0usize;
        while batch_bytes < BATCH_BYTES && batch.len() < BATCH_PIECES {
            match stream.next_piece()? {
                Some(piece) => {
                    batch_bytes += piece.text.len();
                    batch.push(piece);
                }
                None => break,
            }
        }
        if batch.is_empty() {
            break;
        }
        let encoded: Vec<Result<Vec<u32>, String>> = batch
            .par_iter()
            .map(|piece| {
                let enc = tokenizer.encode_fast(piece.text.as_str(), false).map_err(|e| e.to_string())?;
                Ok(enc.get_ids().to_vec())
            })
            .collect();
        for (piece, ids) in batch.iter().zip(encoded) {
            let ids = ids.map_err(|message| DataError::Tokenizer {
                path: opts.tokenizer.clone(),
                message: format!("encoding failed: {message}"),
            })?;
            doc.push(&piece.text, &ids)?;
            match piece.end {
                DocEnd::Continues => {}
                DocEnd::Drop => doc.clear(),
                DocEnd::Keep => {
                    let valid = hash_in_valid_split(doc.text_hash(), opts.valid_fraction);
                    let split = if valid { Split::Valid } else { Split::Train };
                    total_tokens += doc.write_to(&mut writer, split, &head, &tail)?;
                }
            }
        }
        bar.set_position(stream.bytes_read);
        bar.set_message(format!("{total_tokens} tokens"));
    }
    bar.finish_and_clear();
    if total_tokens == 0 {
        return Err(DataError::EmptyInput {
            path: opts.corpus.inputs[0].clone(),
            what: "no documents in any input (all empty or whitespace)".into(),
        });
    }

    let meta = ManifestMeta {
        tokenizer: Some(TOKENIZER_FILE.into()),
        vocab_size: vocab,
        eos_token: Some(opts.eos_token.clone()),
        eos_id: Some(eos_id),
        valid_fraction: opts.valid_fraction,
    };
    let manifest = finish_dataset(tmp, &parent, &opts.output, writer, &opts.tokenizer, meta)?;
    Ok(PrepareReport { manifest, input_bytes: stream.bytes_read, elapsed: started.elapsed() })
}

/// Checks the options `prepare` and `prepare_sft` share and loads the tokenizer: (tokenizer, vocabulary size,
/// token type).
pub(crate) fn load_checked(
    tokenizer_path: &Path,
    dtype: DtypeChoice,
    valid_fraction: f64,
    shard_tokens: u64,
) -> Result<(Tokenizer, u32, Dtype), DataError> {
    if !(0.0..1.0).contains(&valid_fraction) {
        return Err(DataError::InvalidArgument(format!("--valid-fraction {valid_fraction} must be in [0, 1)")));
    }
    if shard_tokens == 0 {
        return Err(DataError::InvalidArgument("--shard-tokens must be at least 1".into()));
    }
    let tokenizer = load_tokenizer(tokenizer_path)?;
    let vocab = vocab_size(&tokenizer);
    let vocab_u32 = u32::try_from(vocab).map_err(|_| DataError::Tokenizer {
        path: tokenizer_path.to_path_buf(),
        message: format!("vocabulary of {vocab} tokens is too large"),
    })?;
    let dtype = match dtype {
        DtypeChoice::Auto => Dtype::for_vocab(vocab),
        DtypeChoice::U32 => Dtype::U32,
        DtypeChoice::U16 if vocab > 1 << 16 => {
            return Err(DataError::VocabTooLargeForU16 { path: tokenizer_path.to_path_buf(), vocab_size: vocab })
        }
        DtypeChoice::U16 => Dtype::U16,
    };
    Ok((tokenizer, vocab_u32, dtype))
}

/// The id of the end-of-document token, which must be in the vocabulary.
pub(crate) fn eos_id_of(tokenizer: &Tokenizer, path: &Path, eos_token: &str) -> Result<u32, DataError> {
    tokenizer.token_to_id(eos_token).ok_or_else(|| DataError::Tokenizer {
        path: path.to_path_buf(),
        message: format!(
            "EOS token {eos_token:?} is not in the vocabulary; pass the tokenizer's end-of-text token with --eos-token"
        ),
    })
}

/// Checks that the dataset may be written to `output` (see [`check_output`]) and creates the hidden sibling
/// directory it is written into (removed on error; a killed run leaves only this `.NAME.tmp-*` directory);
/// returns it and `output`'s parent.
pub(crate) fn staging_dir<'a>(
    output: &Path,
    force: bool,
    inputs: impl IntoIterator<Item = &'a Path>,
) -> Result<(tempfile::TempDir, PathBuf), DataError> {
    check_output(output, force, inputs)?;
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| DataError::io(&parent, e))?;
    let name = output
        .file_name()
        .ok_or_else(|| DataError::InvalidArgument(format!("--output {} must name a directory", output.display())))?
        .to_string_lossy()
        .into_owned();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(&parent)
        .map_err(|e| DataError::io(&parent, e))?;
    Ok((tmp, parent))
}

/// Copies the tokenizer into the staged dataset, writes its manifest and publishes it as `output`.
pub(crate) fn finish_dataset(
    tmp: tempfile::TempDir,
    parent: &Path,
    output: &Path,
    writer: DatasetWriter,
    tokenizer_path: &Path,
    meta: ManifestMeta,
) -> Result<Manifest, DataError> {
    let tok_dst = tmp.path().join(TOKENIZER_FILE);
    std::fs::copy(tokenizer_path, &tok_dst).map_err(|e| DataError::io(tokenizer_path, e))?;
    let manifest = writer.finish(meta)?;
    publish(tmp, output, parent)?;
    Ok(manifest)
}

/// A progress bar over `total` input bytes on stderr, drawn only if `show` and stderr is a terminal.
pub(crate) fn progress_bar(show: bool, total: u64) -> ProgressBar {
    if !(show && std::io::stderr().is_terminal()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta}) {msg}",
        )
        .expect("valid template"),
    );
    bar
}
