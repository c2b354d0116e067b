//! Sharded checkpoints: each rank writes its pieces of global tensors, rank 0 commits a manifest and publishes the step by rename; loading reads, under any layout, the intersections it needs.
//!
//! Layout of `checkpoint.dir`:
//! ```text
//! step-00000100/manifest.json        written last, after every rank's files are fsync'd
//! step-00000100/rank-00003.safetensors
//! step-00000100/tokenizer.json
//! .step-00000200.partial/            a save in progress (never loaded, removed later)
//! latest                             the name of the newest complete step, replaced by rename
//! ```
//! Every stored tensor is a box of a global tensor (`Region`): a parameter under its
//! Hugging Face name (`model:NAME`) or an optimizer state of it (`exp_avg:NAME`,
//! `exp_avg_sq:NAME`, `master:NAME`). Replicated tensors are written by one rank only.
mod format;
mod load;
mod save;

pub use format::{Manifest, Piece, TensorEntry, FORMAT_VERSION};
pub use load::{check_same_model, load_optimizer, load_params, Reader};
pub use save::{Checkpointer, SaveReport, SaveStatus};
