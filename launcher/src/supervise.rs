//! Supervision of an mpirun job: restarts after failures with exponential backoff, decided by the job's exit status alone (preempted, invalid configuration, usage error, other failures).
use crate::cluster::Cluster;
use crate::mpirun::{Job, Outcome};
use crate::signals::SignalForwarder;
use anyhow::Result;
use launcher::protocol::{exit_code, ExitClass, INVALID_CONFIG, PREEMPTED, USAGE_ERROR};
use std::time::Duration;

/// The longest wait between two restarts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// When to start a job again, and how long it may take to stop.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Restarts after failures (0: run once, as an unsupervised job).
    pub max_restarts: u32,
    /// Wait before the first restart after a failure; doubled for each further one, up to [`MAX_BACKOFF`].
    pub backoff: Duration,
    /// Restart at once (without counting a failure) when the job exits [`PREEMPTED`], instead of exiting with it.
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

/// Runs `job` under `policy` on `cluster`'s hosts; returns the launcher's exit code. Every run gets
/// `TRAINER_RESTARTS=<restarts so far>` when supervised. A failed run of a hostfile job is followed by asking every
/// host whether it answers: the lost ones are named, and with `--elastic` the next run goes to the others.
/// SIGINT/SIGTERM to the launcher reach the running job and end supervision.
pub fn supervise(mut job: Job, policy: &Policy, cluster: &mut Cluster) -> Result<i32> {
    let signals = SignalForwarder::install(policy.kill_after)?;
    let mut restarts = 0u32;
    let mut failures = 0u32;
    loop {
        if policy.supervised() {
            job.env.retain(|(name, _)| name != "TRAINER_RESTARTS");
            job.env.push(("TRAINER_RESTARTS".into(), restarts.to_string()));
        }
        let watch = cluster.place(&mut job)?;
        let outcome = job.run(&signals, watch)?;
        let code = exit_code(outcome.status);
        let class = ExitClass::of(code);
        let mut what = describe(&outcome);
        if class == ExitClass::Failed && signals.received().is_none() {
            let lost = cluster.lost()?;
            if !lost.is_empty() {
                what += &format!(
                    "; lost host(s): {} (no answer within {:.0} s){}",
                    lost.join(", "),
                    cluster.probe_seconds(),
                    if cluster.elastic() { ", a restart goes to the others (--elastic)" } else { "" }
                );
            }
        }
        if !policy.supervised() {
            match class {
                ExitClass::Succeeded => {}
                ExitClass::Preempted => eprintln!("launcher: job preempted ({what})"),
                _ => eprintln!("launcher: job failed ({what})"),
            }
            return Ok(code);
        }
        let next = match class {
            ExitClass::Succeeded => Next::Done,
            _ if signals.received().is_some() => Next::Stop,
            ExitClass::Preempted if policy.restart_on_preempt => Next::RestartNow,
            ExitClass::Preempted => Next::Stop,
            ExitClass::InvalidConfig | ExitClass::UsageError => Next::Stop,
            ExitClass::Failed if failures < policy.max_restarts => Next::RestartAfterBackoff,
            ExitClass::Failed => Next::Stop,
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
                } else if class == ExitClass::Preempted {
                    format!(
                        "preempted: exiting {PREEMPTED} so that a scheduler can requeue it (--restart-on-preempt \
                         restarts it here)"
                    )
                } else if class == ExitClass::UsageError {
                    format!("exit status {USAGE_ERROR} is a usage error, which a restart cannot fix")
                } else if class == ExitClass::InvalidConfig {
                    format!(
                        "the trainer refused its configuration (exit status {INVALID_CONFIG}), which a restart cannot \
                         fix"
                    )
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
    if !outcome.lost_hosts.is_empty() {
        text += &format!(", ended by the launcher: host(s) {} stopped answering", outcome.lost_hosts.join(", "));
    }
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
