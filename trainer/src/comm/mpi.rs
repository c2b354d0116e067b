//! The MPI backend: collectives on CPU tensors as blocking MPI calls on the communication thread.
use super::{op::Op, ReduceOp};
use anyhow::{bail, Context, Result};
use mpi::ffi;
use mpi::topology::SimpleCommunicator;
use mpi::traits::AsRaw;
use std::os::raw::{c_int, c_void};
use tch::{Device, Kind, Tensor};

/// Open MPI's `MPI_IN_PLACE` (`((void *) 1)` in its mpi.h; mpi-sys does not export the sentinel).
const OPEN_MPI_IN_PLACE: *const c_void = std::ptr::without_provenance(1);

/// How an in-place all-reduce passes its send buffer.
#[derive(Debug, Clone, Copy)]
enum InPlace {
    /// The library is Open MPI, whose sentinel value is known.
    Sentinel,
    /// Another MPI: send from a temporary copy.
    Copy,
}

impl InPlace {
    fn detect() -> InPlace {
        static DETECTED: std::sync::OnceLock<InPlace> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| match mpi::environment::library_version() {
            Ok(version) if version.contains("Open MPI") => InPlace::Sentinel,
            _ => InPlace::Copy,
        })
    }
}

fn datatype(kind: Kind) -> Result<ffi::MPI_Datatype> {
    // SAFETY: reading constants that mpi-sys's C shim initializes at load time.
    Ok(unsafe {
        match kind {
            Kind::Float => ffi::RSMPI_FLOAT,
            Kind::Double => ffi::RSMPI_DOUBLE,
            Kind::Int64 => ffi::RSMPI_INT64_T,
            Kind::Uint8 => ffi::RSMPI_UINT8_T,
            other => bail!("MPI collectives support bf16, f16, f32, f64, int64 and uint8 CPU tensors, not {other:?}"),
        }
    })
}

fn count(tensor: &Tensor) -> Result<c_int> {
    if !tensor.is_contiguous() || tensor.device() != Device::Cpu {
        bail!("MPI collectives need contiguous CPU tensors");
    }
    c_int::try_from(tensor.numel()).context("more than 2^31 elements in one MPI collective")
}

/// Runs one collective (checked by [`Op::check`]) as a blocking MPI call: MPI's own tuned
/// algorithms, the same call a program using MPI directly would make. The communication
/// thread's watchdog ends the process if it does not return in time.
pub(super) fn run(comm: &SimpleCommunicator, op: &Op) -> Result<()> {
    if let Some((tensor, _)) = op.tensors() {
        if matches!(tensor.kind(), Kind::BFloat16 | Kind::Half) {
            return run_widened(comm, op);
        }
    }
    let raw = comm.as_raw();
    // SAFETY: every pointer is the data of a live, contiguous CPU tensor of the datatype and
    // element count passed alongside (checked by `count` and `datatype`; sizes by
    // Op::check); the tensors are owned by `op`, and every call is blocking.
    let code = unsafe {
        match op {
            Op::AllReduce { tensor, op } => {
                let (n, dtype) = (count(tensor)?, datatype(tensor.kind())?);
                let reduction = match op {
                    ReduceOp::Sum => ffi::RSMPI_SUM,
                    ReduceOp::Max => ffi::RSMPI_MAX,
                };
                match InPlace::detect() {
                    InPlace::Sentinel => {
                        ffi::MPI_Allreduce(OPEN_MPI_IN_PLACE, tensor.data_ptr(), n, dtype, reduction, raw)
                    }
                    InPlace::Copy => {
                        let send = tensor.copy();
                        ffi::MPI_Allreduce(send.data_ptr(), tensor.data_ptr(), n, dtype, reduction, raw)
                    }
                }
            }
            Op::ReduceScatter { input, output } => {
                count(input)?;
                let (n, dtype) = (count(output)?, datatype(input.kind())?);
                ffi::MPI_Reduce_scatter_block(input.data_ptr(), output.data_ptr(), n, dtype, ffi::RSMPI_SUM, raw)
            }
            Op::AllGather { input, output } => {
                count(output)?;
                let (n, dtype) = (count(input)?, datatype(input.kind())?);
                ffi::MPI_Allgather(input.data_ptr(), n, dtype, output.data_ptr(), n, dtype, raw)
            }
            Op::Broadcast { tensor, root } => {
                ffi::MPI_Bcast(tensor.data_ptr(), count(tensor)?, datatype(tensor.kind())?, *root as c_int, raw)
            }
            Op::Barrier => ffi::MPI_Barrier(raw),
            Op::Mpi(_) => bail!("direct MPI calls are not a collective"),
        }
    };
    if code != 0 {
        bail!("MPI error code {code}");
    }
    Ok(())
}

