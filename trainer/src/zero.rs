//! Data-parallel gradient reduction and the optimizer step over the flat buffers, replicated (plain DP) or sharded (ZeRO-1).
//!
//! Plain DP: every segment's gradients are all-reduced over the data-parallel group and
//! every rank updates all parameters. ZeRO-1: every segment's range is split into one equal
//! chunk per data-parallel rank; gradients are reduce-scattered so each rank receives the
//! sum for its chunks only, updates them (master weights and Adam moments exist only for
//! its chunks), and the new parameters are all-gathered back into every rank's flat buffer.
use crate::comm::{wait_all, Comm, GroupKind, Pending, ReduceOp};
use crate::config::OptimConfig;
use crate::optim::AdamW;
use crate::params::{master_kind, FlatParams, Region};
use anyhow::Result;
use std::ops::Range;
use std::sync::Arc;
use tch::{Kind, Tensor};

/// The part of a segment this rank's optimizer updates, and where it sits in the shard.
#[derive(Debug, Clone)]
struct Chunk {
    flat: Range<i64>,
    offset: i64,
}

impl Chunk {
    fn len(&self) -> i64 {
        self.flat.end - self.flat.start
    }
}

/// The optimizer's weights: what it updates, in the master dtype.
#[derive(Debug)]
enum Weights {
    /// The flat parameter buffer itself (plain DP in f32 or f64).
    Flat,
    /// A master copy of the whole flat buffer (plain DP in bf16).
    Master(Tensor),
    /// This rank's chunks, contiguous (ZeRO-1), and the reduce-scatter target for their
    /// gradients (in the gradients' dtype, which the collective keeps).
    Shard { weights: Tensor, grads: Tensor },
}

#[derive(Debug)]
pub struct DistOptimizer {
    comm: Arc<Comm>,
    chunks: Vec<Chunk>,
    weights: Weights,
    adamw: AdamW,
    /// On tensor-parallel ranks other than the first: the optimizer-coordinate indices of
    /// parameters every tensor-parallel rank holds whole, left out of this rank's share of
    /// the gradient norm so that they count once.
    duplicates: Option<Tensor>,
}

/// The parts of `ranges` (flat coordinates) that fall in `chunks`, in shard coordinates.
fn to_shard(ranges: &[Range<i64>], chunks: &[Chunk]) -> Vec<Range<i64>> {
    let mut out = Vec::new();
    for chunk in chunks {
        for range in ranges {
            let (start, end) = (range.start.max(chunk.flat.start), range.end.min(chunk.flat.end));
            if start < end {
                let shift = chunk.offset - chunk.flat.start;
                out.push(start + shift..end + shift);
            }
        }
    }
    out
}

fn narrow(t: &Tensor, range: &Range<i64>) -> Tensor {
    t.narrow(0, range.start, range.end - range.start)
}

impl DistOptimizer {
    /// `zero`: shard the optimizer over the data-parallel group (the flat buffers must have
    /// been laid out with segments padded to a multiple of its size).
    pub fn new(comm: Arc<Comm>, params: &FlatParams, config: &OptimConfig, zero: bool) -> DistOptimizer {
        let data = comm.topology.data;
        let (values, master) = (params.values(), master_kind(params.values().kind()));
        let mut offset = 0;
        let chunks: Vec<Chunk> = (0..params.num_segments())
            .map(|segment| {
                let range = params.segment_range(segment);
                let flat = if zero {
                    let part = (range.end - range.start) / data.size as i64;
                    let start = range.start + data.rank as i64 * part;
                    start..start + part
                } else {
                    range
                };
                let chunk = Chunk { offset: if zero { offset } else { flat.start }, flat };
                offset += chunk.len();
                chunk
            })
            .collect();
        let weights = if zero {
            let pieces: Vec<Tensor> = chunks.iter().map(|c| narrow(values, &c.flat)).collect();
            let weights = Tensor::cat(&pieces, 0).to_kind(master);
            let grads = Tensor::zeros([weights.numel() as i64], (params.grads().kind(), values.device()));
            Weights::Shard { grads, weights }
        } else if values.kind() != master {
            Weights::Master(values.to_kind(master))
        } else {
            Weights::Flat
        };
        let (optimized, grads) = match &weights {
            Weights::Flat => (values, params.grads()),
            Weights::Master(w) => (w, params.grads()),
            Weights::Shard { weights, grads } => (weights, grads),
        };
        let adamw = AdamW::new(config, optimized, grads, &to_shard(&params.decay_ranges(), &chunks));
        let duplicates = (comm.topology.tensor.rank != 0)
            .then(|| to_shard(&params.replicated_ranges(), &chunks).into_iter().flatten().collect::<Vec<i64>>())
            .filter(|indices| !indices.is_empty())
            .map(|indices| Tensor::from_slice(&indices).to_device(values.device()));
        DistOptimizer { comm, chunks, weights, adamw, duplicates }
    }

