//! Collective communication over process groups: the one module that talks to MPI and NCCL; every collective is non-blocking and has a timeout.
//!
//! The training code enqueues collectives and gets a [`Pending`] handle back. One
//! communication thread per process runs them in enqueue order (identical on every rank,
//! which is what keeps groups from deadlocking): CPU tensors through blocking MPI calls
//! ([`mpi`], initialized on that thread, so `MPI_THREAD_FUNNELED` suffices), CUDA tensors
//! through NCCL ([`nccl`], one communicator per group, created on first use from a unique id
//! broadcast over MPI), queued on the GPU without blocking the thread: tensor-parallel
//! collectives, which every layer waits for, on a stream of the GPU's highest priority, so they
//! never queue behind data-parallel reductions, which have a stream of their own. Tensors stay
//! alive inside the queued job until their collective has completed.
//!
//! Every collective has a deadline (`parallel.collective_timeout_s`). A watchdog thread ends
//! the process when the communication thread has been blocked in one MPI call past it; a
//! CUDA collective past it aborts the NCCL communicators and fails the next wait. Either way
//! the message names the rank, group, operation and sizes.
mod mpi;
mod nccl;
mod op;
mod worker;

use op::Op;
use worker::{communication_thread, Completion, Job};

pub use mpi::raw as raw_mpi;
pub use nccl::{self_test as nccl_self_test, version as nccl_version};

use crate::config::InvalidConfig;
use crate::cuda::Event;
use crate::timing;
pub use crate::topology::{Group, GroupKind, Topology};
use ::mpi::topology::SimpleCommunicator;
use anyhow::{bail, Context, Result};
use launcher::protocol;
use std::io::Write;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

/// The first failure of the communication thread, for every handle that asks afterwards.
pub(super) type Failure = Arc<OnceLock<String>>;

/// A collective in flight; `wait` returns once its result may be used: completed (CPU) or
/// ordered before every later kernel of the compute stream (CUDA); or failed, or timed out.
#[must_use = "a collective must be waited for before its tensors are read or written"]
#[derive(Debug)]
pub struct Pending(Option<(Receiver<Result<Completion>>, Failure, GroupKind)>);

impl Pending {
    pub fn wait(self) -> Result<()> {
        let Some((done, failure, group)) = self.0 else { return Ok(()) };
        let started = Instant::now();
        let completion = match receive_soon(&done) {
            Ok(completion) => completion?,
            Err(_) => bail!("{}", failure.get().map_or("the communication thread has stopped", String::as_str)),
        };
        match completion {
            Completion::OnGpu { event, device } => {
                timing::gpu_wait(group, device, || event.block_compute_stream(device))
            }
            Completion::Finished => {
                timing::record_wait(group, started.elapsed());
                Ok(())
            }
        }
    }
}

/// Receives from `channel`, first polling for a moment (a collective or job often arrives within
/// microseconds, and waking a blocked thread costs more than that), then blocking.
pub(super) fn receive_soon<T>(channel: &Receiver<T>) -> std::result::Result<T, std::sync::mpsc::RecvError> {
    const POLL: Duration = Duration::from_micros(50);
    let started = Instant::now();
    while started.elapsed() < POLL {
        match channel.try_recv() {
            Ok(value) => return Ok(value),
            Err(std::sync::mpsc::TryRecvError::Empty) => std::thread::yield_now(),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
        }
    }
    channel.recv()
}

/// Waits for every pending collective, returning the first failure.
pub fn wait_all(pending: impl IntoIterator<Item = Pending>) -> Result<()> {
    pending.into_iter().try_for_each(Pending::wait)
}

/// The process's collectives: process groups over MPI and NCCL, or a single rank.
#[derive(Debug)]
pub struct Comm {
    pub topology: Topology,
    jobs: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    observer: Arc<OnceLock<Arc<dyn CollectiveObserver>>>,
    failure: Failure,
}

/// Told about every completed multi-rank collective, on the communication thread (metrics).
pub trait CollectiveObserver: Send + Sync + std::fmt::Debug {
    fn record(&self, group: GroupKind, operation: &'static str, elapsed: Duration, bytes: u64);
}

impl Comm {
    /// A single-rank job: every collective is local.
    pub fn single() -> Comm {
        Comm {
            topology: Topology::new(0, 1, 0, 1),
            jobs: None,
            worker: None,
            observer: Default::default(),
            failure: Default::default(),
        }
    }

