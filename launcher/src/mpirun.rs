//! One `mpirun` job: building its command line, running it in a session of its own under a guard, and relaying its ranks' output.
use crate::guard::Guard;
use crate::procs;
use crate::signals::{SignalForwarder, Stopped};
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

/// How long to keep relaying output after mpirun has exited, in case something it started still holds the pipes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What to start: `nproc` ranks of `program` on this machine or the hosts of `hostfile`.
#[derive(Debug)]
pub struct Job {
    pub nproc: u32,
    /// Absolute path (see [`resolve_program`]).
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
    /// mpirun's exit status.
    pub status: ExitStatus,
    /// Whether the job was asked to stop because the launcher received a signal, and whether it was killed.
    pub stopped: Stopped,
    /// A rank reported that the trainer refused its configuration (`error: invalid config ...`): running the same
    /// job again cannot succeed.
    pub config_refused: bool,
    /// Processes of the job still alive after mpirun exited, killed by the launcher.
    pub leftovers_killed: usize,
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
    /// whatever process of the job is still alive once mpirun has exited.
    pub fn run(&self, signals: &SignalForwarder) -> Result<Outcome> {
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

        let config_refused = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = mpsc::channel();
        let mut relays = 0;
        if let Some(out) = child.stdout.take() {
            spawn_relay(out, done_tx.clone(), Arc::clone(&config_refused));
            relays += 1;
        }
        if let Some(err) = child.stderr.take() {
            spawn_relay(err, done_tx.clone(), Arc::clone(&config_refused));
            relays += 1;
        }

        signals.attach(pid);
        let exited = wait_exited(pid);
        let stopped = signals.detach();
        guard.stop();
        exited?;
        let status = child.wait().context("waiting for mpirun")?;
        let leftovers_killed = procs::kill_leftovers(pid);

        let deadline = Instant::now() + DRAIN_TIMEOUT;
        for _ in 0..relays {
            if done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_err() {
                eprintln!("launcher: mpirun exited but its output pipes are still open; not waiting for them");
                break;
            }
        }
        Ok(Outcome { status, stopped, config_refused: config_refused.load(Ordering::Relaxed), leftovers_killed })
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

/// The launcher's exit code for mpirun's status: its exit code, or 128 + signal if it was killed.
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    }
}

/// Checks that `program` is an executable file and returns it as an absolute path; a bare name is looked up on PATH.
pub fn resolve_program(program: &Path) -> Result<PathBuf> {
    let is_bare_name = program.components().count() == 1 && !program.is_absolute();
    let path = if is_bare_name && !program.exists() {
        match find_in_path(program.as_os_str()) {
            Some(path) => path,
            None => bail!("program {} not found on PATH; build it with `scripts/setup`", program.display()),
        }
    } else {
        std::path::absolute(program).with_context(|| format!("invalid program path {}", program.display()))?
    };
    if !path.is_file() {
        bail!("program {} does not exist; build it with `scripts/setup` (or pass --program)", path.display());
    }
    if !is_executable(&path) {
        bail!("program {} is not executable", path.display());
    }
    Ok(path)
}

fn is_executable(path: &Path) -> bool {
    path.metadata().is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// The first executable called `name` in a directory of PATH.
fn find_in_path(name: impl AsRef<std::ffi::OsStr>) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name.as_ref())).find(|candidate| is_executable(candidate))
}

/// Relays one of mpirun's output pipes on a thread; sends on `done` at end of file.
fn spawn_relay(pipe: impl Read + Send + 'static, done: mpsc::Sender<()>, config_refused: Arc<AtomicBool>) {
    thread::spawn(move || {
        relay(BufReader::new(pipe), &config_refused);
        let _ = done.send(());
    });
}

/// The trainer's messages for a configuration it refuses before training (`Config::load`): a job that printed one
/// fails again however often it is restarted.
const CONFIG_ERRORS: [&[u8]; 2] = [b"error: invalid config ", b"error: cannot read config file "];

/// Whether a relayed piece (`[rank R] text\n`) is the trainer refusing its configuration.
fn is_config_error(piece: &[u8]) -> bool {
    let Some(rest) = piece.strip_prefix(b"[rank ") else { return false };
    let Some(end) = rest.iter().position(|&b| b == b']') else { return false };
    let text = rest[end + 1..].strip_prefix(b" ").unwrap_or(&rest[end + 1..]);
    CONFIG_ERRORS.iter().any(|prefix| text.starts_with(prefix))
}

/// Re-prints each line read from mpirun with its rank prefix, on the launcher's stdout or stderr; sets
/// `config_refused` when a rank reports that the trainer refused its configuration.
fn relay(mut input: impl BufRead, config_refused: &AtomicBool) {
    let mut line = Vec::new();
    // After a write error (e.g. the reader of our stdout went away) keep draining mpirun's pipe, so it never blocks.
    let (mut stdout_ok, mut stderr_ok) = (true, true);
    loop {
        line.clear();
        match input.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        for (stream, out) in format_line(text) {
            if is_config_error(&out) {
                config_refused.store(true, Ordering::Relaxed);
            }
            match stream {
                Stream::Stdout if stdout_ok => stdout_ok = std::io::stdout().lock().write_all(&out).is_ok(),
                Stream::Stderr if stderr_ok => stderr_ok = std::io::stderr().lock().write_all(&out).is_ok(),
                _ => {}
            }
        }
    }
}