/// MPI has no 16-bit float types: runs the collective on f32 copies and rounds the result back
/// once (a bf16 all-reduce then rounds once, as NCCL's does, instead of at every partial sum).
fn run_widened(comm: &SimpleCommunicator, op: &Op) -> Result<()> {
    let wide = |t: &Tensor| t.to_kind(Kind::Float);
    let (widened, mut target, result) = match op {
        Op::AllReduce { tensor, op } => {
            let result = wide(tensor);
            (Op::AllReduce { tensor: result.shallow_clone(), op: *op }, tensor.shallow_clone(), result)
        }
        Op::Broadcast { tensor, root } => {
            let result = wide(tensor);
            (Op::Broadcast { tensor: result.shallow_clone(), root: *root }, tensor.shallow_clone(), result)
        }
        Op::ReduceScatter { input, output } => {
            let result = wide(output);
            (Op::ReduceScatter { input: wide(input), output: result.shallow_clone() }, output.shallow_clone(), result)
        }
        Op::AllGather { input, output } => {
            let result = wide(output);
            (Op::AllGather { input: wide(input), output: result.shallow_clone() }, output.shallow_clone(), result)
        }
        Op::Barrier | Op::Mpi(_) => return run(comm, op),
    };
    run(comm, &widened)?;
    target.copy_(&result);
    Ok(())
}

/// Makes an NCCL unique id known to every rank of `comm`: `root`'s bytes overwrite the others'.
pub(super) fn broadcast_bytes(comm: &SimpleCommunicator, bytes: &mut [u8]) -> Result<()> {
    let values: Vec<i64> = bytes.iter().map(|&b| i64::from(b)).collect();
    let tensor = Tensor::from_slice(&values);
    run(comm, &Op::Broadcast { tensor: tensor.shallow_clone(), root: 0 })?;
    for (byte, value) in bytes.iter_mut().zip(Vec::<i64>::try_from(&tensor)?) {
        *byte = value as u8;
    }
    Ok(())
}

/// The MPI calls behind the collectives, called directly on a communicator: the reference
/// that benchmarks hold the collectives (queue, communication thread, checks) against.
pub mod raw {
    use super::{run, ReduceOp};
    use crate::comm::op::Op;
    use anyhow::Result;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use tch::Tensor;

    /// `MPI_Allreduce` (sum) in place on a contiguous CPU tensor.
    pub fn all_reduce_sum(comm: &SimpleCommunicator, tensor: &Tensor) -> Result<()> {
        let op = Op::AllReduce { tensor: tensor.shallow_clone(), op: ReduceOp::Sum };
        run(comm, &op)
    }

    /// `MPI_Reduce_scatter_block` (sum) from `input` into `output` (group size x smaller).
    pub fn reduce_scatter_sum(comm: &SimpleCommunicator, input: &Tensor, output: &Tensor) -> Result<()> {
        let op = Op::ReduceScatter { input: input.shallow_clone(), output: output.shallow_clone() };
        op.check(comm.size() as usize)?;
        run(comm, &op)
    }
}

/// Ends every rank of the job with `code` (MPI_Abort on the world). Called from a thread other
/// than the one that initialized MPI, which Open MPI's abort allows: it only asks the runtime
/// (mpirun, or the PMIx server under srun) to kill the job.
pub(super) fn abort_job(code: c_int) -> ! {
    // SAFETY: MPI is initialized (a Comm with a communication thread exists); MPI_Abort does not
    // return, and the process exits with the job.
    unsafe {
        ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, code);
    }
    std::process::exit(code)
}
