//! Data-parallel gradient reduction and the optimizer step over the flat buffers, replicated (plain DP) or sharded (ZeRO-1).
//!
//! Plain DP: every segment's gradients are all-reduced over the data-parallel group and
//! every rank updates all parameters. ZeRO-1: every segment's range is split into one equal
//! chunk per data-parallel rank; gradients are reduce-scattered so each rank receives the
//! sum for its chunks only, updates them (master weights and Adam moments exist only for
//! its chunks), and the new parameters are all-gathered back into every rank's flat buffer.
use crate::comm::{wait_all, Comm, GroupKind, Pending, ReduceOp};
use crate::config::OptimConfig;
use crate::optim::{clip_scale, squared_norm, AdamW};
use crate::params::{master_kind, FlatParams, Region};
use anyhow::Result;
use std::ops::Range;
use std::sync::Arc;
use tch::Tensor;

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
    /// Ranges (in the optimizer's coordinates) of parameters every tensor-parallel rank
    /// holds whole: counted once in the gradient norm.
    replicated: Vec<Range<i64>>,
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
        let optimized = match &weights {
            Weights::Flat => values.shallow_clone(),
            Weights::Master(w) | Weights::Shard { weights: w, .. } => w.shallow_clone(),
        };
        let adamw = AdamW::new(config, &optimized, to_shard(&params.decay_ranges(), &chunks));
        let replicated = to_shard(&params.replicated_ranges(), &chunks);
        DistOptimizer { comm, chunks, weights, adamw, replicated }
    }

    /// Starts the reduction of one segment's gradients, to be called once they are final
    /// (after the last micro-batch's backward of that segment): replicated parameters'
    /// partial gradients are summed over the tensor-parallel group, then everything over
    /// the data-parallel group.
    pub fn reduce_segment(&self, params: &FlatParams, segment: usize) -> Vec<Pending> {
        let grads = params.grads();
        let mut pending: Vec<Pending> = params
            .segment_replicated_ranges(segment)
            .iter()
            .map(|range| self.comm.all_reduce(GroupKind::Tensor, &narrow(grads, range), ReduceOp::Sum))
            .collect();
        let segment_grads = narrow(grads, &params.segment_range(segment));
        pending.push(match &self.weights {
            Weights::Shard { grads: shard, .. } => {
                let chunk = &self.chunks[segment];
                self.comm.reduce_scatter(GroupKind::Data, &segment_grads, &shard.narrow(0, chunk.offset, chunk.len()))
            }
            Weights::Flat | Weights::Master(_) => self.comm.all_reduce(GroupKind::Data, &segment_grads, ReduceOp::Sum),
        });
        pending
    }

    /// After every segment's reduction has completed: the global gradient norm (returned,
    /// before clipping), clipping to `max_norm`, the AdamW update, and (ZeRO) the all-gather
    /// of the updated parameters. A non-finite norm skips the update.
    pub fn step(&mut self, params: &FlatParams, lr: f64, max_norm: f64) -> Result<f64> {
        let grads = match &self.weights {
            Weights::Shard { grads, .. } => grads,
            Weights::Flat | Weights::Master(_) => params.grads(),
        };
        // bf16 gradients: norm, clipping and the update in the master dtype (no copy otherwise).
        let grads = grads.to_kind(master_kind(grads.kind()));
        let norm = self.global_grad_norm(&grads)?;
        if !norm.is_finite() {
            // Every rank sees the same global norm, so every rank skips this update.
            return Ok(norm);
        }
        let scale = clip_scale(norm, max_norm);
        if scale < 1.0 {
            let _ = grads.shallow_clone().g_mul_scalar_(scale);
        }
        let values = params.values();
        match &mut self.weights {
            Weights::Flat => self.adamw.step(&mut values.shallow_clone(), &grads, lr),
            Weights::Master(master) => {
                self.adamw.step(master, &grads, lr);
                tch::no_grad(|| values.shallow_clone().copy_(master));
            }
            Weights::Shard { weights, .. } => {
                self.adamw.step(weights, &grads, lr);
                let updated = weights.to_kind(values.kind());
                let gathers = self.chunks.iter().enumerate().map(|(segment, chunk)| {
                    let local = updated.narrow(0, chunk.offset, chunk.len());
                    self.comm.all_gather(GroupKind::Data, &local, &narrow(values, &params.segment_range(segment)))
                });
                wait_all(gathers.collect::<Vec<_>>())?;
            }
        }
        Ok(norm)
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

    /// L2 norm of the whole model's gradient: every element counted once over all ranks.
    fn global_grad_norm(&self, grads: &Tensor) -> Result<f64> {
        let topology = self.comm.topology;
        let mut sum = squared_norm(grads);
        if topology.tensor.rank != 0 {
            sum -= self.replicated.iter().map(|r| squared_norm(&narrow(grads, r))).sum::<f64>();
        }
        let group = match self.weights {
            Weights::Shard { .. } => GroupKind::World,
            Weights::Flat | Weights::Master(_) => GroupKind::Tensor,
        };
        let total = self.comm.sum_scalar(group, sum)?;
        // Rounding can leave a tiny negative total; NaN must survive (f64::max would drop it).
        Ok(if total < 0.0 { 0.0 } else { total.sqrt() })
    }
}
