//! Hugging Face LLaMA format: `config.json` both ways, weights in safetensors (one file or sharded), and model directories as an export writes them.
mod config;
mod dir;
mod weights;

pub use config::config_json;
pub use dir::{check_replaceable, tokenizer_files, write_dir, TOKENIZER_FILES};
pub use weights::{write_weights, HfWeights, INDEX_FILE, MAX_SHARD_BYTES, SINGLE_FILE};
