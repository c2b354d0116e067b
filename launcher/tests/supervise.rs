//! `launcher run --max-restarts` with the real `mpirun` and `/bin/sh` ranks: restarts, backoff, preemption, statuses that are not restarted (whatever the ranks print), leftovers.
mod common;

use common::{launcher, processes_with, unique, wait_until, Running};
use std::path::Path;
use std::time::{Duration, Instant};

/// `launcher run --nproc 2 <flags> --program /bin/sh -- -c <script>` with the ranks' attempts logged to `log`.
fn supervised(flags: &[&str], script: &str) -> Running {
    let mut command = launcher();
    command.args(["run", "--nproc", "2"]).args(flags).args(["--program", "/bin/sh", "--", "-c", script]);
    Running::start(&mut command)
}

/// The lines of `path` (the ranks' attempt log), sorted.
fn attempts(path: &Path) -> Vec<String> {
    let mut lines: Vec<String> = std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

/// Appends `rank R restarts T` to `log`, the rank's view of which run it is.
fn log_attempt(log: &Path) -> String {
    format!("echo \"rank $OMPI_COMM_WORLD_RANK restarts $TRAINER_RESTARTS\" >> {};", log.display())
}

#[test]
fn a_job_that_fails_twice_is_restarted_with_backoff_and_succeeds() {
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("attempts");
    // Rank 1 fails in the first two runs; TRAINER_RESTARTS tells each run which one it is.
    let script =
        format!("{} [ $OMPI_COMM_WORLD_RANK = 0 ] || [ $TRAINER_RESTARTS -ge 2 ] || exit 3", log_attempt(&log));
    let started = Instant::now();
    let (status, stderr) =
        supervised(&["--max-restarts", "3", "--restart-backoff", "0.5"], &script).finish(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{stderr}");
    // Backoff 0.5 s, then 1 s.
    assert!(started.elapsed() >= Duration::from_millis(1500), "{:?}", started.elapsed());
    let expected: Vec<String> = (0..3).flat_map(|t| (0..2).map(move |r| format!("rank {r} restarts {t}"))).collect();
    let mut expected = expected;
    expected.sort();
    assert_eq!(attempts(&log), expected);
    assert!(stderr.contains("launcher: job failed (exit status 3); restart 1 of 3 in 0.5 s"), "{stderr}");
    assert!(stderr.contains("launcher: job failed (exit status 3); restart 2 of 3 in 1.0 s"), "{stderr}");
    assert!(stderr.contains("launcher: job finished after 3 run(s): 2 restart(s), 2 after failures"), "{stderr}");
}

#[test]
fn supervision_gives_up_after_max_restarts_with_the_jobs_status() {
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("attempts");
    let script = format!("{} exit $((OMPI_COMM_WORLD_RANK == 1 ? 4 : 0))", log_attempt(&log));
    let (status, stderr) =
        supervised(&["--max-restarts", "2", "--restart-backoff", "0"], &script).finish(Duration::from_secs(60));
    assert_eq!(status.code(), Some(4), "{stderr}");
    assert_eq!(attempts(&log).len(), 6, "3 runs of 2 ranks");
    assert!(
        stderr.contains("not restarting: giving up after 2 restart(s) after failures (--max-restarts 2); 3 run(s)"),
        "{stderr}"
    );
}

#[test]
fn a_preempted_job_exits_75_unless_restart_on_preempt_is_given() {
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("attempts");
    let script = format!("{} [ $TRAINER_RESTARTS -ge 1 ] || exit 75", log_attempt(&log));
    let (status, stderr) = supervised(&["--max-restarts", "3"], &script).finish(Duration::from_secs(60));
    assert_eq!(status.code(), Some(75), "{stderr}");
    assert_eq!(attempts(&log).len(), 2, "one run");
    assert!(stderr.contains("not restarting: preempted: exiting 75 so that a scheduler can requeue it"), "{stderr}");

    std::fs::remove_file(&log).unwrap();
    // Not a failure: no backoff and no restart of the failure budget used (--max-restarts 0).
    let started = Instant::now();
    let (status, stderr) =
        supervised(&["--restart-on-preempt", "--restart-backoff", "100"], &script).finish(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(attempts(&log), ["rank 0 restarts 0", "rank 0 restarts 1", "rank 1 restarts 0", "rank 1 restarts 1"]);
    assert!(stderr.contains("launcher: job preempted (exit status 75); restarting it now (restart 1, not a failure)"));
    assert!(stderr.contains("launcher: job finished after 2 run(s): 1 restart(s), 0 after failures"), "{stderr}");
}

#[test]
fn usage_and_configuration_errors_are_not_restarted() {
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("attempts");
    let script = format!("{} exit 2", log_attempt(&log));
    let (status, stderr) = supervised(&["--max-restarts", "3"], &script).finish(Duration::from_secs(60));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(attempts(&log).len(), 2, "one run");
    assert!(stderr.contains("not restarting: exit status 2 is a usage error"), "{stderr}");

    std::fs::remove_file(&log).unwrap();
    // One rank refuses its configuration: it exits 78 (the trainer does so through MPI_Abort), which is mpirun's
    // status too, while the other rank waits.
    let script = format!(
        "{} [ $OMPI_COMM_WORLD_RANK = 0 ] && exec sleep 30; echo 'error: invalid config a.toml: model.n_heads = 7 must divide model.dim = 64' >&2; exit 78",
        log_attempt(&log)
    );
    let (status, stderr) = supervised(&["--max-restarts", "3"], &script).finish(Duration::from_secs(60));
    assert_eq!(status.code(), Some(78), "{stderr}");
    assert_eq!(attempts(&log).len(), 2, "one run");
    assert!(
        stderr.contains(
            "not restarting: the trainer refused its configuration (exit status 78), which a restart cannot fix"
        ),
        "{stderr}"
    );
}

#[test]
fn the_restart_decision_is_made_by_exit_status_not_by_what_a_rank_printed() {
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("attempts");
    // The text of a configuration error, but status 1 (as for a transient I/O error): a failure like any other,
    // restarted within the budget; the second run succeeds.
    let script = format!(
        "{} [ $OMPI_COMM_WORLD_RANK = 0 ] || [ $TRAINER_RESTARTS -ge 1 ] || {{ echo 'error: invalid config a.toml: model.n_heads = 7 must divide model.dim = 64' >&2; exit 1; }}",
        log_attempt(&log)
    );
    let (status, stderr) =
        supervised(&["--max-restarts", "3", "--restart-backoff", "0"], &script).finish(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(attempts(&log), ["rank 0 restarts 0", "rank 0 restarts 1", "rank 1 restarts 0", "rank 1 restarts 1"]);
    assert!(stderr.contains("[rank 1] error: invalid config a.toml"), "{stderr}");
    assert!(stderr.contains("launcher: job failed (exit status 1); restart 1 of 3 in 0.0 s"), "{stderr}");
    assert!(stderr.contains("launcher: job finished after 2 run(s): 1 restart(s), 1 after failures"), "{stderr}");
    assert!(!stderr.contains("refused its configuration"), "{stderr}");
}

#[test]
fn a_killed_rank_is_restarted_and_processes_outliving_mpirun_are_killed() {
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("attempts");
    // A sleep length unique to this test run (digits only), so that its processes can be found.
    let marker = format!("1000.{}", unique("").replace('x', ""));
    // First run: rank 0 leaves a process in a session of its own (mpirun does not kill it) and waits; rank 1 is
    // killed by SIGKILL, which makes mpirun end the job.
    let script = format!(
        "{} [ $TRAINER_RESTARTS = 0 ] || exit 0; if [ $OMPI_COMM_WORLD_RANK = 0 ]; then setsid sleep {marker} & sleep {marker}; else sleep 0.5; kill -9 $$; fi",
        log_attempt(&log)
    );
    let (status, stderr) =
        supervised(&["--max-restarts", "1", "--restart-backoff", "0"], &script).finish(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(attempts(&log).len(), 4, "two runs");
    assert!(stderr.contains("outliving mpirun killed); restart 1 of 1"), "{stderr}");
    assert!(wait_until(Duration::from_secs(2), || processes_with(&marker).is_empty()), "{:?}", processes_with(&marker));
}

#[test]
fn sigterm_during_the_backoff_ends_supervision() {
    let (mut command, work) = (launcher(), tempfile::tempdir().unwrap());
    let log = work.path().join("attempts");
    let script = format!("{} exit 3", log_attempt(&log));
    command.args(["run", "--nproc", "2", "--max-restarts", "5", "--restart-backoff", "60"]);
    let running = Running::start(command.args(["--program", "/bin/sh", "--", "-c", &script]));
    assert!(wait_until(Duration::from_secs(30), || running.stderr().contains("restart 1 of 5 in 60.0 s")));
    let pid = rustix::process::Pid::from_child(&running.child);
    let sent = Instant::now();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let (status, stderr) = running.finish(Duration::from_secs(10));
    assert!(sent.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("launcher: received SIGTERM while waiting to restart; not restarting"), "{stderr}");
    assert_eq!(attempts(&log).len(), 2, "one run");
}
