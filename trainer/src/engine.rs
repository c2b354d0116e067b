//! Segment-by-segment forward and backward with the tensor-parallel collectives between segments: the trainer, not autograd, drives the backward pass.
//!
//! tch has no custom autograd functions or tensor hooks, so every place where a collective
//! or a schedule decision must sit between two parts of the graph is a segment boundary:
//! each segment runs from a detached leaf input, the residual stream is added outside the
//! graph, and the backward pass walks the segments last to first, handing each one the
//! gradient of its output (`(out * grad_out).sum()` backpropagated gives the exact
//! vector-Jacobian product). Under tensor parallelism a segment's output is this rank's
//! partial sum (all-reduced in the forward pass, Megatron's g) and its input gradient is
//! partial too (all-reduced in the backward pass, Megatron's f). The same schedule gives
//! activation recomputation (keep only a segment's input, rerun its forward in backward)
//! and lets data-parallel reduction of a segment's gradients start as soon as they are final.
use crate::comm::{Comm, GroupKind, ReduceOp};
use crate::config::ModelConfig;
use crate::data::Batch;
use crate::kv_cache::KvCache;
use crate::model::{Documents, Llama, SegmentKind, TpShard};
use crate::params::FlatParams;
use crate::timing::{lap, Phase};
use anyhow::Result;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// What the forward pass keeps of one residual branch for its backward.
enum Saved {
    /// The branch's input leaf and output, with its graph.
    Graph { input: Tensor, output: Tensor },
    /// Only the branch's input; the graph is rebuilt in the backward pass.
    Input(Tensor),
}

#[derive(Debug)]
pub struct Engine {
    pub model: Llama,
    pub params: FlatParams,
    comm: Arc<Comm>,
    kinds: Vec<SegmentKind>,
    recompute: bool,
}

impl Engine {
    pub fn new(params: FlatParams, model_config: &ModelConfig, comm: Arc<Comm>, recompute: bool) -> Engine {
        let kinds = params.specs().iter().map(|s| s.kind).collect();
        let tensor = comm.topology.tensor;
        let tp = TpShard { rank: tensor.rank as i64, size: tensor.size as i64 };
        let model = Llama::new(model_config, tp, params.leaves());
        Engine { model, params, comm, kinds, recompute }
    }

    pub fn comm(&self) -> &Arc<Comm> {
        &self.comm
    }

    /// Forward and backward of one micro-batch: [batch, seq + 1] token ids, and for packed
    /// fine-tuning data the trained targets and the documents' positions. The loss is the sum
    /// of the trained targets' cross-entropies divided by `loss_denominator` (the trained
    /// targets of the whole step, over every data-parallel rank, so gradients of micro-batches
    /// add up to the step's mean whatever the layout and micro-batching). Gradients
    /// are added to the flat gradient buffer; `grads_final(segment)` is called as soon as a
    /// segment's backward is done, when `Some` (on the step's last micro-batch). Returns
    /// this micro-batch's share of the loss, a scalar on the device (read nothing back here:
    /// on CUDA that would stall the host until the GPU has caught up).
    pub fn forward_backward(
        &self,
        batch: &Batch,
        loss_denominator: f64,
        mut grads_final: Option<&mut dyn FnMut(usize)>,
    ) -> Result<Tensor> {
        let tokens = &batch.tokens;
        let seq = tokens.size()[1] - 1;
        let (input, targets) = (tokens.narrow(1, 0, seq), tokens.narrow(1, 1, seq));
        let last = self.kinds.len() - 1;
        let documents = batch.packing.as_ref().map(|p| Documents::new(&p.positions));
        let branch = |segment: usize, input: &Tensor| self.branch(segment, input, documents.as_ref());

        let embedded = self.model.segment_forward(0, SegmentKind::Embedding, &input);
        let mut stream = self.tp_sum(&embedded)?;
        let mut saved = Vec::with_capacity(last);
        for segment in 1..last {
            let input = stream.detach().set_requires_grad(true);
            let output = branch(segment, &input);
            stream = &stream + self.tp_sum(&output)?;
            saved.push(if self.recompute { Saved::Input(input) } else { Saved::Graph { input, output } });
        }
        let head_input = stream.set_requires_grad(true);
        let logits = self.model.segment_forward(last, SegmentKind::Head, &head_input);
        let loss = self.trained_loss_sum(batch, &logits, &targets)? / loss_denominator;
        lap(Phase::Forward);

        let mut notify = |segment: usize| {
            if let Some(f) = grads_final.as_mut() {
                f(segment)
            }
        };
        let mut grad = self.backward_segment(last, &loss, Some(&head_input))?.expect("head input grad");
        notify(last);
        for (segment, saved) in saved.into_iter().enumerate().rev().map(|(i, s)| (i + 1, s)) {
            let (input, output) = match saved {
                Saved::Graph { input, output } => (input, output),
                Saved::Input(input) => {
                    let output = branch(segment, &input);
                    (input, output)
                }
            };
            let input_grad = self.backward_segment(segment, &(output * &grad).sum(None), Some(&input))?;
            grad += input_grad.expect("branch input grad");
            notify(segment);
        }
        self.backward_segment(0, &(embedded * grad).sum(None), None)?;
        notify(0);
        lap(Phase::Backward);
        Ok(loss.detach())
    }

