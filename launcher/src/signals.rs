//! The launcher's SIGINT and SIGTERM: passed on to the running job as SIGTERM to its ranks, then SIGKILL if the job is still running after a grace period or a second signal.
use crate::procs;
use anyhow::{Context, Result};
use rustix::process::Pid;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Passes the launcher's SIGINT and SIGTERM on to the running job (if any) and remembers that one arrived, for as
/// long as it lives (across the attempts of a supervised job).
pub struct SignalForwarder {
    shared: Arc<Shared>,
    handle: signal_hook::iterator::Handle,
    threads: Vec<thread::JoinHandle<()>>,
}

struct Shared {
    state: Mutex<ForwardState>,
    /// Notified at every change of `state`.
    changed: Condvar,
    /// How long a job may take to exit after it was asked to stop.
    kill_after: Duration,
}

#[derive(Default)]
struct ForwardState {
    /// The running mpirun; `None` once it has exited, so a signal is never sent to a recycled pid.
    target: Option<Pid>,
    /// The last signal the launcher received.
    received: Option<&'static str>,
    /// The signal the launcher had received when it asked the current target to stop.
    forwarded: Option<&'static str>,
    /// When the current target is to be killed if it is still running, and why.
    kill_at: Option<(Instant, String)>,
    /// Why the current target was killed.
    killed: Option<String>,
    /// The forwarder is being dropped.
    closed: bool,
}

/// What the forwarder did to a job.
#[derive(Debug, Default)]
pub struct Stopped {
    /// The signal the launcher received before the job was asked to stop, e.g. `SIGTERM`.
    pub signal: Option<&'static str>,
    /// Why the job was killed with SIGKILL, if it was, e.g. `at a second signal`.
    pub killed: Option<String>,
}

fn lock(shared: &Shared) -> MutexGuard<'_, ForwardState> {
    shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// Asks `target` to stop, and schedules its killing.
    fn stop(&self, st: &mut ForwardState, target: Pid, signal: &'static str) {
        procs::terminate_job(target);
        st.forwarded = Some(signal);
        let why = format!("{} s after the signal (--kill-after)", self.kill_after.as_secs_f64());
        st.kill_at = Some((Instant::now() + self.kill_after, why));
    }

    /// Runs on the signal thread: asks the job to stop at the first signal, kills it at the second.
    fn receive(&self, signal: &'static str) {
        let mut st = lock(self);
        st.received = Some(signal);
        if let Some(target) = st.target {
            if st.forwarded.is_some() {
                st.kill_at = Some((Instant::now(), "at a second signal".into()));
            } else {
                self.stop(&mut st, target, signal);
            }
        }
        self.changed.notify_all();
    }

    /// Runs on the killer thread: kills the target when its time is up.
    fn kill_when_due(&self) {
        let mut st = lock(self);
        while !st.closed {
            let now = Instant::now();
            let due = st.kill_at.as_ref().map(|(at, _)| *at);
            st = match (st.target, due) {
                (Some(target), Some(at)) if at <= now => {
                    procs::kill_job(target);
                    st.killed = st.kill_at.take().map(|(_, why)| why);
                    st
                }
                (Some(_), Some(at)) => self.changed.wait_timeout(st, at - now).unwrap_or_else(|e| e.into_inner()).0,
                _ => self.changed.wait(st).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

impl SignalForwarder {
    /// Installs the SIGINT/SIGTERM handlers. Installed before mpirun starts, so a signal arriving in between is
    /// remembered (and passed on as soon as mpirun runs) rather than killing the launcher and orphaning the job. A
    /// job asked to stop is killed if it is still running `kill_after` later.
    pub fn install(kill_after: Duration) -> Result<SignalForwarder> {
        let mut signals = Signals::new([SIGINT, SIGTERM]).context("cannot install the SIGINT/SIGTERM handlers")?;
        let shared = Arc::new(Shared { state: Mutex::default(), changed: Condvar::new(), kill_after });
        let handle = signals.handle();
        let receiver = {
            let shared = Arc::clone(&shared);
            thread::spawn(move || {
                for signal in signals.forever() {
                    if let Some(name) = signal_hook::low_level::signal_name(signal) {
                        shared.receive(name);
                    }
                }
            })
        };
        let killer = {
            let shared = Arc::clone(&shared);
            thread::spawn(move || shared.kill_when_due())
        };
        Ok(SignalForwarder { shared, handle, threads: vec![receiver, killer] })
    }

    /// The last SIGINT/SIGTERM the launcher received, if any.
    pub fn received(&self) -> Option<&'static str> {
        lock(&self.shared).received
    }

    /// Sleeps for `duration` or until the launcher receives SIGINT/SIGTERM; returns that signal's name, if one came.
    pub fn sleep(&self, duration: Duration) -> Option<&'static str> {
        let deadline = Instant::now() + duration;
        let mut st = lock(&self.shared);
        while st.received.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self.shared.changed.wait_timeout(st, left).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
        }
        st.received
    }

    /// Starts passing signals on to the job of mpirun `pid`; one received before it started is passed on now.
    pub fn attach(&self, pid: Pid) {
        let mut st = lock(&self.shared);
        st.target = Some(pid);
        (st.forwarded, st.kill_at, st.killed) = (None, None, None);
        if let Some(signal) = st.received {
            self.shared.stop(&mut st, pid, signal);
        }
        self.shared.changed.notify_all();
    }

    /// Stops passing signals on (mpirun has exited but is not reaped yet); says what was done to the job.
    pub fn detach(&self) -> Stopped {
        let mut st = lock(&self.shared);
        st.target = None;
        st.kill_at = None;
        Stopped { signal: st.forwarded.take(), killed: st.killed.take() }
    }
}

impl Drop for SignalForwarder {
    fn drop(&mut self) {
        self.handle.close();
        lock(&self.shared).closed = true;
        self.shared.changed.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
