//! The contract between the launcher and a rank: the exit statuses that decide what happens next, and the environment that tells a rank who it is (std only; the trainer uses it through the `launcher` library).
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// Exit status of a rank that received a preemption signal, saved a checkpoint and wants to be started again
/// (`EX_TEMPFAIL` of sysexits.h). The launcher restarts it at once with `--restart-on-preempt`, else exits with it so
/// that a scheduler requeues the job; the Slurm batch script requeues the job.
pub const PREEMPTED: u8 = 75;

/// Exit status of a rank whose configuration is invalid (`EX_CONFIG` of sysexits.h): running the same command again
/// cannot succeed, so neither the launcher nor the Slurm batch script starts it again.
pub const INVALID_CONFIG: u8 = 78;

/// Exit status of a command-line usage error (clap's): running the same command again cannot succeed either.
pub const USAGE_ERROR: u8 = 2;

/// A process's exit status as one number, as a shell reports it: its exit code, or 128 + signal if a signal killed
/// it.
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    }
}

/// What a job's exit status means for the decision to start it again.
///
/// How a rank's status becomes the job's (measured with OpenMPI 4.1 and Slurm's `srun --mpi=pmix`): mpirun exits
/// with the status of the first rank that exits non-zero, or with the error code of an `MPI_Abort`. srun exits with
/// the error code of an `MPI_Abort`, else with the highest status of the step's tasks, a task killed by a signal
/// counting as 128 + signal; and a rank that exits without `MPI_Finalize` makes Slurm kill the step's other ranks
/// (status 137). So a rank that must make its status the job's calls `MPI_Abort` with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitClass {
    /// 0: the job is done.
    Succeeded,
    /// [`PREEMPTED`]: a checkpoint is saved; start it again (it is no failure).
    Preempted,
    /// [`INVALID_CONFIG`]: a restart cannot fix it.
    InvalidConfig,
    /// [`USAGE_ERROR`]: a restart cannot fix it.
    UsageError,
    /// Any other status (a crash, an I/O error, a rank killed by a signal: 128 + signal, a collective timeout): the
    /// same job may succeed when started again.
    Failed,
}

impl ExitClass {
    /// The class of exit status `code` (a process's status, or 128 + signal for one killed by a signal).
    pub fn of(code: i32) -> ExitClass {
        match u8::try_from(code) {
            Ok(0) => ExitClass::Succeeded,
            Ok(PREEMPTED) => ExitClass::Preempted,
            Ok(INVALID_CONFIG) => ExitClass::InvalidConfig,
            Ok(USAGE_ERROR) => ExitClass::UsageError,
            _ => ExitClass::Failed,
        }
    }

    /// Whether starting the same job again cannot succeed.
    pub fn is_permanent(self) -> bool {
        matches!(self, ExitClass::InvalidConfig | ExitClass::UsageError)
    }
}

/// Set by OpenMPI's mpirun for each rank: its rank in the job.
pub const OMPI_COMM_WORLD_RANK: &str = "OMPI_COMM_WORLD_RANK";
/// Set by OpenMPI's mpirun for each rank: the number of ranks in the job.
pub const OMPI_COMM_WORLD_SIZE: &str = "OMPI_COMM_WORLD_SIZE";
/// Set by OpenMPI's mpirun: the rank among the job's ranks on this node.
pub const OMPI_COMM_WORLD_LOCAL_RANK: &str = "OMPI_COMM_WORLD_LOCAL_RANK";
/// Set by OpenMPI's mpirun: the number of the job's ranks on this node.
pub const OMPI_COMM_WORLD_LOCAL_SIZE: &str = "OMPI_COMM_WORLD_LOCAL_SIZE";
/// Set by a PMIx server (`srun --mpi=pmix`, OpenMPI's daemons): the rank in the job.
pub const PMIX_RANK: &str = "PMIX_RANK";
/// Set by a PMI/PMI-2 server (MPICH's Hydra, `srun --mpi=pmi2`): the rank in the job.
pub const PMI_RANK: &str = "PMI_RANK";
/// Set by MPICH's Hydra: the rank among the job's ranks on this node.
pub const MPI_LOCALRANKID: &str = "MPI_LOCALRANKID";
/// Set by MPICH's Hydra: the number of the job's ranks on this node.
pub const MPI_LOCALNRANKS: &str = "MPI_LOCALNRANKS";
/// Set by Slurm for each task of a step: its rank in the step.
pub const SLURM_PROCID: &str = "SLURM_PROCID";
/// Set by Slurm for each task of a step: the task's index on this node.
pub const SLURM_LOCALID: &str = "SLURM_LOCALID";
/// Set by Slurm for each task of a step: the number of tasks of the step.
pub const SLURM_NTASKS: &str = "SLURM_NTASKS";
/// Set by a PMIx server: the number of ranks in the job.
pub const PMIX_SIZE: &str = "PMIX_SIZE";
/// Set by a PMI/PMI-2 server: the number of ranks in the job.
pub const PMI_SIZE: &str = "PMI_SIZE";
/// Set by Slurm from `--ntasks-per-node`.
pub const SLURM_NTASKS_PER_NODE: &str = "SLURM_NTASKS_PER_NODE";

