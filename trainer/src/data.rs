//! The training loop's data: the configured token dataset as batches of windows, this rank's share, and the fixed validation set.
use crate::config::{invalid_config, Config, DataFormat};
use crate::torch_ext;
use anyhow::{bail, Result};
use data_shards::{DataCursor, RankLoader, Split, TokenDataset, WindowSampler};
use std::path::PathBuf;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

#[derive(Debug)]
pub struct TrainData {
    loader: RankLoader,
    validation: Option<WindowSampler>,
    window: i64,
    dp_rank: usize,
    dp_size: usize,
    device: Device,
    /// Token ids must be below it (`model.vocab_size`); checked per batch on the host.
    vocab_size: i64,
    path: PathBuf,
    pub tokenizer_path: Option<PathBuf>,
}

impl TrainData {
    /// Opens the data for data-parallel rank `dp_rank` of `dp_size`, positioned at `cursor`,
    /// checking that it fits the model.
    pub fn open(
        config: &Config,
        dp_rank: usize,
        dp_size: usize,
        device: Device,
        cursor: DataCursor,
    ) -> Result<TrainData> {
        let (path, seq_len, seed) = (&config.data.path, config.train.seq_len as usize, config.train.seed);
        let (train, valid) = match config.data.format {
            DataFormat::Shards => (
                TokenDataset::open(path, Split::Train)?,
                (config.train.eval_every > 0).then(|| TokenDataset::open(path, Split::Valid)).transpose()?,
            ),
            DataFormat::Megatron => {
                if config.train.eval_every > 0 {
                    return Err(invalid_config(
                        "data.format = \"megatron\" has no validation split: set train.eval_every = 0",
                    ));
                }
                (TokenDataset::open_megatron(path)?, None)
            }
        };
        if let Some(vocab) = train.vocab_size() {
            if i64::from(vocab) > config.model.vocab_size {
                return Err(invalid_config(format!(
                    "model.vocab_size = {}: the tokenizer of {} has {vocab} tokens; raise model.vocab_size to at \
                     least {vocab}",
                    config.model.vocab_size,
                    path.display()
                )));
            }
        }
        let tokenizer_path = train.tokenizer_path();
        let sampler = WindowSampler::new(Arc::new(train), seq_len, seed)?;
        let validation = valid.map(|v| WindowSampler::new(Arc::new(v), seq_len, seed)).transpose()?;
        if let Some(v) = &validation {
            if (v.num_windows() as i64) < config.train.eval_sequences {
                bail!(
                    "train.eval_sequences = {} but the validation split of {} holds only {} windows of {} tokens; lower train.eval_sequences",
                    config.train.eval_sequences,
                    path.display(),
                    v.num_windows(),
                    seq_len + 1
                );
            }
        }
        Ok(TrainData {
            loader: RankLoader::new(sampler, dp_rank, dp_size, cursor),
            validation,
            window: seq_len as i64 + 1,
            dp_rank,
            dp_size,
            device,
            vocab_size: config.model.vocab_size,
            path: path.clone(),
            tokenizer_path,
        })
    }

    /// How many windows all ranks together have consumed.
    pub fn cursor(&self) -> DataCursor {
        self.loader.cursor()
    }

    /// This rank's share of the next global batch: [global_batch / dp, seq_len + 1] token ids,
    /// each checked to be inside the vocabulary.
    /// On CUDA the copy goes through pinned memory without blocking the host (a copy from
    /// pageable memory would wait for every kernel queued before it).
    pub fn next_batch(&mut self, global_batch: i64) -> Result<Tensor> {
        let tokens = self.loader.next_batch(global_batch as usize);
        // A damaged shard must be an error here, not an index error inside a kernel.
        if let Some(bad) = tokens.iter().find(|&&id| id < 0 || id >= self.vocab_size) {
            bail!(
                "{} holds token id {bad}, outside the model's vocabulary of {} (model.vocab_size): the data is \
                 damaged or was prepared with another tokenizer; `data-shards verify {}` checks it",
                self.path.display(),
                self.vocab_size,
                self.path.display()
            );
        }
        let tokens = Tensor::from_slice(&tokens).view([-1, self.window]);
        match self.device {
            Device::Cuda(_) => Ok(torch_ext::pin_memory(&tokens)?.to_device_(self.device, Kind::Int64, true, false)),
            _ => Ok(tokens),
        }
    }

    /// This data-parallel rank's share of the validation windows (the same ones every
    /// time), `micro_batch` at a time.
    pub fn validation_batches(&self, sequences: i64, micro_batch: i64) -> Vec<Tensor> {
        let Some(sampler) = &self.validation else {
            return Vec::new();
        };
        let share = sequences as u64 / self.dp_size as u64;
        let first = share * self.dp_rank as u64;
        let mut window = vec![0i64; self.window as usize];
        let mut all = Vec::with_capacity(share as usize * self.window as usize);
        for index in first..first + share {
            sampler.window_into(index, &mut window);
            all.extend_from_slice(&window);
        }
        Tensor::from_slice(&all).view([-1, self.window]).to_device(self.device).split(micro_batch, 0)
    }
}
