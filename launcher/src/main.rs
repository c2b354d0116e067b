//! The `launcher` command line: starts the trainer's ranks through `mpirun` and reports how the job ended.
mod cluster;
mod guard;
mod hostfile;
mod mpirun;
mod probe;
mod procs;
mod program;
mod relay;
mod signals;
mod slurm;
mod slurm_job;
mod supervise;
mod targets;
mod watch;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use cluster::{Cluster, Remote};
use mpirun::Job;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(about = "Launches distributed training jobs", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start N ranks of the program through mpirun, relaying their output prefixed with `[rank R] `.
    Run(RunArgs),
    /// Write an sbatch script that runs the trainer's ranks with `srun --mpi=pmix` and requeues the job when it is
    /// preempted; print it, or submit it with `--submit`.
    Slurm(SlurmArgs),
    /// (Started by `launcher run` itself.) Wait for the end of stdin, which comes when the launcher dies, then end
    /// the job of mpirun MPIRUN_PID.
    #[command(hide = true)]
    Guard {
        #[arg(value_name = "MPIRUN_PID", value_parser = parse_pid)]
        mpirun: rustix::process::Pid,
    },
    /// (Run on a host by `launcher run`, through the rsh agent, to see whether it answers.) Connect to the launcher
    /// at ADDRESS and send TOKEN.
    #[command(hide = true)]
    Answer {
        #[arg(value_name = "ADDRESS")]
        address: std::net::SocketAddr,
        #[arg(value_name = "TOKEN")]
        token: String,
    },
}

fn parse_pid(text: &str) -> Result<rustix::process::Pid, String> {
    text.parse().ok().and_then(rustix::process::Pid::from_raw).ok_or_else(|| format!("{text:?} is not a process id"))
}

#[derive(Args)]
struct RunArgs {
    /// Number of ranks to start. Without --hostfile, at most 4 per CPU of this machine unless --oversubscribe; with
    /// it, at most the hosts' slots [default: all their slots].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), required_unless_present = "hostfile")]
    nproc: Option<u32>,

    /// Start more than 4 ranks per CPU on this machine anyway.
    #[arg(long)]
    oversubscribe: bool,

    /// Program every rank runs [default: the `trainer` binary next to this launcher].
    #[arg(long, value_name = "PATH")]
    program: Option<PathBuf>,

    /// Hostfile listing the hosts to start ranks on, one per line: `HOST slots=N` (N ranks on it; a host's ranks are
    /// contiguous, so give it a multiple of parallel.tensor) [default: this machine]. Other hosts are reached through
    /// Open MPI's rsh agent (ssh, or OMPI_MCA_plm_rsh_agent) and must see the same paths (program, data, run dir).
    #[arg(long, value_name = "FILE")]
    hostfile: Option<PathBuf>,

    /// When a run fails, restart it (within --max-restarts) on the hosts that still answer, with the ranks of their
    /// slots (fewer data-parallel ranks; the trainer keeps the global batch through more accumulation); a host that
    /// answers again is used again by a later restart. Needs --hostfile.
    #[arg(long, requires = "hostfile")]
    elastic: bool,

    /// With --elastic: do not start a run on fewer hosts than this.
    #[arg(long, value_name = "N", default_value_t = 1, requires = "elastic")]
    min_hosts: usize,

    /// With --hostfile: how long a host has to answer (run `launcher answer` through the rsh agent and connect back)
    /// before it counts as lost.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
    lost_host_grace: Duration,

    /// Write the Prometheus file-SD targets of each run (every rank's `host:metrics.port+local rank`) to this file.
    #[arg(long, value_name = "FILE")]
    prometheus_targets: Option<PathBuf>,

    /// Extra argument for mpirun, placed before the program (repeatable), e.g. `--mpirun-arg=--mca`.
    #[arg(long = "mpirun-arg", value_name = "ARG", allow_hyphen_values = true)]
    mpirun_args: Vec<String>,

    /// Supervise the job: start it again after a failure (a rank exits non-zero or is killed), up to K times; not
    /// after exit 78 (invalid configuration) or 2 (usage error). The trainer resumes from its latest checkpoint. 0:
    /// run it once.
    #[arg(long, value_name = "K", default_value_t = 0)]
    max_restarts: u32,

