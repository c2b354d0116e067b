//! Parallel runs under real `mpirun` equal the single-rank run (f64: TP, DP, TP x DP, ZeRO and recomputation on and off), bad layouts fail early, and a hung rank makes the others fail in time.
use data_shards::{DatasetWriter, Dtype, ManifestMeta, Split};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

const TRAINER: &str = env!("CARGO_BIN_EXE_trainer");
const STEPS: usize = 5;

/// A small grouped-query model, in f64, on random tokens.
fn config(data: &Path, run_dir: &Path, micro_batch: i64) -> String {
    format!(
        r#"
[model]
dim = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
ffn_dim = 96
vocab_size = 512
max_seq_len = 32

[train]
steps = {STEPS}
seq_len = 16
global_batch = 8
micro_batch = {micro_batch}
seed = 5
dtype = "float64"
threads = 1
eval_every = 5
eval_sequences = 4
run_dir = "{run}"
export_dir = "{run}/final"

[optim]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 2
weight_decay = 0.1
grad_clip = 0.5

[data]
path = "{data}"
"#,
        run = run_dir.display(),
        data = data.display()
    )
}

/// Random documents of random tokens, written in the data-shards format.
fn random_dataset(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut writer = DatasetWriter::new(dir, Dtype::U16, 1 << 20);
    let mut state = 12345u64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    for doc in 0..120 {
        let len = 20 + next() % 60;
        let tokens: Vec<u32> = (0..len).map(|_| 1 + next() % 511).chain([0]).collect();
        let split = if doc % 10 == 0 { Split::Valid } else { Split::Train };
        writer.push_document(split, &tokens).unwrap();
    }
    let meta = ManifestMeta { tokenizer: None, vocab_size: 512, eos_token: None, eos_id: Some(0), valid_fraction: 0.1 };
    writer.finish(meta).unwrap();
}

