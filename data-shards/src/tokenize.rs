//! Tokenizer loading (any `tokenizer.json`) and byte-level BPE training.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Encoding, Token, Tokenizer, TokenizerBuilder};

use crate::corpus::{discover, CorpusOptions};
use crate::error::DataError;
use crate::stream::DocumentStream;

/// Default end-of-document token.
pub const DEFAULT_EOS: &str = "<|endoftext|>";

/// Loads a `tokenizer.json` with truncation and padding switched off (documents are
/// tokenized whole).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, DataError> {
    if !path.exists() {
        return Err(DataError::Tokenizer {
            path: path.to_path_buf(),
            message: "file not found; pass --tokenizer PATH or create one with `data-shards train-tokenizer`".into(),
        });
    }
    let mut tok = Tokenizer::from_file(path).map_err(|e| DataError::Tokenizer {
        path: path.to_path_buf(),
        message: format!("cannot load ({e}); is it a Hugging Face tokenizer.json?"),
    })?;
    tok.with_truncation(None).map_err(|e| DataError::Tokenizer {
        path: path.to_path_buf(),
        message: format!("cannot disable truncation ({e})"),
    })?;
    tok.with_padding(None);
    Ok(tok)
}

/// The ids that the tokenizer's post-processor puts before and after a sequence (e.g. BOS) when it adds special
/// tokens, found by post-processing one placeholder token. `prepare` encodes a document in pieces and adds these
/// once around the whole.
pub fn special_tokens_around(tok: &Tokenizer, path: &Path) -> Result<(Vec<u32>, Vec<u32>), DataError> {
    let placeholder = u32::MAX;
    let probe = Encoding::from_tokens(vec![Token::new(placeholder, String::new(), (0, 0))], 0);
    let processed = tok.post_process(probe, None, true).map_err(|e| DataError::Tokenizer {
        path: path.to_path_buf(),
        message: format!("its post-processor failed ({e})"),
    })?;
    let ids = processed.get_ids();
    match ids.iter().position(|&id| id == placeholder) {
        Some(at) if ids.iter().filter(|&&id| id == placeholder).count() == 1 => {
            Ok((ids[..at].to_vec(), ids[at + 1..].to_vec()))
        }
        _ => Err(DataError::Tokenizer {
            path: path.to_path_buf(),
            message: "its post-processor does more than add tokens around a sequence; leave out --add-special-tokens"
                .into(),
        }),
    }
}

/// One more than the largest token id (added tokens included).
pub fn vocab_size(tok: &Tokenizer) -> u64 {
    tok.get_vocab(true).values().copied().max().map_or(0, |m| u64::from(m) + 1)
}

/// Options of `train-tokenizer`.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub corpus: CorpusOptions,
    pub vocab_size: usize,
    pub output: PathBuf,
    pub min_frequency: u64,
    pub show_progress: bool,
}

/// What `train-tokenizer` did.
#[derive(Clone, Debug)]
pub struct TrainReport {
    pub documents: u64,
    pub bytes: u64,
    pub vocab_size: u64,
}

/// Trains a byte-level BPE tokenizer (GPT-2 style: ByteLevel pre-tokenizer without prefix
/// space, ByteLevel decoder, full byte alphabet) with `<|endoftext|>` as special token id 0,
/// and saves it as a standard `tokenizer.json`.
pub fn train_tokenizer(opts: &TrainOptions) -> Result<TrainReport, DataError> {
    let alphabet = ByteLevel::alphabet();
    if opts.vocab_size < alphabet.len() + 1 {
        return Err(DataError::InvalidArgument(format!(
            "--vocab-size {} is too small: byte-level BPE needs at least {} (256 bytes + {DEFAULT_EOS})",
            opts.vocab_size,
            alphabet.len() + 1
        )));
    }
    let files = discover(&opts.corpus)?;
    let mut stream = DocumentStream::new(files, opts.corpus.clone());
    let mut docs = Vec::new();
    while let Some(d) = stream.next_document()? {
        docs.push(d);
    }
    if docs.is_empty() {
        return Err(DataError::EmptyInput {
            path: opts.corpus.inputs[0].clone(),
            what: "no documents in any input".into(),
        });
    }
    let bytes: u64 = docs.iter().map(|d| d.len() as u64).sum();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(opts.vocab_size)
        .min_frequency(opts.min_frequency)
        .show_progress(opts.show_progress)
        .special_tokens(vec![AddedToken::from(DEFAULT_EOS.to_string(), true)])
        .initial_alphabet(alphabet.into_iter().collect())
        .build();
    let model_err = |e: tokenizers::Error| DataError::Tokenizer {
        path: opts.output.clone(),
        message: format!("training failed: {e}"),
    };
    let mut tokenizer =
        TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, PostProcessorWrapper, ByteLevelDecoder>::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_post_processor(None)
            .with_decoder(Some(ByteLevelDecoder::default()))
            .build()
            .map_err(model_err)?;
    tokenizer.train(&mut trainer, docs.iter().map(|d| d.as_str())).map_err(model_err)?;
    if let Some(parent) = opts.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
    }
    let tmp = PathBuf::from(format!("{}.tmp", opts.output.display()));
    tokenizer
        .save(&tmp, true)
        .map_err(|e| DataError::Tokenizer { path: tmp.clone(), message: format!("cannot save ({e})") })?;
    std::fs::rename(&tmp, &opts.output).map_err(|e| DataError::io(&opts.output, e))?;
    // Round trip through the generic loader, as `prepare` and Python will.
    let loaded = load_tokenizer(&opts.output)?;
    if loaded.token_to_id(DEFAULT_EOS) != Some(0) {
        return Err(DataError::Tokenizer {
            path: opts.output.clone(),
            message: format!("{DEFAULT_EOS} did not get id 0"),
        });
    }
    Ok(TrainReport { documents: docs.len() as u64, bytes, vocab_size: vocab_size(&loaded) })
}
