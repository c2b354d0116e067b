//! What a collective is: its operation and tensors, how it runs over MPI or NCCL, and how its failures are described.
use super::ReduceOp;
use crate::topology::{GroupKind, Topology};
use ::mpi::topology::SimpleCommunicator;
use anyhow::{bail, Result};
use std::time::Duration;
use tch::{Device, Tensor};

/// One collective, holding (shallow handles to) the tensors it reads and writes.
pub(super) enum Op {
    AllReduce {
        tensor: Tensor,
        op: ReduceOp,
    },
    /// `input` is split into `size` equal parts; part `rank`, summed over the group, lands in `output`.
    ReduceScatter {
        input: Tensor,
        output: Tensor,
    },
    /// Every rank's `input` is concatenated, in rank order, into `output`.
    AllGather {
        input: Tensor,
        output: Tensor,
    },
    Broadcast {
        tensor: Tensor,
        root: usize,
    },
    Barrier,
    /// The caller's own calls on the group's MPI communicator (benchmarks against raw MPI).
    Mpi(Box<dyn FnOnce(&SimpleCommunicator) + Send>),
}

/// A collective in plain values, kept while it runs so that a failure or timeout can be
/// described (the text is only formatted then, never on the way of a collective).
#[derive(Debug, Clone, Copy)]
pub(super) enum Summary {
    AllReduce(ReduceOp, Buffer),
    ReduceScatter(Buffer),
    AllGather(Buffer),
    Broadcast(usize, Buffer),
    Barrier,
    Mpi,
}

/// The elements, dtype and device of a collective's buffer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Buffer(usize, tch::Kind, Device);

impl Buffer {
    fn of(tensor: &Tensor) -> Buffer {
        Buffer(tensor.numel(), tensor.kind(), tensor.device())
    }
}

impl std::fmt::Display for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?} elements on {:?}", self.0, self.1, self.2)
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Summary::AllReduce(op, buffer) => write!(f, "all_reduce({op:?}) of {buffer}"),
            Summary::ReduceScatter(buffer) => write!(f, "reduce_scatter of {buffer}"),
            Summary::AllGather(buffer) => write!(f, "all_gather into {buffer}"),
            Summary::Broadcast(root, buffer) => write!(f, "broadcast from {root} of {buffer}"),
            Summary::Barrier => write!(f, "barrier"),
            Summary::Mpi => write!(f, "direct MPI calls"),
        }
    }
}

/// Who failed where: the rank's place, the collective and its group.
pub(super) fn context(topology: Topology, group: GroupKind, summary: Summary) -> String {
    let t = topology;
    format!(
        "rank {} (tensor-parallel rank {}/{}, data-parallel rank {}/{}): {summary} in the {} group",
        t.rank,
        t.tensor.rank,
        t.tensor.size,
        t.data.rank,
        t.data.size,
        group.name()
    )
}

/// The message of a collective that has not completed within `timeout`.
pub(super) fn timed_out(context: &str, timeout: Duration) -> String {
    format!(
        "{context}: timed out after {:.1}s (parallel.collective_timeout_s): a peer rank has died, hangs or runs \
         another operation",
        timeout.as_secs_f64()
    )
}

impl Op {
    pub(super) fn summary(&self) -> Summary {
        match self {
            Op::AllReduce { tensor, op } => Summary::AllReduce(*op, Buffer::of(tensor)),
            Op::ReduceScatter { input, .. } => Summary::ReduceScatter(Buffer::of(input)),
            Op::AllGather { output, .. } => Summary::AllGather(Buffer::of(output)),
            Op::Broadcast { tensor, root } => Summary::Broadcast(*root, Buffer::of(tensor)),
            Op::Barrier => Summary::Barrier,
            Op::Mpi(_) => Summary::Mpi,
        }
    }

    /// The operation's label in metrics.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Op::AllReduce { .. } => "all_reduce",
            Op::ReduceScatter { .. } => "reduce_scatter",
            Op::AllGather { .. } => "all_gather",
            Op::Broadcast { .. } => "broadcast",
            Op::Barrier => "barrier",
            Op::Mpi(_) => "mpi",
        }
    }

    /// Bytes of the collective's full buffer (for reduce_scatter the input, for all_gather the output).
    pub(super) fn bytes(&self) -> u64 {
        let of = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        match self {
            Op::AllReduce { tensor, .. } | Op::Broadcast { tensor, .. } => of(tensor),
            Op::ReduceScatter { input, .. } => of(input),
            Op::AllGather { output, .. } => of(output),
            Op::Barrier | Op::Mpi(_) => 0,
        }
    }

    /// The tensors a collective reads and writes (the same one twice when in place).
    pub(super) fn tensors(&self) -> Option<(&Tensor, &Tensor)> {
        match self {
            Op::AllReduce { tensor, .. } | Op::Broadcast { tensor, .. } => Some((tensor, tensor)),
            Op::ReduceScatter { input, output } | Op::AllGather { input, output } => Some((input, output)),
            Op::Barrier | Op::Mpi(_) => None,
        }
    }

    /// The device of the collective's tensors (`None` for a collective without tensors).
    pub(super) fn device(&self) -> Option<Device> {
        self.tensors().map(|(input, _)| input.device())
    }

    /// Checks that the tensors are contiguous, share device and dtype, and are sized for a
    /// group of `size` ranks.
    pub(super) fn check(&self, size: usize) -> Result<()> {
        let Some((input, output)) = self.tensors() else { return Ok(()) };
        match self {
            Op::ReduceScatter { .. } if input.numel() != output.numel() * size => {
                bail!("reduce_scatter input must hold group size ({size}) x output elements")
            }
            Op::AllGather { .. } if output.numel() != input.numel() * size => {
                bail!("all_gather output must hold group size ({size}) x input elements")
            }
            _ => {}
        }
        if input.device() != output.device() || input.kind() != output.kind() {
            bail!("a collective's input and output must share device and dtype");
        }
        if !input.is_contiguous() || !output.is_contiguous() {
            bail!("collectives need contiguous tensors");
        }
        Ok(())
    }

    /// The collective on a group of one rank.
    pub(super) fn run_alone(self) {
        match self {
            Op::ReduceScatter { input, mut output } | Op::AllGather { input, mut output } => output.copy_(&input),
            Op::AllReduce { .. } | Op::Broadcast { .. } | Op::Barrier | Op::Mpi(_) => {}
        }
    }
}
