//! The `launcher` command line: starts the trainer's ranks through `mpirun` and reports how the job ended.
mod guard;
mod mpirun;
mod procs;
mod program;
mod relay;
mod signals;
mod slurm;
mod slurm_job;
mod supervise;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
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
}

fn parse_pid(text: &str) -> Result<rustix::process::Pid, String> {
    text.parse().ok().and_then(rustix::process::Pid::from_raw).ok_or_else(|| format!("{text:?} is not a process id"))
}

#[derive(Args)]
struct RunArgs {
    /// Number of ranks to start. Without --hostfile, at most 4 per CPU of this machine unless --oversubscribe.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    nproc: u32,

    /// Start more than 4 ranks per CPU on this machine anyway.
    #[arg(long)]
    oversubscribe: bool,

    /// Program every rank runs [default: the `trainer` binary next to this launcher].
    #[arg(long, value_name = "PATH")]
    program: Option<PathBuf>,

    /// OpenMPI hostfile listing the hosts to start ranks on [default: this machine].
    #[arg(long, value_name = "FILE")]
    hostfile: Option<PathBuf>,

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
    if args.nproc > limit {
        bail!(
            "--nproc {} is more than this machine takes: {cpus} CPU(s), at most {MAX_RANKS_PER_CPU} ranks per CPU \
             ({limit}); pass --oversubscribe to start them all here on purpose, or --hostfile FILE to spread them over \
             several hosts",
            args.nproc
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
    let mut env = Vec::new();
    if let Some(hostfile) = &args.hostfile {
        if !hostfile.is_file() {
            bail!("hostfile {} does not exist", hostfile.display());
        }
        // Ranks on other hosts do not inherit this environment.
        env = mpirun::for_remote_ranks(std::env::vars());
    }
    let job = Job {
        nproc: args.nproc,
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
    let code = supervise::supervise(job, &policy)?;
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
        None => slurm::metrics_port_in(&args.program_args)?.unwrap_or(slurm::DEFAULT_METRICS_PORT),
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
