//! Trainable parameters and their gradients as views of two flat buffers, laid out segment by segment.
//!
//! One contiguous buffer per role makes the optimizer step a handful of tensor ops, makes
//! each segment's gradients one contiguous slice (one collective per segment later), and
//! is what ZeRO shards. Autograd sees each trainable tensor as a leaf view of the buffer.
use crate::hf::HfWeights;
use crate::model::{HfPiece, Init, LeafSpec, SegmentSpec};
use anyhow::{bail, Context, Result};
use std::ops::Range;
use tch::{Device, Kind, Tensor};

/// A box of a global Hugging Face tensor whose elements sit, row-major, in one contiguous
/// range of a flat buffer: the unit checkpoints store and reshard.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    pub name: String,
    pub global_shape: Vec<i64>,
    /// Where the box starts in each dimension of the global tensor.
    pub offset: Vec<i64>,
    pub shape: Vec<i64>,
    /// The box's elements in the flat buffer.
    pub flat: Range<i64>,
    /// Every tensor-parallel rank holds the whole tensor.
    pub replicated: bool,
}

#[derive(Debug)]
pub struct FlatParams {
    specs: Vec<SegmentSpec>,
    /// Parameter values in the compute dtype.
    values: Tensor,
    /// Gradients, accumulated over micro-batches, in the optimizer's dtype.
    grads: Tensor,
    /// Per segment, per leaf: the leaf's element range in the flat buffers.
    ranges: Vec<Vec<Range<i64>>>,
    /// Per segment: where its (padded) range ends.
    segment_ends: Vec<i64>,
    /// Per segment, per leaf: a view of `values` that requires grad.
    leaves: Vec<Vec<Tensor>>,
}

/// Where every leaf sits in the flat buffers: leaves one after another in segment order, each
/// segment padded to a multiple of `segment_multiple` (the data-parallel degree under ZeRO, so
/// every rank owns an equal part of every segment).
#[derive(Debug, Clone, PartialEq)]
pub struct FlatLayout {
    /// Per segment, per leaf: the leaf's element range.
    pub ranges: Vec<Vec<Range<i64>>>,
    /// Per segment: where its padded range ends (the last one is the buffers' length).
    pub segment_ends: Vec<i64>,
}

impl FlatLayout {
    pub fn new(specs: &[SegmentSpec], segment_multiple: i64) -> FlatLayout {
        let mut ranges = Vec::with_capacity(specs.len());
        let mut segment_ends = Vec::with_capacity(specs.len());
        let mut next = 0;
        for segment in specs {
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
            next = (next + segment_multiple - 1) / segment_multiple * segment_multiple;
            segment_ends.push(next);
        }
        FlatLayout { ranges, segment_ends }
    }
}

/// The dtype optimizer state and gradients are kept in for a given compute dtype.
pub fn master_kind(kind: Kind) -> Kind {
    match kind {
        Kind::Double => Kind::Double,
        _ => Kind::Float,
    }
}

impl FlatParams {
    /// Allocates zeroed buffers for `specs` laid out as [`FlatLayout`] says; call `init` or
    /// `load_hf` to fill them.
    pub fn new(specs: Vec<SegmentSpec>, kind: Kind, device: Device, segment_multiple: i64) -> FlatParams {
        Self::allocate(specs, kind, device, segment_multiple, true)
    }

    /// Parameters for inference: no gradient buffer (it would double an f32 model's memory and
    /// triple a bf16 one's), and leaves that do not require grad.
    pub fn without_grads(specs: Vec<SegmentSpec>, kind: Kind, device: Device) -> FlatParams {
        Self::allocate(specs, kind, device, 1, false)
    }

    fn allocate(specs: Vec<SegmentSpec>, kind: Kind, device: Device, segment_multiple: i64, grad: bool) -> FlatParams {
        let FlatLayout { ranges, segment_ends } = FlatLayout::new(&specs, segment_multiple);
        let numel = segment_ends.last().copied().unwrap_or(0);
        let values = Tensor::zeros([numel], (kind, device));
        let grads = Tensor::zeros([if grad { numel } else { 0 }], (master_kind(kind), device));
        let leaves = specs
            .iter()
            .zip(&ranges)
            .map(|(segment, leaf_ranges)| {
                segment
                    .leaves
                    .iter()
                    .zip(leaf_ranges)
                    .map(|(leaf, range)| view(&values, range).view(leaf.shape.as_slice()).set_requires_grad(grad))
                    .collect()
            })
            .collect();
        FlatParams { specs, values, grads, ranges, segment_ends, leaves }
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
        self.leaves.iter().map(|s| s.iter().map(Tensor::shallow_clone).collect()).collect()
    }

