//! Hugging Face export of a trained model: from the training ranks at the end of a run, or from a checkpoint on disk (`trainer export-hf`).
use crate::checkpoint::Reader;
use crate::config::Config;
use crate::engine::Engine;
use crate::hf;
use anyhow::{Context, Result};
use std::path::Path;

/// Writes the trained model as a Hugging Face directory. Collective: every rank calls it;
/// the first data-parallel replica gathers the weights and rank 0 writes them.
pub fn from_engine(engine: &Engine, config: &Config, data_tokenizer: Option<&Path>, dir: &Path) -> Result<()> {
    let topology = engine.comm().topology;
    if topology.data.rank != 0 {
        return Ok(());
    }
    let weights = engine.hf_weights()?;
    if topology.rank == 0 {
        hf::write_dir(&weights, config, &hf::tokenizer_files(config, data_tokenizer), dir)?;
    }
    Ok(())
}

/// Writes a checkpoint's model as a Hugging Face directory (no ranks needed: every tensor is
/// assembled from its pieces).
pub fn from_checkpoint(checkpoint: &Path, output: &Path) -> Result<()> {
    let mut reader = Reader::open(checkpoint)?;
    let config = Config::parse(&reader.manifest().config, &[])
        .with_context(|| format!("{}: the saved configuration is invalid", checkpoint.display()))?;
    let weights = reader.model_weights()?;
    let tokenizer = checkpoint.join("tokenizer.json");
    hf::write_dir(&weights, &config, &hf::tokenizer_files(&config, Some(&tokenizer)), output)
}