    /// Joins the MPI job this process belongs to (or runs alone when not launched by MPI),
    /// with tensor-parallel degree `tp` and a `timeout` on every collective.
    pub fn init(tp: usize, timeout: Duration) -> Result<Comm> {
        if !protocol::started_by_mpi() {
            if tp != 1 {
                bail!(
                    "parallel.tensor = {tp} needs {tp} or more ranks: start the trainer with `launcher run --nproc N`"
                );
            }
            return Ok(Comm::single());
        }
        let (jobs, receiver) = channel::<Job>();
        let observer = Arc::new(OnceLock::new());
        let failure = Failure::default();
        let (ready, topology) = sync_channel(1);
        let worker = std::thread::Builder::new()
            .name("collectives".into())
            .spawn({
                let (observer, failure) = (observer.clone(), failure.clone());
                move || communication_thread(tp, timeout, receiver, ready, observer, failure)
            })
            .context("cannot start the communication thread")?;
        let topology = topology.recv().context("the communication thread failed to start")??;
        Ok(Comm { topology, jobs: Some(jobs), worker: Some(worker), observer, failure })
    }

    /// Queues a collective behind every earlier one (even on a group of one rank, whose
    /// local copy must not overtake a collective still in flight on the same buffers).
    fn submit(&self, group: GroupKind, op: Op) -> Pending {
        let Some(jobs) = &self.jobs else {
            op.run_alone();
            return Pending(None);
        };
        let (done, receiver) = sync_channel(1);
        let ready = match op.device() {
            Some(Device::Cuda(device)) => match Event::on_compute_stream(device, false) {
                Ok(event) => Some(event),
                Err(error) => {
                    let _ = done.send(Err(error));
                    return Pending(Some((receiver, self.failure.clone(), group)));
                }
            },
            _ => None,
        };
        // A send fails only if the worker has exited after a failure, which the returned
        // handle then reports.
        let _ = jobs.send(Job { group, op, ready, done });
        Pending(Some((receiver, self.failure.clone(), group)))
    }

    /// In place: `tensor` becomes the reduction of every rank's `tensor` over the group.
    pub fn all_reduce(&self, group: GroupKind, tensor: &Tensor, op: ReduceOp) -> Pending {
        self.submit(group, Op::AllReduce { tensor: tensor.shallow_clone(), op })
    }

    /// `output` (numel = input numel / group size) receives this rank's part of the summed `input`.
    pub fn reduce_scatter(&self, group: GroupKind, input: &Tensor, output: &Tensor) -> Pending {
        self.submit(group, Op::ReduceScatter { input: input.shallow_clone(), output: output.shallow_clone() })
    }

    /// `output` (numel = input numel x group size) receives every rank's `input` in rank order.
    pub fn all_gather(&self, group: GroupKind, input: &Tensor, output: &Tensor) -> Pending {
        self.submit(group, Op::AllGather { input: input.shallow_clone(), output: output.shallow_clone() })
    }

    pub fn broadcast(&self, group: GroupKind, tensor: &Tensor, root: usize) -> Pending {
        self.submit(group, Op::Broadcast { tensor: tensor.shallow_clone(), root })
    }

    /// `root`'s `bytes` (ignored on the other ranks) to every rank of the group, through two
    /// CPU broadcasts (the length, then the bytes); blocks until they have arrived.
    pub fn broadcast_bytes(&self, group: GroupKind, bytes: &[u8], root: usize) -> Result<Vec<u8>> {
        let length = Tensor::from_slice(&[bytes.len() as i64]);
        self.broadcast(group, &length, root).wait()?;
        let length = usize::try_from(length.int64_value(&[0])).context("a negative broadcast length")?;
        let buffer = match bytes.len() == length {
            true => Tensor::from_slice(bytes),
            false => Tensor::zeros([length as i64], (tch::Kind::Uint8, Device::Cpu)),
        };
        self.broadcast(group, &buffer, root).wait()?;
        Ok(Vec::<u8>::try_from(&buffer)?)
    }

    pub fn barrier(&self, group: GroupKind) -> Pending {
        self.submit(group, Op::Barrier)
    }

