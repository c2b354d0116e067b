//! The guard of a job: a process started next to mpirun that ends the job if the launcher dies, even by SIGKILL.
use crate::procs;
use anyhow::{Context, Result};
use rustix::process::{Pid, Signal};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// How long the job's processes get to exit after mpirun is told to end the job, before the guard kills them.
const GRACE: Duration = Duration::from_secs(3);

/// A running guard. Its stdin is a pipe whose write end only the launcher holds, so it ends only when the launcher
/// dies: the launcher kills the guard (SIGKILL) when the job has ended.
pub struct Guard {
    child: Child,
}

impl Guard {
    /// Starts the guard of the job of `mpirun`, which leads a session of its own. The guard is the launcher's own
    /// executable (`launcher guard PID`), in a process group of its own so that a terminal's Ctrl-C misses it.
    pub fn start(mpirun: Pid) -> Result<Guard> {
        let child = Command::new("/proc/self/exe")
            .arg("guard")
            .arg(mpirun.as_raw_nonzero().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .context("cannot start the launcher's guard process")?;
        Ok(Guard { child })
    }

    /// The job has ended: kills and reaps the guard. Call it before mpirun is reaped, so that the guard can never
    /// signal a recycled pid.
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The guard process: waits for the end of its stdin, then ends the job of `mpirun`: SIGTERM to mpirun (which ends
/// its job on every host: SIGTERM to the ranks, SIGKILL a second later), and after [`GRACE`] SIGKILL to whatever is
/// left in mpirun's session. (The kernel's parent-death signal is no substitute: it comes once per exiting thread of
/// the launcher, and a second SIGTERM makes mpirun exit at once without ending its job.)
pub fn watch(mpirun: Pid) -> ExitCode {
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    let _ = writeln!(std::io::stderr(), "launcher: the launcher has exited; ending its job (mpirun, pid {mpirun:?})");
    let _ = rustix::process::kill_process(mpirun, Signal::TERM);
    let deadline = Instant::now() + GRACE;
    while procs::session_alive(mpirun) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    procs::kill_session(mpirun);
    ExitCode::SUCCESS
}