    /// Seconds to wait before the first restart after a failure; doubled for each further one, at most 300.
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = parse_seconds)]
    restart_backoff: Duration,

    /// When the job exits 75 (preempted: it saved a checkpoint), start it again at once instead of exiting 75.
    #[arg(long)]
    restart_on_preempt: bool,

    /// After SIGINT/SIGTERM to the launcher (passed on to the ranks as SIGTERM), kill the job (SIGKILL) if it is
    /// still running this many seconds later; a second SIGINT/SIGTERM kills it at once.
    #[arg(long, value_name = "SECONDS", default_value = "120", value_parser = parse_seconds)]
    kill_after: Duration,

    /// Arguments for the program, after `--`.
    #[arg(last = true, value_name = "PROGRAM_ARGS")]
    program_args: Vec<OsString>,
}

#[derive(Args)]
struct SlurmArgs {
    /// Nodes to allocate.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    nodes: u32,

    /// GPUs per node; one rank per GPU. 0 (CPU only) needs --ntasks-per-node.
    #[arg(long, value_name = "G")]
    gpus_per_node: u32,

    /// Ranks per node [default: --gpus-per-node].
    #[arg(long, value_name = "T")]
    ntasks_per_node: Option<u32>,

    /// CPUs per rank.
    #[arg(long, value_name = "C", value_parser = clap::value_parser!(u32).range(1..))]
    cpus_per_task: Option<u32>,

    /// Time limit, e.g. 04:00:00.
    #[arg(long, value_name = "HH:MM:SS")]
    time: Option<String>,

    /// Partition to submit to.
    #[arg(long, value_name = "P")]
    partition: Option<String>,

    /// Job name.
    #[arg(long, value_name = "J", default_value = "llama-trainer")]
    job_name: String,

    /// Directory for the script, the job's output (J-JOBID.out) and prometheus-targets.json.
    #[arg(long, value_name = "D", default_value = "runs/slurm")]
    output_dir: PathBuf,

    /// Slurm signals the batch script (USR1) this many seconds before the time limit; the ranks then save and the
    /// job requeues itself.
    #[arg(long, value_name = "S", default_value_t = 300)]
    signal_lead_seconds: u32,

    /// Port of node-local rank 0's metrics endpoint in the Prometheus targets [default: `--set metrics.port=` in the
    /// trainer's arguments, else 9400].
    #[arg(long, value_name = "PORT")]
    metrics_port: Option<u16>,

    /// Program every rank runs [default: the `trainer` binary next to this launcher].
    #[arg(long, value_name = "PATH")]
    program: Option<PathBuf>,

    /// Write the script to the output directory and submit it with sbatch (prints the job id); without it the script
    /// is printed.
    #[arg(long)]
    submit: bool,

    /// With --submit: wait for the job to end (`sbatch --wait`) and exit with its status.
    #[arg(long, requires = "submit")]
    wait: bool,

    /// Arguments for the trainer, after `--`.
    #[arg(last = true, value_name = "TRAINER_ARGS")]
    program_args: Vec<OsString>,
}

/// The longest duration an option takes (about 31 years): longer ones cannot be added to a clock reading.
const MAX_SECONDS: f64 = 1e9;

fn parse_seconds(text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(seconds) if (0.0..=MAX_SECONDS).contains(&seconds) => Ok(Duration::from_secs_f64(seconds)),
        _ => Err(format!("{text:?} is not a number of seconds from 0 to {MAX_SECONDS:e}")),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run_job(args),
        Command::Slurm(args) => slurm_job(args),
        Command::Guard { mpirun } => Ok(guard::watch(mpirun)),
        Command::Answer { address, token } => probe::answer(address, &token).map(|()| ExitCode::SUCCESS),
    }
}

/// Ranks per CPU that `launcher run` starts on this machine without --oversubscribe: the demo runs 4 ranks on 2
/// cores; far beyond that a job only thrashes, and mpirun hangs trying to start tens of thousands.
const MAX_RANKS_PER_CPU: u32 = 4;

