//! The `trainer` command line: train, count parameters, export, generate, draw a run's report, check the machine's libraries.
use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use launcher::protocol;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use trainer::config::{Config, InvalidConfig};
use trainer::train::Outcome;

#[derive(Parser, Debug)]
#[command(name = "trainer", version, about = "Pretrain a LLaMA-style language model")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(clap::Args, Debug)]
struct ConfigArgs {
    /// TOML run configuration (see configs/).
    #[arg(long)]
    config: PathBuf,
    /// Override a config value, e.g. `--set train.steps=100` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

impl ConfigArgs {
    fn load(&self) -> Result<Config> {
        Config::load(&self.config, &self.overrides)
    }
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print the configuration as it would run, every default filled in (for this process's
    /// world size, 1 when started alone), and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(clap::Args, Debug)]
struct PlanArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Ranks of the job (tensor x data parallel) [default: parallel.tensor].
    #[arg(long, conflicts_with = "gpus", value_parser = clap::value_parser!(i64).range(1..))]
    world: Option<i64>,
    /// GPUs of the job: list the layouts (tensor parallel, recomputation, micro-batch) that fit.
    #[arg(long, requires = "gpu_memory_gib", value_parser = clap::value_parser!(i64).range(1..))]
    gpus: Option<i64>,
    /// Memory of one GPU in GiB (with --gpus).
    #[arg(long, requires = "gpus")]
    gpu_memory_gib: Option<f64>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train the model as configured.
    Train(TrainArgs),
    /// Print the parameter count of the configured model (nothing is allocated).
    Params(ConfigArgs),
    /// Print the memory one rank needs, term by term, or (with --gpus) the layouts that fit on GPUs of a given size.
    Plan(PlanArgs),
    /// Write a checkpoint's model as a Hugging Face LLaMA directory (config.json, model.safetensors, tokenizer.json).
    ExportHf {
        /// A checkpoint step directory, e.g. runs/tiny/checkpoints/step-00000300.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The directory to create.
        #[arg(long)]
        output: PathBuf,
    },
    /// Continue prompts with a trained model (a checkpoint or a Hugging Face directory); under
    /// `launcher run --nproc N` the model is split tensor-parallel over the N ranks.
    Generate(trainer::generate::GenerateArgs),
    /// Serve a trained model over an OpenAI-compatible HTTP API (completions, chat, streaming,
    /// continuous batching); under `launcher run --nproc N` split tensor-parallel over N ranks.
    Serve(trainer::serve::ServeArgs),
    /// Judge a model: loss, perplexity and bits per byte on text or a token dataset, accuracy on multiple-choice tasks.
    Eval(trainer::eval::EvalArgs),
    /// Print what this build finds on this machine: CUDA devices, the MPI library, NCCL.
    Env,
    /// Run every collective through NCCL on one GPU (a one-rank communicator) and check the results.
    CheckNccl {
        /// The CUDA device index.
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// Draw RUN_DIR/metrics.jsonl as a PNG: training and validation loss, tokens/s, learning rate.
    Report {
        /// The run directory (`train.run_dir`).
        run_dir: PathBuf,
        /// Where to write the PNG [default: RUN_DIR/report.png].
        #[arg(long, value_name = "FILE.png")]
        output: Option<PathBuf>,
    },
}

/// Keeps freed tensor memory in the process instead of returning it to the kernel: glibc
/// serves blocks above 128 KiB with mmap/munmap, so every step's activations would be
/// page-faulted in afresh (measured: ~9% of a CPU training step).
fn keep_freed_memory() {
    const ONE_GIB: i32 = 1 << 30;
    // SAFETY: mallopt only adjusts allocator tunables; it is called before any other thread
    // exists and takes plain integers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, ONE_GIB);
        libc::mallopt(libc::M_TRIM_THRESHOLD, ONE_GIB);
    }
}

/// MKL (libtorch's CPU BLAS) keeps a cache of its GEMM buffers, filled on the first step and
/// never returned (38 MiB on the tiny model). The heap already reuses freed blocks
/// (`keep_freed_memory`), so the cache is turned off (no step-time change measured): a CPU run's
/// measured peak (`memory.rs`) is then its tensors, not a library's cache. An explicit setting wins.
fn disable_mkl_buffer_cache() {
    const VARIABLE: &str = "MKL_DISABLE_FAST_MM";
    if std::env::var_os(VARIABLE).is_none() {
        // Before any other thread exists and before MKL reads its environment (its first call).
        std::env::set_var(VARIABLE, "1");
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    disable_mkl_buffer_cache();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // Every log line carries the rank: the MPI rank from the launcher's environment (0 alone).
    let _rank = tracing::info_span!("rank", rank = protocol::world_rank().unwrap_or(0)).entered();
    match run(cli.command) {
        Ok(Outcome::Finished) => ExitCode::SUCCESS,
        Ok(Outcome::Preempted) => ExitCode::from(protocol::PREEMPTED),
        Err(error) => {
            trainer::comm::write_error_line(format_args!("{error:#}"));
            ExitCode::from(trainer::comm::exit_status_of(&error))
        }
    }
}

fn run(command: Command) -> Result<Outcome> {
    match command {
        Command::Train(args) if args.print_config => {
            let world = protocol::world_size().unwrap_or(1) as i64;
            let config = args.config.load()?;
            let resolved = config.for_world(world).context(InvalidConfig(format!("for {world} ranks")))?;
            print!("{}", resolved.to_toml());
        }
        Command::Train(args) => return trainer::train::train(&args.config.load()?),
        Command::Params(args) => {
            let config = args.load()?;
            println!("{}", trainer::plan::group_thousands(config.model.num_params() as u64));
        }
        Command::Plan(args) => {
            let config = args.config.load()?;
            let text = match args.gpus.zip(args.gpu_memory_gib) {
                Some((gpus, memory_gib)) => trainer::plan::search(&config, gpus, memory_gib)?,
                None => {
                    let world = args.world.unwrap_or(config.parallel.tensor);
                    trainer::plan::report(&config, world, trainer::plan::Target::of(&config))?
                }
            };
            print!("{text}");
        }
        Command::ExportHf { checkpoint, output } => trainer::export::from_checkpoint(&checkpoint, &output)?,
        Command::Generate(args) => trainer::generate::run(&args)?,
        Command::Eval(args) => trainer::eval::run(&args)?,
        Command::Serve(args) => trainer::serve::run(&args)?,
        Command::Env => {
            println!("libtorch threads: {}", tch::get_num_threads());
            println!("cuda devices: {}", tch::Cuda::device_count());
            let mpi = mpi::environment::library_version().unwrap_or_else(|_| "unknown".into());
            println!("mpi: {}", mpi.lines().next().unwrap_or_default().trim());
            match trainer::comm::nccl_version() {
                Ok(version) => println!("nccl: {version}"),
                Err(error) => println!("nccl: unavailable: {error:#}"),
            }
        }
        Command::CheckNccl { device } => {
            for line in trainer::comm::nccl_self_test(device)? {
                println!("{line}");
            }
        }
        Command::Report { run_dir, output } => {
            let output = output.unwrap_or_else(|| run_dir.join("report.png"));
            trainer::report::write_report(&run_dir, &output)?;
            println!("{}", output.display());
        }
    }
    Ok(Outcome::Finished)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let colors = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(colors);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
