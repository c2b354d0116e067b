//! Preemption: a signal (SIGTERM or SIGUSR1 by default) asks the run to finish its step, save a checkpoint and exit with a "requeue" status.
use crate::config::PreemptSignal;
use anyhow::{Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct Preemption {
    requested: Arc<AtomicBool>,
}

impl Preemption {
    /// Starts listening for `signals`.
    pub fn install(signals: &[PreemptSignal]) -> Result<Preemption> {
        let requested = Arc::new(AtomicBool::new(false));
        for signal in signals {
            signal_hook::flag::register(signal.number(), requested.clone())
                .with_context(|| format!("cannot handle {signal:?}"))?;
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
