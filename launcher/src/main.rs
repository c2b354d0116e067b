//! The `launcher` command line: starts the trainer's ranks through `mpirun` and reports how the job ended.
mod mpirun;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use mpirun::{exit_code, Job};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
}

#[derive(Args)]
struct RunArgs {
    /// Number of ranks to start.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    nproc: u32,

    /// Program every rank runs [default: the `trainer` binary next to this launcher].
    #[arg(long, value_name = "PATH")]
    program: Option<PathBuf>,

    /// OpenMPI hostfile listing the hosts to start ranks on [default: this machine].
    #[arg(long, value_name = "FILE")]
    hostfile: Option<PathBuf>,

    /// Extra argument for mpirun, placed before the program (repeatable), e.g. `--mpirun-arg=--mca`.
    #[arg(long = "mpirun-arg", value_name = "ARG", allow_hyphen_values = true)]
    mpirun_args: Vec<String>,

    /// Arguments for the program, after `--`.
    #[arg(last = true, value_name = "PROGRAM_ARGS")]
    program_args: Vec<OsString>,
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
    }
}

fn run_job(args: RunArgs) -> Result<ExitCode> {
    let program = match args.program {
        Some(program) => program,
        None => default_program()?,
    };
    let program = mpirun::resolve_program(&program)?;
    if let Some(hostfile) = &args.hostfile {
        if !hostfile.is_file() {
            bail!("hostfile {} does not exist", hostfile.display());
        }
    }
    let job = Job {
        nproc: args.nproc,
        program,
        program_args: args.program_args,
        hostfile: args.hostfile,
        mpirun_args: args.mpirun_args,
    };
    let outcome = job.run()?;
    let code = exit_code(outcome.status);
    if code != 0 {
        let forwarded = match outcome.forwarded_signal {
            Some(name) => format!(", after forwarding {name} to mpirun"),
            None => String::new(),
        };
        eprintln!("launcher: job failed ({}{forwarded})", describe(outcome.status));
    }
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)))
}

/// The `trainer` binary that `cargo build` puts next to the launcher.
fn default_program() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the launcher's own executable")?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    Ok(dir.join("trainer"))
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("mpirun killed by signal {signal}"),
        (None, None) => format!("{status}"),
    }
}
