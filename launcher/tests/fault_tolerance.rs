//! The real trainer under `launcher run --max-restarts`: a SIGKILLed rank and a hung rank are recovered from by a restart that resumes bit for bit; a bad configuration is not restarted.
mod common;

use common::{launcher, processes_with, rank_pid, signal, trainer, wait_until, Running};
use rustix::process::Signal;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const STEPS: usize = 24;

/// Random documents of random tokens (as in the trainer's tests).
fn random_dataset(dir: &Path) {
    data_shards::write_random_dataset(dir, 120, 512, 12345).unwrap();
}

/// The trainer tests' small model (tests/fixtures/small-random.toml) in f32 on one thread per rank (bitwise
/// repeatable), for `STEPS` steps, saving every 2 steps; returns the config path.
fn write_config(work: &Path, name: &str) -> PathBuf {
    let run = work.join(name);
    let mut config: toml::Table = include_str!("../../tests/fixtures/small-random.toml").parse().unwrap();
    let mut set = |section: &str, key: &str, value: toml::Value| {
        let table = config.entry(section).or_insert_with(|| toml::Table::new().into());
        table.as_table_mut().unwrap().insert(key.into(), value);
    };
    set("train", "steps", (STEPS as i64).into());
    set("train", "dtype", "float32".into());
    set("train", "log_every", 1.into());
    set("train", "eval_every", 8.into());
    set("train", "run_dir", run.display().to_string().into());
    set("train", "export_dir", format!("{}/final", run.display()).into());
    set("checkpoint", "every", 2.into());
    set("data", "path", work.join("data").display().to_string().into());
    let path = work.join(format!("{name}.toml"));
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    path
}

/// `launcher run --nproc 2 <flags> -- train --config <config> <extra>`.
fn start(config: &Path, flags: &[&str], extra: &[&str]) -> Running {
    let mut command = launcher();
    command.args(["run", "--nproc", "2", "--program"]).arg(trainer()).args(flags);
    command.args(["--", "train", "--config"]).arg(config).args(extra);
    Running::start(&mut command)
}

/// What must be identical between two runs: every step's loss, learning rate, gradient norm and validation loss, and
/// the exported final weights (compared as bytes).
fn result(run: &Path) -> (Vec<String>, Vec<u8>) {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let records = text
        .lines()
        .map(|line| {
            let r: serde_json::Value = serde_json::from_str(line).unwrap();
            let bits = |key: &str| r[key].as_f64().map(|v| format!("{:016x}", v.to_bits())).unwrap_or_default();
            format!(
                "step {} loss {} lr {} grad_norm {} val {}",
                r["step"],
                bits("loss"),
                bits("lr"),
                bits("grad_norm"),
                bits("val_loss")
            )
        })
        .collect();
    (records, std::fs::read(run.join("final/model.safetensors")).unwrap())
}

fn assert_same(reference: &(Vec<String>, Vec<u8>), other: &(Vec<String>, Vec<u8>)) {
    assert_eq!(other.0.len(), STEPS, "one record per step: {:#?}", other.0);
    assert_eq!(reference.0, other.0, "per-step records differ");
    assert!(reference.1 == other.1, "the final weights differ");
}

/// Steps logged so far by the run in `run`.
fn logged_steps(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map(|m| m.lines().count()).unwrap_or(0)
}

/// A step in 3..=10 that differs from run to run.
fn random_step() -> usize {
    3 + (SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos() as usize / 1000) % 8
}

fn uninterrupted(work: &Path) -> (Vec<String>, Vec<u8>) {
    let config = write_config(work, "straight");
    let (status, stderr) = start(&config, &[], &[]).finish(Duration::from_secs(300));
    assert!(status.success(), "{stderr}");
    result(&work.join("straight"))
}