    /// Backpropagates the scalar `objective` into `segment`'s parameter gradients and
    /// returns the gradient of its input leaf, if it has one, summed over the
    /// tensor-parallel group. A tied head's gradient for the embedding matrix goes into the
    /// embedding's segment (reduced last, after the embedding's own backward has added to it).
    fn backward_segment(&self, segment: usize, objective: &Tensor, input: Option<&Tensor>) -> Result<Option<Tensor>> {
        let leaves = self.params.segment_leaves(segment);
        let tied_head = self.kinds[segment] == SegmentKind::Head && self.model.config().tie_word_embeddings;
        let mut wrt: Vec<&Tensor> = leaves.iter().collect();
        wrt.extend(tied_head.then(|| self.model.head_weight()));
        wrt.extend(input);
        let mut grads = Tensor::run_backward(&[objective], &wrt, false, false);
        let input_grad = input.map(|_| grads.pop().expect("one grad per input"));
        if tied_head {
            let embedding_grad = grads.pop().expect("one grad for the tied head");
            self.params.accumulate_grads(0, &[embedding_grad]);
        }
        self.params.accumulate_grads(segment, &grads);
        input_grad.map(|g| self.tp_sum(&g)).transpose()
    }

    /// The sum of a partial result over the tensor-parallel group (outside any graph).
    fn tp_sum(&self, partial: &Tensor) -> Result<Tensor> {
        if self.comm.topology.tensor.size == 1 {
            return Ok(partial.detach());
        }
        let total = partial.detach().copy();
        self.comm.all_reduce(GroupKind::Tensor, &total, ReduceOp::Sum).wait()?;
        Ok(total)
    }

    /// Sum of the trained targets' cross-entropies (all, or those of the batch's mask),
    /// differentiable with respect to this rank's logits.
    fn trained_loss_sum(&self, batch: &Batch, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let losses = self.token_losses(logits, targets)?;
        Ok(match &batch.packing {
            Some(packing) => (losses * &packing.target_mask).sum(None),
            None => losses.sum(None),
        })
    }

    /// The cross-entropy of each token, [batch, seq], differentiable with respect to this
    /// rank's logits. Under tensor parallelism each rank holds a slice of the vocabulary and the
    /// logits are never gathered: the max, the sum of exponentials and the target logit are
    /// reduced over the group, entering the graph as `local + (global - local).detach()` so
    /// the gradient flows into the local logits exactly.
    pub fn token_losses(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        if self.comm.topology.tensor.size == 1 {
            return Ok(Llama::token_losses(logits, targets));
        }
        let logits = if logits.kind() == Kind::BFloat16 { logits.to_kind(Kind::Float) } else { logits.shallow_clone() };
        let (start, size) = self.model.vocab_slice();
        let max = logits.detach().amax([-1], true);
        self.comm.all_reduce(GroupKind::Tensor, &max, ReduceOp::Max).wait()?;
        let shifted = &logits - max;
        let local_sum_exp = shifted.exp().sum_dim_intlist([-1i64].as_slice(), false, None);
        let local_targets = targets - start;
        let outside = local_targets.lt(0).logical_or(&local_targets.ge(size));
        let target_logit = shifted
            .gather(-1, &local_targets.masked_fill(&outside, 0).unsqueeze(-1), false)
            .squeeze_dim(-1)
            .masked_fill(&outside, 0.0);
        let sum_exp = self.with_tp_total(&local_sum_exp)?;
        let target_logit = self.with_tp_total(&target_logit)?;
        Ok(sum_exp.log() - target_logit)
    }

    /// `local` with the value of its sum over the tensor-parallel group and the gradient of `local`.
    fn with_tp_total(&self, local: &Tensor) -> Result<Tensor> {
        let total = self.tp_sum(local)?;
        Ok(local + (total - local.detach()))
    }

    /// This rank's logits (its vocabulary slice under tensor parallelism) for `tokens`
    /// [batch, seq], without building a graph.
    pub fn logits(&self, tokens: &Tensor) -> Result<Tensor> {
        self.logits_within(tokens, None)
    }

