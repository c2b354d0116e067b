//! The hosts of a job across its runs: where each run's ranks go (with `--elastic`, the hosts that still answer), its Prometheus targets, and which hosts a failed run lost.
use crate::hostfile::{self, Host};
use crate::mpirun::Job;
use crate::probe::Prober;
use crate::watch::Watch;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

/// Where the job runs and what the launcher does when a host is lost.
pub struct Cluster {
    /// Every host the job may use (the hostfile's), or this machine alone.
    hosts: Vec<Host>,
    /// Hosts of other machines, reached by mpirun through its rsh agent (`--hostfile`).
    remote: Option<Remote>,
    /// Where to write each run's Prometheus targets, and node-local rank 0's metrics port.
    targets: Option<(PathBuf, u16)>,
}

/// A hostfile job's hosts: how they are probed, and what a lost host does to the job.
pub struct Remote {
    pub prober: Prober,
    /// Restart on the hosts that still answer (with fewer ranks) instead of on all of them.
    pub elastic: bool,
    /// With `elastic`: the fewest hosts a run may have.
    pub min_hosts: usize,
    /// Which hosts answered when last asked (after a failure), for the next run to use.
    answering: Option<Vec<bool>>,
    /// Holds the hostfile of each run's hosts.
    dir: tempfile::TempDir,
}

impl Remote {
    pub fn new(prober: Prober, elastic: bool, min_hosts: usize) -> Result<Remote> {
        let dir = tempfile::Builder::new().prefix("launcher-hosts").tempdir().context("cannot create a temp dir")?;
        Ok(Remote { prober, elastic, min_hosts, answering: None, dir })
    }
}

fn listed(hosts: &[Host]) -> String {
    hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", ")
}

impl Cluster {
    /// This machine alone, running `nproc` ranks.
    pub fn local(nproc: u32, targets: Option<(PathBuf, u16)>) -> Cluster {
        Cluster { hosts: vec![Host { name: "127.0.0.1".into(), slots: nproc }], remote: None, targets }
    }

    /// The hosts of a hostfile.
    pub fn remote(hosts: Vec<Host>, remote: Remote, targets: Option<(PathBuf, u16)>) -> Cluster {
        Cluster { hosts, remote: Some(remote), targets }
    }

    fn names(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.name.clone()).collect()
    }

    /// Sets where the next run of `job` goes: with `--elastic`, the hosts that answer (asked now, unless a failure
    /// just asked), each with all its slots, in the hostfile's order; then writes the run's Prometheus targets.
    /// Returns the watch over the run's hosts (hostfile jobs).
    pub fn place(&mut self, job: &mut Job) -> Result<Option<Watch>> {
        let names = self.names();
        let hosts: Vec<Host> = match &mut self.remote {
            Some(remote) if remote.elastic => {
                let answering = match remote.answering.take() {
                    Some(answering) => answering,
                    None => remote.prober.answering(&names, &AtomicBool::new(false))?,
                };
                let pick = |answers: bool| -> Vec<Host> {
                    self.hosts.iter().zip(&answering).filter(|(_, &a)| a == answers).map(|(h, _)| h.clone()).collect()
                };
                let (live, lost) = (pick(true), pick(false));
                if live.len() < remote.min_hosts {
                    bail!(
                        "{} of the hostfile's {} hosts answer (lost: {}), fewer than --min-hosts {}: not starting the \
                         job; bring the hosts back and run it again",
                        live.len(),
                        self.hosts.len(),
                        listed(&lost),
                        remote.min_hosts
                    );
                }
                if !lost.is_empty() {
                    eprintln!(
                        "launcher: host(s) {} do not answer within {:.0} s; starting {} rank(s) on the {} host(s) that \
                         do: {}",
                        listed(&lost),
                        remote.prober.timeout.as_secs_f64(),
                        hostfile::total_slots(&live),
                        live.len(),
                        listed(&live)
                    );
                }
                let path = remote.dir.path().join("hostfile");
                std::fs::write(&path, hostfile::text(&live))
                    .with_context(|| format!("cannot write {}", path.display()))?;
                job.hostfile = Some(path);
                job.nproc = hostfile::total_slots(&live);
                live
            }
            _ => placed(&self.hosts, job.nproc),
        };
        if let Some((path, port)) = &self.targets {
            crate::targets::write(path, &hosts, *port)?;
        }
        let watch = self.remote.as_ref().map(|remote| Watch {
            prober: remote.prober.clone(),
            hosts: hosts.iter().map(|h| h.name.clone()).collect(),
        });
        Ok(watch)
    }

    /// After a failed run of a hostfile job: asks every host whether it answers and returns the names of those that
    /// do not (remembered for the next [`Cluster::place`]).
    pub fn lost(&mut self) -> Result<Vec<String>> {
        let names = self.names();
        let Some(remote) = &mut self.remote else { return Ok(Vec::new()) };
        let answering = remote.prober.answering(&names, &AtomicBool::new(false))?;
        let lost = self.hosts.iter().zip(&answering).filter(|(_, &a)| !a).map(|(h, _)| h.name.clone()).collect();
        remote.answering = Some(answering);
        Ok(lost)
    }

    /// Whether a lost host makes the next run go to the others.
    pub fn elastic(&self) -> bool {
        self.remote.as_ref().is_some_and(|r| r.elastic)
    }

    /// How long a host has to answer before it counts as lost.
    pub fn probe_seconds(&self) -> f64 {
        self.remote.as_ref().map_or(0.0, |r| r.prober.timeout.as_secs_f64())
    }
}

/// Where mpirun puts `nproc` ranks on `hosts`: each host's slots filled in order.
fn placed(hosts: &[Host], nproc: u32) -> Vec<Host> {
    let mut left = nproc;
    let mut placed = Vec::new();
    for host in hosts {
        let slots = host.slots.min(left);
        if slots > 0 {
            placed.push(Host { name: host.name.clone(), slots });
        }
        left -= slots;
    }
    placed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_fill_each_hosts_slots_in_order() {
        let hosts = [Host { name: "a".into(), slots: 2 }, Host { name: "b".into(), slots: 2 }];
        let names =
            |placed: Vec<Host>| placed.into_iter().map(|h| format!("{}x{}", h.name, h.slots)).collect::<Vec<_>>();
        assert_eq!(names(placed(&hosts, 4)), ["ax2", "bx2"]);
        assert_eq!(names(placed(&hosts, 3)), ["ax2", "bx1"]);
        assert_eq!(names(placed(&hosts, 1)), ["ax1"]);
    }
}
