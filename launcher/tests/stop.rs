//! How `launcher run` stops a job (real `mpirun`, `/bin/sh` ranks, or a stand-in `mpirun`): SIGTERM reaches the ranks and their status is the launcher's, a job that ignores it is killed after `--kill-after` or at a second signal, a job never outlives a SIGKILLed launcher, and absurd `--nproc` or durations are refused before mpirun starts.
mod common;

use common::{launcher, processes_with, signal, unique, wait_until, Running};
use rustix::process::Signal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A string unique to one test (digits only: it serves as a sleep length) that all of its processes carry on their
/// command line; dropping it SIGKILLs those still running, so that a failing test leaves nothing behind.
struct Marker(String);

impl Marker {
    fn new() -> Marker {
        Marker(format!("1000.{}", unique("").replace('x', "")))
    }

    /// Processes carrying the marker, other than this test.
    fn processes(&self) -> Vec<u32> {
        processes_with(&self.0)
    }

    /// How many `sleep <marker>` processes run (started, not only forked by mpirun).
    fn sleeping(&self) -> usize {
        let command = format!("sleep\0{}", self.0);
        let cmdline = |pid: u32| std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        self.processes().into_iter().filter(|&pid| cmdline(pid).starts_with(command.as_bytes())).count()
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        self.processes().into_iter().for_each(|pid| signal(pid, Signal::KILL));
    }
}

/// `launcher run --nproc 2 <flags> --program /bin/sh -- -c <script>`.
fn run_sh(flags: &[&str], script: &str) -> Command {
    let mut command = launcher();
    command.args(["run", "--nproc", "2"]).args(flags).args(["--program", "/bin/sh", "--", "-c", script]);
    command
}

/// Writes `dir/mpirun`, which runs `script` instead of a job; returns a PATH that finds it first.
fn path_with_stand_in_mpirun(dir: &Path, script: &str) -> PathBuf {
    let path = dir.join("mpirun");
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    PathBuf::from(format!("{}:{}", dir.display(), std::env::var("PATH").unwrap()))
}

#[test]
fn a_sigkilled_launcher_takes_its_job_with_it() {
    let marker = Marker::new();
    let running = Running::start(&mut run_sh(&[], &format!("exec sleep {}", marker.0)));
    assert!(wait_until(Duration::from_secs(30), || marker.sleeping() == 2), "the job did not start");
    signal(running.child.id(), Signal::KILL);
    let (status, _) = running.finish(Duration::from_secs(10));
    assert_eq!(status.code(), None, "killed");
    let gone = wait_until(Duration::from_secs(5), || marker.processes().is_empty());
    assert!(gone, "mpirun or ranks outlived the launcher: {:?}", marker.processes());
}

#[test]
fn sigterm_reaches_the_ranks_which_exit_75_and_so_does_the_launcher() {
    // Like the trainer: on SIGTERM a rank takes a while (saving a checkpoint), then exits 75. mpirun's own
    // SIGTERM handling would kill it a second later and exit 1.
    let marker = Marker::new();
    let script = format!(": {}; trap 'sleep 2; exit 75' TERM; while :; do sleep 0.1; done", marker.0);
    let running = Running::start(&mut run_sh(&[], &script));
    // The launcher, mpirun and two ranks; then time for the ranks to set their trap.
    assert!(wait_until(Duration::from_secs(30), || marker.processes().len() == 4), "the job did not start");
    std::thread::sleep(Duration::from_millis(500));
    signal(running.child.id(), Signal::TERM);
    let (status, stderr) = running.finish(Duration::from_secs(30));
    assert_eq!(status.code(), Some(75), "{stderr}");
    assert!(
        stderr.contains("launcher: job preempted (exit status 75, asked to stop: the launcher received SIGTERM)"),
        "{stderr}"
    );
}

/// A launcher whose mpirun ignores SIGTERM (as one busy starting 100000 ranks does) and has a child; `signals` are
/// sent to the launcher once it runs, a moment apart. Returns the launcher's status and stderr, and how long it took
/// to exit after the first signal.
fn stop_a_job_that_ignores_sigterm(flags: &[&str], signals: &[Signal]) -> (Option<i32>, String, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let marker = Marker::new();
    let path = path_with_stand_in_mpirun(dir.path(), &format!("trap '' TERM; sleep {}", marker.0));
    let running = Running::start(run_sh(flags, &format!(": {}", marker.0)).env("PATH", path));
    assert!(wait_until(Duration::from_secs(30), || marker.sleeping() == 1), "mpirun did not start");
    let sent = Instant::now();
    for &s in signals {
        signal(running.child.id(), s);
        std::thread::sleep(Duration::from_millis(300));
    }
    let (status, stderr) = running.finish(Duration::from_secs(20));
    let took = sent.elapsed();
    assert!(wait_until(Duration::from_secs(2), || marker.processes().is_empty()), "{:?}", marker.processes());
    (status.code(), stderr, took)
}

#[test]
fn a_job_that_ignores_sigterm_is_killed_after_kill_after() {
    let (code, stderr, took) = stop_a_job_that_ignores_sigterm(&["--kill-after", "1"], &[Signal::TERM]);
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(code, Some(128 + 9), "{stderr}");
    assert!(stderr.contains("the job was killed (SIGKILL) 1 s after the signal (--kill-after)"), "{stderr}");
}

#[test]
fn a_second_signal_kills_at_once() {
    let (code, stderr, took) = stop_a_job_that_ignores_sigterm(&[], &[Signal::TERM, Signal::INT]);
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(code, Some(128 + 9), "{stderr}");
    assert!(stderr.contains("the job was killed (SIGKILL) at a second signal"), "{stderr}");
}

#[test]
fn absurd_nproc_is_refused_before_mpirun_starts() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("started");
    let path = path_with_stand_in_mpirun(dir.path(), &format!("echo \"$@\" > {}", log.display()));
    let run = |flags: &[&str]| {
        let mut command = launcher();
        command.args(["run", "--nproc", "100000"]).args(flags).args(["--program", "/bin/true"]);
        command.env("PATH", &path).output().unwrap()
    };
    let out = run(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: --nproc 100000 is more than this machine takes: "), "{stderr}");
    assert!(stderr.contains("--oversubscribe") && stderr.contains("--hostfile"), "{stderr}");
    assert!(!log.exists(), "mpirun was started");
    // On purpose, it is started.
    let out = run(&["--oversubscribe"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read_to_string(&log).unwrap().starts_with("-np 100000 "));
}

#[test]
fn absurd_durations_are_usage_errors() {
    for flag in ["--restart-backoff", "--kill-after"] {
        let out = launcher().args(["run", "--nproc", "1", flag, "1e30", "--program", "/bin/true"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("\"1e30\" is not a number of seconds from 0 to 1e9"), "{stderr}");
    }
}