/// Where a rank's rank in the job is read, first set (and valid) first.
pub const WORLD_RANK_VARS: [&str; 4] = [OMPI_COMM_WORLD_RANK, PMIX_RANK, PMI_RANK, SLURM_PROCID];
/// Where the number of ranks in the job is read, first set (and valid) first.
pub const WORLD_SIZE_VARS: [&str; 4] = [OMPI_COMM_WORLD_SIZE, PMIX_SIZE, PMI_SIZE, SLURM_NTASKS];
/// Where a rank's node-local rank is read, first set (and valid) first.
pub const LOCAL_RANK_VARS: [&str; 3] = [OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID, MPI_LOCALRANKID];
/// Where the number of the job's ranks on this node is read, first set (and valid) first.
pub const LOCAL_SIZE_VARS: [&str; 3] = [OMPI_COMM_WORLD_LOCAL_SIZE, SLURM_NTASKS_PER_NODE, MPI_LOCALNRANKS];
/// Any of these set: the process was started as a rank of an MPI job (by mpirun or by `srun --mpi=...`).
/// (`SLURM_PROCID` alone is no proof: a plain `srun` or a batch script sets it too.)
pub const STARTED_BY_MPI_VARS: [&str; 3] = [OMPI_COMM_WORLD_SIZE, PMIX_RANK, PMI_RANK];

/// What the environment says about this process as a rank of a job. Read it once with [`RankEnv::from_env`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RankEnv {
    /// Its rank in the job ([`WORLD_RANK_VARS`]); `None` when started alone.
    pub world_rank: Option<usize>,
    /// The number of ranks in the job ([`WORLD_SIZE_VARS`]); `None` when started alone.
    pub world_size: Option<usize>,
    /// Its rank among the job's ranks on this node ([`LOCAL_RANK_VARS`]).
    pub local_rank: Option<usize>,
    /// The number of the job's ranks on this node ([`LOCAL_SIZE_VARS`]).
    pub local_size: Option<usize>,
    /// Whether an MPI launcher started it ([`STARTED_BY_MPI_VARS`]).
    pub started_by_mpi: bool,
}

impl RankEnv {
    /// From this process's environment.
    pub fn from_env() -> RankEnv {
        RankEnv::from_lookup(|name| std::env::var_os(name))
    }

    /// From the variables that `lookup` returns by name.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> RankEnv {
        RankEnv {
            world_rank: first_number(&WORLD_RANK_VARS, &lookup),
            world_size: first_number(&WORLD_SIZE_VARS, &lookup),
            local_rank: first_number(&LOCAL_RANK_VARS, &lookup),
            local_size: first_number(&LOCAL_SIZE_VARS, &lookup),
            started_by_mpi: STARTED_BY_MPI_VARS.iter().any(|name| lookup(name).is_some()),
        }
    }
}

/// The value of the first of `names` that is set to a number.
fn first_number(names: &[&str], lookup: &impl Fn(&str) -> Option<OsString>) -> Option<usize> {
    names.iter().find_map(|name| lookup(name)?.to_str()?.parse().ok())
}

/// This process's rank in its job ([`WORLD_RANK_VARS`]); `None` when started alone.
pub fn world_rank() -> Option<usize> {
    RankEnv::from_env().world_rank
}

/// The number of ranks in this process's job ([`WORLD_SIZE_VARS`]); `None` when started alone.
pub fn world_size() -> Option<usize> {
    RankEnv::from_env().world_size
}

/// This process's rank among the job's ranks on its node ([`LOCAL_RANK_VARS`]).
pub fn local_rank() -> Option<usize> {
    RankEnv::from_env().local_rank
}

/// The number of the job's ranks on this node ([`LOCAL_SIZE_VARS`]).
pub fn local_size() -> Option<usize> {
    RankEnv::from_env().local_size
}

/// Whether this process was started as a rank of an MPI job ([`STARTED_BY_MPI_VARS`]).
pub fn started_by_mpi() -> bool {
    RankEnv::from_env().started_by_mpi
}

