//! Checkpoints: bitwise resume, loading under other layouts, Hugging Face export and import, a rank killed mid-save, clear errors for damaged checkpoints.
mod common;

use common::{random_dataset, rank_pid, relative_diff, signal, train, train_command, TRAINER};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};
use trainer::checkpoint::{load_params, Reader};
use trainer::comm::Comm;
use trainer::config::Config;
use trainer::train::build_engine;

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn step_dir(run: &Path, step: i64) -> PathBuf {
    run.join(format!("checkpoints/step-{step:08}"))
}

/// Every tensor of a checkpoint, assembled whole from its pieces.
fn checkpoint_tensors(dir: &Path) -> HashMap<String, Tensor> {
    let mut reader = Reader::open(dir).unwrap();
    let entries = reader.manifest().tensors.clone();
    entries
        .into_iter()
        .map(|(name, entry)| {
            let kind = if entry.dtype == "float64" { Kind::Double } else { Kind::Float };
            let tensor = Tensor::zeros(entry.shape.as_slice(), (kind, tch::Device::Cpu));
            reader.read_box(&name, &entry.shape, &vec![0; entry.shape.len()], &tensor).unwrap();
            (name, tensor)
        })
        .collect()
}

fn assert_identical(what: &str, a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) {
    assert_eq!(a.len(), b.len(), "{what}: same tensors");
    for (name, tensor) in a {
        assert!(tensor.equal(&b[name]), "{what}: {name} differs");
    }
}

#[test]
fn resume_is_bitwise_identical_on_one_rank_and_on_tp2_dp2() {
    let work = tempfile::tempdir().unwrap();
    random_dataset(&work.path().join("data"));
    for (ranks, tp) in [(1, 1), (4, 2)] {
        let base = strings(&["train.dtype=float32", "train.steps=20", "train.eval_every=0"]);
        let base: Vec<String> = base.into_iter().chain([format!("parallel.tensor={tp}")]).collect();
        let straight = train(work.path(), &format!("straight-{ranks}"), ranks, &base);
        let name = format!("resumed-{ranks}");
        let mut first_half = base.clone();
        first_half.push("train.stop_at_step=10".into());
        let half = train(work.path(), &name, ranks, &first_half);
        assert_eq!(half.losses.len(), 10);
        let resumed = train(work.path(), &name, ranks, &base);
        assert_eq!(resumed.losses.len(), 20, "the log keeps the first 10 steps and appends 10");
        for (step, (a, b)) in resumed.losses.iter().zip(&straight.losses).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{ranks} ranks: loss of step {} differs", step + 1);
        }
        assert_identical(&format!("{ranks} ranks: final weights"), &resumed.weights, &straight.weights);
        let straight_state = checkpoint_tensors(&step_dir(&work.path().join(format!("straight-{ranks}")), 20));
        let resumed_state = checkpoint_tensors(&step_dir(&work.path().join(&name), 20));
        assert!(straight_state.keys().any(|k| k.starts_with("exp_avg_sq:")));
        assert_identical(&format!("{ranks} ranks: parameters and optimizer state"), &resumed_state, &straight_state);
    }
}

