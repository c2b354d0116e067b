//! Parallel runs under real `mpirun` equal the single-rank run (f64: TP, DP, TP x DP, ZeRO, recomputation and reduction overlap on and off; bf16 within rounding), bad layouts fail early, a hung rank makes the others fail in time, and an error on one rank ends the job at once.
mod common;

use common::{random_dataset, rank_pid, relative_diff, signal, train, train_command, Run, STEPS};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};
use tch::Kind;

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
                // Reductions after the whole backward instead of overlapped: each ZeRO and
                // recomputation setting meets both, at no extra runs.
                let overlap = zero == recompute;
                let name = format!("tp{tp}-dp{}-zero-{zero}-recompute-{recompute}-overlap-{overlap}", ranks / tp);
                let overrides = [
                    format!("parallel.tensor={tp}"),
                    format!("parallel.zero={zero}"),
                    format!("train.recompute={recompute}"),
                    format!("parallel.overlap_grad_reduce={overlap}"),
                ];
                let run = train(work.path(), &name, ranks, &overrides);
                assert_equal_runs(&name, &run, &reference);
            }
        }
    }
}

/// Relative L2 distance between two runs' final weights, over all tensors together.
fn weight_distance(run: &Run, reference: &Run) -> f64 {
    let (mut diff, mut norm) = (0.0, 0.0);
    for (tensor, expected) in &reference.weights {
        let expected = expected.to_kind(Kind::Float);
        diff += (run.weights[tensor].to_kind(Kind::Float) - &expected).square().sum(Kind::Double).double_value(&[]);
        norm += expected.square().sum(Kind::Double).double_value(&[]);
    }
    (diff / norm).sqrt()
}

/// bf16 parameters with f32 master weights: the gradients accumulate in f32 and are
/// reduce-scattered into the shard, the tensor-parallel all-reduces of activations are bf16
/// (the path multi-GPU runs take; MPI reduces bf16 via f32).
/// bf16 cannot match exactly, so the yardstick is the single-rank run with its micro-batches
/// split differently: only the rounding differs there.
#[test]
fn bf16_tensor_and_data_parallel_zero_tracks_the_single_rank_run() {
    let work = tempfile::tempdir().unwrap();
    random_dataset(&work.path().join("data"));
    let bf16 = "train.dtype=bfloat16".to_string();
    let reference = train(work.path(), "bf16-single", 1, std::slice::from_ref(&bf16));
    assert_eq!(reference.weights["model.embed_tokens.weight"].kind(), Kind::BFloat16);
    let resplit = train(work.path(), "bf16-single-resplit", 1, &[bf16.clone(), "train.micro_batch=2".into()]);
    let parallel = ["parallel.tensor=2".to_string(), "parallel.zero=true".into()];
    let run = train(work.path(), "bf16-tp2-dp2", 4, &[bf16, parallel[0].clone(), parallel[1].clone()]);
    for (step, (a, b)) in run.losses.iter().zip(&reference.losses).enumerate() {
        // 1e-3 is about a quarter of bf16's rounding step.
        assert!(relative_diff(*a, *b) <= 1e-3, "step {}: loss {a} vs single rank {b}", step + 1);
    }
    let (noise, distance) = (weight_distance(&resplit, &reference), weight_distance(&run, &reference));
    assert!(noise > 0.0 && noise < 0.1, "bf16 rounding moved the weights by {noise:e}");
    assert!(
        distance <= 3.0 * noise,
        "TP2xDP2 weights are {distance:e} from the single rank's, rounding alone {noise:e}"
    );
}

fn failing_run(ranks: usize, overrides: &[&str]) -> Output {
    let work = tempfile::tempdir().unwrap();
    random_dataset(&work.path().join("data"));
    train_command(work.path(), "run", ranks, 1, overrides).0.output().unwrap()
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

#[test]
fn a_hung_rank_makes_the_others_fail_within_the_timeout() {
    let work = tempfile::tempdir().unwrap();
    random_dataset(&work.path().join("data"));
    let run_dir = work.path().join("hang");
    let settings = ["train.steps=100000", "parallel.collective_timeout_s=3", "train.eval_every=0"];
    let (mut command, config_path) = train_command(work.path(), "hang", 2, 2, &settings);
    let child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
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
    // Where rank 1 stopped decides which collective rank 0 waits in: the message names it.
    let line = stderr.lines().find(|l| l.contains("timed out after 3.0s")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains("error: rank 0 (tensor-parallel rank 0/1, data-parallel rank 0/2): "), "{line}");
    let operations = ["all_reduce(Sum) of ", "reduce_scatter of ", "all_gather into "];
    assert!(operations.iter().any(|op| line.contains(op)), "{line}");
    let groups = ["in the data-parallel group", "in the world group"];
    assert!(line.contains(" Double elements on Cpu ") && groups.iter().any(|g| line.contains(g)), "{line}");
}

#[test]
fn an_error_on_one_rank_is_printed_once_and_ends_the_job_at_once() {
    let work = tempfile::tempdir().unwrap();
    random_dataset(&work.path().join("data"));
    // Only rank 0 writes the run's log: a directory in its place fails rank 0 alone.
    std::fs::create_dir_all(work.path().join("broken/metrics.jsonl")).unwrap();
    let settings = ["parallel.collective_timeout_s=300", "train.eval_every=0"];
    let (mut command, _) = train_command(work.path(), "broken", 2, 2, &settings);
    let started = Instant::now();
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10), "the job took {:?} to end: {stderr}", started.elapsed());
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("cannot write") && errors[0].contains("metrics.jsonl"), "{stderr}");
}