    pub fn segment_leaves(&self, segment: usize) -> &[Tensor] {
        &self.leaves[segment]
    }

    /// Element range of a whole segment (with its padding) in the flat buffers.
    pub fn segment_range(&self, segment: usize) -> Range<i64> {
        self.ranges[segment][0].start..self.segment_ends[segment]
    }

    pub fn num_segments(&self) -> usize {
        self.specs.len()
    }

    /// Element ranges of the leaves that take weight decay (matrices, not norm weights).
    pub fn decay_ranges(&self) -> Vec<Range<i64>> {
        self.leaf_ranges_where(|leaf| leaf.decay)
    }

    /// Element ranges of the leaves every tensor-parallel rank holds whole (norm weights).
    pub fn replicated_ranges(&self) -> Vec<Range<i64>> {
        self.leaf_ranges_where(LeafSpec::replicated)
    }

    /// Element ranges of one segment's replicated leaves.
    pub fn segment_replicated_ranges(&self, segment: usize) -> Vec<Range<i64>> {
        let leaves = self.specs[segment].leaves.iter().zip(&self.ranges[segment]);
        leaves.filter(|(leaf, _)| leaf.replicated()).map(|(_, range)| range.clone()).collect()
    }

    /// Element ranges of the leaves that satisfy `keep`, merged where adjacent.
    fn leaf_ranges_where(&self, keep: impl Fn(&LeafSpec) -> bool) -> Vec<Range<i64>> {
        let mut merged: Vec<Range<i64>> = Vec::new();
        let leaves = self.specs.iter().flat_map(|s| &s.leaves).zip(self.ranges.iter().flatten());
        for (_, range) in leaves.filter(|(leaf, _)| keep(leaf)) {
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

    /// Draws every (global) Hugging Face tensor from the seed, one after another in model
    /// order, and keeps this rank's part: the initial weights depend on the seed and the
    /// shape only, never on the parallel layout.
    pub fn init(&mut self, seed: u64) {
        tch::manual_seed(seed as i64);
        tch::no_grad(|| {
            for (piece, mut target) in self.pieces(&self.values) {
                let options = (Kind::Float, target.device());
                let value = match piece.init {
                    Init::Ones => Tensor::ones(piece.global_shape.as_slice(), options),
                    Init::Normal(std) => Tensor::randn(piece.global_shape.as_slice(), options) * std,
                };
                target.copy_(&piece.local_part(&value));
            }
        });
    }

    /// This rank's part of every Hugging Face tensor: views of the parameter values.
    pub fn hf_values(&self) -> impl Iterator<Item = (&HfPiece, Tensor)> + '_ {
        self.pieces(&self.values)
    }

    /// This rank's part of every Hugging Face tensor's accumulated gradient.
    pub fn hf_grads(&self) -> impl Iterator<Item = (&HfPiece, Tensor)> + '_ {
        self.pieces(&self.grads)
    }

    /// Copies this rank's part of every Hugging Face tensor out of `weights` into the buffers
    /// (reading only that part); every tensor must be present with its global shape.
    pub fn load_hf(&self, weights: &HfWeights) -> Result<()> {
        for (piece, target) in self.pieces(&self.values) {
            let shape = weights.shape(&piece.name).with_context(|| format!("tensor {} is missing", piece.name))?;
            if shape != piece.global_shape.as_slice() {
                bail!("tensor {} has shape {shape:?}, the model needs {:?}", piece.name, piece.global_shape);
            }
            let mut start = vec![0; shape.len()];
            if let Some((dim, offset)) = piece.split {
                start[dim] = offset;
            }
            weights.copy_box(&piece.name, &start, &target)?;
        }
        Ok(())
    }

    /// The boxes of global tensors held by the flat elements `range` (at most three per
    /// tensor: a partial first row, whole rows, a partial last row).
    pub fn regions(&self, range: &Range<i64>) -> Vec<Region> {
        let mut regions = Vec::new();
        let leaves = self.specs.iter().flat_map(|s| &s.leaves).zip(self.ranges.iter().flatten());
        for (leaf, leaf_range) in leaves.filter(|(_, r)| r.start < range.end && range.start < r.end) {
            for piece in &leaf.pieces {
                let cols: i64 = piece.shape[1..].iter().product();
                let start = leaf_range.start + piece.row_offset * cols;
                let end = start + piece.shape.iter().product::<i64>();
                let (first, last) = (range.start.max(start) - start, range.end.min(end) - start);
                for (mut offset, shape) in element_boxes(first, last, &piece.shape) {
                    let flat_start =
                        start + offset.iter().zip(row_major_strides(&piece.shape)).map(|(o, s)| o * s).sum::<i64>();
                    if let Some((dim, split_start)) = piece.split {
                        offset[dim] += split_start;
                    }
                    regions.push(Region {
                        name: piece.name.clone(),
                        global_shape: piece.global_shape.clone(),
                        offset,
                        flat: flat_start..flat_start + shape.iter().product::<i64>(),
                        shape,
                        replicated: piece.split.is_none(),
                    });
                }
            }
        }
        regions
    }

