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

pub use mpi::raw as raw_mpi;
pub use nccl::{self_test as nccl_self_test, version as nccl_version};

use crate::cuda::Event;
use crate::timing;
pub use crate::topology::{Group, GroupKind, Topology};
use ::mpi::topology::{Color, Communicator, SimpleCommunicator};
use anyhow::{bail, Context, Result};
use std::collections::VecDeque;
use std::io::Write;
use std::os::raw::c_int;
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

/// One collective, holding (shallow handles to) the tensors it reads and writes.
enum Op {
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
enum Summary {
    AllReduce(ReduceOp, Buffer),
    ReduceScatter(Buffer),
    AllGather(Buffer),
    Broadcast(usize, Buffer),
    Barrier,
    Mpi,
}

/// The elements, dtype and device of a collective's buffer.
#[derive(Debug, Clone, Copy)]
struct Buffer(usize, tch::Kind, Device);

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
fn context(topology: Topology, group: GroupKind, summary: Summary) -> String {
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
fn timed_out(context: &str, timeout: Duration) -> String {
    format!(
        "{context}: timed out after {:.1}s (parallel.collective_timeout_s): a peer rank has died, hangs or runs \
         another operation",
        timeout.as_secs_f64()
    )
}

impl Op {
    fn summary(&self) -> Summary {
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
    fn name(&self) -> &'static str {
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
    fn bytes(&self) -> u64 {
        let of = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        match self {
            Op::AllReduce { tensor, .. } | Op::Broadcast { tensor, .. } => of(tensor),
            Op::ReduceScatter { input, .. } => of(input),
            Op::AllGather { output, .. } => of(output),
            Op::Barrier | Op::Mpi(_) => 0,
        }
    }

    /// The tensors a collective reads and writes (the same one twice when in place).
    fn tensors(&self) -> Option<(&Tensor, &Tensor)> {
        match self {
            Op::AllReduce { tensor, .. } | Op::Broadcast { tensor, .. } => Some((tensor, tensor)),
            Op::ReduceScatter { input, output } | Op::AllGather { input, output } => Some((input, output)),
            Op::Barrier | Op::Mpi(_) => None,
        }
    }

    /// The device of the collective's tensors (`None` for a collective without tensors).
    fn device(&self) -> Option<Device> {
        self.tensors().map(|(input, _)| input.device())
    }

    /// Checks that the tensors are contiguous, share device and dtype, and are sized for a
    /// group of `size` ranks.
    fn check(&self, size: usize) -> Result<()> {
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
    fn run_alone(self) {
        match self {
            Op::ReduceScatter { input, mut output } | Op::AllGather { input, mut output } => output.copy_(&input),
            Op::AllReduce { .. } | Op::Broadcast { .. } | Op::Barrier | Op::Mpi(_) => {}
        }
    }
}

struct Job {
    group: GroupKind,
    op: Op,
    /// For a CUDA collective: recorded on the compute stream when the collective was asked
    /// for, so that it starts after the kernels that produced its input.
    ready: Option<Event>,
    done: SyncSender<Result<Completion>>,
}

/// What a collective's handle learns from the communication thread.
enum Completion {
    /// The collective has completed.
    Finished,
    /// The collective is queued on the GPU; the compute stream must wait for `event`.
    OnGpu { event: Arc<Event>, device: usize },
}

/// The first failure of the communication thread, for every handle that asks afterwards.
type Failure = Arc<OnceLock<String>>;

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
fn receive_soon<T>(channel: &Receiver<T>) -> std::result::Result<T, std::sync::mpsc::RecvError> {
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

/// True when this process was started by `mpirun`/`srun` as one of several ranks.
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK"].iter().any(|v| std::env::var_os(v).is_some())
}

/// The node-local rank from the launcher's environment (OpenMPI, then Slurm).
fn local_rank_from_env() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(0)
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
        if !launched_by_mpi() {
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
        mpi::abort_job(1)
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

/// The communication thread: initializes MPI, splits the groups, then runs jobs in order.
fn communication_thread(
    tp: usize,
    timeout: Duration,
    jobs: Receiver<Job>,
    ready: SyncSender<Result<Topology>>,
    observer: Arc<OnceLock<Arc<dyn CollectiveObserver>>>,
    failure: Failure,
) {
    let Some((universe, _)) = ::mpi::initialize_with_threading(::mpi::Threading::Funneled) else {
        let _ = ready.send(Err(anyhow::anyhow!("MPI could not be initialized")));
        return;
    };
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    if size % tp != 0 {
        let _ = ready.send(Err(anyhow::anyhow!("world size {size} is not divisible by parallel.tensor = {tp}")));
        return;
    }
    let topology = Topology::new(rank, size, local_rank_from_env(), tp);
    let split = |color: usize| world.split_by_color(Color::with_value(color as c_int)).expect("every rank has a color");
    let (tensor, data) = (split(rank / tp), split(rank % tp));
    let _ = ready.send(Ok(topology));
    let busy = Arc::new(Busy::default());
    let watched = Arc::downgrade(&busy);
    let watch = move || watchdog(watched, topology, timeout);
    if let Err(error) = std::thread::Builder::new().name("watchdog".into()).spawn(watch) {
        let _ = failure.set(format!("cannot start the collectives' watchdog: {error}"));
        return;
    }
    let mut worker = Worker {
        topology,
        timeout,
        busy,
        groups: [tensor, data, world],
        nccl: None,
        in_flight: VecDeque::new(),
        observer,
    };
    if let Err(error) = worker.run(&jobs) {
        // Set before `jobs` goes, so that every handle still queued reports this failure.
        let _ = failure.set(format!("{error:#}"));
        if let Some(nccl) = worker.nccl.as_mut() {
            nccl.abort();
        }
        // A collective that never completed cannot be cancelled: MPI must not be finalized
        // (it would wait for it), so leave without tearing it down.
        std::mem::forget(worker);
        std::mem::forget(universe);
    }
    drop(jobs);
}

/// A CUDA collective queued on an NCCL stream, kept (with its tensors) until it completes.
struct InFlight {
    group: GroupKind,
    op: Op,
    done: Arc<Event>,
    launched: Instant,
}

/// What the communication thread is blocked in, and since when (read by the watchdog).
#[derive(Default)]
struct Busy(Mutex<Option<(Instant, GroupKind, Summary)>>);

/// Writes `error: MESSAGE` as one line in one write (after flushing stdout), so that mpirun's
/// output tagging and the launcher, which recognises `error: invalid config`, see it whole.
pub fn write_error_line(message: impl std::fmt::Display) {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().write_all(format!("error: {message}\n").as_bytes());
}

/// Ends the process when the communication thread has been blocked in one call for longer
/// than `timeout` (a blocking MPI call cannot be cancelled); stops with the thread.
fn watchdog(busy: Weak<Busy>, topology: Topology, timeout: Duration) {
    let tick = (timeout / 20).clamp(Duration::from_millis(10), Duration::from_secs(1));
    while let Some(busy) = busy.upgrade() {
        if let Some((since, group, summary)) = *busy.0.lock().unwrap_or_else(|e| e.into_inner()) {
            if since.elapsed() > timeout {
                write_error_line(timed_out(&context(topology, group, summary), timeout));
                // SAFETY: _exit takes an integer and ends the process without running atexit
                // handlers, which could block on the MPI call that never returns.
                unsafe { libc::_exit(1) };
            }
        }
        drop(busy);
        std::thread::sleep(tick);
    }
}

struct Worker {
    topology: Topology,
    timeout: Duration,
    busy: Arc<Busy>,
    /// MPI communicators of the tensor-parallel, data-parallel and world groups (indexed by [`GroupKind`]).
    groups: [SimpleCommunicator; 3],
    nccl: Option<nccl::Nccl>,
    in_flight: VecDeque<InFlight>,
    observer: Arc<OnceLock<Arc<dyn CollectiveObserver>>>,
}

impl Worker {
    /// Runs jobs until the sender is gone (then waits for the GPU's last collectives), or a
    /// collective fails or times out.
    fn run(&mut self, jobs: &Receiver<Job>) -> Result<()> {
        loop {
            self.retire_completed()?;
            let job = if self.in_flight.is_empty() {
                match receive_soon(jobs) {
                    Ok(job) => job,
                    Err(_) => return Ok(()),
                }
            } else {
                match jobs.recv_timeout(Duration::from_micros(100)) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        while !self.in_flight.is_empty() {
                            self.retire_completed()?;
                            std::thread::sleep(Duration::from_micros(100));
                        }
                        return Ok(());
                    }
                }
            };
            let (group, summary, done) = (job.group, job.op.summary(), job.done.clone());
            *self.busy.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), group, summary));
            let result = self.execute(job).with_context(|| context(self.topology, group, summary));
            *self.busy.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
            match result {
                Ok(completion) => {
                    let _ = done.send(Ok(completion));
                }
                Err(error) => {
                    let _ = done.send(Err(anyhow::anyhow!("{error:#}")));
                    return Err(error);
                }
            }
        }
    }

