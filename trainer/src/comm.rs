//! Collective communication over process groups: the one module that talks to MPI; every collective is non-blocking and has a timeout.
//!
//! All MPI calls happen on one communication thread per process (MPI is initialized there,
//! so `MPI_THREAD_FUNNELED` suffices). The training code enqueues collectives and gets a
//! [`Pending`] handle back; the thread runs them in enqueue order (identical on every rank,
//! which is what keeps groups from deadlocking), polls each with a deadline, and reports a
//! collective that does not complete in time with the rank, group, operation and sizes.
//! Tensors stay alive inside the queued job until their collective has completed.
use anyhow::{bail, Context, Result};
use mpi::ffi;
use mpi::topology::{Color, Communicator, SimpleCommunicator};
use mpi::traits::AsRaw;
use std::os::raw::{c_int, c_void};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

/// Which process group a collective runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    /// Ranks that split each layer (one data-parallel replica).
    Tensor,
    /// Ranks holding the same tensor-parallel shard of different data.
    Data,
    /// Every rank.
    World,
}

impl GroupKind {
    fn name(self) -> &'static str {
        match self {
            GroupKind::Tensor => "tensor-parallel",
            GroupKind::Data => "data-parallel",
            GroupKind::World => "world",
        }
    }
}

/// This rank's place in one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    pub kind: GroupKind,
    pub rank: usize,
    pub size: usize,
}

/// Where this process sits: world = data x tensor, rank = dp_index * tp + tp_index, so a
/// tensor-parallel group is contiguous (one node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub tensor: Group,
    pub data: Group,
}

impl Topology {
    pub fn new(rank: usize, world: usize, local_rank: usize, tp: usize) -> Topology {
        Topology {
            rank,
            world,
            local_rank,
            tensor: Group { kind: GroupKind::Tensor, rank: rank % tp, size: tp },
            data: Group { kind: GroupKind::Data, rank: rank / tp, size: world / tp },
        }
    }
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
}

impl Op {
    fn describe(&self) -> String {
        let of = |t: &Tensor| format!("{} {:?} elements", t.numel(), t.kind());
        match self {
            Op::AllReduce { tensor, op } => format!("all_reduce({op:?}) of {}", of(tensor)),
            Op::ReduceScatter { input, .. } => format!("reduce_scatter of {}", of(input)),
            Op::AllGather { output, .. } => format!("all_gather into {}", of(output)),
            Op::Broadcast { tensor, root } => format!("broadcast from {root} of {}", of(tensor)),
            Op::Barrier => "barrier".into(),
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
        }
    }

    /// Bytes of the collective's full buffer (for reduce_scatter the input, for all_gather the output).
    fn bytes(&self) -> u64 {
        let of = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        match self {
            Op::AllReduce { tensor, .. } | Op::Broadcast { tensor, .. } => of(tensor),
            Op::ReduceScatter { input, .. } => of(input),
            Op::AllGather { output, .. } => of(output),
            Op::Barrier => 0,
        }
    }

    /// The collective on a group of one rank.
    fn run_alone(self) {
        match self {
            Op::ReduceScatter { input, mut output } | Op::AllGather { input, mut output } => output.copy_(&input),
            Op::AllReduce { .. } | Op::Broadcast { .. } | Op::Barrier => {}
        }
    }
}

struct Job {
    group: GroupKind,
    op: Op,
    done: SyncSender<Result<()>>,
}

/// A collective in flight; `wait` returns once it has completed (or failed, or timed out).
#[must_use = "a collective must be waited for before its tensors are read"]
#[derive(Debug)]
pub struct Pending(Option<Receiver<Result<()>>>);

impl Pending {
    pub fn wait(self) -> Result<()> {
        match self.0 {
            None => Ok(()),
            Some(done) => {
                let started = Instant::now();
                let result = done.recv().context("the communication thread has stopped");
                crate::metrics::record_wait(started.elapsed());
                result?
            }
        }
    }
}

