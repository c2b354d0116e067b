//! A submitted job's end as Slurm's controller records it (`scontrol show job`): `sbatch --wait` can return while a job requeues itself, so the launcher waits for a final state and takes the job's exit code from there.
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

/// The job's states in which it will not run again (Slurm's base states of a finished job).
const FINAL_STATES: [&str; 10] = [
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
];

/// What `scontrol show job` says of a job: its state and, once it ended, its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    pub state: String,
    /// The batch script's exit status (`ExitCode=STATUS:SIGNAL`; a signal counts as 128 + signal).
    pub exit_code: i32,
}

impl JobState {
    /// Reads one line of `scontrol show job --oneliner` (`Key=Value` fields).
    pub fn parse(line: &str) -> Option<JobState> {
        let field = |key: &str| line.split_whitespace().find_map(|f| f.strip_prefix(key)?.strip_prefix('='));
        let state = field("JobState")?.to_string();
        let (status, signal) = field("ExitCode")?.split_once(':')?;
        let (status, signal): (i32, i32) = (status.parse().ok()?, signal.parse().ok()?);
        let exit_code = if signal > 0 { 128 + signal } else { status };
        Some(JobState { state, exit_code })
    }

    /// Whether the job will not run again.
    pub fn is_final(&self) -> bool {
        FINAL_STATES.contains(&self.state.as_str())
    }

    /// The job's state now, or `None` where scontrol cannot tell (not installed, the job forgotten).
    pub fn query(job_id: &str) -> Option<JobState> {
        let output = Command::new("scontrol").args(["show", "job", "--oneliner", job_id]).output().ok()?;
        output.status.success().then(|| JobState::parse(&String::from_utf8_lossy(&output.stdout)))?
    }

    /// Polls the job until it reaches a final state; `None` where scontrol cannot tell.
    pub fn wait_final(job_id: &str, poll: Duration) -> Option<JobState> {
        loop {
            let state = JobState::query(job_id)?;
            if state.is_final() {
                return Some(state);
            }
            sleep(poll);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_job_and_its_status_are_read_from_scontrol_output() {
        let line = "JobId=12 JobName=preempt UserId=root(0) Priority=1 JobState=FAILED Reason=NonZeroExitCode \
                    Dependency=(null) Requeue=1 Restarts=1 BatchFlag=1 ExitCode=78:0 RunTime=00:00:03 \
                    WorkDir=/tmp/a dir/with spaces StdOut=/tmp/out-12.out";
        let state = JobState::parse(line).unwrap();
        assert_eq!(state, JobState { state: "FAILED".into(), exit_code: 78 });
        assert!(state.is_final());
        let killed = JobState::parse("JobId=3 JobState=CANCELLED ExitCode=0:9").unwrap();
        assert_eq!((killed.exit_code, killed.is_final()), (137, true));
    }

    #[test]
    fn a_requeued_job_is_not_final() {
        for state in ["PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "REQUEUE_HOLD"] {
            let line = format!("JobId=7 JobState={state} Reason=BeginTime ExitCode=0:0");
            assert!(!JobState::parse(&line).unwrap().is_final(), "{state}");
        }
        assert_eq!(JobState::parse("JobId=7 Reason=None"), None);
    }
}
