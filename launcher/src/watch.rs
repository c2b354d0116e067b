//! Watching a running job's hosts: a host that stops answering ends the job (mpirun can wait forever on a daemon whose host left the network), so that the launcher can report the host and restart without it.
use crate::probe::Prober;
use crate::procs;
use rustix::process::Pid;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Answers in a row a host must miss to count as lost while the job runs.
pub const MISSES: usize = 2;

/// What to watch: the hosts of one run, asked every `prober.timeout` whether they answer; a host lost is one that
/// misses [`MISSES`] answers in a row (a busy host can miss one).
#[derive(Debug, Clone)]
pub struct Watch {
    pub prober: Prober,
    pub hosts: Vec<String>,
}

/// A watch running next to the job of one mpirun.
pub struct Watching {
    stop: Arc<AtomicBool>,
    lost: Arc<Mutex<Vec<String>>>,
    thread: JoinHandle<()>,
}

impl Watch {
    /// Starts watching the job of `mpirun`: once a host does not answer, the job is killed (mpirun and its local
    /// processes; the launcher then kills what outlives mpirun).
    pub fn start(self, mpirun: Pid) -> Watching {
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, lost) = (stop.clone(), lost.clone());
            std::thread::spawn(move || {
                let pause = self.prober.timeout;
                let mut missed = vec![0; self.hosts.len()];
                while !sleep_unless(&stop, pause) {
                    let Ok(answering) = self.prober.answering(&self.hosts, &stop) else { continue };
                    for (count, answered) in missed.iter_mut().zip(answering) {
                        *count = if answered { 0 } else { *count + 1 };
                    }
                    let gone: Vec<String> =
                        self.hosts.iter().zip(&missed).filter(|(_, &m)| m >= MISSES).map(|(h, _)| h.clone()).collect();
                    if !gone.is_empty() && !stop.load(Ordering::SeqCst) {
                        eprintln!(
                            "launcher: host(s) {} stopped answering ({MISSES} times no answer within {:.0} s); ending \
                             the job",
                            gone.join(", "),
                            pause.as_secs_f64()
                        );
                        *lost.lock().unwrap_or_else(|e| e.into_inner()) = gone;
                        procs::kill_job(mpirun);
                        return;
                    }
                }
            })
        };
        Watching { stop, lost, thread }
    }
}

/// Sleeps `pause` unless `stop` is set first; returns whether it was.
fn sleep_unless(stop: &AtomicBool, pause: Duration) -> bool {
    let until = Instant::now() + pause;
    while Instant::now() < until {
        if stop.load(Ordering::SeqCst) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.load(Ordering::SeqCst)
}

impl Watching {
    /// Stops watching (before mpirun is reaped, so the watch never signals a recycled pid); returns the hosts that
    /// stopped answering, if the watch ended the job.
    pub fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
        let lost = self.lost.lock().unwrap_or_else(|e| e.into_inner());
        lost.clone()
    }
}
