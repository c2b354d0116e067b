//! The training loop's data: the configured token dataset as batches of windows, this rank's share, and the fixed validation set.
use crate::config::{invalid_config, Config, DataFormat};
use crate::torch_ext;
use anyhow::{bail, Result};
use data_shards::{DataCursor, RankLoader, Split, TokenDataset, WindowBatch, WindowSampler};
use std::path::PathBuf;
use std::sync::Arc;
use tch::{Device, Tensor};

/// Windows of token ids, [rows, seq_len + 1], and for fine-tuning data which targets are trained
/// and where each packed document starts.
#[derive(Debug)]
pub struct Batch {
    pub tokens: Tensor,
    pub packing: Option<Packing>,
}

/// What fine-tuning windows add to their tokens (`data-shards` format version 2).
#[derive(Debug)]
pub struct Packing {
    /// 1.0 where the target (token `t + 1` predicted at `t`) is trained, [rows, seq_len].
    pub target_mask: Tensor,
    /// Each input token's position within its document, restarting at 0 where one starts,
    /// [rows, seq_len]: attention stays within a document and RoPE restarts with it.
    pub positions: Tensor,
}

impl Batch {
    /// The batch in pieces of `rows` windows (micro-batches).
    pub fn split(&self, rows: i64) -> Vec<Batch> {
        let tokens = self.tokens.split(rows, 0);
        let packing: Vec<Option<Packing>> = match &self.packing {
            None => tokens.iter().map(|_| None).collect(),
            Some(p) => p
                .target_mask
                .split(rows, 0)
                .into_iter()
                .zip(p.positions.split(rows, 0))
                .map(|(target_mask, positions)| Some(Packing { target_mask, positions }))
                .collect(),
        };
        tokens.into_iter().zip(packing).map(|(tokens, packing)| Batch { tokens, packing }).collect()
    }
}

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
    /// The data carries a loss mask and document positions (fine-tuning data).
    masked: bool,
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
        let masked = train.has_loss_mask();
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
            masked,
            path: path.clone(),
            tokenizer_path,
        })
    }

    /// How many windows all ranks together have consumed.
    pub fn cursor(&self) -> DataCursor {
        self.loader.cursor()
    }

    /// This rank's share of the next global batch: [global_batch / dp, seq_len + 1] token ids,
    /// each checked to be inside the vocabulary, with the fine-tuning mask and positions when
    /// the data has them; and how many of its targets are trained (counted on the host).
    /// On CUDA the copies go through pinned memory without blocking the host (a copy from
    /// pageable memory would wait for every kernel queued before it).
    pub fn next_batch(&mut self, global_batch: i64) -> Result<(Batch, u64)> {
        if !self.masked {
            let tokens = self.loader.next_batch(global_batch as usize);
            self.check_vocabulary(&tokens)?;
            return self.batch_of(&tokens, None);
        }
        let windows = self.loader.next_masked_batch(global_batch as usize);
        self.check_vocabulary(&windows.tokens)?;
        self.batch_of(&windows.tokens, Some(&windows))
    }

    /// The device batch of windows of `tokens` (with the packing of `windows` for fine-tuning
    /// data) and how many of its targets are trained, counted on the host.
    fn batch_of(&self, tokens: &[i64], windows: Option<&WindowBatch>) -> Result<(Batch, u64)> {
        let (rows, seq) = (tokens.len() as i64 / self.window, self.window - 1);
        let tokens = self.to_device(Tensor::from_slice(tokens).view([rows, self.window]))?;
        let Some(windows) = windows else {
            return Ok((Batch { tokens, packing: None }, (rows * seq) as u64));
        };
        let (mask, positions) = self.packing_of(windows);
        let trained = mask.iter().filter(|&&m| m > 0.0).count() as u64;
        let packing = Packing {
            target_mask: self.to_device(Tensor::from_slice(&mask).view([rows, seq]))?,
            positions: self.to_device(Tensor::from_slice(&positions).view([rows, seq]))?,
        };
        Ok((Batch { tokens, packing: Some(packing) }, trained))
    }

    /// The target mask ([rows, seq_len], 1.0 where trained: target `t` is token `t + 1`, so its
    /// bit is the token's) and the input tokens' positions of fine-tuning windows.
    fn packing_of(&self, windows: &WindowBatch) -> (Vec<f32>, Vec<i64>) {
        let w = self.window as usize;
        let rows = windows.tokens.len() / w;
        let mut mask = Vec::with_capacity(rows * (w - 1));
        let mut positions = Vec::with_capacity(rows * (w - 1));
        for row in 0..rows {
            let window = row * w..(row + 1) * w;
            mask.extend(windows.loss_mask[window.clone()][1..].iter().map(|&m| f32::from(m)));
            positions.extend_from_slice(&windows.positions[window][..w - 1]);
        }
        (mask, positions)
    }

    /// A damaged shard must be an error here, not an index error inside a kernel.
    fn check_vocabulary(&self, tokens: &[i64]) -> Result<()> {
        if let Some(bad) = tokens.iter().find(|&&id| id < 0 || id >= self.vocab_size) {
            bail!(
                "{} holds token id {bad}, outside the model's vocabulary of {} (model.vocab_size): the data is \
                 damaged or was prepared with another tokenizer; `data-shards verify {}` checks it",
                self.path.display(),
                self.vocab_size,
                self.path.display()
            );
        }
        Ok(())
    }

    fn to_device(&self, tensor: Tensor) -> Result<Tensor> {
        match self.device {
            Device::Cuda(_) => {
                let kind = tensor.kind();
                Ok(torch_ext::pin_memory(&tensor)?.to_device_(self.device, kind, true, false))
            }
            _ => Ok(tensor),
        }
    }

    /// This data-parallel rank's share of the validation windows (the same ones every time),
    /// `micro_batch` at a time, and how many of their targets are trained.
    pub fn validation_batches(&self, sequences: i64, micro_batch: i64) -> Result<(Vec<Batch>, u64)> {
        let Some(sampler) = &self.validation else {
            return Ok((Vec::new(), 0));
        };
        let share = sequences as u64 / self.dp_size as u64;
        let first = share * self.dp_rank as u64;
        let w = self.window as usize;
        let mut windows = WindowBatch::default();
        for index in first..first + share {
            let (mut tokens, mut mask, mut positions) = (vec![0i64; w], vec![1u8; w], vec![0i64; w]);
            match self.masked {
                true => sampler.masked_window_into(index, &mut tokens, &mut mask, &mut positions),
                false => sampler.window_into(index, &mut tokens),
            }
            windows.tokens.extend(tokens);
            windows.loss_mask.extend(mask);
            windows.positions.extend(positions);
        }
        let (batch, trained) = self.batch_of(&windows.tokens, self.masked.then_some(&windows))?;
        Ok((batch.split(micro_batch), trained))
    }
}
