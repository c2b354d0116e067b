//! Tokenized training data: prepare a corpus into checksummed shards and read them back as training windows (format: docs/DATA_FORMAT.md).

pub mod chat_template;
pub mod corpus;
pub mod dataset;
pub mod doc_tokens;
pub mod error;
pub mod format;
pub mod output;
pub mod prepare;
pub mod sampler;
pub mod sft;
pub mod stream;
pub mod tokenize;
pub mod writer;

pub use chat_template::{ChatTemplate, Message};
pub use corpus::CorpusOptions;
pub use dataset::TokenDataset;
pub use error::DataError;
pub use format::{Dtype, Manifest, ShardInfo, Split, SplitInfo};
pub use prepare::{prepare, DtypeChoice, PrepareOptions, PrepareReport};
pub use sampler::{DataCursor, RankLoader, WindowBatch, WindowSampler};
pub use sft::{prepare_sft, MaskedExample, SftEncoder, SftFormat, SftOptions};
pub use tokenize::{load_tokenizer, train_tokenizer, TrainOptions};
pub use writer::{write_random_dataset, DatasetWriter, ManifestMeta, ShardWriter};
