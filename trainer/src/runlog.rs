//! The run's `metrics.jsonl`, one JSON object per step: its schema ([`StepRecord`]), its writer on rank 0 ([`StepLog`]) and its reader for `trainer report` ([`read_metrics`]).
use crate::config::Config;
use crate::timing::{GroupSeconds, PhaseSeconds};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// One line of the run's `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepRecord {
    pub step: i64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub step_seconds: f64,
    /// Model FLOPs utilization (see `Metrics::mfu`).
    pub mfu: f64,
    /// Seconds of the step by phase (data wait, forward, backward, communication wait, optimizer).
    #[serde(serialize_with = "crate::timing::serialize_phases")]
    pub phase_seconds: PhaseSeconds,
    /// Of the communication phase: seconds waited on each group's collectives (tensor, data, world).
    #[serde(serialize_with = "crate::timing::serialize_groups")]
    pub wait_seconds: GroupSeconds,
    /// Host synchronizations from the step's start to its record (see [`crate::step_sync`]):
    /// one, where the step's scalars are read, unless something else stalls the host.
    pub host_syncs: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// The held-out evaluations of `[eval]`, run with the validation loss: each task's scores.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub eval: EvalScores,
    /// This rank's peak of allocated memory during the step's forward, backward and update,
    /// above what the process held before the model was built ([`crate::memory::PeakMemory`]);
    /// absent where it is not measured yet (CUDA).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
}

/// Each evaluation task's scores by name (one of [`EVAL_SCORES`]), the task by its name.
pub type EvalScores = BTreeMap<String, BTreeMap<String, f64>>;

/// The scores an evaluation reports: the name in metrics.jsonl, the Prometheus gauge (by task),
/// and what it means.
pub const EVAL_SCORES: [(&str, &str, &str); 6] = [
    ("accuracy", "trainer_eval_accuracy", "Multiple-choice accuracy: the right choice has the highest log-likelihood"),
    (
        "accuracy_norm",
        "trainer_eval_accuracy_norm",
        "Multiple-choice accuracy by log-likelihood per byte of each choice (acc_norm)",
    ),
    (
        "answer_nll",
        "trainer_eval_answer_nll",
        "Negative log-likelihood (nats) of the right choices, averaged over the items",
    ),
    ("loss", "trainer_eval_loss", "Mean negative log-likelihood per token (nats) of held-out text"),
    ("perplexity", "trainer_eval_perplexity", "Perplexity of held-out text"),
    // promtool takes a name with "bits" for a size in bits, to be given in bytes: bpb is the usual short form.
    ("bits_per_byte", "trainer_eval_bpb", "Negative log-likelihood of held-out text in bits per byte of it"),
];

/// The fields of one `metrics.jsonl` line that the report draws (others are ignored).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ReportRow {
    pub step: i64,
    pub loss: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
    #[serde(default)]
    pub val_loss: Option<f64>,
}

/// The run directory's `config.toml` and `metrics.jsonl` (one JSON line per step), kept by rank 0.
pub struct StepLog {
    file: std::fs::File,
}

impl StepLog {
    /// Creates the log, or (resuming after `first_step` steps) keeps the lines of the steps
    /// up to it and appends after them.
    pub fn open(config: &Config, first_step: i64) -> Result<StepLog> {
        let run_dir = &config.train.run_dir;
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("cannot create run directory {}", run_dir.display()))?;
        let written = run_dir.join("config.toml");
        std::fs::write(&written, config.to_toml()).with_context(|| format!("cannot write {}", written.display()))?;
        let path = run_dir.join("metrics.jsonl");
        let kept: String = match std::fs::read_to_string(&path) {
            Ok(text) if first_step > 0 => text
                .lines()
                .filter(|line| {
                    let step = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["step"].as_i64());
                    step.is_some_and(|s| s <= first_step)
                })
                .map(|line| format!("{line}\n"))
                .collect(),
            _ => String::new(),
        };
        std::fs::write(&path, kept).with_context(|| format!("cannot write {}", path.display()))?;
        let file = std::fs::OpenOptions::new().append(true).open(&path)?;
        Ok(StepLog { file })
    }

    /// Appends `record` as one line.
    pub fn write(&mut self, record: &StepRecord) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(record)?)?;
        Ok(())
    }
}

/// Reads `metrics.jsonl` (one JSON object per step; blank lines are skipped).
pub fn read_metrics(path: &Path) -> Result<Vec<ReportRow>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let row = serde_json::from_str(line).with_context(|| format!("{} line {}", path.display(), i + 1))?;
        rows.push(row);
    }
    if rows.is_empty() {
        bail!("{} has no steps to report", path.display());
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = include_str!("../../configs/tiny.toml");

    fn record(step: i64, val_loss: Option<f64>) -> StepRecord {
        StepRecord {
            step,
            loss: 5.0 - step as f64 / 8.0,
            lr: 1e-3 * step as f64,
            grad_norm: 0.5,
            tokens_per_s: 1000.0 + step as f64,
            step_seconds: 0.25,
            mfu: 0.125,
            phase_seconds: [0.05; 5],
            wait_seconds: [0.0, 0.05, 0.0],
            host_syncs: 1,
            val_loss,
            eval: EvalScores::new(),
            peak_memory_bytes: None,
        }
    }

    #[test]
    fn a_resumed_log_keeps_the_steps_up_to_the_resumed_one_and_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse(TINY, &[format!("train.run_dir={}", dir.path().display())]).unwrap();
        let mut log = StepLog::open(&config, 0).unwrap();
        for step in 1..=3 {
            log.write(&record(step, None)).unwrap();
        }
        // Resumed from step 2: step 3 is trained again and logged once.
        let mut log = StepLog::open(&config, 2).unwrap();
        log.write(&record(3, Some(4.5))).unwrap();
        let rows = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
        let expected: Vec<ReportRow> = [record(1, None), record(2, None), record(3, Some(4.5))]
            .iter()
            .map(|r| ReportRow {
                step: r.step,
                loss: r.loss,
                lr: r.lr,
                tokens_per_s: r.tokens_per_s,
                val_loss: r.val_loss,
            })
            .collect();
        assert_eq!(rows, expected);
        assert!(dir.path().join("config.toml").is_file());
    }
}