/// Whether a process environment (the NUL-separated `NAME=value` entries of `/proc/PID/environ`) is that of a rank
/// started by OpenMPI's mpirun: it sets [`OMPI_COMM_WORLD_RANK`], which mpirun's helpers (such as the ssh to other
/// hosts) do not have. (The other rank variables may be inherited from a surrounding Slurm job.)
pub fn is_mpirun_rank(environ: &[u8]) -> bool {
    environ
        .split(|&b| b == 0)
        .any(|var| var.strip_prefix(OMPI_COMM_WORLD_RANK.as_bytes()).is_some_and(|rest| rest.first() == Some(&b'=')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> RankEnv {
        RankEnv::from_lookup(|name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| OsString::from(v)))
    }

    #[test]
    fn statuses_are_the_sysexits_ones() {
        assert_eq!((PREEMPTED, INVALID_CONFIG, USAGE_ERROR), (75, 78, 2));
    }

    #[test]
    fn exit_code_maps_signals_to_128_plus() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(78 << 8)), 78);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
    }

    #[test]
    fn statuses_are_classified_for_the_retry_decision() {
        assert_eq!(ExitClass::of(0), ExitClass::Succeeded);
        assert_eq!(ExitClass::of(75), ExitClass::Preempted);
        assert_eq!(ExitClass::of(78), ExitClass::InvalidConfig);
        assert_eq!(ExitClass::of(2), ExitClass::UsageError);
        for code in [1, 3, 77, 79, 137, 143, 255, 256 + 78, -1] {
            assert_eq!(ExitClass::of(code), ExitClass::Failed, "{code}");
        }
        assert!(ExitClass::InvalidConfig.is_permanent() && ExitClass::UsageError.is_permanent());
        assert!(![ExitClass::Succeeded, ExitClass::Preempted, ExitClass::Failed].iter().any(|c| c.is_permanent()));
    }

    #[test]
    fn nothing_set_is_a_process_started_alone() {
        assert_eq!(env(&[]), RankEnv::default());
        assert!(!env(&[("SLURM_PROCID", "0")]).started_by_mpi, "a plain srun or batch script");
    }

    #[test]
    fn openmpi_variables_come_first() {
        let ompi = [
            ("SLURM_PROCID", "9"),
            ("SLURM_LOCALID", "9"),
            ("SLURM_NTASKS_PER_NODE", "9"),
            ("OMPI_COMM_WORLD_RANK", "5"),
            ("OMPI_COMM_WORLD_SIZE", "8"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
            ("PMIX_RANK", "7"),
        ];
        assert_eq!(
            env(&ompi),
            RankEnv {
                world_rank: Some(5),
                world_size: Some(8),
                local_rank: Some(1),
                local_size: Some(4),
                started_by_mpi: true
            }
        );
    }

    #[test]
    fn each_list_is_read_in_order_skipping_unset_and_invalid_values() {
        let srun = [
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "2"),
            ("PMIX_RANK", "3"),
        ];
        assert_eq!(
            env(&srun),
            RankEnv {
                world_rank: Some(3),
                world_size: Some(4),
                local_rank: Some(1),
                local_size: Some(2),
                started_by_mpi: true
            }
        );
        let hydra = [("PMI_RANK", "6"), ("MPI_LOCALRANKID", "2"), ("MPI_LOCALNRANKS", "3")];
        assert_eq!(
            env(&hydra),
            RankEnv {
                world_rank: Some(6),
                world_size: None,
                local_rank: Some(2),
                local_size: Some(3),
                started_by_mpi: true
            }
        );
        // Slurm writes `2(x3)` for a varying number of tasks per node: not a number, so the next variable counts.
        let odd = [("OMPI_COMM_WORLD_RANK", "x"), ("PMIX_RANK", "4"), ("SLURM_NTASKS_PER_NODE", "2(x3)")];
        assert_eq!(
            env(&odd),
            RankEnv { world_rank: Some(4), world_size: None, local_rank: None, local_size: None, started_by_mpi: true }
        );
        assert!(env(&[("PMI_RANK", "")]).started_by_mpi, "set, even if empty");
        assert_eq!(env(&[("OMPI_COMM_WORLD_SIZE", "2")]).world_rank, None);
    }

    #[test]
    fn mpirun_ranks_are_recognised_by_their_environ() {
        assert!(is_mpirun_rank(b"HOME=/root\0OMPI_COMM_WORLD_RANK=3\0PATH=/bin\0"));
        assert!(is_mpirun_rank(b"OMPI_COMM_WORLD_RANK=0"));
        assert!(!is_mpirun_rank(b"HOME=/root\0OMPI_COMM_WORLD_RANKS=3\0SLURM_PROCID=0\0"));
        assert!(!is_mpirun_rank(b"X=OMPI_COMM_WORLD_RANK=3\0"));
        assert!(!is_mpirun_rank(b""));
    }
}
