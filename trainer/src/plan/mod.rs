//! `trainer plan`: the memory one rank needs to train a model under a parallel layout, term by term, from the buffers and saved tensors the code allocates.
//!
//! Persistent terms follow `params.rs` (flat values in the compute dtype, flat gradients in the
//! master dtype, segments padded to the data-parallel degree under ZeRO) and `zero.rs`/`optim.rs`
//! (the ZeRO shard's weights and gradients, or a master copy of bf16 weights without ZeRO, and
//! AdamW's buffers). Step terms follow `engine.rs`: what the forward pass keeps of one
//! micro-batch (each segment's input leaf, and without recomputation its whole graph: the
//! tensors libtorch's autograd saves, counted op by op below), the logits and the
//! cross-entropy's tensors, and what the backward pass of a segment allocates on top. The peak
//! is the highest of the backward pass's stages (the head, the last MLP branch, the last
//! attention branch) and the optimizer step. `trainer/tests/plan.rs` holds the prediction of the
//! tensors' peak to 10% of the peak a CPU run measures (`memory.rs`).
use crate::config::{Config, InvalidConfig, TrainDevice};
use crate::model::{segment_specs, TpShard};
use crate::params::{master_kind, FlatLayout};
use anyhow::{Context, Result};
use tch::Kind;

mod text;
pub use text::{group_thousands, report, search};

/// How the job's ranks divide the work, and what one rank processes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub tensor: i64,
    pub data: i64,
    pub zero: bool,
    pub recompute: bool,
    pub micro_batch: i64,
}

impl Layout {
    /// The layout `config` trains with on `world` ranks, refused as training refuses it.
    pub fn of(config: &Config, world: i64) -> Result<Layout> {
        config.for_world(world).context(InvalidConfig(format!("for {world} ranks")))?;
        Ok(Layout {
            tensor: config.parallel.tensor,
            data: config.data_parallel(world),
            zero: config.parallel.zero,
            recompute: config.train.recompute,
            micro_batch: config.train.micro_batch,
        })
    }
}

/// Where the rank computes. libtorch's CPU and CUDA kernels save different tensors for RMSNorm,
/// and only a GPU has memory outside the allocator (CUDA context, libraries, NCCL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Cpu,
    Cuda,
}

impl Target {
    pub fn of(config: &Config) -> Target {
        if config.train.device == TrainDevice::Cpu {
            Target::Cpu
        } else {
            Target::Cuda
        }
    }
}

/// The allocator's rounding and fragmentation (CUDA's caching allocator, glibc's heap on CPU) as
/// a share of the tensors' peak: an estimate, not measured.
pub const ALLOCATOR_SLACK: f64 = 0.10;

/// A CUDA process's memory outside the caching allocator, NCCL aside: the context and the
/// kernels of libtorch, cuBLAS and flash attention (0.75 GiB measured on an H200, torch 2.11
/// with CUDA 13, after GEMMs, attention and RMSNorm had run).
pub const CUDA_RUNTIME_BYTES: u64 = 768 << 20;

/// NCCL's buffers for one communicator (one per process group larger than one rank: the
/// tensor and the data group), allocated by NCCL outside the caching allocator: channels x
/// peers x protocol buffers. An estimate, not measured (NCCL needs two GPUs; NVLink SHARP,
/// `NCCL_NVLS_ENABLE`, can take more).
pub const NCCL_COMMUNICATOR_BYTES: u64 = 512 << 20;

/// MKL's packing buffers while a CPU GEMM runs, per thread: about 5 MiB whatever the shape
/// (measured from 2048x256x344 to 4096x4096x1376, f32 and bf16).
pub const MKL_GEMM_WORKSPACE_PER_THREAD: u64 = 5 << 20;

/// AdamW as `optim.rs` implements it (libtorch's fused kernel), over `elements` elements of
/// `master` bytes: the state it keeps (exp_avg, exp_avg_sq) and the temporary its step
/// allocates (none: the kernel updates in place).
fn adamw(elements: u64, master: u64) -> (u64, u64) {
    (2 * elements * master, 0)
}

