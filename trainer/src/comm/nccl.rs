//! The NCCL backend: collectives on CUDA tensors on their own stream, ordered with libtorch's compute stream by events; libnccl and the CUDA driver are loaded at run time (cudarc), so builds need no CUDA.
//!
//! libtorch (through tch) launches every kernel on the device's default stream, the legacy
//! null stream of the primary context. A collective asked for on the compute thread records
//! a `ready` event there; the communication thread makes the NCCL stream (non-blocking, so
//! no implicit synchronization with the null stream) wait for it, launches the collective
//! and records a `done` event, which the compute stream waits for when the handle is waited
//! on: neither stream blocks the host, and computation overlaps communication in between.
use super::{op::Op, GroupKind, ReduceOp};
use crate::cuda::{make_current, require, Event, Library, Priority, Stream};
use anyhow::{bail, Context, Result};
use cudarc::nccl::{result as nccl, sys as nccl_sys};
use tch::{Kind, Tensor};

/// The NCCL library's version, e.g. "2.28.9".
pub fn version() -> Result<String> {
    require(Library::Nccl)?;
    let code = nccl::get_nccl_version().map_err(|e| nccl_error("ncclGetVersion", e))?;
    Ok(format!("{}.{}.{}", code / 10000, code / 100 % 100, code % 100))
}

fn nccl_error(call: &str, error: nccl::NcclError) -> anyhow::Error {
    // SAFETY: ncclGetErrorString returns a static C string for any result code.
    let text = unsafe { std::ffi::CStr::from_ptr(nccl_sys::ncclGetErrorString(error.0)) };
    anyhow::anyhow!("{call} failed: {} ({:?})", text.to_string_lossy(), error.0)
}

/// One NCCL communicator.
#[derive(Debug, Clone, Copy)]
pub(super) struct NcclComm(nccl_sys::ncclComm_t);

/// The process's NCCL state: one communicator per process group, and two streams: the
/// tensor-parallel group's collectives (which every layer waits for) on one of the GPU's
/// highest priority, so that they never queue behind the data-parallel group's large
/// reductions, which share the other with the world group. Each stream runs its collectives in
/// the order they were asked for, which is the same on every rank.
#[derive(Debug)]
pub(super) struct Nccl {
    device: usize,
    tensor_stream: Stream,
    stream: Stream,
    communicators: Vec<(GroupKind, NcclComm)>,
}

impl Nccl {
    /// Sets up NCCL on `device` for the calling thread.
    pub(super) fn new(device: usize) -> Result<Nccl> {
        require(Library::Nccl)?;
        make_current(device)?;
        let (tensor_stream, stream) = (Stream::new(Priority::High)?, Stream::new(Priority::Normal)?);
        Ok(Nccl { device, tensor_stream, stream, communicators: Vec::new() })
    }

    fn stream(&self, group: GroupKind) -> &Stream {
        match group {
            GroupKind::Tensor => &self.tensor_stream,
            GroupKind::Data | GroupKind::World => &self.stream,
        }
    }

    /// The group's communicator, created on first use (a collective call on every rank of the
    /// group: rank 0 makes the unique id and `share_id` hands it to the others).
    pub(super) fn communicator(
        &mut self,
        group: GroupKind,
        rank: usize,
        size: usize,
        device: usize,
        share_id: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<NcclComm> {
        if device != self.device {
            bail!("NCCL collectives on cuda:{device}, but this rank's NCCL state is on cuda:{}", self.device);
        }
        if let Some((_, comm)) = self.communicators.iter().find(|(g, _)| *g == group) {
            return Ok(*comm);
        }
        let mut id = if rank == 0 {
            nccl::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e))?
        } else {
            nccl_sys::ncclUniqueId { internal: [0; 128] }
        };
        // SAFETY: ncclUniqueId is 128 plain bytes; the slice covers exactly them while `id` lives.
        let bytes = unsafe { std::slice::from_raw_parts_mut(id.internal.as_mut_ptr().cast::<u8>(), 128) };
        share_id(bytes).context("cannot share the NCCL unique id")?;
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL on success; the primary context of `device` is
        // current on this thread (Nccl::new), which is how NCCL picks the device.
        let comm = unsafe {
            nccl::comm_init_rank(comm.as_mut_ptr(), size as i32, id, rank as i32)
                .map_err(|e| nccl_error("ncclCommInitRank", e))?;
            NcclComm(comm.assume_init())
        };
        self.communicators.push((group, comm));
        Ok(comm)
    }

    /// Queues `op` on `group`'s communicator and stream after `ready` and returns the event
    /// that marks its end. The tensors must stay alive until that event has completed.
    pub(super) fn launch(&self, group: GroupKind, comm: NcclComm, op: &Op, ready: Option<&Event>) -> Result<Event> {
        let stream = self.stream(group);
        if let Some(ready) = ready {
            ready.block(stream)?;
        }
        let (done_on, stream) = (stream, stream.raw() as nccl_sys::cudaStream_t);
        let (comm, ptr) = (comm.0, |t: &Tensor| t.data_ptr());
        // SAFETY: the pointers are the data of contiguous CUDA tensors on this device, checked
        // by Op::check for size and dtype; the caller keeps them alive until the returned
        // event completes. NCCL only enqueues work on `stream` here.
        let result = unsafe {
            match op {
                Op::AllReduce { tensor, op } => nccl::all_reduce(
                    ptr(tensor),
                    ptr(tensor),
                    tensor.numel(),
                    datatype(tensor.kind())?,
                    reduction(*op),
                    comm,
                    stream,
                ),
                Op::ReduceScatter { input, output } => nccl::reduce_scatter(
                    ptr(input),
                    ptr(output),
                    output.numel(),
                    datatype(input.kind())?,
                    nccl_sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                ),
                Op::AllGather { input, output } => {
                    nccl::all_gather(ptr(input), ptr(output), input.numel(), datatype(input.kind())?, comm, stream)
                }
                Op::Broadcast { tensor, root } => nccl::broadcast(
                    ptr(tensor),
                    ptr(tensor),
                    tensor.numel(),
                    datatype(tensor.kind())?,
                    *root as i32,
                    comm,
                    stream,
                ),
                Op::Barrier | Op::Mpi(_) => bail!("only collectives on tensors run through NCCL"),
            }
        };
        result.map_err(|e| nccl_error(&format!("nccl {}", op.name()), e))?;
        let done = Event::new(false)?;
        done.record(done_on)?;
        Ok(done)
    }

    /// Ends every communicator at once, cancelling collectives that will never complete.
    pub(super) fn abort(&mut self) {
        for (_, comm) in self.communicators.drain(..) {
            // SAFETY: a live communicator, removed from the list so it is never used again.
            let _ = unsafe { nccl::comm_abort(comm.0) };
        }
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        for (_, comm) in self.communicators.drain(..) {
            // SAFETY: a live communicator whose collectives have completed (the communication
            // thread retires every one before it stops).
            let _ = unsafe { nccl::comm_destroy(comm.0) };
        }
    }
}