    /// Runs a CPU collective to completion, or queues a CUDA one on the NCCL stream.
    fn execute(&mut self, job: Job) -> Result<Completion> {
        let Job { group, op, ready, .. } = job;
        let comm = &self.groups[group as usize];
        if let Op::Mpi(calls) = op {
            calls(comm);
            return Ok(Completion::Finished);
        }
        let size = comm.size() as usize;
        op.check(size)?;
        if size == 1 {
            op.run_alone();
            return Ok(Completion::Finished);
        }
        match op.device() {
            Some(Device::Cuda(device)) => {
                let nccl = match &mut self.nccl {
                    Some(nccl) => nccl,
                    None => self.nccl.insert(nccl::Nccl::new(device)?),
                };
                let nccl_comm =
                    nccl.communicator(group, comm.rank() as usize, size, device, |id| mpi::broadcast_bytes(comm, id))?;
                let done = Arc::new(nccl.launch(group, nccl_comm, &op, ready.as_ref())?);
                self.in_flight.push_back(InFlight { group, op, done: done.clone(), launched: Instant::now() });
                Ok(Completion::OnGpu { event: done, device })
            }
            _ => {
                let started = Instant::now();
                mpi::run(comm, &op)?;
                self.observe(group, &op, started.elapsed());
                Ok(Completion::Finished)
            }
        }
    }

    /// Drops the tensors of CUDA collectives that have completed (the two NCCL streams finish
    /// in their own orders); fails on one past its deadline.
    fn retire_completed(&mut self) -> Result<()> {
        let mut index = 0;
        while let Some(job) = self.in_flight.get(index) {
            if job.done.completed()? {
                let finished = self.in_flight.remove(index).expect("the job exists");
                self.observe(finished.group, &finished.op, finished.launched.elapsed());
            } else if job.launched.elapsed() > self.timeout {
                bail!(timed_out(&context(self.topology, job.group, job.op.summary()), self.timeout));
            } else {
                index += 1;
            }
        }
        Ok(())
    }

    fn observe(&self, group: GroupKind, op: &Op, elapsed: Duration) {
        if let Some(observer) = self.observer.get() {
            observer.record(group, op.name(), elapsed, op.bytes());
        }
    }
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