#[test]
fn a_killed_rank_and_a_hung_rank_are_restarted_and_the_run_equals_an_uninterrupted_one() {
    let work = tempfile::tempdir().unwrap();
    random_dataset(&work.path().join("data"));
    let reference = uninterrupted(work.path());

    // SIGKILL of rank 1 at a random step.
    let config = write_config(work.path(), "killed");
    let needle = config.to_str().unwrap().to_string();
    let running = start(&config, &["--max-restarts", "3", "--restart-backoff", "0.2"], &[]);
    let at = random_step();
    assert!(wait_until(Duration::from_secs(120), || logged_steps(&work.path().join("killed")) >= at), "no progress");
    signal(rank_pid(1, &needle).expect("rank 1 is running"), Signal::KILL);
    let (status, stderr) = running.finish(Duration::from_secs(300));
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("restart 1 of 3"), "{stderr}");
    assert!(stderr.contains("job finished after 2 run(s): 1 restart(s), 1 after failures"), "{stderr}");
    assert!(stderr.contains("resumed from"), "the restarted run resumes from a checkpoint:\n{stderr}");
    assert_same(&reference, &result(&work.path().join("killed")));
    assert!(wait_until(Duration::from_secs(2), || processes_with(&needle).is_empty()), "trainer processes left");

    // SIGSTOP of rank 1: rank 0 times out in its next collective, the job fails and is restarted.
    let config = write_config(work.path(), "hung");
    let needle = config.to_str().unwrap().to_string();
    let running = start(
        &config,
        &["--max-restarts", "3", "--restart-backoff", "0.2"],
        &["--set", "parallel.collective_timeout_s=3"],
    );
    let at = random_step();
    assert!(wait_until(Duration::from_secs(120), || logged_steps(&work.path().join("hung")) >= at), "no progress");
    let stopped = rank_pid(1, &needle).expect("rank 1 is running");
    signal(stopped, Signal::STOP);
    let outcome = running.finish(Duration::from_secs(300));
    // Cleanup first, whatever happened: the stopped rank must not survive the test.
    if processes_with(&needle).contains(&stopped) {
        signal(stopped, Signal::CONT);
        signal(stopped, Signal::KILL);
    }
    let (status, stderr) = outcome;
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("timed out after"), "{stderr}");
    assert!(stderr.contains("job finished after 2 run(s): 1 restart(s), 1 after failures"), "{stderr}");
    assert_same(&reference, &result(&work.path().join("hung")));
    assert!(wait_until(Duration::from_secs(2), || processes_with(&needle).is_empty()), "trainer processes left");
}

#[test]
fn an_invalid_configuration_stops_at_once_without_restarts() {
    let work = tempfile::tempdir().unwrap();
    random_dataset(&work.path().join("data"));
    let config = write_config(work.path(), "bad");
    let running = start(&config, &["--max-restarts", "3", "--restart-backoff", "30"], &["--set", "model.n_heads=7"]);
    let (status, stderr) = running.finish(Duration::from_secs(25));
    // The trainer exits (MPI_Abort) with the invalid-configuration status, which alone stops the supervision.
    assert_eq!(status.code(), Some(i32::from(launcher::protocol::INVALID_CONFIG)), "{stderr}");
    assert!(stderr.contains("model.n_heads = 7"), "{stderr}");
    assert!(stderr.contains("not restarting: the trainer refused its configuration (exit status 78)"), "{stderr}");
    assert!(!stderr.contains("restart 1 of"), "{stderr}");
}

#[test]
fn sigterm_to_the_launcher_saves_and_exits_75_and_sigkill_leaves_no_trainer() {
    let work = tempfile::tempdir().unwrap();
    random_dataset(&work.path().join("data"));

    // SIGTERM: the ranks finish the step, save it and exit 75, which is the launcher's status too.
    let config = write_config(work.path(), "stopped");
    let run = work.path().join("stopped");
    let running = start(&config, &[], &[]);
    assert!(wait_until(Duration::from_secs(120), || logged_steps(&run) >= 3), "no progress");
    signal(running.child.id(), Signal::TERM);
    let (status, stderr) = running.finish(Duration::from_secs(120));
    assert_eq!(status.code(), Some(75), "{stderr}");
    let steps = logged_steps(&run);
    assert!(steps < STEPS, "the run was not stopped: {steps} steps");
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), format!("step-{steps:08}"), "the last step is saved");

    // SIGKILL: mpirun and the ranks do not outlive the launcher.
    let config = write_config(work.path(), "orphaned");
    let needle = config.to_str().unwrap().to_string();
    let running = start(&config, &[], &[]);
    assert!(wait_until(Duration::from_secs(120), || logged_steps(&work.path().join("orphaned")) >= 3), "no progress");
    signal(running.child.id(), Signal::KILL);
    let _ = running.finish(Duration::from_secs(10));
    let gone = wait_until(Duration::from_secs(5), || processes_with(&needle).is_empty());
    let left = processes_with(&needle);
    left.iter().for_each(|&pid| signal(pid, Signal::KILL));
    assert!(gone, "mpirun or trainer ranks outlived the launcher: {left:?}");
}