// SAFETY: the stream and communicators are used only by the thread that owns the Nccl value
// (the communication thread, or the caller of `self_test`); CUDA and NCCL allow handles to
// move between threads.
unsafe impl Send for Nccl {}

fn datatype(kind: Kind) -> Result<nccl_sys::ncclDataType_t> {
    use nccl_sys::ncclDataType_t as T;
    Ok(match kind {
        Kind::BFloat16 => T::ncclBfloat16,
        Kind::Half => T::ncclFloat16,
        Kind::Float => T::ncclFloat32,
        Kind::Double => T::ncclFloat64,
        Kind::Int64 => T::ncclInt64,
        Kind::Int => T::ncclInt32,
        other => bail!("NCCL collectives support bf16, f16, f32, f64, i32 and i64 tensors, not {other:?}"),
    })
}

fn reduction(op: ReduceOp) -> nccl_sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => nccl_sys::ncclRedOp_t::ncclSum,
        ReduceOp::Max => nccl_sys::ncclRedOp_t::ncclMax,
    }
}

/// Runs every collective through NCCL on `device` with a one-rank communicator and checks the
/// results (the GPU check's round trip; no MPI involved). As in training, the NCCL state lives
/// on a thread of its own: this thread records `ready`, that one launches and returns `done`,
/// and this thread's compute stream waits for it before reading. Returns one line per collective.
pub fn self_test(device: usize) -> Result<Vec<String>> {
    let (to_nccl, launches) = std::sync::mpsc::channel::<(Op, Event)>();
    let (to_compute, dones) = std::sync::mpsc::channel::<Result<Event>>();
    let (set_up, setup) = std::sync::mpsc::channel::<Result<()>>();
    let launcher = std::thread::spawn(move || {
        let state = Nccl::new(device).and_then(|mut nccl| {
            let comm = nccl.communicator(GroupKind::World, 0, 1, device, |_| Ok(()))?;
            Ok((nccl, comm))
        });
        let (nccl, comm) = match state {
            Ok(state) => state,
            Err(error) => {
                let _ = set_up.send(Err(error));
                return;
            }
        };
        let _ = set_up.send(Ok(()));
        // Every op (with its tensors) stays alive until the thread ends, after the last `done`.
        let mut in_flight = Vec::new();
        for (op, ready) in launches {
            let _ = to_compute.send(nccl.launch(GroupKind::World, comm, &op, Some(&ready)));
            in_flight.push(op);
        }
    });
    // No CUDA tensor before NCCL and the driver are known to be there: libtorch would panic.
    setup.recv().context("the NCCL thread stopped")??;
    let cuda = tch::Device::Cuda(device);
    let mut lines = Vec::new();
    for kind in [Kind::BFloat16, Kind::Float, Kind::Double, Kind::Int64] {
        let values = Tensor::arange(1 << 20, (Kind::Float, cuda)).to_kind(kind);
        let ops = [
            ("all_reduce", Op::AllReduce { tensor: values.copy(), op: ReduceOp::Sum }),
            ("all_reduce(max)", Op::AllReduce { tensor: values.copy(), op: ReduceOp::Max }),
            ("reduce_scatter", Op::ReduceScatter { input: values.copy(), output: values.zeros_like() }),
            ("all_gather", Op::AllGather { input: values.copy(), output: values.zeros_like() }),
            ("broadcast", Op::Broadcast { tensor: values.copy(), root: 0 }),
        ];
        for (name, op) in ops {
            op.check(1)?;
            let (_, result) = op.tensors().expect("tensor collectives");
            let result = result.shallow_clone();
            let ready = Event::on_compute_stream(device, false)?;
            to_nccl.send((op, ready)).map_err(|_| anyhow::anyhow!("the NCCL thread stopped"))?;
            let done = dones.recv().context("the NCCL thread stopped")??;
            done.block_compute_stream(device)?;
            if !result.to_kind(Kind::Double).equal(&values.to_kind(Kind::Double)) {
                bail!("NCCL {name} of {kind:?} on cuda:{device} changed the data of a one-rank group");
            }
            lines.push(format!("nccl {name} {kind:?} 1Mi elements: ok"));
        }
    }
    drop(to_nccl);
    launcher.join().map_err(|_| anyhow::anyhow!("the NCCL thread panicked"))?;
    Ok(lines)
}
