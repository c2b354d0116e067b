//! Preemption: a signal (SIGTERM or SIGUSR1 by default) asks the run to finish its step, save a checkpoint and exit with a "requeue" status.
use anyhow::{bail, Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The exit status of a preempted run (BSD's EX_TEMPFAIL): the launcher and the Slurm
/// script requeue on it instead of counting a failure.
pub const REQUEUE_EXIT_CODE: u8 = 75;

/// The signals that may be named in `train.preempt_signals`.
const SIGNALS: [(&str, i32); 4] = [
    ("SIGTERM", signal_hook::consts::SIGTERM),
    ("SIGUSR1", signal_hook::consts::SIGUSR1),
    ("SIGUSR2", signal_hook::consts::SIGUSR2),
    ("SIGINT", signal_hook::consts::SIGINT),
];

pub fn check_signal_names(names: &[String]) -> Result<()> {
    for name in names {
        if !SIGNALS.iter().any(|(known, _)| known == name) {
            let known: Vec<&str> = SIGNALS.iter().map(|(n, _)| *n).collect();
            bail!("train.preempt_signals names {name:?}; use some of {known:?}");
        }
    }
    Ok(())
}

#[derive(Debug)]
pub struct Preemption {
    requested: Arc<AtomicBool>,
}

impl Preemption {
    /// Starts listening for `signals` (names from `SIGNALS`).
    pub fn install(signals: &[String]) -> Result<Preemption> {
        check_signal_names(signals)?;
        let requested = Arc::new(AtomicBool::new(false));
        for name in signals {
            let (_, number) = SIGNALS.iter().find(|(n, _)| n == name).expect("checked above");
            signal_hook::flag::register(*number, requested.clone()).with_context(|| format!("cannot handle {name}"))?;
        }
        Ok(Preemption { requested })
    }

    /// Whether this rank has received a preemption signal. Every rank's answer goes into the
    /// step's one all-reduce, so that all ranks stop after the same step even if only one
    /// was signalled.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }
}