/// The stage of the backward pass with the most memory in use, and what is in use then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackwardPeak {
    pub stage: &'static str,
    /// Kept by the forward pass for the backward pass: segment inputs, residual stream, saved
    /// tensors of the graphs.
    pub activations: u64,
    /// The logits and what the cross-entropy keeps of them.
    pub logits: u64,
    /// Allocated by the backward pass of the stage: gradients of activations and of the
    /// segment's parameters.
    pub transient: u64,
}

impl BackwardPeak {
    pub fn total(&self) -> u64 {
        self.activations + self.logits + self.transient
    }
}

/// One rank's memory, term by term, in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Elements of this rank's flat buffers (its part of the model, segments padded).
    pub flat_numel: u64,
    pub weights: u64,
    pub gradients: u64,
    /// ZeRO: the reduce-scatter target of this rank's gradient chunks.
    pub gradient_shard: u64,
    pub master_weights: u64,
    pub optimizer_state: u64,
    pub backward: BackwardPeak,
    pub optimizer_step: u64,
    pub communication: u64,
    pub runtime: u64,
}

impl Plan {
    /// Buffers that live for the whole run.
    pub fn persistent(&self) -> u64 {
        self.weights + self.gradients + self.gradient_shard + self.master_weights + self.optimizer_state
    }

    /// The peak of the tensors the allocator holds: the persistent buffers and the larger of the
    /// backward pass's peak and the optimizer step's temporaries.
    pub fn tensors(&self) -> u64 {
        self.persistent() + self.backward.total().max(self.optimizer_step)
    }

    pub fn slack(&self) -> u64 {
        (self.tensors() as f64 * ALLOCATOR_SLACK) as u64
    }

    /// Everything the rank's process needs on its device.
    pub fn total(&self) -> u64 {
        self.tensors() + self.slack() + self.communication + self.runtime
    }
}

/// The sizes one micro-batch's tensors are made of on one rank, and their element sizes.
#[derive(Debug, Clone, Copy)]
struct Dims {
    tokens: u64,
    dim: u64,
    /// This rank's attention heads and query, key/value and FFN widths, and vocabulary slice.
    heads: u64,
    q: u64,
    kv: u64,
    ffn: u64,
    vocab: u64,
    /// Bytes of an element in the compute dtype, and in the dtype the cross-entropy and
    /// RMSNorm compute in (bf16 is upcast to f32).
    compute: u64,
    upcast: u64,
    /// Allocated by the BLAS while a GEMM runs (MKL on CPU; cuBLAS's workspace is allocated once).
    gemm_workspace: u64,
    target: Target,
    tensor_parallel: bool,
}

impl Dims {
    fn new(config: &Config, layout: &Layout, target: Target) -> Dims {
        let (m, tp) = (&config.model, layout.tensor as u64);
        let kind = config.train.dtype.kind();
        let compute = kind.elt_size_in_bytes() as u64;
        Dims {
            tokens: (layout.micro_batch * config.train.seq_len) as u64,
            dim: m.dim as u64,
            heads: m.n_heads as u64 / tp,
            q: (m.n_heads * m.head_dim()) as u64 / tp,
            kv: (m.kv_heads() * m.head_dim()) as u64 / tp,
            ffn: m.ffn_dim as u64 / tp,
            vocab: m.vocab_size as u64 / tp,
            compute,
            upcast: if kind == Kind::BFloat16 { 4 } else { compute },
            gemm_workspace: match target {
                Target::Cpu => MKL_GEMM_WORKSPACE_PER_THREAD * cpu_threads(config),
                Target::Cuda => 0,
            },
            target,
            tensor_parallel: tp > 1,
        }
    }

    /// Bytes of a [tokens, width] tensor in the compute dtype.
    fn act(&self, width: u64) -> u64 {
        self.tokens * width * self.compute
    }

    /// One residual-stream tensor (a segment's input or output).
    fn stream(&self) -> u64 {
        self.act(self.dim)
    }

    /// What RMSNorm saves besides its input. CPU (composite): the input upcast to f32 (bf16
    /// only), the normalized input and the f32 rstd per token, plus its output, which the
    /// following linear saves. CUDA (fused kernel): the rstd and the output.
    fn norm_saved(&self) -> u64 {
        let rstd = self.tokens * 4;
        let composite = match self.target {
            Target::Cpu if self.upcast != self.compute => 2 * self.tokens * self.dim * self.upcast,
            Target::Cpu => self.tokens * self.dim * self.upcast,
            Target::Cuda => 0,
        };
        composite + rstd + self.stream()
    }

