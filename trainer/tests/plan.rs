//! The memory planner against measurement: its prediction of a rank's peak of tensors is within 10% of the peak a CPU run measures (f32 and bf16, recomputation on and off, tensor and data parallel under real mpirun), and its persistent terms are what building the model and the optimizer allocates.
mod common;

use common::trainer_command;
use std::sync::{Arc, Mutex};
use trainer::comm::Comm;
use trainer::config::Config;
use trainer::memory::host_bytes_in_use;
use trainer::plan::{plan, Layout, Plan, Target};
use trainer::train::build_engine;
use trainer::zero::DistOptimizer;

const TINY: &str = include_str!("../../configs/tiny.toml");

/// The largest error the prediction may have, relative to the measured peak.
const TOLERANCE: f64 = 0.10;

/// Held by each test: one measures this process's allocations, so the other must not allocate
/// or free meanwhile.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Shapes large enough for tensors to dwarf what else the process allocates meanwhile, small
/// enough for one step to take a few seconds on two cores.
const SEQ_256: [&str; 3] = ["model.vocab_size=512", "train.seq_len=256", "train.micro_batch=16"];

struct Case {
    name: &'static str,
    ranks: usize,
    overrides: Vec<&'static str>,
}

fn cases() -> Vec<Case> {
    let with = |extra: &[&'static str]| SEQ_256.iter().chain(extra).copied().collect::<Vec<_>>();
    vec![
        Case { name: "tiny, f32, 1 rank", ranks: 1, overrides: vec![] },
        Case { name: "seq 256, f32, 1 rank", ranks: 1, overrides: with(&["train.global_batch=16"]) },
        Case {
            name: "seq 256, f32, 1 rank, recompute",
            ranks: 1,
            overrides: with(&["train.global_batch=16", "train.recompute=true"]),
        },
        Case {
            name: "seq 256, bf16, 1 rank",
            ranks: 1,
            overrides: with(&["train.micro_batch=8", "train.global_batch=8", "train.dtype=bfloat16"]),
        },
        Case {
            name: "seq 256, f32, TP 2",
            ranks: 2,
            overrides: with(&["train.micro_batch=8", "train.global_batch=8", "parallel.tensor=2"]),
        },
        Case {
            name: "seq 256, f32, DP 2, ZeRO",
            ranks: 2,
            overrides: with(&["train.micro_batch=8", "train.global_batch=16", "parallel.zero=true"]),
        },
    ]
}

/// Runs one training step of `case` and returns the predicted and the measured peak (rank 0's).
fn predicted_and_measured(work: &std::path::Path, index: usize, case: &Case) -> (u64, u64) {
    let run_dir = work.join(format!("run-{index}"));
    let mut overrides: Vec<String> = [
        format!("data.path={}", work.join("data").display()),
        format!("train.run_dir={}", run_dir.display()),
        "train.steps=1".into(),
        "train.threads=1".into(),
        "train.eval_every=0".into(),
        "train.sample_tokens=0".into(),
        "checkpoint.save_final=false".into(),
    ]
    .into();
    overrides.extend(case.overrides.iter().map(|s| s.to_string()));
    let config = Config::parse(TINY, &overrides).unwrap();
    let config_path = work.join(format!("run-{index}.toml"));
    std::fs::write(&config_path, config.to_toml()).unwrap();
    let output = trainer_command(case.ranks).args(["train", "--config"]).arg(&config_path).output().unwrap();
    assert!(output.status.success(), "{} failed:\n{}", case.name, String::from_utf8_lossy(&output.stderr));
    let lines = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let measured = lines
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["peak_memory_bytes"].as_u64().unwrap())
        .max()
        .unwrap();
    let layout = Layout::of(&config, case.ranks as i64).unwrap();
    (plan(&config, layout, Target::Cpu).tensors(), measured)
}

#[test]
fn predicted_peaks_are_within_10_percent_of_measured_ones() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let work = tempfile::tempdir().unwrap();
    data_shards::write_random_dataset(&work.path().join("data"), 2000, 512, 1).unwrap();
    let mib = |bytes: u64| bytes as f64 / (1u64 << 20) as f64;
    let mut results = Vec::new();
    println!("{:34} {:>14} {:>14} {:>7}", "configuration", "predicted MiB", "measured MiB", "error");
    for (index, case) in cases().iter().enumerate() {
        let (predicted, measured) = predicted_and_measured(work.path(), index, case);
        let error = predicted as f64 / measured as f64 - 1.0;
        println!("{:34} {:>14.1} {:>14.1} {:>+6.1}%", case.name, mib(predicted), mib(measured), error * 100.0);
        results.push((case.name, error));
    }
    for (name, error) in results {
        assert!(error.abs() <= TOLERANCE, "{name}: predicted {:+.1}% off the measured peak", error * 100.0);
    }
}

/// Bytes that `build` leaves allocated (what it frees again is not counted).
fn allocated_by<T>(build: impl FnOnce() -> T) -> (T, u64) {
    let before = host_bytes_in_use();
    let built = build();
    (built, host_bytes_in_use() - before)
}

fn assert_close(what: &str, predicted: u64, allocated: u64) {
    let error = predicted as f64 / allocated as f64 - 1.0;
    assert!(error.abs() < 0.01, "{what}: predicted {predicted} bytes, allocated {allocated}");
}

#[test]
fn persistent_terms_are_what_the_model_and_the_optimizer_allocate() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for overrides in [["parallel.zero=true", "train.dtype=float32"], ["parallel.zero=false", "train.dtype=float32"]]
        .into_iter()
        .chain([["parallel.zero=true", "train.dtype=bfloat16"], ["parallel.zero=false", "train.dtype=bfloat16"]])
    {
        let config = Config::parse(TINY, &overrides.map(String::from)).unwrap();
        let comm = Arc::new(Comm::single());
        let (engine, model) = allocated_by(|| build_engine(&config, comm.clone()).unwrap());
        let (_optimizer, optimizer) =
            allocated_by(|| DistOptimizer::new(comm.clone(), &engine.params, &config.optim, config.parallel.zero));
        let plan: Plan = plan(&config, Layout::of(&config, 1).unwrap(), Target::Cpu);
        assert_close(&format!("{overrides:?}: weights and gradients"), plan.weights + plan.gradients, model);
        let state = plan.gradient_shard + plan.master_weights + plan.optimizer_state;
        assert_close(&format!("{overrides:?}: optimizer"), state, optimizer);
    }
}