    /// Every Hugging Face tensor with a view of the rows it occupies in `flat` (the values
    /// or the gradients).
    fn pieces<'a>(&'a self, flat: &'a Tensor) -> impl Iterator<Item = (&'a HfPiece, Tensor)> + 'a {
        self.specs.iter().zip(self.ranges.iter()).flat_map(move |(segment, ranges)| {
            segment.leaves.iter().zip(ranges).flat_map(move |(leaf, range)| {
                let data = view(flat, range).view(leaf.shape.as_slice());
                leaf.pieces.iter().map(move |piece| (piece, data.narrow(0, piece.row_offset, piece.shape[0])))
            })
        })
    }
}

fn view(flat: &Tensor, range: &Range<i64>) -> Tensor {
    flat.narrow(0, range.start, range.end - range.start)
}

fn row_major_strides(shape: &[i64]) -> Vec<i64> {
    (0..shape.len()).map(|d| shape[d + 1..].iter().product()).collect()
}

/// Boxes (offset, shape) covering the row-major elements `[first, last)` of a 1-D or 2-D
/// tensor of `shape`.
fn element_boxes(first: i64, last: i64, shape: &[i64]) -> Vec<(Vec<i64>, Vec<i64>)> {
    if first >= last {
        return Vec::new();
    }
    if shape.len() == 1 {
        return vec![(vec![first], vec![last - first])];
    }
    let cols = shape[1];
    let (mut row, col, end_row, end_col) = (first / cols, first % cols, last / cols, last % cols);
    if row == end_row {
        return vec![(vec![row, col], vec![1, end_col - col])];
    }
    let mut boxes = Vec::new();
    if col > 0 {
        boxes.push((vec![row, col], vec![1, cols - col]));
        row += 1;
    }
    if end_row > row {
        boxes.push((vec![row, 0], vec![end_row - row, cols]));
    }
    if end_col > 0 {
        boxes.push((vec![end_row, 0], vec![1, end_col]));
    }
    boxes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::model::{segment_specs, TpShard};
    use std::collections::HashMap;

    #[test]
    fn element_boxes_cover_exactly_the_range() {
        let shape = [5, 7];
        for first in 0..35 {
            for last in first..=35 {
                let mut covered = vec![false; 35];
                for (offset, size) in element_boxes(first, last, &shape) {
                    for r in offset[0]..offset[0] + size[0] {
                        for c in offset[1]..offset[1] + size[1] {
                            let i = (r * 7 + c) as usize;
                            assert!(!covered[i], "element {i} covered twice");
                            covered[i] = true;
                        }
                    }
                }
                let expected: Vec<bool> = (0..35).map(|i| i >= first && i < last).collect();
                assert_eq!(covered, expected, "[{first}, {last})");
            }
        }
    }

    #[test]
    fn regions_of_any_split_cover_every_global_element_once() {
        let config = Config::parse(include_str!("../../configs/tiny.toml"), &["model.n_layers=1".into()]).unwrap();
        let mut counts: HashMap<String, Tensor> = HashMap::new();
        for tp in 0..2 {
            let params = FlatParams::new(
                segment_specs(&config.model, TpShard { rank: tp, size: 2 }),
                Kind::Float,
                Device::Cpu,
                3,
            );
            let n = params.numel();
            for part in 0..3 {
                let range = n * part / 3..n * (part + 1) / 3;
                for region in params.regions(&range) {
                    assert!(region.flat.start >= range.start && region.flat.end <= range.end);
                    if region.replicated && tp == 1 {
                        continue;
                    }
                    let count = counts
                        .entry(region.name.clone())
                        .or_insert_with(|| Tensor::zeros(region.global_shape.as_slice(), (Kind::Float, Device::Cpu)));
                    let mut view = count.shallow_clone();
                    for (dim, (&o, &s)) in region.offset.iter().zip(&region.shape).enumerate() {
                        view = view.narrow(dim as i64, o, s);
                    }
                    let _ = view.g_add_scalar_(1.0);
                }
            }
        }
        assert_eq!(counts.len(), 12, "embedding, 5 attention and 4 MLP tensors, final norm, head");
        for (name, count) in counts {
            assert_eq!(count.min().double_value(&[]), 1.0, "{name} has an uncovered element");
            assert_eq!(count.max().double_value(&[]), 1.0, "{name} has an element covered twice");
        }
    }
}