/// Waits for every pending collective, returning the first failure.
pub fn wait_all(pending: impl IntoIterator<Item = Pending>) -> Result<()> {
    pending.into_iter().try_for_each(Pending::wait)
}

/// The process's collectives: process groups over MPI (CPU tensors), or a single rank.
#[derive(Debug)]
pub struct Comm {
    pub topology: Topology,
    jobs: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    observer: Arc<OnceLock<Arc<dyn CollectiveObserver>>>,
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
        Comm { topology: Topology::new(0, 1, 0, 1), jobs: None, worker: None, observer: Default::default() }
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
        let (ready, topology) = sync_channel(1);
        let worker = std::thread::Builder::new()
            .name("collectives".into())
            .spawn({
                let observer = observer.clone();
                move || mpi_worker(tp, timeout, receiver, ready, observer)
            })
            .context("cannot start the communication thread")?;
        let topology = topology.recv().context("the communication thread failed to start")??;
        Ok(Comm { topology, jobs: Some(jobs), worker: Some(worker), observer })
    }

    /// Queues a collective behind every earlier one (even on a group of one rank, whose
    /// local copy must not overtake a collective still in flight on the same buffers).
    fn submit(&self, group: GroupKind, op: Op) -> Pending {
        match &self.jobs {
            Some(jobs) => {
                let (done, receiver) = sync_channel(1);
                // A send fails only if the worker has exited after a failure, which the
                // returned handle then reports.
                let _ = jobs.send(Job { group, op, done });
                Pending(Some(receiver))
            }
            None => {
                op.run_alone();
                Pending(None)
            }
        }
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

    /// Reports every later collective to `observer` (the first observer set stays).
    pub fn observe_collectives(&self, observer: Arc<dyn CollectiveObserver>) {
        let _ = self.observer.set(observer);
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
fn mpi_worker(
    tp: usize,
    timeout: Duration,
    jobs: Receiver<Job>,
    ready: SyncSender<Result<Topology>>,
    observer: Arc<OnceLock<Arc<dyn CollectiveObserver>>>,
) {
    let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
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
    let tensor = split(rank / tp);
    let data = split(rank % tp);
    let _ = ready.send(Ok(topology));

    for job in jobs {
        let comm: &SimpleCommunicator = match job.group {
            GroupKind::Tensor => &tensor,
            GroupKind::Data => &data,
            GroupKind::World => &world,
        };
        if comm.size() == 1 {
            job.op.run_alone();
            let _ = job.done.send(Ok(()));
            continue;
        }
        let started = Instant::now();
        let result = run_mpi(comm, &job.op, timeout).with_context(|| {
            format!(
                "rank {rank} (tensor-parallel rank {}/{}, data-parallel rank {}/{}): {} in the {} group",
                topology.tensor.rank,
                topology.tensor.size,
                topology.data.rank,
                topology.data.size,
                job.op.describe(),
                job.group.name()
            )
        });
        let (elapsed, failed) = (started.elapsed(), result.is_err());
        let _ = job.done.send(result);
        if let (false, Some(observer)) = (failed, observer.get()) {
            observer.record(job.group, job.op.name(), elapsed, job.op.bytes());
        }
        if failed {
            // A collective that never completed cannot be cancelled: MPI must not be
            // finalized (it would wait for it), so leave without tearing it down.
            std::mem::forget(universe);
            return;
        }
    }
}

fn mpi_datatype(kind: Kind) -> Result<ffi::MPI_Datatype> {
    // SAFETY: reading constants that mpi-sys's C shim initializes at load time.
    Ok(unsafe {
        match kind {
            Kind::Float => ffi::RSMPI_FLOAT,
            Kind::Double => ffi::RSMPI_DOUBLE,
            Kind::Int64 => ffi::RSMPI_INT64_T,
            other => bail!("MPI collectives support float32, float64 and int64 CPU tensors, not {other:?}"),
        }
    })
}

fn count(tensor: &Tensor) -> Result<c_int> {
    if !tensor.is_contiguous() || tensor.device() != tch::Device::Cpu {
        bail!("MPI collectives need contiguous CPU tensors");
    }
    c_int::try_from(tensor.numel()).context("more than 2^31 elements in one MPI collective")
}

/// Starts one non-blocking MPI collective and polls it until it completes or `timeout` passes.
fn run_mpi(comm: &SimpleCommunicator, op: &Op, timeout: Duration) -> Result<()> {
    let raw = comm.as_raw();
    let size = comm.size();
    let mut request = std::mem::MaybeUninit::<ffi::MPI_Request>::uninit();
    // A temporary send buffer where MPI's in-place mode would be needed (its sentinel is
    // not exported by mpi-sys); kept alive until the request completes.
    let mut send_copy = None;
    // SAFETY: every pointer is the data of a live, contiguous CPU tensor of the datatype and
    // element count passed alongside (checked by `count` and `mpi_datatype`); the tensors are
    // owned by `op` (and `send_copy`), which outlive the request, polled to completion below.
    let code = unsafe {
        match op {
            Op::AllReduce { tensor, op } => {
                let copy = send_copy.insert(tensor.copy());
                let mpi_op = match op {
                    ReduceOp::Sum => ffi::RSMPI_SUM,
                    ReduceOp::Max => ffi::RSMPI_MAX,
                };
                ffi::MPI_Iallreduce(
                    copy.data_ptr() as *const c_void,
                    tensor.data_ptr(),
                    count(tensor)?,
                    mpi_datatype(tensor.kind())?,
                    mpi_op,
                    raw,
                    request.as_mut_ptr(),
                )
            }
            Op::ReduceScatter { input, output } => {
                if input.numel() != output.numel() * size as usize || input.kind() != output.kind() {
                    bail!("reduce_scatter input must be group size x output");
                }
                count(input)?;
                ffi::MPI_Ireduce_scatter_block(
                    input.data_ptr() as *const c_void,
                    output.data_ptr(),
                    count(output)?,
                    mpi_datatype(input.kind())?,
                    ffi::RSMPI_SUM,
                    raw,
                    request.as_mut_ptr(),
                )
            }
            Op::AllGather { input, output } => {
                if output.numel() != input.numel() * size as usize || input.kind() != output.kind() {
                    bail!("all_gather output must be group size x input");
                }
                count(output)?;
                let datatype = mpi_datatype(input.kind())?;
                ffi::MPI_Iallgather(
                    input.data_ptr() as *const c_void,
                    count(input)?,
                    datatype,
                    output.data_ptr(),
                    count(input)?,
                    datatype,
                    raw,
                    request.as_mut_ptr(),
                )
            }
            Op::Broadcast { tensor, root } => ffi::MPI_Ibcast(
                tensor.data_ptr(),
                count(tensor)?,
                mpi_datatype(tensor.kind())?,
                *root as c_int,
                raw,
                request.as_mut_ptr(),
            ),
            Op::Barrier => ffi::MPI_Ibarrier(raw, request.as_mut_ptr()),
        }
    };
    if code != 0 {
        bail!("MPI error code {code}");
    }
    // SAFETY: the call above returned success, so it initialized the request.
    let mut request = unsafe { request.assume_init() };
    let deadline = Instant::now() + timeout;
    let mut spins = 0u32;
    loop {
        let mut flag: c_int = 0;
        // SAFETY: `request` is the live request started above; MPI_Test frees it on completion.
        let code = unsafe { ffi::MPI_Test(&mut request, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
        if code != 0 {
            bail!("MPI error code {code} while waiting");
        }
        if flag != 0 {
            drop(send_copy);
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {:.1}s (parallel.collective_timeout_s): a peer rank has died, hangs or runs another operation",
                timeout.as_secs_f64()
            );
        }
        spins += 1;
        if spins > 100 {
            std::thread::sleep(Duration::from_micros(50));
        } else {
            std::thread::yield_now();
        }
    }
}