    /// Autograd's saved tensors of an attention branch: the norm's, the fused q/k/v projection
    /// (kept whole by v, a view of it), q and k after the rotary embedding, the attention's
    /// output (saved by it and by the output projection) and its f32 log-sum-exp per head.
    fn attention_saved(&self) -> u64 {
        let (q, kv) = (self.q, self.kv);
        self.norm_saved() + self.act((q + 2 * kv) + q + kv + q) + self.tokens * self.heads * 4
    }

    /// Autograd's saved tensors of an MLP branch: the norm's, the fused gate/up projection
    /// (silu and the product save views of it), silu's output and the product fed to `down`.
    fn mlp_saved(&self) -> u64 {
        self.norm_saved() + self.act(2 * self.ffn + self.ffn + self.ffn)
    }

    /// The logits of this rank's vocabulary slice (kept by `forward_backward` until it returns).
    fn logits(&self) -> u64 {
        self.act(self.vocab)
    }

    /// What the cross-entropy saves, in the upcast dtype: log_softmax's output (one rank), or the
    /// shifted logits and their exponentials (vocabulary-parallel).
    fn loss_saved(&self) -> u64 {
        let copies = if self.tensor_parallel { 2 } else { 1 };
        copies * self.tokens * self.vocab * self.upcast
    }

    /// The cross-entropy's backward at its peak: two logit-sized gradients (nll_loss's and
    /// log_softmax's, or gather's zeros and scatter_add's).
    fn loss_backward(&self) -> u64 {
        2 * self.tokens * self.vocab * self.upcast
    }

    /// The head's linear backward (GEMMs): the logits' gradient (and its bf16 copy), the head
    /// weight's gradient and the gradient of its input.
    fn head_linear_backward(&self) -> u64 {
        let copy = if self.upcast != self.compute { self.logits() } else { 0 };
        let gradients = self.tokens * self.vocab * self.upcast + copy + self.vocab * self.dim * self.compute;
        gradients + self.stream() + self.gemm_workspace
    }

    /// An attention branch's backward at its peak: the output projection's weight gradient,
    /// then the larger of (gradient of the branch output + of the attention output, during a
    /// GEMM) and (gradient of the attention output + the gradients of q, k and v, during the
    /// attention's backward).
    fn attention_backward(&self) -> u64 {
        let (d, q, kv) = (self.dim, self.q, self.kv);
        let projection = self.act(d + q) + self.gemm_workspace;
        d * q * self.compute + projection.max(self.act(2 * q + 2 * kv) + self.attention_backward_workspace())
    }

    /// What the attention's backward kernel allocates for itself. CUDA (flash attention): an
    /// f32 accumulator for dq and, with grouped-query attention, dk and dv for every query head
    /// before they are summed per group (measured on an H200). CPU: its GEMMs' workspace.
    fn attention_backward_workspace(&self) -> u64 {
        match self.target {
            Target::Cuda => {
                let expanded = if self.kv < self.q { 2 * self.act(self.q) } else { 0 };
                self.tokens * self.q * 4 + expanded
            }
            Target::Cpu => self.gemm_workspace,
        }
    }

    /// An MLP branch's backward at its peak: `down`'s weight gradient, then the larger of
    /// (gradient of the branch output + of the product, during a GEMM) and (gradients of silu's
    /// output and of `up`'s).
    fn mlp_backward(&self) -> u64 {
        let (d, f) = (self.dim, self.ffn);
        d * f * self.compute + (self.act(d + f) + self.gemm_workspace).max(self.act(2 * f))
    }
}

/// libtorch's intra-op threads of a CPU run: `train.threads`, or libtorch's default here.
fn cpu_threads(config: &Config) -> u64 {
    match config.train.threads {
        0 => tch::get_num_threads() as u64,
        threads => threads as u64,
    }
}

