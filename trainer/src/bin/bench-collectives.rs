//! Benchmark (run under mpirun): bus bandwidth of all-reduce and reduce-scatter through the trainer's collectives against plain blocking MPI on the same buffers.
//!
//! Sizes 1 KiB to 256 MiB of f32. Each (operation, size) runs rounds of the two methods back
//! to back and reports the medians: of each one's bandwidth, and of the per-round ratio (so
//! that load drifting on a shared machine penalizes neither).
//! Bus bandwidth follows nccl-tests: all-reduce moves 2(n-1)/n of the buffer per rank,
//! reduce-scatter (n-1)/n of its input.
use anyhow::Result;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use trainer::comm::{raw_mpi, wait_all, Comm, GroupKind, ReduceOp};

const ROUNDS: usize = 7;

#[derive(Clone, Copy, PartialEq)]
enum Operation {
    AllReduce,
    ReduceScatter,
}

fn main() -> Result<()> {
    tch::set_num_threads(1);
    let comm = Comm::init(1, Duration::from_secs(600))?;
    let ranks = comm.topology.world;
    anyhow::ensure!(ranks > 1, "run under mpirun with 2 or more ranks");
    let leader = comm.topology.rank == 0;
    if leader {
        println!("{ranks} ranks; bus bandwidth in GB/s, medians of {ROUNDS} rounds");
        println!("{:<15} {:>10} {:>12} {:>12} {:>7}", "operation", "bytes", "collectives", "raw MPI", "ratio");
    }
    for operation in [Operation::AllReduce, Operation::ReduceScatter] {
        for power in (10..=28).step_by(2) {
            let bytes = 1usize << power;
            let elements = (bytes / 4 / ranks * ranks) as i64;
            let case = Case {
                operation,
                buffer: Tensor::zeros([elements], (Kind::Float, Device::Cpu)),
                output: Tensor::zeros([elements / ranks as i64], (Kind::Float, Device::Cpu)),
            };
            let iterations = (((1usize << 30) / bytes).clamp(2, 200)) as u32;
            let bus_bytes = (elements * 4) as f64 * (ranks - 1) as f64 / ranks as f64;
            let bus_bytes = if operation == Operation::AllReduce { 2.0 * bus_bytes } else { bus_bytes };
            let gbps = |time: Duration| bus_bytes * f64::from(iterations) / time.as_secs_f64() / 1e9;
            let (mut ours, mut raw, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                ours.push(gbps(case.time_collectives(&comm, iterations)?));
                raw.push(gbps(case.time_raw_mpi(&comm, iterations)?));
                ratios.push(ours[ours.len() - 1] / raw[raw.len() - 1]);
            }
            if leader {
                let name = if operation == Operation::AllReduce { "all_reduce" } else { "reduce_scatter" };
                let (ours, raw, ratio) = (median(ours), median(raw), median(ratios));
                println!("{name:<15} {:>10} {ours:>12.3} {raw:>12.3} {ratio:>7.3}", elements * 4);
            }
        }
    }
    Ok(())
}

/// One operation on one buffer size: the buffer (all-reduce in place, reduce-scatter input) and
/// the reduce-scatter output.
struct Case {
    operation: Operation,
    buffer: Tensor,
    output: Tensor,
}

impl Case {
    /// The slowest rank's time for `iterations` collectives through [`Comm`], each waited for.
    fn time_collectives(&self, comm: &Comm, iterations: u32) -> Result<Duration> {
        wait_all([comm.barrier(GroupKind::World)])?;
        let started = Instant::now();
        for _ in 0..iterations {
            let pending = match self.operation {
                Operation::AllReduce => comm.all_reduce(GroupKind::World, &self.buffer, ReduceOp::Sum),
                Operation::ReduceScatter => comm.reduce_scatter(GroupKind::World, &self.buffer, &self.output),
            };
            pending.wait()?;
        }
        slowest(comm, started.elapsed())
    }

    /// The slowest rank's time for `iterations` blocking MPI calls on the same buffers.
    fn time_raw_mpi(&self, comm: &Comm, iterations: u32) -> Result<Duration> {
        let (operation, buffer, output) = (self.operation, self.buffer.shallow_clone(), self.output.shallow_clone());
        let elapsed = comm.with_mpi(GroupKind::World, move |mpi| -> Result<Duration> {
            mpi::collective::CommunicatorCollectives::barrier(mpi);
            let started = Instant::now();
            for _ in 0..iterations {
                match operation {
                    Operation::AllReduce => raw_mpi::all_reduce_sum(mpi, &buffer)?,
                    Operation::ReduceScatter => raw_mpi::reduce_scatter_sum(mpi, &buffer, &output)?,
                }
            }
            Ok(started.elapsed())
        })??;
        slowest(comm, elapsed)
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn slowest(comm: &Comm, elapsed: Duration) -> Result<Duration> {
    let seconds = Tensor::from(elapsed.as_secs_f64());
    comm.all_reduce(GroupKind::World, &seconds, ReduceOp::Max).wait()?;
    Ok(Duration::from_secs_f64(seconds.double_value(&[])))
}