/// Refuses more ranks than this machine takes, unless they go to other hosts or are oversubscribed on purpose.
fn check_nproc(args: &RunArgs) -> Result<()> {
    if args.hostfile.is_some() || args.oversubscribe {
        return Ok(());
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let limit = cpus.saturating_mul(MAX_RANKS_PER_CPU);
    let nproc = args.nproc.unwrap_or(0);
    if nproc > limit {
        bail!(
            "--nproc {nproc} is more than this machine takes: {cpus} CPU(s), at most {MAX_RANKS_PER_CPU} ranks per CPU \
             ({limit}); pass --oversubscribe to start them all here on purpose, or --hostfile FILE to spread them over \
             several hosts"
        );
    }
    Ok(())
}

fn run_job(args: RunArgs) -> Result<ExitCode> {
    check_nproc(&args)?;
    let program = match args.program {
        Some(program) => program,
        None => default_program()?,
    };
    let program = program::resolve(&program)?;
    let targets = match &args.prometheus_targets {
        Some(path) => {
            let port = targets::metrics_port_in(&args.program_args)?.unwrap_or(targets::DEFAULT_METRICS_PORT);
            Some((std::path::absolute(path).with_context(|| format!("invalid path {}", path.display()))?, port))
        }
        None => None,
    };
    let (nproc, env, mut cluster) = match &args.hostfile {
        None => {
            let nproc = args.nproc.context("--nproc N is required without --hostfile")?;
            (nproc, Vec::new(), Cluster::local(nproc, targets))
        }
        Some(path) => {
            let hosts = hostfile::read(path)?;
            let slots = hostfile::total_slots(&hosts);
            let nproc = args.nproc.unwrap_or(slots);
            if nproc > slots {
                bail!("--nproc {nproc} is more than the {slots} slots of the hosts in {}", path.display());
            }
            if args.elastic && nproc != slots {
                bail!("--elastic runs every answering host's slots: leave out --nproc (here {nproc} of {slots} slots)");
            }
            if args.elastic && args.max_restarts == 0 {
                bail!("--elastic restarts the job on the hosts that still answer: give --max-restarts K (K >= 1)");
            }
            if args.min_hosts > hosts.len() {
                bail!("--min-hosts {} is more than the {} hosts in {}", args.min_hosts, hosts.len(), path.display());
            }
            let exe = std::env::current_exe().context("cannot locate the launcher's own executable")?;
            let agent = probe::rsh_agent(std::env::var(probe::RSH_AGENT_VAR).ok().as_deref());
            let prober = probe::Prober { agent, exe, timeout: args.lost_host_grace };
            let remote = Remote::new(prober, args.elastic, args.min_hosts)?;
            // Ranks on other hosts do not inherit this environment.
            (nproc, mpirun::for_remote_ranks(std::env::vars()), Cluster::remote(hosts, remote, targets))
        }
    };
    let job = Job {
        nproc,
        program,
        program_args: args.program_args,
        hostfile: args.hostfile,
        mpirun_args: args.mpirun_args,
        env,
    };
    let policy = supervise::Policy {
        max_restarts: args.max_restarts,
        backoff: args.restart_backoff,
        restart_on_preempt: args.restart_on_preempt,
        kill_after: args.kill_after,
    };
    let code = supervise::supervise(job, &policy, &mut cluster)?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)))
}

fn slurm_job(args: SlurmArgs) -> Result<ExitCode> {
    let program = match args.program {
        Some(program) => program,
        None => default_program()?,
    };
    let program = program::resolve(&program)?;
    let metrics_port = match args.metrics_port {
        Some(port) => port,
        None => targets::metrics_port_in(&args.program_args)?.unwrap_or(targets::DEFAULT_METRICS_PORT),
    };
    let workdir = std::env::current_dir().context("cannot read the current directory")?;
    let batch = slurm::Batch {
        nodes: args.nodes,
        gpus_per_node: args.gpus_per_node,
        ntasks_per_node: args.ntasks_per_node.unwrap_or(args.gpus_per_node),
        cpus_per_task: args.cpus_per_task,
        time: args.time,
        partition: args.partition,
        job_name: args.job_name,
        output_dir: std::path::absolute(&args.output_dir)
            .with_context(|| format!("invalid --output-dir {}", args.output_dir.display()))?,
        workdir,
        signal_lead_seconds: args.signal_lead_seconds,
        program,
        program_args: args.program_args,
        metrics_port,
    };
    if !args.submit {
        print!("{}", batch.script()?);
        return Ok(ExitCode::SUCCESS);
    }
    let code = slurm::submit(&batch, args.wait)?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)))
}

/// The `trainer` binary that `cargo build` puts next to the launcher.
fn default_program() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the launcher's own executable")?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    Ok(dir.join("trainer"))
}