/// The highest stage of the backward pass of one micro-batch. The forward pass keeps every
/// segment's input (one residual-stream tensor each; the embedding's output is the first one
/// except under tensor parallelism, where the first is its all-reduced copy; the head's input
/// is the last) and, without recomputation, each branch's graph and output. The backward pass
/// frees a branch's tensors once it is done, so after the head the largest stages are the last
/// MLP branch and the last attention branch; with recomputation their graphs are rebuilt there.
/// Each also holds the gradient of the residual stream and the objective `output * grad`
/// (which replaces the output).
fn backward_peak(d: &Dims, layers: u64, recompute: bool) -> BackwardPeak {
    let streams = 2 * layers + if d.tensor_parallel { 2 } else { 1 };
    let (attention, mlp) = (d.attention_saved() + d.stream(), d.mlp_saved() + d.stream());
    let graphs = if recompute { 0 } else { layers * (attention + mlp) };
    let kept = streams * d.stream() + graphs;
    let head = BackwardPeak {
        stage: "head",
        activations: kept + d.norm_saved(),
        logits: d.logits() + d.loss_saved(),
        transient: d.loss_backward().max(d.head_linear_backward().saturating_sub(d.loss_saved())),
    };
    let (last_mlp, last_attention) = match recompute {
        false => (kept, kept - d.stream() - mlp),
        true => (kept + mlp, kept - d.stream() + attention),
    };
    let mlp_stage = BackwardPeak {
        stage: "last MLP branch",
        activations: last_mlp,
        logits: d.logits(),
        transient: d.stream() + d.mlp_backward(),
    };
    let attention_stage = BackwardPeak {
        stage: "last attention branch",
        activations: last_attention,
        logits: d.logits(),
        transient: d.stream() + d.attention_backward(),
    };
    [head, mlp_stage, attention_stage].into_iter().max_by_key(BackwardPeak::total).expect("three stages")
}

/// The memory of one rank of `config`'s model trained under `layout` on `target`.
pub fn plan(config: &Config, layout: Layout, target: Target) -> Plan {
    let tp = TpShard { rank: 0, size: layout.tensor };
    let segment_multiple = if layout.zero { layout.data } else { 1 };
    let flat = FlatLayout::new(&segment_specs(&config.model, tp), segment_multiple);
    let numel = *flat.segment_ends.last().expect("a model has segments") as u64;
    let kind = config.train.dtype.kind();
    let (compute, master) = (kind.elt_size_in_bytes() as u64, master_kind(kind).elt_size_in_bytes() as u64);
    // Under ZeRO the optimizer updates a shard (a master-dtype copy of this rank's chunks, even
    // when the parameters are f32); without it the flat buffer itself, or a master copy of bf16.
    let optimized = if layout.zero { numel / layout.data as u64 } else { numel };
    let master_weights = match (layout.zero, compute == master) {
        (true, _) => optimized * master,
        (false, true) => 0,
        (false, false) => numel * master,
    };
    let (optimizer_state, optimizer_step) = adamw(optimized, master);
    let dims = Dims::new(config, &layout, target);
    let communicators = u64::from(layout.tensor > 1) + u64::from(layout.data > 1);
    let (communication, runtime) = match target {
        Target::Cuda => (communicators * NCCL_COMMUNICATOR_BYTES, CUDA_RUNTIME_BYTES),
        Target::Cpu => (0, 0),
    };
    Plan {
        flat_numel: numel,
        weights: numel * compute,
        gradients: numel * master,
        gradient_shard: if layout.zero { optimized * master } else { 0 },
        master_weights,
        optimizer_state,
        backward: backward_peak(&dims, config.model.n_layers as u64, layout.recompute),
        optimizer_step,
        communication,
        runtime,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(text: &str, overrides: &[&str]) -> Config {
        Config::parse(text, &overrides.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn recomputation_keeps_only_segment_inputs() {
        let config = preset(include_str!("../../../configs/llama-7b.toml"), &[]);
        let layout = Layout::of(&config, 8).unwrap();
        let [off, on] = [false, true].map(|recompute| plan(&config, Layout { recompute, ..layout }, Target::Cuda));
        assert_eq!(off.persistent(), on.persistent());
        // Tensor parallel: the embedding's output, the 64 branches' inputs (the first is the
        // embedding's all-reduced copy) and the head's, 4096 tokens x 4096 in bf16 each, and what
        // the head's fused RMSNorm saves (its output and an f32 rstd per token).
        let stream = 4096 * 4096 * 2;
        assert_eq!(on.backward.stage, "head");
        assert_eq!(on.backward.activations, 66 * stream + stream + 4096 * 4);
        assert!(off.backward.activations > 3 * on.backward.activations);
    }
}