    /// Starts the reduction of one segment's gradients, to be called once they are final
    /// (after the last micro-batch's backward of that segment): replicated parameters'
    /// partial gradients are summed over the tensor-parallel group, then everything over
    /// the data-parallel group. On CUDA the two groups' collectives run on different NCCL
    /// streams, so the tensor-parallel sums are waited for (by the compute stream, not the
    /// host) before the data-parallel reduction that reads them is asked for.
    pub fn reduce_segment(&self, params: &FlatParams, segment: usize) -> Result<Pending> {
        let grads = params.grads();
        let replicated = params.segment_replicated_ranges(segment);
        wait_all(replicated.iter().map(|r| self.comm.all_reduce(GroupKind::Tensor, &narrow(grads, r), ReduceOp::Sum)))?;
        let segment_grads = narrow(grads, &params.segment_range(segment));
        Ok(match &self.weights {
            Weights::Shard { grads: shard, .. } => {
                let chunk = &self.chunks[segment];
                self.comm.reduce_scatter(GroupKind::Data, &segment_grads, &shard.narrow(0, chunk.offset, chunk.len()))
            }
            Weights::Flat | Weights::Master(_) => self.comm.all_reduce(GroupKind::Data, &segment_grads, ReduceOp::Sum),
        })
    }

    /// The gradients the optimizer reads (in the master dtype).
    fn grads<'a>(&'a self, params: &'a FlatParams) -> &'a Tensor {
        match &self.weights {
            Weights::Shard { grads, .. } => grads,
            Weights::Flat | Weights::Master(_) => params.grads(),
        }
    }

    /// After every segment's reduction has completed: this rank's share of the squared global
    /// gradient norm, a scalar on the device, such that the sum of every rank's share is the
    /// square of the whole model's gradient norm (each element counted once).
    pub fn grad_norm_sq_share(&self, params: &FlatParams) -> Tensor {
        tch::no_grad(|| {
            let grads = self.grads(params);
            let mut share = grads.norm().square();
            if let Some(duplicates) = &self.duplicates {
                share -= grads.index_select(0, duplicates).norm().square();
            }
            if !self.sharded() {
                // Every data-parallel rank holds the whole (reduced) gradient.
                share /= self.comm.topology.data.size as f64;
            }
            share
        })
    }

    /// Clipping to `max_norm` given the squared global norm (a scalar on the device), the
    /// AdamW update, and (ZeRO) the all-gather of the updated parameters, without reading
    /// anything back to the host: a non-finite norm skips the update on the device.
    pub fn step(&mut self, params: &FlatParams, lr: f64, max_norm: f64, norm_sq: &Tensor) -> Result<()> {
        let norm = tch::no_grad(|| norm_sq.clamp_min(0.0).sqrt());
        let skip = norm.isfinite().logical_not().to_kind(Kind::Float);
        if max_norm > 0.0 {
            let clip = tch::no_grad(|| (max_norm / (norm + 1e-6)).clamp_max(1.0));
            let _ = self.grads(params).shallow_clone().g_mul_(&clip);
        }
        self.adamw.step(lr, &skip)?;
        let values = params.values();
        match &self.weights {
            Weights::Flat => {}
            Weights::Master(master) => tch::no_grad(|| {
                values.shallow_clone().copy_(master);
            }),
            Weights::Shard { weights, .. } => {
                let updated = weights.to_kind(values.kind());
                let gathers = self.chunks.iter().enumerate().map(|(segment, chunk)| {
                    let local = updated.narrow(0, chunk.offset, chunk.len());
                    self.comm.all_gather(GroupKind::Data, &local, &narrow(values, &params.segment_range(segment)))
                });
                wait_all(gathers.collect::<Vec<_>>())?;
            }
        }
        Ok(())
    }

    /// Whether the state is sharded over the data-parallel group (ZeRO-1).
    pub fn sharded(&self) -> bool {
        matches!(self.weights, Weights::Shard { .. })
    }

    pub fn adamw(&mut self) -> &mut AdamW {
        &mut self.adamw
    }

    /// The state a checkpoint must keep, by name, in the optimizer's coordinates: the Adam
    /// moments, and the master weights where they differ from the parameters (bf16).
    pub fn state(&self, params: &FlatParams) -> Vec<(&'static str, Tensor)> {
        let mut state: Vec<_> = self.adamw.moments().iter().map(|(n, t)| (*n, t.shallow_clone())).collect();
        match &self.weights {
            Weights::Master(w) => state.push(("master", w.shallow_clone())),
            Weights::Shard { weights, .. } if weights.kind() != params.values().kind() => {
                state.push(("master", weights.shallow_clone()))
            }
            Weights::Flat | Weights::Shard { .. } => {}
        }
        state
    }

    /// The boxes of global tensors this rank's optimizer state holds, with `flat` in the
    /// optimizer's coordinates.
    pub fn regions(&self, params: &FlatParams) -> Vec<Region> {
        let mut regions = Vec::new();
        for chunk in &self.chunks {
            for mut region in params.regions(&chunk.flat) {
                let shift = chunk.offset - chunk.flat.start;
                region.flat = region.flat.start + shift..region.flat.end + shift;
                regions.push(region);
            }
        }
        regions
    }
}
