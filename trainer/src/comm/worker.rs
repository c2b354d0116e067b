//! The communication thread that runs the queued collectives in order, and the watchdog that ends a rank blocked in one past its deadline.
use super::op::{context, timed_out, Op, Summary};
use super::{mpi, nccl, receive_soon, write_error_line, CollectiveObserver, Failure};
use crate::cuda::Event;
use crate::topology::{GroupKind, Topology};
use ::mpi::topology::{Color, Communicator, SimpleCommunicator};
use anyhow::{bail, Context, Result};
use launcher::protocol;
use std::collections::VecDeque;
use std::os::raw::c_int;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tch::Device;

pub(super) struct Job {
    pub(super) group: GroupKind,
    pub(super) op: Op,
    /// For a CUDA collective: recorded on the compute stream when the collective was asked
    /// for, so that it starts after the kernels that produced its input.
    pub(super) ready: Option<Event>,
    pub(super) done: SyncSender<Result<Completion>>,
}

/// What a collective's handle learns from the communication thread.
pub(super) enum Completion {
    /// The collective has completed.
    Finished,
    /// The collective is queued on the GPU; the compute stream must wait for `event`.
    OnGpu { event: Arc<Event>, device: usize },
}

/// The communication thread: initializes MPI, splits the groups, then runs jobs in order.
pub(super) fn communication_thread(
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
    let topology = Topology::new(rank, size, protocol::local_rank().unwrap_or(0), tp);
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