#[test]
fn a_tp2_dp2_zero_checkpoint_continues_under_other_layouts() {
    let work = tempfile::tempdir().unwrap();
    random_dataset(&work.path().join("data"));
    let base = strings(&["model.n_kv_heads=4", "train.steps=10", "train.eval_every=0"]);
    let with = |extra: &[String]| -> Vec<String> { base.iter().chain(extra).cloned().collect() };
    let saved_layout = strings(&["parallel.tensor=2", "parallel.zero=true"]);
    let reference = train(work.path(), "reference", 4, &with(&saved_layout));
    let mut stop = saved_layout.clone();
    stop.push("train.stop_at_step=5".into());
    train(work.path(), "saved", 4, &with(&stop));
    let checkpoint = step_dir(&work.path().join("saved"), 5);
    for (ranks, tp, zero) in [(4, 1, true), (4, 4, true), (1, 1, true), (2, 2, false)] {
        let name = format!("tp{tp}-dp{}-zero-{zero}", ranks / tp);
        let layout = vec![
            format!("parallel.tensor={tp}"),
            format!("parallel.zero={zero}"),
            format!("checkpoint.load={}", checkpoint.display()),
        ];
        let run = train(work.path(), &name, ranks, &with(&layout));
        assert_eq!(run.losses.len(), 5, "{name}: steps 6 to 10");
        for (i, (a, b)) in run.losses.iter().zip(&reference.losses[5..]).enumerate() {
            assert!(relative_diff(*a, *b) <= 1e-6, "{name}: step {} loss {a} vs uninterrupted {b}", i + 6);
        }
        for (tensor, expected) in &reference.weights {
            let diff = (&run.weights[tensor] - expected).abs().max().double_value(&[]);
            assert!(
                diff <= 1e-6 * expected.abs().max().double_value(&[]),
                "{name}: final {tensor} differs by {diff:e}"
            );
        }
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[test]
fn hf_export_matches_transformers_and_imports_back_exactly() {
    let work = tempfile::tempdir().unwrap();
    random_dataset(&work.path().join("data"));
    train(work.path(), "run", 1, &strings(&["train.dtype=float32", "train.steps=3", "train.eval_every=0"]));
    let checkpoint = step_dir(&work.path().join("run"), 3);
    let exported = work.path().join("hf");
    let status = Command::new(TRAINER)
        .args(["export-hf", "--checkpoint"])
        .arg(&checkpoint)
        .arg("--output")
        .arg(&exported)
        .status()
        .unwrap();
    assert!(status.success());

    let mut reader = Reader::open(&checkpoint).unwrap();
    let config = Config::parse(&reader.manifest().config, &[]).unwrap();
    let engine = build_engine(&config, Arc::new(Comm::single())).unwrap();
    load_params(&mut reader, &engine.params).unwrap();
    tch::manual_seed(3);
    let tokens = Tensor::randint(config.model.vocab_size, [2, 24], (Kind::Int64, tch::Device::Cpu));
    Tensor::write_safetensors(&[("tokens", &tokens)], work.path().join("tokens.safetensors")).unwrap();
    let python = repo_root().join(".venv/bin/python");
    let status = Command::new(&python)
        .arg(repo_root().join("tests/reference/hf_logits.py"))
        .arg(&exported)
        .arg(work.path().join("tokens.safetensors"))
        .arg(work.path().join("logits.safetensors"))
        .status()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}); run scripts/setup first", python.display()));
    assert!(status.success(), "transformers could not load the export");
    let reference: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(work.path().join("logits.safetensors")).unwrap().into_iter().collect();
    let ours = engine.logits(&tokens).unwrap();
    let diff = (&ours - &reference["logits"]).abs().max().double_value(&[]);
    assert!(diff <= 1e-4, "logits of the exported model differ from ours by {diff:e}");

    let imported = build_engine(&config, Arc::new(Comm::single())).unwrap();
    imported.params.load_hf(&trainer::hf::HfWeights::open(&exported).unwrap()).unwrap();
    assert!(imported.params.values().equal(engine.params.values()), "import must reproduce every parameter");
}

fn partial_saves(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect()
}

#[test]
fn a_rank_killed_mid_save_leaves_the_previous_checkpoint_latest() {
    let work = tempfile::tempdir().unwrap();
    random_dataset(&work.path().join("data"));
    let run_dir = work.path().join("run");
    // A model large enough that writing a checkpoint takes a while (~60 MB per save).
    let sizes = ["model.dim=256", "model.n_heads=8", "model.n_kv_heads=8", "model.ffn_dim=688", "model.n_layers=4"];
    let saving = ["train.steps=100000", "checkpoint.every=2", "checkpoint.async_save=false"];
    let (mut command, config_path) = train_command(work.path(), "run", 2, 2, &[&sizes[..], &saving[..]].concat());
    let mut child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let root = run_dir.join("checkpoints");
    let started = Instant::now();
    let killed_during = loop {
        assert!(started.elapsed() < Duration::from_secs(120), "no save was caught in progress");
        let partial = partial_saves(&root);
        if root.join("latest").exists() && !partial.is_empty() {
            let pid = rank_pid(1, config_path.to_str().unwrap()).expect("rank 1 is running");
            signal(pid, "KILL");
            break partial;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let _ = child.wait();
    let latest = std::fs::read_to_string(root.join("latest")).unwrap();
    let latest_step: i64 = latest.trim().trim_start_matches("step-").parse().unwrap();
    assert!(!killed_during.iter().any(|p| p.contains(latest.trim())), "latest must not name the interrupted save");
    assert!(!partial_saves(&root).is_empty(), "the interrupted save is left as a .partial directory");
    assert!(Reader::open(&root.join(latest.trim())).is_ok(), "the previous checkpoint stays complete");

    // Resuming (on another layout) loads the previous checkpoint and cleans the partial one up.
    let resume_to = format!("train.steps={}", latest_step + 2);
    let resume: Vec<&str> = sizes.iter().copied().chain([resume_to.as_str(), "checkpoint.async_save=false"]).collect();
    let output = train_command(work.path(), "run", 1, 2, &resume).0.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("(step {latest_step}, saved by 2 ranks")), "{stderr}");
    assert!(partial_saves(&root).is_empty(), "the next published save removes abandoned partial saves");
}

