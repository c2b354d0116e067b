//! End-to-end tests of `launcher run` with the real `mpirun`, using `/bin/sh` as the ranks' program.
mod common;

use common::{launcher, wait_until};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Runs `launcher run --nproc <nproc> --program /bin/sh -- -c <script>`.
fn run_sh(nproc: u32, script: &str) -> Output {
    launcher()
        .args(["run", "--nproc", &nproc.to_string(), "--program", "/bin/sh", "--", "-c", script])
        .output()
        .expect("start the launcher")
}

fn sorted_lines(bytes: &[u8]) -> Vec<String> {
    let mut lines: Vec<String> = String::from_utf8_lossy(bytes).lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

#[test]
fn relays_every_ranks_stdout_and_stderr_with_rank_prefix() {
    let out = run_sh(3, "echo out-$OMPI_COMM_WORLD_RANK; echo err-$OMPI_COMM_WORLD_RANK >&2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "status {:?}, stderr:\n{stderr}", out.status);
    assert_eq!(sorted_lines(&out.stdout), ["[rank 0] out-0", "[rank 1] out-1", "[rank 2] out-2"]);
    assert_eq!(sorted_lines(&out.stderr), ["[rank 0] err-0", "[rank 1] err-1", "[rank 2] err-2"]);
}

#[test]
fn failing_rank_fails_the_job_with_a_summary() {
    let out = run_sh(3, "exit $((OMPI_COMM_WORLD_RANK == 1 ? 3 : 0))");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr:\n{stderr}");
    assert!(stderr.contains("launcher: job failed (exit status 3)"), "stderr:\n{stderr}");
}

#[test]
fn missing_program_is_a_clear_error() {
    let program = std::path::Path::new("/nonexistent-launcher-test/trainer");
    let out = launcher().args(["run", "--nproc", "2", "--program"]).arg(program).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(stderr.starts_with("error: program "), "stderr:\n{stderr}");
    assert!(stderr.contains(&program.display().to_string()), "stderr:\n{stderr}");
    assert!(stderr.contains("scripts/setup"), "stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "stderr:\n{stderr}");
}

/// Pids of processes whose full command line matches `pattern` (`pgrep -f`).
fn pgrep(pattern: &str) -> Vec<String> {
    let out = Command::new("pgrep").args(["-f", pattern]).output().expect("run pgrep");
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect()
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn sigterm_is_forwarded_and_no_rank_survives() {
    // A sleep length unique to this test run, so pgrep finds only this job's ranks.
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    let marker = format!("60.{}{nanos:09}", std::process::id());
    let ranks = format!("^sleep {}$", marker.replace('.', "\\."));
    let mut child = launcher()
        .args(["run", "--nproc", "2", "--program", "/bin/sh", "--", "-c", &format!("exec sleep {marker}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(30), || pgrep(&ranks).len() == 2), "ranks did not start");

    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = wait_with_timeout(&mut child, Duration::from_secs(10));
    if status.is_none() {
        child.kill().unwrap();
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let status = status.unwrap_or_else(|| panic!("launcher still running 10 s after SIGTERM; stderr:\n{stderr}"));
    assert!(!status.success(), "stderr:\n{stderr}");
    assert!(stderr.contains("launcher: job failed"), "stderr:\n{stderr}");
    assert!(
        wait_until(Duration::from_secs(2), || pgrep(&marker).is_empty()),
        "processes of the job survived: {:?}",
        pgrep(&marker)
    );
}
