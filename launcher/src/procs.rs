//! The job's processes, found in /proc: mpirun's local ranks (to signal them), its session, and what outlives mpirun (to kill it).
use rustix::process::{Pid, Signal};

/// What /proc/PID/stat says about a process.
struct Stat {
    pid: Pid,
    zombie: bool,
    parent: Option<Pid>,
    session: Option<Pid>,
}

/// Every process, from /proc.
fn processes() -> Vec<Stat> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let stat = |entry: std::fs::DirEntry| {
        let pid = Pid::from_raw(entry.file_name().to_str()?.parse().ok()?)?;
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        // `pid (comm) state ppid pgrp session ...`; comm may contain spaces and parentheses.
        let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split_whitespace().take(4).collect();
        let pid_at = |i: usize| fields.get(i)?.parse().ok().and_then(Pid::from_raw);
        Some(Stat { pid, zombie: *fields.first()? == "Z", parent: pid_at(1), session: pid_at(3) })
    };
    entries.flatten().filter_map(stat).collect()
}

/// `(pid, is a zombie)` of the processes whose parent is `parent`.
fn children_of(parent: Pid) -> Vec<(Pid, bool)> {
    processes().into_iter().filter(|p| p.parent == Some(parent)).map(|p| (p.pid, p.zombie)).collect()
}

/// The live processes of session `session`.
fn session_members(session: Pid) -> Vec<Pid> {
    processes().into_iter().filter(|p| p.session == Some(session) && !p.zombie).map(|p| p.pid).collect()
}

/// Whether a live process is left in session `session`.
pub fn session_alive(session: Pid) -> bool {
    !session_members(session).is_empty()
}

/// Kills (SIGKILL) every process of session `session` (the job's processes: mpirun leads it, and the ranks and
/// their children stay in it unless they start a session of their own).
pub fn kill_session(session: Pid) {
    for pid in session_members(session) {
        let _ = rustix::process::kill_process(pid, Signal::KILL);
    }
}

/// The live children of `mpirun` that are ranks of its job (OpenMPI sets `OMPI_COMM_WORLD_RANK` in their
/// environment), not its helpers such as the ssh to other hosts.
fn local_ranks(mpirun: Pid) -> Vec<Pid> {
    let is_rank = |pid: Pid| {
        let environ = std::fs::read(format!("/proc/{}/environ", pid.as_raw_nonzero())).unwrap_or_default();
        launcher::protocol::is_mpirun_rank(&environ)
    };
    children_of(mpirun).into_iter().filter(|&(pid, zombie)| !zombie && is_rank(pid)).map(|(pid, _)| pid).collect()
}

/// Sends `signal` to a rank's process group (OpenMPI makes every rank the leader of one, and signals the group
/// itself), or to the rank alone if it leads none.
fn signal_rank(rank: Pid, signal: Signal) {
    if rustix::process::kill_process_group(rank, signal).is_err() {
        let _ = rustix::process::kill_process(rank, signal);
    }
}

/// Asks the job of `mpirun` to stop: SIGTERM to each local rank, which gets all the time it needs (mpirun itself,
/// on SIGTERM, kills its ranks one second later and exits 1, whatever they would have returned). Without local
/// ranks (all on other hosts, or none started yet) SIGTERM goes to mpirun, which ends the job its own way.
pub fn terminate_job(mpirun: Pid) {
    let ranks = local_ranks(mpirun);
    if ranks.is_empty() {
        let _ = rustix::process::kill_process(mpirun, Signal::TERM);
    }
    for rank in ranks {
        signal_rank(rank, Signal::TERM);
    }
}

/// Kills (SIGKILL) mpirun and its local ranks.
pub fn kill_job(mpirun: Pid) {
    for rank in local_ranks(mpirun) {
        signal_rank(rank, Signal::KILL);
    }
    let _ = rustix::process::kill_process(mpirun, Signal::KILL);
}

/// Kills (SIGKILL) and reaps every child of the launcher other than `mpirun`: as a subreaper, those are the job's
/// processes that outlived mpirun (exited ones are only reaped). Returns how many were alive.
pub fn kill_leftovers(mpirun: Pid) -> usize {
    let own = rustix::process::getpid();
    let mut killed = 0;
    // Orphans are re-parented as their parents exit: look until a pass finds none.
    for _ in 0..50 {
        let children: Vec<_> = children_of(own).into_iter().filter(|&(pid, _)| pid != mpirun).collect();
        if children.is_empty() {
            break;
        }
        for (pid, zombie) in children {
            // A child cannot be recycled before it is reaped, so this reaches exactly that process.
            if !zombie {
                let _ = rustix::process::kill_process(pid, Signal::KILL);
                killed += 1;
            }
            let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
        }
    }
    if killed > 0 {
        eprintln!("launcher: killed {killed} process(es) of the job that outlived mpirun");
    }
    killed
}
