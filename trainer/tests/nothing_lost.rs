//! Nothing lost: exports and resumes never delete or overwrite what the program did not write, one job per run directory, and checkpoints of another model, damaged manifests (also fuzzed) and out-of-vocabulary data are refused with the cause named.
mod common;

use common::{random_dataset, train_command, TRAINER};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Names and contents of every file under `dir` but the run lock, sorted: what must not change.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.file_name().is_some_and(|name| name != ".lock") {
                files.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

/// A single-rank run of the fixture model in `work/name` that keeps every checkpoint.
fn run(name: &str, work: &Path, overrides: &[&str]) -> Output {
    let overrides: Vec<&str> = ["checkpoint.keep_last=10"].into_iter().chain(overrides.iter().copied()).collect();
    train_command(work, name, 1, 4, &overrides).0.output().unwrap()
}

/// Damage done to a manifest's `tensors` object.
type Damage = fn(&mut serde_json::Value);

fn assert_refused(output: &Output, expected: &str) {
    assert_refused_with(output, 1, expected);
}

/// Refused as an invalid configuration: the status that tells the launcher not to retry.
fn assert_refused_config(output: &Output, expected: &str) {
    assert_refused_with(output, launcher::protocol::INVALID_CONFIG.into(), expected);
}

fn assert_refused_with(output: &Output, status: i32, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(status), "{stderr}");
    assert!(stderr.contains(expected), "expected {expected:?} in {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A finished 5-step run of the fixture model in `work/run`, with checkpoints at steps 3 and 5.
fn finished_run(work: &Path) -> PathBuf {
    random_dataset(&work.join("data"));
    let output = run("run", work, &["checkpoint.every=3", "train.eval_every=0"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    work.join("run")
}

#[test]
fn exports_replace_only_previous_exports() {
    let work = tempfile::tempdir().unwrap();
    let run_dir = finished_run(work.path());
    let checkpoints = run_dir.join("checkpoints");
    let export = |output: &Path| {
        let step = checkpoints.join("step-00000005");
        Command::new(TRAINER)
            .args(["export-hf", "--checkpoint"])
            .arg(step)
            .arg("--output")
            .arg(output)
            .output()
            .unwrap()
    };
    let before = snapshot(&run_dir);
    assert_refused(&export(&checkpoints), "is not a previous export; exporting there would delete it");
    assert_refused(&export(&run_dir), "is not a previous export");
    assert_eq!(snapshot(&run_dir), before, "a refused export changed the run directory");

    let hf = work.path().join("hf");
    assert!(export(&hf).status.success());
    assert!(export(&hf).status.success(), "a previous export is replaced");
    assert!(hf.join("model.safetensors").exists() && !work.path().join(".hf.previous").exists());
    std::fs::write(hf.join("notes.txt"), "mine").unwrap();
    assert_refused(&export(&hf), "holds \"notes.txt\"");
    assert_eq!(std::fs::read_to_string(hf.join("notes.txt")).unwrap(), "mine");

    // train.export_dir is checked before any step: the run directory itself is refused untouched.
    let export_dir = format!("train.export_dir={}", run_dir.display());
    let output = run("run", work.path(), &[&export_dir, "train.steps=8", "train.eval_every=0"]);
    assert_refused_config(&output, "invalid config train.export_dir");
    assert_eq!(snapshot(&run_dir), before, "a refused run changed its run directory");
}

#[test]
fn a_missing_or_stale_latest_resumes_from_the_newest_complete_checkpoint() {
    let work = tempfile::tempdir().unwrap();
    let run_dir = finished_run(work.path());
    let checkpoints = run_dir.join("checkpoints");
    for damage in ["missing", "dangling", "stale"] {
        match damage {
            "missing" => std::fs::remove_file(checkpoints.join("latest")).unwrap(),
            "dangling" => std::fs::write(checkpoints.join("latest"), "step-00000099").unwrap(),
            _ => std::fs::write(checkpoints.join("latest"), "step-00000003").unwrap(),
        }
        let output = run("run", work.path(), &["train.steps=6", "train.eval_every=0"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{damage}: {stderr}");
        assert!(stderr.contains("resumed from") && stderr.contains("(step 5,"), "{damage}: {stderr}");
        let steps: Vec<i64> = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_i64().unwrap())
            .collect();
        assert_eq!(steps, vec![1, 2, 3, 4, 5, 6], "{damage}: metrics.jsonl kept its steps");
        assert_eq!(std::fs::read_to_string(checkpoints.join("latest")).unwrap(), "step-00000006", "{damage}");
        // Back to step 5 for the next case: drop step 6 as a crash before its save would have.
        std::fs::remove_dir_all(checkpoints.join("step-00000006")).unwrap();
        std::fs::write(checkpoints.join("latest"), "step-00000005").unwrap();
        let log = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
        std::fs::write(
            run_dir.join("metrics.jsonl"),
            log.lines().take(5).map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
    }
    let before = snapshot(&run_dir);
    let output = run("run", work.path(), &["checkpoint.resume=false", "train.steps=6"]);
    assert_refused_config(&output, "invalid config checkpoint.resume = false");
    assert_eq!(snapshot(&run_dir), before, "starting over touched the checkpoints");
}

#[test]
fn another_model_or_a_manifest_that_does_not_tile_its_tensors_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let run_dir = finished_run(work.path());
    // Shapes that happen to fit the tensors of the checkpoint are still another model.
    let output = run("run", work.path(), &["model.n_layers=1", "train.steps=6"]);
    assert_refused_config(&output, "model.n_layers = 2 in the checkpoint, 1 in this run");
    let output = run("run", work.path(), &["model.n_kv_heads=4", "train.steps=6"]);
    assert_refused_config(&output, "model.n_kv_heads = 2 in the checkpoint, 4 in this run");

    let step = run_dir.join("checkpoints/step-00000005");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(step.join("manifest.json")).unwrap()).unwrap();
    let cases: [(&str, Damage, &str); 4] = [
        ("overlap", |m| m["model:lm_head.weight"]["pieces"][0]["offset"][0] = 1.into(), "lies outside"),
        ("gap", |m| m["model:lm_head.weight"]["pieces"][0]["shape"][0] = 1.into(), "its pieces hold"),
        ("dimensions", |m| m["model:lm_head.weight"]["pieces"][0]["offset"] = serde_json::json!([0]), "offsets"),
        (
            "duplicate",
            |m| {
                let pieces = m["model:lm_head.weight"]["pieces"].as_array_mut().unwrap();
                pieces.push(pieces[0].clone());
            },
            "overlap",
        ),
    ];
    for (i, (what, damage, expected)) in cases.into_iter().enumerate() {
        let copy = work.path().join(format!("step-{i}/step-00000005"));
        std::fs::create_dir_all(&copy).unwrap();
        for entry in std::fs::read_dir(&step).unwrap().flatten() {
            std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
        let mut damaged = manifest.clone();
        damage(&mut damaged["tensors"]);
        std::fs::write(copy.join("manifest.json"), damaged.to_string()).unwrap();
        let load = format!("checkpoint.load={}", copy.display());
        let output = run(&format!("r{i}"), work.path(), &[&load]);
        assert_refused(&output, expected);
        assert!(String::from_utf8_lossy(&output.stderr).contains("model:lm_head.weight is corrupt"), "{what}");
    }
    let mut wrong_step = manifest.clone();
    wrong_step["step"] = 7.into();
    std::fs::write(step.join("manifest.json"), wrong_step.to_string()).unwrap();
    let load = format!("checkpoint.load={}", step.display());
    assert_refused(&run("r-step", work.path(), &[&load]), "the manifest is of step 7");
}

#[test]
fn token_ids_outside_the_vocabulary_are_an_error_naming_the_data() {
    let work = tempfile::tempdir().unwrap();
    random_dataset(&work.path().join("data"));
    // Damage tokens of the training shard (between its header and its document table): u16 ids of 65535.
    let shard = work.path().join("data/train-00000.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    let len = bytes.len();
    bytes[len / 8..len * 5 / 8].fill(0xff);
    std::fs::write(&shard, bytes).unwrap();
    let output = run("run", work.path(), &["train.eval_every=0"]);
    assert_refused(&output, "holds token id 65535, outside the model's vocabulary of 512 (model.vocab_size)");
}

#[test]
fn a_run_directory_takes_one_job_at_a_time_and_a_dead_job_leaves_no_lock() {
    let work = tempfile::tempdir().unwrap();
    random_dataset(&work.path().join("data"));
    let settings = ["checkpoint.keep_last=10", "train.steps=100000", "train.eval_every=0"];
    let (mut command, _) = train_command(work.path(), "run", 1, 4, &settings);
    let mut first = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let metrics = work.path().join("run/metrics.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.is_empty()) {
        assert!(started.elapsed() < Duration::from_secs(60), "the first job did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = run("run", work.path(), &["train.steps=3"]);
    assert_refused(&second, &format!("is in use by another job (pid {}", first.id()));
    first.kill().unwrap();
    first.wait().unwrap();
    let third = run("run", work.path(), &["train.steps=3", "checkpoint.resume=false"]);
    // The killed job's lock ended with it; it saved no checkpoint, so this run starts over.
    assert!(third.status.success(), "{}", String::from_utf8_lossy(&third.stderr));
}

/// A small deterministic generator for the fuzz cases.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// Every number, string, array and object of a JSON value, by path, to pick one to damage.
fn paths(value: &serde_json::Value, at: Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(at.clone());
    let children: Vec<(String, &serde_json::Value)> = match value {
        serde_json::Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), v)).collect(),
        serde_json::Value::Array(items) => items.iter().enumerate().map(|(i, v)| (i.to_string(), v)).collect(),
        _ => Vec::new(),
    };
    for (key, child) in children {
        let mut path = at.clone();
        path.push(key);
        paths(child, path, out);
    }
}

fn at_path<'a>(value: &'a mut serde_json::Value, path: &[String]) -> &'a mut serde_json::Value {
    path.iter().fold(value, |v, key| match v {
        serde_json::Value::Array(items) => &mut items[key.parse::<usize>().unwrap()],
        other => &mut other[key.as_str()],
    })
}

#[test]
fn fuzzed_manifests_give_errors_never_panics() {
    let work = tempfile::tempdir().unwrap();
    let run_dir = finished_run(work.path());
    let step = run_dir.join("checkpoints/step-00000005");
    let pristine: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(step.join("manifest.json")).unwrap()).unwrap();
    let config = trainer::config::Config::parse(pristine["config"].as_str().unwrap(), &[]).unwrap();
    let engine = trainer::train::build_engine(&config, std::sync::Arc::new(trainer::comm::Comm::single())).unwrap();
    let mut all = Vec::new();
    paths(&pristine, Vec::new(), &mut all);
    let damages: [fn(&mut serde_json::Value, &mut Lcg); 5] = [
        |v, _| *v = serde_json::Value::Null,
        |v, r| *v = (-(r.below(1000) as i64)).into(),
        |v, _| *v = (i64::MAX - 3).into(),
        |v, _| *v = "x".into(),
        |v, r| {
            if let serde_json::Value::Array(items) = v {
                if !items.is_empty() {
                    items.remove(r.below(items.len()));
                }
            }
        },
    ];
    let mut random = Lcg(20261201);
    let (mut refused, cases) = (0, 300);
    for case in 0..cases {
        let mut manifest = pristine.clone();
        let path = &all[random.below(all.len())];
        damages[random.below(damages.len())](at_path(&mut manifest, path), &mut random);
        std::fs::write(step.join("manifest.json"), manifest.to_string()).unwrap();
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            trainer::checkpoint::Reader::open(&step).and_then(|mut reader| {
                trainer::checkpoint::check_same_model(&reader, &config, false)?;
                trainer::checkpoint::load_params(&mut reader, &engine.params)
            })
        }));
        match loaded {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                refused += 1;
                assert!(format!("{error:#}").contains(step.to_str().unwrap()), "case {case} {path:?}: {error:#}");
            }
            Err(_) => panic!("case {case}: damaging {path:?} made loading panic"),
        }
    }
    assert!(refused > cases / 2, "only {refused} of {cases} damaged manifests were refused");
}