/// Which of the launcher's streams a line goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

/// The launcher's output for one line of mpirun output (without its newline), each piece ending in a newline.
///
/// `--tag-output` lines look like `[JOBID,RANK]<stdout>:text` (or `<stderr>:`, `<stddiag>:`). mpirun does not
/// end a rank's last line if the rank did not, so another tag can follow mid-line; each tag starts a new piece.
/// Untagged lines are mpirun's own messages and go to stderr as they are.
fn format_line(line: &[u8]) -> Vec<(Stream, Vec<u8>)> {
    let Some((mut tag, mut start)) = parse_tag(line) else {
        let mut out = line.to_vec();
        out.push(b'\n');
        return vec![(Stream::Stderr, out)];
    };
    let mut pieces = Vec::new();
    loop {
        let next = (start..line.len())
            .filter(|&i| line[i] == b'[')
            .find_map(|i| parse_tag(&line[i..]).map(|(tag, len)| (i, tag, len)));
        let end = next.map_or(line.len(), |(i, _, _)| i);
        let mut out = format!("[rank {}] ", tag.rank).into_bytes();
        out.extend_from_slice(&line[start..end]);
        out.push(b'\n');
        pieces.push((tag.stream, out));
        match next {
            Some((i, next_tag, len)) => (tag, start) = (next_tag, i + len),
            None => return pieces,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tag {
    rank: u32,
    stream: Stream,
}

/// Parses a `[JOBID,RANK]<stdout>:` tag at the start of `s`; returns it and its length.
fn parse_tag(s: &[u8]) -> Option<(Tag, usize)> {
    let rest = s.strip_prefix(b"[")?;
    let jobid_len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let rest = rest[jobid_len..].strip_prefix(b",").filter(|_| jobid_len > 0)?;
    let rank_len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let rank = std::str::from_utf8(&rest[..rank_len]).ok()?.parse().ok()?;
    let rest = rest[rank_len..].strip_prefix(b"]")?;
    let (stream, name_len) =
        [(Stream::Stdout, &b"<stdout>:"[..]), (Stream::Stderr, b"<stderr>:"), (Stream::Stderr, b"<stddiag>:")]
            .into_iter()
            .find(|(_, name)| rest.starts_with(name))
            .map(|(stream, name)| (stream, name.len()))?;
    Some((Tag { rank, stream }, s.len() - rest.len() + name_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(pieces: Vec<(Stream, Vec<u8>)>) -> Vec<(Stream, String)> {
        pieces.into_iter().map(|(stream, out)| (stream, String::from_utf8(out).unwrap())).collect()
    }

    #[test]
    fn tagged_lines_get_rank_prefix_and_stream() {
        assert_eq!(text(format_line(b"[1,0]<stdout>:hello")), [(Stream::Stdout, "[rank 0] hello\n".into())]);
        assert_eq!(text(format_line(b"[12,17]<stderr>:oops: x")), [(Stream::Stderr, "[rank 17] oops: x\n".into())]);
        assert_eq!(text(format_line(b"[1,2]<stddiag>:diag")), [(Stream::Stderr, "[rank 2] diag\n".into())]);
        assert_eq!(text(format_line(b"[1,3]<stdout>:")), [(Stream::Stdout, "[rank 3] \n".into())]);
    }

    #[test]
    fn untagged_lines_pass_through_to_stderr() {
        for line in ["-----", "[1,x]<stdout>:no", "[,1]<stdout>:no", "[1,1]<stdin>:no", "mpirun noticed that"] {
            assert_eq!(text(format_line(line.as_bytes())), [(Stream::Stderr, format!("{line}\n"))]);
        }
    }

    #[test]
    fn unterminated_rank_output_followed_by_another_tag_is_split() {
        assert_eq!(
            text(format_line(b"[1,0]<stdout>:no newline[1,1]<stderr>:next [x]")),
            [(Stream::Stdout, "[rank 0] no newline\n".into()), (Stream::Stderr, "[rank 1] next [x]\n".into())]
        );
    }

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

    #[test]
    fn config_errors_are_recognised_only_as_a_ranks_own_error_line() {
        assert!(is_config_error(b"[rank 1] error: invalid config a.toml: model.n_heads = 7 must divide\n"));
        assert!(is_config_error(b"[rank 0] error: cannot read config file /x.toml: No such file\n"));
        assert!(!is_config_error(b"[rank 0] error: collective all_reduce timed out\n"));
        assert!(!is_config_error(b"[rank 0] INFO step 3 error: invalid config\n"));
        assert!(!is_config_error(b"error: invalid config a.toml\n"));
    }

    #[test]
    fn exit_code_maps_signals_to_128_plus() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
    }
}
