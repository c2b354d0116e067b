//! The values every rank needs after a step (loss, gradient norm, stop and save flags), summed over the world in one all-reduce and read to the host in the step's one synchronization.
//!
//! On CUDA a read of a device value blocks the host until the GPU has run everything queued
//! before it, and the GPU idles while the host queues the next kernels. So nothing inside a
//! step reads back: the loss accumulates on the device, the gradient norm feeds clipping and
//! the skip decision on the device, and the host learns the step's numbers once, at its end,
//! from [`StepScalars::read`]. Host synchronizations are counted (libtorch's own count on
//! CUDA, the reads made here elsewhere), and every step reports its count.
use crate::comm::{Comm, GroupKind, ReduceOp};
use crate::torch_ext;
use anyhow::Result;
use std::sync::atomic::{AtomicU64, Ordering};
use tch::{Device, Kind, Tensor};

static HOST_READS: AtomicU64 = AtomicU64::new(0);

/// Every rank's values summed over the world, on the device.
#[derive(Debug)]
pub struct StepScalars {
    sums: Tensor,
    values: usize,
}

/// A step's scalars on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct StepTotals {
    /// The sums of the values, in the order given.
    pub sums: Vec<f64>,
    /// Whether any rank raised each flag, in the order given.
    pub flags: Vec<bool>,
}

impl StepScalars {
    /// Sums `values` (device scalars, each rank's share of a total) and counts `flags` over
    /// every rank, in one all-reduce, without a host synchronization.
    pub fn reduce(comm: &Comm, values: &[Tensor], flags: &[bool]) -> Result<StepScalars> {
        let first = values.first().expect("at least one value");
        let sums = Tensor::zeros([(values.len() + flags.len()) as i64], (first.kind(), first.device()));
        tch::no_grad(|| {
            for (i, value) in values.iter().enumerate() {
                sums.narrow(0, i as i64, 1).copy_(&value.reshape([1]));
            }
            for (i, _) in flags.iter().enumerate().filter(|(_, raised)| **raised) {
                let _ = sums.narrow(0, (values.len() + i) as i64, 1).fill_(1.0);
            }
        });
        comm.all_reduce(GroupKind::World, &sums, ReduceOp::Sum).wait()?;
        Ok(StepScalars { sums, values: values.len() })
    }

    /// The sum of value `index`, still on the device (for the optimizer to use before the read).
    pub fn sum(&self, index: usize) -> Tensor {
        assert!(index < self.values, "value {index} of {}", self.values);
        self.sums.get(index as i64)
    }

    /// Copies the sums to the host: the step's one synchronization.
    pub fn read(&self) -> Result<StepTotals> {
        HOST_READS.fetch_add(1, Ordering::Relaxed);
        let host = Vec::<f64>::try_from(self.sums.to_kind(Kind::Double).to_device(Device::Cpu))?;
        let (sums, flags) = host.split_at(self.values);
        Ok(StepTotals { sums: sums.to_vec(), flags: flags.iter().map(|&count| count > 0.0).collect() })
    }
}

/// Counts the host synchronizations of a stretch of training.
#[derive(Debug, Clone, Copy)]
pub struct SyncCounter {
    cuda: bool,
    start: u64,
}

impl SyncCounter {
    /// Starts counting for a training thread on `device`: on CUDA, every synchronizing call
    /// libtorch makes on this thread (its sync debug mode); elsewhere, where nothing
    /// synchronizes, the device reads this module makes.
    pub fn start(device: Device) -> Result<SyncCounter> {
        let cuda = device.is_cuda() && torch_ext::has_cuda();
        if cuda {
            torch_ext::count_cuda_syncs()?;
        }
        Ok(SyncCounter { cuda, start: 0 }.restart())
    }

    fn now(&self) -> u64 {
        if self.cuda {
            torch_ext::cuda_syncs()
        } else {
            HOST_READS.load(Ordering::Relaxed)
        }
    }

    /// A counter from now on.
    pub fn restart(self) -> SyncCounter {
        SyncCounter { start: self.now(), ..self }
    }

    /// Synchronizations since the (re)start.
    pub fn count(&self) -> u64 {
        self.now() - self.start
    }
}