    /// Runs `calls` with the group's MPI communicator on the communication thread, in order
    /// with the collectives (benchmarks compare raw MPI against the collectives through it).
    pub fn with_mpi<R: Send + 'static>(
        &self,
        group: GroupKind,
        calls: impl FnOnce(&SimpleCommunicator) -> R + Send + 'static,
    ) -> Result<R> {
        if self.jobs.is_none() {
            bail!("direct MPI calls need a job started by mpirun");
        }
        let (result, receiver) = sync_channel(1);
        let op = Op::Mpi(Box::new(move |comm: &SimpleCommunicator| {
            let _ = result.send(calls(comm));
        }));
        self.submit(group, op).wait()?;
        receiver.recv().context("the direct MPI calls did not finish")
    }

    /// Reports every later collective to `observer` (the first observer set stays).
    pub fn observe_collectives(&self, observer: Arc<dyn CollectiveObserver>) {
        let _ = self.observer.set(observer);
    }

    /// Ends the whole job after an error on this rank: writes `error: ...` (one write, so that
    /// the line arrives whole) and, in a job of several ranks, aborts them all at once; the
    /// others would otherwise wait for this rank at their next collective until its timeout,
    /// and this one in MPI_Finalize for them. Returns (the error) only for a single rank.
    pub fn end_job_on_error(&self, error: anyhow::Error) -> anyhow::Error {
        if self.jobs.is_none() {
            return error;
        }
        write_error_line(format_args!("{error:#}"));
        mpi::abort_job(exit_status_of(&error).into())
    }

    /// Sum of a scalar over the group.
    pub fn sum_scalar(&self, group: GroupKind, value: f64) -> Result<f64> {
        let tensor = Tensor::from(value);
        self.all_reduce(group, &tensor, ReduceOp::Sum).wait()?;
        Ok(tensor.double_value(&[]))
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// The exit status of a process that ends with `error`: `INVALID_CONFIG` when the configuration
/// is invalid (a restart cannot fix it), else 1 (the launcher may restart the job). Through
/// `MPI_Abort` it becomes mpirun's status, so the launcher decides on statuses alone.
pub fn exit_status_of(error: &anyhow::Error) -> u8 {
    if InvalidConfig::is_cause_of(error) {
        protocol::INVALID_CONFIG
    } else {
        1
    }
}

/// Writes `error: MESSAGE` as one line in one write (after flushing stdout), so that mpirun's
/// output tagging and a reader of the log see it whole.
pub fn write_error_line(message: impl std::fmt::Display) {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().write_all(format!("error: {message}\n").as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn zeros(n: i64, kind: Kind) -> Tensor {
        Tensor::zeros([n], (kind, Device::Cpu))
    }

    #[test]
    fn collectives_check_sizes_dtypes_and_layout_before_any_backend_sees_them() {
        let scatter = |input: Tensor, output: Tensor| Op::ReduceScatter { input, output };
        let gather = |input: Tensor, output: Tensor| Op::AllGather { input, output };
        assert!(scatter(zeros(8, Kind::Float), zeros(4, Kind::Float)).check(2).is_ok());
        assert!(gather(zeros(4, Kind::Float), zeros(8, Kind::Float)).check(2).is_ok());
        let cases = [
            (scatter(zeros(8, Kind::Float), zeros(3, Kind::Float)), "reduce_scatter input must hold group size (2)"),
            (gather(zeros(4, Kind::Float), zeros(4, Kind::Float)), "all_gather output must hold group size (2)"),
            (scatter(zeros(8, Kind::BFloat16), zeros(4, Kind::Float)), "must share device and dtype"),
            (
                Op::AllReduce { tensor: zeros(8, Kind::Float).view([4, 2]).transpose(0, 1), op: ReduceOp::Sum },
                "contiguous",
            ),
        ];
        for (op, expected) in cases {
            let error = op.check(2).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
    }

    #[test]
    fn a_single_rank_runs_collectives_locally_and_refuses_direct_mpi() {
        let comm = Comm::single();
        let (input, output) = (Tensor::arange(6, (Kind::Float, Device::Cpu)), zeros(6, Kind::Float));
        comm.all_gather(GroupKind::World, &input, &output).wait().unwrap();
        assert!(output.equal(&input));
        let error = comm.with_mpi(GroupKind::World, |_| ()).unwrap_err().to_string();
        assert!(error.contains("need a job started by mpirun"), "{error}");
    }
}
