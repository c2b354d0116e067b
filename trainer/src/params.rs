//! Trainable parameters and their gradients as views of two flat buffers, laid out segment by segment.
//!
//! One contiguous buffer per role makes the optimizer step a handful of tensor ops, makes
//! each segment's gradients one contiguous slice (one collective per segment later), and
//! is what ZeRO shards. Autograd sees each trainable tensor as a leaf view of the buffer.
use crate::model::{HfPiece, Init, SegmentSpec};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::ops::Range;
use tch::{Device, Kind, Tensor};

#[derive(Debug)]
pub struct FlatParams {
    specs: Vec<SegmentSpec>,
    /// Parameter values in the compute dtype.
    values: Tensor,
    /// Gradients, accumulated over micro-batches, in the optimizer's dtype.
    grads: Tensor,
    /// Per segment, per leaf: the leaf's element range in the flat buffers.
    ranges: Vec<Vec<Range<i64>>>,
    /// Per segment, per leaf: a view of `values` that requires grad.
    leaves: Vec<Vec<Tensor>>,
}

/// The dtype optimizer state and gradients are kept in for a given compute dtype.
pub fn master_kind(kind: Kind) -> Kind {
    match kind {
        Kind::Double => Kind::Double,
        _ => Kind::Float,
    }
}

impl FlatParams {
    /// Allocates zeroed buffers for `specs`; call `init` or `load_hf` to fill them.
    pub fn new(specs: Vec<SegmentSpec>, kind: Kind, device: Device) -> FlatParams {
        let mut ranges = Vec::with_capacity(specs.len());
        let mut next = 0;
        for segment in &specs {
            let leaf_ranges = segment
                .leaves
                .iter()
                .map(|leaf| {
                    let range = next..next + leaf.numel();
                    next = range.end;
                    range
                })
                .collect();
            ranges.push(leaf_ranges);
        }
        let values = Tensor::zeros([next], (kind, device));
        let grads = Tensor::zeros([next], (master_kind(kind), device));
        let leaves = specs
            .iter()
            .zip(&ranges)
            .map(|(segment, leaf_ranges)| {
                segment
                    .leaves
                    .iter()
                    .zip(leaf_ranges)
                    .map(|(leaf, range)| view(&values, range).view(leaf.shape.as_slice()).set_requires_grad(true))
                    .collect()
            })
            .collect();
        FlatParams {
            specs,
            values,
            grads,
            ranges,
            leaves,
        }
    }

    pub fn specs(&self) -> &[SegmentSpec] {
        &self.specs
    }

    pub fn numel(&self) -> i64 {
        self.values.size()[0]
    }

    pub fn values(&self) -> &Tensor {
        &self.values
    }

    pub fn grads(&self) -> &Tensor {
        &self.grads
    }

    /// Trainable tensors per segment (shallow handles sharing the flat storage).
    pub fn leaves(&self) -> Vec<Vec<Tensor>> {
        self.leaves
            .iter()
            .map(|s| s.iter().map(Tensor::shallow_clone).collect())
            .collect()
    }

    pub fn segment_leaves(&self, segment: usize) -> &[Tensor] {
        &self.leaves[segment]
    }

    /// Element range of a whole segment in the flat buffers.
    pub fn segment_range(&self, segment: usize) -> Range<i64> {
        let leaves = &self.ranges[segment];
        leaves[0].start..leaves[leaves.len() - 1].end
    }

    /// Element ranges that take weight decay (matrices, not norm weights), merged where adjacent.
    pub fn decay_ranges(&self) -> Vec<Range<i64>> {
        let mut merged: Vec<Range<i64>> = Vec::new();
        let leaves = self
            .specs
            .iter()
            .flat_map(|s| &s.leaves)
            .zip(self.ranges.iter().flatten());
        for (_, range) in leaves.filter(|(leaf, _)| leaf.decay) {
            match merged.last_mut() {
                Some(last) if last.end == range.start => last.end = range.end,
                _ => merged.push(range.clone()),
            }
        }
        merged
    }

    /// Adds the gradients of one segment's leaves (as returned by autograd, in leaf order).
    pub fn accumulate_grads(&self, segment: usize, grads: &[Tensor]) {
        for (range, grad) in self.ranges[segment].iter().zip(grads) {
            if grad.defined() {
                let _ = view(&self.grads, range).view_as(grad).g_add_(grad);
            }
        }
    }

    pub fn zero_grads(&self) {
        let _ = self.grads.shallow_clone().zero_();
    }

    pub fn scale_grads(&self, factor: f64) {
        let _ = self.grads.shallow_clone().g_mul_scalar_(factor);
    }

    /// Draws every Hugging Face tensor from the seed, one after another in model order, so
    /// the initial weights depend on the seed and the shape only.
    pub fn init(&mut self, seed: u64) {
        tch::manual_seed(seed as i64);
        tch::no_grad(|| {
            for (piece, mut target) in self.pieces(&self.values) {
                let value = match piece.init {
                    Init::Ones => Tensor::ones(piece.shape.as_slice(), (Kind::Float, target.device())),
                    Init::Normal(std) => Tensor::randn(piece.shape.as_slice(), (Kind::Float, target.device())) * std,
                };
                target.copy_(&value);
            }
        });
    }

    /// Views of the parameter values under their Hugging Face names.
    pub fn hf_tensors(&self) -> Vec<(String, Tensor)> {
        self.pieces(&self.values)
            .map(|(piece, view)| (piece.name.clone(), view))
            .collect()
    }

    /// Views of the accumulated gradients under the parameters' Hugging Face names.
    pub fn hf_grads(&self) -> Vec<(String, Tensor)> {
        self.pieces(&self.grads)
            .map(|(piece, view)| (piece.name.clone(), view))
            .collect()
    }

    /// Copies Hugging Face tensors into the buffers; every tensor must be present with its shape.
    pub fn load_hf(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        tch::no_grad(|| {
            for (piece, mut target) in self.pieces(&self.values) {
                let source = tensors
                    .get(&piece.name)
                    .with_context(|| format!("tensor {} is missing", piece.name))?;
                if source.size() != piece.shape {
                    bail!(
                        "tensor {} has shape {:?}, the model needs {:?}",
                        piece.name,
                        source.size(),
                        piece.shape
                    );
                }
                target.copy_(source);
            }
            Ok(())
        })
    }

    /// Every Hugging Face tensor with a view of the rows it occupies in `flat` (the values
    /// or the gradients).
    fn pieces<'a>(&'a self, flat: &'a Tensor) -> impl Iterator<Item = (&'a HfPiece, Tensor)> + 'a {
        self.specs
            .iter()
            .zip(self.ranges.iter())
            .flat_map(move |(segment, ranges)| {
                segment.leaves.iter().zip(ranges).flat_map(move |(leaf, range)| {
                    let data = view(flat, range).view(leaf.shape.as_slice());
                    leaf.pieces
                        .iter()
                        .map(move |piece| (piece, data.narrow(0, piece.row_offset, piece.shape[0])))
                })
            })
    }
}

fn view(flat: &Tensor, range: &Range<i64>) -> Tensor {
    flat.narrow(0, range.start, range.end - range.start)
}
