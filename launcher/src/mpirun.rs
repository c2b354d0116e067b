//! One `mpirun` job: its command line, and running it in a session of its own under a guard while its output is relayed.
use crate::guard::Guard;
use crate::procs;
use crate::program::find_in_path;
use crate::relay::Relays;
use crate::signals::{SignalForwarder, Stopped};
use crate::watch::Watch;
use anyhow::{Context, Result};
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

/// How long to keep relaying output after mpirun has exited, in case something it started still holds the pipes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What to start: `nproc` ranks of `program` on this machine or the hosts of `hostfile`.
#[derive(Debug)]
pub struct Job {
    pub nproc: u32,
    /// Absolute path (see [`crate::program::resolve`]).
    pub program: PathBuf,
    pub program_args: Vec<OsString>,
    pub hostfile: Option<PathBuf>,
    /// Appended to mpirun's own flags, before the program.
    pub mpirun_args: Vec<String>,
    /// Environment variables set for mpirun and exported to every rank (`-x NAME`).
    pub env: Vec<(String, String)>,
}

/// How the job ended.
#[derive(Debug)]
pub struct Outcome {
    /// mpirun's exit status: the status of the first rank that exited non-zero, or the error code of an `MPI_Abort`
    /// (see [`launcher::protocol::ExitClass`]); 0 when every rank exited 0.
    pub status: ExitStatus,
    /// Whether the job was asked to stop because the launcher received a signal, and whether it was killed.
    pub stopped: Stopped,
    /// Processes of the job still alive after mpirun exited, killed by the launcher.
    pub leftovers_killed: usize,
    /// Hosts that stopped answering while the job ran, for which the launcher ended it.
    pub lost_hosts: Vec<String>,
}

/// The variables of `vars` that configure the ranks' libraries (NCCL, libtorch, logging, the
/// library path), which mpirun must export (`-x`) for ranks started on other hosts to see them.
pub fn for_remote_ranks(vars: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    const PREFIXES: [&str; 3] = ["NCCL_", "TORCH_", "UCX_"];
    const NAMES: [&str; 3] = ["RUST_LOG", "LD_LIBRARY_PATH", "OMP_NUM_THREADS"];
    let mut exported: Vec<_> = vars
        .filter(|(name, _)| PREFIXES.iter().any(|p| name.starts_with(p)) || NAMES.contains(&name.as_str()))
        .collect();
    exported.sort();
    exported
}