fn mpirun(ranks: usize) -> Command {
    let mut command = Command::new("mpirun");
    command
        .args(["-np", &ranks.to_string(), "--oversubscribe", "--bind-to", "none"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    command
}

fn trainer_command(ranks: usize) -> Command {
    if ranks == 1 {
        return Command::new(TRAINER);
    }
    let mut command = mpirun(ranks);
    command.arg(TRAINER);
    command
}

struct Run {
    losses: Vec<f64>,
    val_losses: Vec<f64>,
    weights: HashMap<String, Tensor>,
}

fn train(work: &Path, name: &str, ranks: usize, overrides: &[String]) -> Run {
    let run_dir = work.join(name);
    let tp: usize = overrides.iter().find_map(|o| o.strip_prefix("parallel.tensor=")?.parse().ok()).unwrap_or(1);
    let dp = ranks / tp;
    let config_path = work.join(format!("{name}.toml"));
    std::fs::write(&config_path, config(&work.join("data"), &run_dir, 8 / (2 * dp as i64))).unwrap();
    let mut command = trainer_command(ranks);
    command.args(["train", "--config"]).arg(&config_path);
    for item in overrides {
        command.args(["--set", item]);
    }
    let output = command.output().unwrap();
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

fn relative_diff(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

fn assert_equal_runs(name: &str, run: &Run, reference: &Run) {
    assert_eq!(run.losses.len(), STEPS, "{name}: one loss per step");
    for (step, (a, b)) in run.losses.iter().zip(&reference.losses).enumerate() {
        assert!(relative_diff(*a, *b) <= 1e-9, "{name}: step {} loss {a} vs single rank {b}", step + 1);
    }
    assert_eq!(run.val_losses.len(), 1);
    assert!(relative_diff(run.val_losses[0], reference.val_losses[0]) <= 1e-9, "{name}: validation loss");
    assert_eq!(run.weights.len(), reference.weights.len());
    for (tensor, expected) in &reference.weights {
        let actual = &run.weights[tensor];
        assert_eq!(actual.size(), expected.size(), "{name}: shape of {tensor}");
        let diff = (actual - expected).abs().max().double_value(&[]);
        let scale = expected.abs().max().double_value(&[]);
        assert!(diff <= 1e-9 * scale, "{name}: final {tensor} differs by {diff:e} (max |value| {scale:e})");
    }
}

#[test]
fn parallel_layouts_equal_the_single_rank_run() {
    let work = tempfile::tempdir().unwrap();
    random_dataset(&work.path().join("data"));
    let reference = train(work.path(), "single", 1, &[]);
    assert!(reference.losses.windows(2).all(|w| w[0] != w[1]), "the weights must move every step");
    assert_eq!(reference.weights["model.embed_tokens.weight"].kind(), Kind::Double);

    for (ranks, tp) in [(2, 2), (2, 1), (4, 1), (4, 2)] {
        for zero in [true, false] {
            for recompute in [false, true] {
                let name = format!("tp{tp}-dp{}-zero-{zero}-recompute-{recompute}", ranks / tp);
                let overrides = [
                    format!("parallel.tensor={tp}"),
                    format!("parallel.zero={zero}"),
                    format!("train.recompute={recompute}"),
                ];
                let run = train(work.path(), &name, ranks, &overrides);
                assert_equal_runs(&name, &run, &reference);
            }
        }
    }
}

fn failing_run(ranks: usize, overrides: &[&str]) -> Output {
    let work = tempfile::tempdir().unwrap();
    random_dataset(&work.path().join("data"));
    let config_path = work.path().join("run.toml");
    std::fs::write(&config_path, config(&work.path().join("data"), &work.path().join("run"), 1)).unwrap();
    let mut command = trainer_command(ranks);
    command.args(["train", "--config"]).arg(&config_path);
    for item in overrides {
        command.args(["--set", item]);
    }
    command.output().unwrap()
}

#[test]
fn bad_layouts_fail_before_training_with_the_numbers() {
    let cases: [(usize, &[&str], &str); 3] = [
        (3, &["parallel.tensor=3"], "parallel.tensor = 3 must divide model.n_heads = 4"),
        (3, &["parallel.tensor=2"], "world size 3 is not divisible by parallel.tensor = 2"),
        (1, &["parallel.tensor=2"], "parallel.tensor = 2 needs 2 or more ranks"),
    ];
    for (ranks, overrides, expected) in cases {
        let output = failing_run(ranks, overrides);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{overrides:?} on {ranks} ranks must fail");
        assert!(stderr.contains(expected), "{overrides:?} on {ranks} ranks: {stderr}");
        assert!(!stderr.contains("training 5 steps"), "must fail before training: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// Pid of the trainer process that is rank `rank` of a job whose command line mentions `marker`.
fn rank_pid(rank: usize, marker: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let environ = std::fs::read(entry.path().join("environ")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        let is_rank = environ.split(|&b| b == 0).any(|v| v == format!("OMPI_COMM_WORLD_RANK={rank}").as_bytes());
        (cmdline.starts_with(TRAINER) && cmdline.contains(marker) && is_rank).then_some(pid)
    })
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status();
}

#[test]
fn a_hung_rank_makes_the_others_fail_within_the_timeout() {
    let work = tempfile::tempdir().unwrap();
    random_dataset(&work.path().join("data"));
    let run_dir = work.path().join("hang");
    let config_path = work.path().join("hang.toml");
    std::fs::write(&config_path, config(&work.path().join("data"), &run_dir, 2)).unwrap();
    let child = mpirun(2)
        .arg(TRAINER)
        .args(["train", "--config"])
        .arg(&config_path)
        .args([
            "--set",
            "train.steps=100000",
            "--set",
            "parallel.collective_timeout_s=3",
            "--set",
            "train.eval_every=0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let marker = config_path.to_str().unwrap();
    let metrics = run_dir.join("metrics.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&metrics).map(|m| m.lines().count() < 2).unwrap_or(true) {
        assert!(started.elapsed() < Duration::from_secs(60), "training did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let hung = rank_pid(1, marker).expect("rank 1 is running");
    signal(hung, "STOP");
    let stopped_at = Instant::now();
    let output = child.wait_with_output().unwrap();
    let waited = stopped_at.elapsed();
    signal(hung, "KILL");
    signal(hung, "CONT");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(waited < Duration::from_secs(30), "the job took {waited:?} to fail");
    assert!(stderr.contains("timed out after 3.0s"), "{stderr}");
    assert!(stderr.contains("rank 0 (tensor-parallel rank 0/1, data-parallel rank 0/2)"), "{stderr}");
    assert!(stderr.contains("Double elements in the data-parallel group"), "{stderr}");
}
