//! Segment-by-segment forward and backward: the trainer, not autograd, drives the backward pass.
//!
//! tch has no custom autograd functions or tensor hooks, so every place where a collective
//! or a schedule decision must sit between two parts of the graph is a segment boundary:
//! each segment runs from a detached leaf input, the residual stream is added outside the
//! graph, and the backward pass walks the segments last to first, handing each one the
//! gradient of its output (`(out * grad_out).sum()` backpropagated gives the exact
//! vector-Jacobian product). The same schedule gives activation recomputation: drop a
//! segment's graph after its forward and rerun the forward in the backward pass.
use crate::model::{Llama, SegmentKind};
use crate::params::FlatParams;
use tch::Tensor;

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
    kinds: Vec<SegmentKind>,
    recompute: bool,
}

impl Engine {
    pub fn new(params: FlatParams, model_config: &crate::config::ModelConfig, recompute: bool) -> Engine {
        let kinds = params.specs().iter().map(|s| s.kind).collect();
        let model = Llama::new(model_config, params.leaves());
        Engine {
            model,
            params,
            kinds,
            recompute,
        }
    }

    /// Forward and backward of one micro-batch. `tokens`: [batch, seq + 1] ids; the loss is
    /// the sum of token cross-entropies divided by `loss_denominator` (the token count of
    /// the whole step, so gradients of micro-batches add up to the step's mean). Gradients
    /// are added to the flat gradient buffer. Returns this micro-batch's share of the loss.
    pub fn forward_backward(&self, tokens: &Tensor, loss_denominator: f64) -> f64 {
        let seq = tokens.size()[1] - 1;
        let (input, targets) = (tokens.narrow(1, 0, seq), tokens.narrow(1, 1, seq));
        let last = self.kinds.len() - 1;

        let embedded = self.model.segment_forward(0, SegmentKind::Embedding, &input);
        let mut stream = embedded.detach();
        let mut saved = Vec::with_capacity(last);
        for (segment, &kind) in self.kinds.iter().enumerate().take(last).skip(1) {
            let input = stream.detach().set_requires_grad(true);
            let output = self.model.segment_forward(segment, kind, &input);
            stream = &stream + output.detach();
            saved.push(if self.recompute {
                Saved::Input(input)
            } else {
                Saved::Graph { input, output }
            });
        }
        let head_input = stream.set_requires_grad(true);
        let logits = self.model.segment_forward(last, SegmentKind::Head, &head_input);
        let loss = Llama::loss_sum(&logits, &targets) / loss_denominator;

        let mut grad = self
            .backward_segment(last, &loss, Some(&head_input))
            .expect("head input grad");
        for (segment, saved) in saved.into_iter().enumerate().rev().map(|(i, s)| (i + 1, s)) {
            let (input, output) = match saved {
                Saved::Graph { input, output } => (input, output),
                Saved::Input(input) => {
                    let output = self.model.segment_forward(segment, self.kinds[segment], &input);
                    (input, output)
                }
            };
            let input_grad = self.backward_segment(segment, &(output * &grad).sum(None), Some(&input));
            grad = grad + input_grad.expect("branch input grad");
        }
        self.backward_segment(0, &(embedded * grad).sum(None), None);
        loss.double_value(&[])
    }

    /// Backpropagates the scalar `objective` into `segment`'s parameter gradients and
    /// returns the gradient of its input leaf, if it has one.
    fn backward_segment(&self, segment: usize, objective: &Tensor, input: Option<&Tensor>) -> Option<Tensor> {
        let leaves = self.params.segment_leaves(segment);
        let mut wrt: Vec<&Tensor> = leaves.iter().collect();
        wrt.extend(input);
        let mut grads = Tensor::run_backward(&[objective], &wrt, false, false);
        let input_grad = input.map(|_| grads.pop().expect("one grad per input"));
        self.params.accumulate_grads(segment, &grads);
        input_grad
    }

    /// Logits for `tokens` [batch, seq] without building a graph.
    pub fn logits(&self, tokens: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let last = self.kinds.len() - 1;
            let mut stream = self.model.segment_forward(0, SegmentKind::Embedding, tokens);
            for (segment, &kind) in self.kinds.iter().enumerate().take(last).skip(1) {
                stream = &stream + self.model.segment_forward(segment, kind, &stream);
            }
            self.model.segment_forward(last, SegmentKind::Head, &stream)
        })
    }

    /// Mean token cross-entropy of `tokens` [batch, seq + 1] without building a graph.
    pub fn eval_loss_sum(&self, tokens: &Tensor) -> f64 {
        let seq = tokens.size()[1] - 1;
        let logits = self.logits(&tokens.narrow(1, 0, seq));
        tch::no_grad(|| Llama::loss_sum(&logits, &tokens.narrow(1, 1, seq)).double_value(&[]))
    }
}