    /// Residual branch `segment` of `input`, attending only within `documents` when given.
    fn branch(&self, segment: usize, input: &Tensor, documents: Option<&Documents>) -> Tensor {
        match documents {
            Some(documents) => self.model.segment_forward_packed(segment, self.kinds[segment], input, documents),
            None => self.model.segment_forward(segment, self.kinds[segment], input),
        }
    }

    /// [`Engine::logits`], attending only within `documents` when given (packed windows).
    fn logits_within(&self, tokens: &Tensor, documents: Option<&Documents>) -> Result<Tensor> {
        tch::no_grad(|| {
            let last = self.kinds.len() - 1;
            let mut stream = self.tp_sum(&self.model.segment_forward(0, SegmentKind::Embedding, tokens))?;
            for segment in 1..last {
                stream = &stream + self.tp_sum(&self.branch(segment, &stream, documents))?;
            }
            Ok(self.model.segment_forward(last, SegmentKind::Head, &stream))
        })
    }

    /// An empty key/value cache for `slots` sequences of up to `capacity` tokens (this rank's KV heads).
    pub fn new_cache(&self, slots: usize, capacity: i64) -> Result<KvCache> {
        self.model.new_cache(slots, capacity)
    }

    /// One decoding step: `tokens` [rows, n] are the next `n` tokens of the sequences in cache
    /// slots `slots` (one row each); only they are computed, against the cached keys and values
    /// of the sequences' earlier tokens, and they join the cache. Returns this rank's logits
    /// (its vocabulary slice) of each row's last token, [rows, vocab slice], without a graph.
    pub fn forward_cached(&self, cache: &mut KvCache, slots: &[usize], tokens: &Tensor) -> Result<Tensor> {
        let n = tokens.size()[1];
        let step = cache.step(slots, n)?;
        let logits = tch::no_grad(|| {
            let last = self.kinds.len() - 1;
            let mut stream = self.tp_sum(&self.model.segment_forward(0, SegmentKind::Embedding, tokens))?;
            for (segment, &kind) in self.kinds.iter().enumerate().take(last).skip(1) {
                let output = self.model.segment_forward_cached(segment, kind, &stream, cache, &step);
                stream = &stream + self.tp_sum(&output)?;
            }
            let logits = self.model.segment_forward(last, SegmentKind::Head, &stream.narrow(1, n - 1, 1));
            anyhow::Ok(logits.squeeze_dim(1))
        })?;
        cache.commit(&step);
        Ok(logits)
    }

    /// Logits over the whole vocabulary (gathered over the tensor-parallel group).
    pub fn full_logits(&self, tokens: &Tensor) -> Result<Tensor> {
        let local = self.logits(tokens)?;
        self.gather_tp(&local, local.dim() - 1)
    }

    /// Concatenates every tensor-parallel rank's `local` along `dim`, in rank order.
    pub fn gather_tp(&self, local: &Tensor, dim: usize) -> Result<Tensor> {
        let tp = self.comm.topology.tensor.size as i64;
        if tp == 1 {
            return Ok(local.shallow_clone());
        }
        let moved = local.movedim(dim as i64, 0).contiguous();
        let mut size = moved.size();
        size[0] *= tp;
        let gathered = Tensor::empty(size.as_slice(), (moved.kind(), moved.device()));
        self.comm.all_gather(GroupKind::Tensor, &moved, &gathered).wait()?;
        Ok(gathered.movedim(0, dim as i64))
    }

    /// Every parameter as a whole (global) CPU tensor under its Hugging Face name, gathered over
    /// the tensor-parallel group. Every rank of the group must call it.
    pub fn hf_weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.params
            .hf_values()
            .map(|(piece, local)| {
                let whole = match piece.split {
                    None => local,
                    Some((dim, _)) => self.gather_tp(&local, dim)?,
                };
                Ok((piece.name.clone(), whole.to_device(Device::Cpu).contiguous()))
            })
            .collect()
    }

    /// Sum of the trained targets' cross-entropies of `batch`, without a graph.
    pub fn eval_loss_sum(&self, batch: &Batch) -> Result<f64> {
        let seq = batch.tokens.size()[1] - 1;
        let documents = batch.packing.as_ref().map(|p| Documents::new(&p.positions));
        let logits = self.logits_within(&batch.tokens.narrow(1, 0, seq), documents.as_ref())?;
        let targets = batch.tokens.narrow(1, 1, seq);
        tch::no_grad(|| Ok(self.trained_loss_sum(batch, &logits, &targets)?.double_value(&[])))
    }
}