impl Job {
    /// mpirun's arguments: its flags, then the program and its arguments.
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = ["-np", &self.nproc.to_string(), "--oversubscribe", "--bind-to", "none"]
            .into_iter()
            .map(OsString::from)
            .collect();
        args.push("--tag-output".into());
        if let Some(hostfile) = &self.hostfile {
            args.push("--hostfile".into());
            args.push(hostfile.into());
        }
        for (name, _) in &self.env {
            args.push("-x".into());
            args.push(name.into());
        }
        args.extend(self.mpirun_args.iter().map(OsString::from));
        args.push(self.program.clone().into());
        args.extend(self.program_args.iter().cloned());
        args
    }

    /// The full mpirun command; `as_root` adds the environment OpenMPI requires before it runs as root.
    pub fn command(&self, mpirun: &Path, as_root: bool) -> Command {
        let mut cmd = Command::new(mpirun);
        cmd.args(self.args());
        if as_root {
            cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        }
        cmd.envs(self.env.iter().map(|(name, value)| (name, value)));
        cmd
    }

    /// Runs the job to completion: relays every rank's output line by line, passes the launcher's SIGINT and
    /// SIGTERM on to the job through `signals`, keeps a [`Guard`] that ends the job if the launcher dies, and kills
    /// whatever process of the job is still alive once mpirun has exited. With `watch`, a host of the job that stops
    /// answering ends it.
    pub fn run(&self, signals: &SignalForwarder, watch: Option<Watch>) -> Result<Outcome> {
        let mpirun = find_in_path("mpirun").context(
            "mpirun not found on PATH: install OpenMPI (`apt-get install openmpi-bin`) or run `scripts/setup`",
        )?;
        // OpenMPI puts every rank in a process group of its own, so the job's processes cannot be found by group:
        // as a child subreaper the launcher inherits the ranks that outlive mpirun and can kill and reap them.
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
            .context("cannot become a child subreaper")?;
        let mut cmd = self.command(&mpirun, rustix::process::geteuid().is_root());
        // A session of its own, which every rank inherits (OpenMPI gives each only a process group of its own), so
        // that the guard finds all of the job's processes; and a process group of its own, so that a terminal's
        // Ctrl-C reaches mpirun once, through the launcher, not twice. No stdin, so it never stops on a terminal read.
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec and only makes a system call (setsid), which is
        // async-signal-safe; it allocates nothing and takes no lock.
        unsafe { cmd.pre_exec(|| rustix::process::setsid().map(drop).map_err(Into::into)) };
        let mut child = cmd.spawn().with_context(|| format!("cannot start {}", mpirun.display()))?;
        let pid = rustix::process::Pid::from_child(&child);
        let guard = match Guard::start(pid) {
            Ok(guard) => guard,
            Err(err) => {
                procs::kill_job(pid);
                let _ = child.wait();
                return Err(err);
            }
        };

        let relays = Relays::start(&mut child);

        signals.attach(pid);
        let watching = watch.map(|watch| watch.start(pid));
        let exited = wait_exited(pid);
        let stopped = signals.detach();
        let lost_hosts = watching.map(|w| w.stop()).unwrap_or_default();
        guard.stop();
        exited?;
        let status = child.wait().context("waiting for mpirun")?;
        let leftovers_killed = procs::kill_leftovers(pid);

        if !relays.finish(DRAIN_TIMEOUT) {
            eprintln!("launcher: mpirun exited but its output pipes are still open; not waiting for them");
        }
        Ok(Outcome { status, stopped, leftovers_killed, lost_hosts })
    }
}

/// Waits until mpirun has exited, without reaping it (its pid stays reserved until the caller reaps it).
fn wait_exited(pid: rustix::process::Pid) -> Result<()> {
    use rustix::process::{waitid, WaitId, WaitIdOptions};
    loop {
        match waitid(WaitId::Pid(pid), WaitIdOptions::EXITED | WaitIdOptions::NOWAIT) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(err) => return Err(err).context("waiting for mpirun"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_has_flags_then_extra_args_then_program() {
        let job = Job {
            nproc: 4,
            program: "/opt/trainer".into(),
            program_args: vec!["--config".into(), "a.toml".into()],
            hostfile: Some("hosts".into()),
            mpirun_args: vec!["--mca".into(), "btl".into(), "self,tcp".into()],
            env: vec![("TRAINER_RESTARTS".into(), "2".into())],
        };
        let args: Vec<_> = job.args().into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(
            args,
            [
                "-np",
                "4",
                "--oversubscribe",
                "--bind-to",
                "none",
                "--tag-output",
                "--hostfile",
                "hosts",
                "-x",
                "TRAINER_RESTARTS",
                "--mca",
                "btl",
                "self,tcp",
                "/opt/trainer",
                "--config",
                "a.toml"
            ]
        );
        let root: Vec<_> = job.command(Path::new("mpirun"), true).get_envs().map(|(k, _)| k.to_owned()).collect();
        assert_eq!(root, ["OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "TRAINER_RESTARTS"]);
        assert_eq!(job.command(Path::new("mpirun"), false).get_envs().count(), 1);
    }

    #[test]
    fn library_settings_are_exported_to_remote_ranks() {
        let vars = [("NCCL_DEBUG", "INFO"), ("HOME", "/root"), ("RUST_LOG", "debug"), ("CUDA_VISIBLE_DEVICES", "0")];
        let exported = for_remote_ranks(vars.iter().map(|(n, v)| (n.to_string(), v.to_string())));
        let names: Vec<_> = exported.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["NCCL_DEBUG", "RUST_LOG"]);
    }
}
