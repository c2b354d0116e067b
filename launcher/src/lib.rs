//! The launcher's library: the process protocol between the launcher and the ranks it starts, shared with the trainer.
pub mod protocol;
