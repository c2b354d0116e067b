//! Supervision of an mpirun job: restarts after failures with exponential backoff, the preemption status, and errors that no restart can fix.
use crate::mpirun::{exit_code, Job, Outcome};
use crate::signals::SignalForwarder;
use anyhow::Result;
use std::time::Duration;

/// The trainer's exit status after a preemption signal: it saved a checkpoint and wants to be started again.
pub const PREEMPTED: i32 = 75;
/// A usage error (clap's status for bad command-line arguments): running the same command again cannot succeed.
pub const USAGE_ERROR: i32 = 2;
/// The longest wait between two restarts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// When to start a job again, and how long it may take to stop.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Restarts after failures (0: run once, as an unsupervised job).
    pub max_restarts: u32,
    /// Wait before the first restart after a failure; doubled for each further one, up to [`MAX_BACKOFF`].
    pub backoff: Duration,
    /// Restart at once (without counting a failure) when the job exits [`PREEMPTED`], instead of exiting 75.
    pub restart_on_preempt: bool,
    /// After the launcher's SIGINT/SIGTERM, how long the job may take to exit before it is killed.
    pub kill_after: Duration,
}

impl Policy {
    fn supervised(&self) -> bool {
        self.max_restarts > 0 || self.restart_on_preempt
    }

    /// The wait before restart number `failures` (1-based) after a failure.
    pub fn backoff_before(&self, failures: u32) -> Duration {
        let factor = 2f64.powi(failures.saturating_sub(1).min(30) as i32);
        Duration::from_secs_f64((self.backoff.as_secs_f64() * factor).min(MAX_BACKOFF.as_secs_f64()))
    }
}

/// What to do after one run of the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Done,
    RestartNow,
    RestartAfterBackoff,
    Stop,
}

/// Runs `job` under `policy`; returns the launcher's exit code. Every run gets `TRAINER_RESTARTS=<restarts so far>`
/// when supervised. SIGINT/SIGTERM to the launcher reach the running job and end supervision.
pub fn supervise(mut job: Job, policy: &Policy) -> Result<i32> {
    let signals = SignalForwarder::install(policy.kill_after)?;
    let mut restarts = 0u32;
    let mut failures = 0u32;
    loop {
        if policy.supervised() {
            job.env.retain(|(name, _)| name != "TRAINER_RESTARTS");
            job.env.push(("TRAINER_RESTARTS".into(), restarts.to_string()));
        }
        let outcome = job.run(&signals)?;
        let code = exit_code(outcome.status);
        let what = describe(&outcome);
        if !policy.supervised() {
            match code {
                0 => {}
                PREEMPTED => eprintln!("launcher: job preempted ({what})"),
                _ => eprintln!("launcher: job failed ({what})"),
            }
            return Ok(code);
        }
        let next = match code {
            0 => Next::Done,
            _ if signals.received().is_some() => Next::Stop,
            PREEMPTED if policy.restart_on_preempt => Next::RestartNow,
            PREEMPTED => Next::Stop,
            USAGE_ERROR => Next::Stop,
            _ if outcome.config_refused => Next::Stop,
            _ if failures < policy.max_restarts => Next::RestartAfterBackoff,
            _ => Next::Stop,
        };
        let attempts = restarts + 1;
        match next {
            Next::Done => {
                eprintln!(
                    "launcher: job finished after {attempts} run(s): {restarts} restart(s), {failures} after failures"
                );
                return Ok(0);
            }
            Next::Stop => {
                let why = if let Some(signal) = signals.received() {
                    format!("the launcher received {signal}")
                } else if code == PREEMPTED {
                    "preempted: exiting 75 so that a scheduler can requeue it (--restart-on-preempt restarts it here)"
                        .to_string()
                } else if code == USAGE_ERROR {
                    "exit status 2 is a usage error, which a restart cannot fix".to_string()
                } else if outcome.config_refused {
                    "the trainer refused its configuration, which a restart cannot fix".to_string()
                } else {
                    format!(
                        "giving up after {failures} restart(s) after failures (--max-restarts {})",
                        policy.max_restarts
                    )
                };
                eprintln!(
                    "launcher: job failed ({what}); not restarting: {why}; {attempts} run(s), {restarts} restart(s)"
                );
                return Ok(code);
            }
            Next::RestartNow => {
                restarts += 1;
                eprintln!("launcher: job preempted ({what}); restarting it now (restart {restarts}, not a failure)");
            }
            Next::RestartAfterBackoff => {
                failures += 1;
                let wait = policy.backoff_before(failures);
                eprintln!(
                    "launcher: job failed ({what}); restart {failures} of {} in {:.1} s (it resumes from its latest checkpoint)",
                    policy.max_restarts,
                    wait.as_secs_f64()
                );
                if let Some(signal) = signals.sleep(wait) {
                    eprintln!("launcher: received {signal} while waiting to restart; not restarting");
                    return Ok(code);
                }
                restarts += 1;
            }
        }
    }
}

fn describe(outcome: &Outcome) -> String {
    use std::os::unix::process::ExitStatusExt;
    let status = outcome.status;
    let mut text = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("mpirun killed by signal {signal}"),
        (None, None) => format!("{status}"),
    };
    if outcome.leftovers_killed > 0 {
        text += &format!(", {} process(es) outliving mpirun killed", outcome.leftovers_killed);
    }
    if let Some(name) = outcome.stopped.signal {
        text += &format!(", asked to stop: the launcher received {name}");
    }
    if let Some(why) = &outcome.stopped.killed {
        text += &format!("; the job was killed (SIGKILL) {why}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let policy = Policy {
            max_restarts: 20,
            backoff: Duration::from_secs(5),
            restart_on_preempt: false,
            kill_after: Duration::from_secs(120),
        };
        let waits: Vec<u64> = (1..=8).map(|n| policy.backoff_before(n).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(policy.backoff_before(1000), MAX_BACKOFF);
    }
}