#[test]
fn damaged_checkpoints_are_refused_with_the_file_named() {
    let work = tempfile::tempdir().unwrap();
    random_dataset(&work.path().join("data"));
    train(work.path(), "run", 1, &strings(&["train.steps=2", "train.eval_every=0"]));
    let good = step_dir(&work.path().join("run"), 2);
    let shard = "rank-00000.safetensors";
    type Damage = Box<dyn Fn(&Path)>;
    let edit_manifest = |f: fn(&mut serde_json::Value)| -> Damage {
        Box::new(move |dir: &Path| {
            let path = dir.join("manifest.json");
            let mut manifest: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            f(&mut manifest);
            std::fs::write(&path, manifest.to_string()).unwrap();
        })
    };
    let cases: Vec<(&str, Damage, Vec<&str>, String)> = vec![
        (
            "flipped byte",
            Box::new(|dir: &Path| {
                let path = dir.join("rank-00000.safetensors");
                let mut bytes = std::fs::read(&path).unwrap();
                let last = bytes.len() - 3;
                bytes[last] ^= 0x40;
                std::fs::write(&path, bytes).unwrap();
            }),
            vec![],
            format!("{shard}: checksum mismatch"),
        ),
        (
            "missing shard",
            Box::new(|dir: &Path| std::fs::remove_file(dir.join("rank-00000.safetensors")).unwrap()),
            vec![],
            format!("{shard} is missing (named by the manifest)"),
        ),
        (
            "path outside",
            edit_manifest(|m| m["tensors"]["model:lm_head.weight"]["pieces"][0]["file"] = "../../secret".into()),
            vec![],
            "names the file \"../../secret\", outside the checkpoint directory".into(),
        ),
        ("incompatible shape", Box::new(|_: &Path| {}), vec!["model.ffn_dim=128"], "incompatible model shape".into()),
        (
            "truncated file",
            Box::new(|dir: &Path| {
                let path = dir.join("rank-00000.safetensors");
                let bytes = std::fs::read(&path).unwrap();
                std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
            }),
            vec![],
            format!("{shard} is truncated or corrupt"),
        ),
        (
            "newer format",
            edit_manifest(|m| m["format_version"] = 99.into()),
            vec![],
            "checkpoint format version 99 is newer than this trainer's 1".into(),
        ),
    ];
    for (i, (what, damage, extra, expected)) in cases.into_iter().enumerate() {
        let copy = work.path().join(format!("damaged-{i}"));
        std::fs::create_dir_all(&copy).unwrap();
        for entry in std::fs::read_dir(&good).unwrap().flatten() {
            std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
        damage(&copy);
        let load = format!("checkpoint.load={}", copy.display());
        let overrides: Vec<&str> = [load.as_str()].into_iter().chain(extra).collect();
        let (mut command, _) = train_command(work.path(), &format!("r{i}"), 1, 4, &overrides);
        let output = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let status = if what == "incompatible shape" { launcher::protocol::INVALID_CONFIG.into() } else { 1 };
        assert_eq!(output.status.code(), Some(status), "{what}: {stderr}");
        assert!(stderr.contains(&expected), "{what}: expected {expected:?} in {stderr}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    }
}

#[test]
fn a_preemption_signal_saves_exits_for_requeue_and_the_requeued_run_matches() {
    let work = tempfile::tempdir().unwrap();
    random_dataset(&work.path().join("data"));
    let settings = strings(&["train.dtype=float32", "train.steps=40", "train.eval_every=0"]);
    let straight = train(work.path(), "straight", 2, &settings);

    let run_dir = work.path().join("preempted");
    let (mut command, config_path) = train_command(work.path(), "preempted", 2, 2, &settings);
    let child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let metrics = run_dir.join("metrics.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&metrics).map(|m| m.lines().count() < 3).unwrap_or(true) {
        assert!(started.elapsed() < Duration::from_secs(60), "training did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Only one rank is signalled; all ranks must stop after the same step.
    signal(rank_pid(1, config_path.to_str().unwrap()).expect("rank 1 is running"), "USR1");
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(75), "a preempted run exits with the requeue status: {stderr}");
    let latest = std::fs::read_to_string(run_dir.join("checkpoints/latest")).unwrap();
    let saved_step: i64 = latest.trim().trim_start_matches("step-").parse().unwrap();
    assert!((3..40).contains(&saved_step), "saved at step {saved_step}");

    let resumed = train(work.path(), "preempted", 2, &settings);
    assert_eq!(resumed.losses.len(), 40);
    for (step, (a, b)) in resumed.losses.iter().zip(&straight.losses).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "loss of step {} differs after the requeue", step + 1);
    }
    assert_identical("final weights after the requeue", &resumed.weights, &straight.weights);
}
