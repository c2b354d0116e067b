//! Shared by the multi-rank tests: a small model config, a random-token dataset, and running the trainer under real `mpirun`.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Tensor;
use trainer::config::Config;

pub const TRAINER: &str = env!("CARGO_BIN_EXE_trainer");
pub const STEPS: usize = 5;

/// The multi-rank tests' model (tests/fixtures/small-random.toml), resolved with this run's paths.
pub fn config(data: &Path, run_dir: &Path, micro_batch: i64) -> String {
    let overrides = [
        format!("data.path={}", data.display()),
        format!("train.run_dir={}", run_dir.display()),
        format!("train.export_dir={}/final", run_dir.display()),
        format!("train.micro_batch={micro_batch}"),
    ];
    let config = Config::parse(include_str!("../../../tests/fixtures/small-random.toml"), &overrides).unwrap();
    assert_eq!(config.train.steps as usize, STEPS);
    config.to_toml()
}

/// Random documents of random tokens, written in the data-shards format.
pub fn random_dataset(dir: &Path) {
    data_shards::write_random_dataset(dir, 120, 512, 12345).unwrap();
}

pub fn mpirun(ranks: usize) -> Command {
    let mut command = Command::new("mpirun");
    command
        .args(["-np", &ranks.to_string(), "--oversubscribe", "--bind-to", "none"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    command
}

pub fn trainer_command(ranks: usize) -> Command {
    if ranks == 1 {
        return Command::new(TRAINER);
    }
    let mut command = mpirun(ranks);
    command.arg(TRAINER);
    command
}

/// `trainer train` (under mpirun when `ranks > 1`) of the fixture model with run directory
/// `work/name`, data in `work/data`, `micro_batch` and `--set` overrides; returns the command and
/// the config path (unique to the job, so it also finds the job's processes).
pub fn train_command<S: AsRef<str>>(
    work: &Path,
    name: &str,
    ranks: usize,
    micro_batch: i64,
    overrides: &[S],
) -> (Command, PathBuf) {
    let config_path = work.join(format!("{name}.toml"));
    std::fs::write(&config_path, config(&work.join("data"), &work.join(name), micro_batch)).unwrap();
    let mut command = trainer_command(ranks);
    command.args(["train", "--config"]).arg(&config_path);
    for item in overrides {
        command.args(["--set", item.as_ref()]);
    }
    (command, config_path)
}

pub struct Run {
    pub losses: Vec<f64>,
    pub val_losses: Vec<f64>,
    pub weights: HashMap<String, Tensor>,
}

pub fn train(work: &Path, name: &str, ranks: usize, overrides: &[String]) -> Run {
    let run_dir = work.join(name);
    let tp: usize = overrides.iter().find_map(|o| o.strip_prefix("parallel.tensor=")?.parse().ok()).unwrap_or(1);
    let dp = ranks / tp;
    let output = train_command(work, name, ranks, 8 / (2 * dp as i64), overrides).0.output().unwrap();
    assert!(output.status.success(), "{name} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let lines = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let weights = Tensor::read_safetensors(run_dir.join("final/model.safetensors")).unwrap().into_iter().collect();
    Run {
        losses: records.iter().map(|r| r["loss"].as_f64().unwrap()).collect(),
        val_losses: records.iter().filter_map(|r| r["val_loss"].as_f64()).collect(),
        weights,
    }
}

pub fn relative_diff(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

/// Pid of the trainer process that is rank `rank` of a job whose command line mentions `marker`.
pub fn rank_pid(rank: usize, marker: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let environ = std::fs::read(entry.path().join("environ")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        let is_rank = environ.split(|&b| b == 0).any(|v| v == format!("OMPI_COMM_WORLD_RANK={rank}").as_bytes());
        (cmdline.starts_with(TRAINER) && cmdline.contains(marker) && is_rank).then_some(pid)
    })
}

pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status();
}
