//! Prometheus file-SD targets of a job: every rank's metrics endpoint, `host:metrics.port + node-local rank`, written atomically.
use crate::hostfile::Host;
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::path::Path;

/// The port of node-local rank 0's metrics endpoint when the trainer's arguments do not set `metrics.port`.
pub const DEFAULT_METRICS_PORT: u16 = 9400;

/// `metrics.port` from `--set metrics.port=N` in the trainer's arguments, if there.
pub fn metrics_port_in(args: &[OsString]) -> Result<Option<u16>> {
    let mut port = None;
    for (i, arg) in args.iter().enumerate() {
        let arg = arg.to_string_lossy();
        let item = match arg.strip_prefix("--set=") {
            Some(item) => item.to_string(),
            None if arg == "--set" => args.get(i + 1).map(|a| a.to_string_lossy().into_owned()).unwrap_or_default(),
            None => continue,
        };
        if let Some(value) = item.strip_prefix("metrics.port=") {
            port = Some(value.trim().parse().with_context(|| format!("--set metrics.port={value} is not a port"))?);
        }
    }
    Ok(port)
}

/// The targets of ranks placed on `hosts` (each running `slots` ranks), node-local rank 0 at `port`.
pub fn targets(hosts: &[Host], port: u16) -> Result<Vec<String>> {
    let mut targets = Vec::new();
    for host in hosts {
        if u32::from(port) + host.slots > 65536 {
            bail!("metrics.port {port} + {} ranks on host {} exceeds port 65535", host.slots, host.name);
        }
        targets.extend((0..host.slots).map(|r| format!("{}:{}", host.name, u32::from(port) + r)));
    }
    Ok(targets)
}

/// Writes `[{"targets": [...], "labels": {}}]` to `path` (Prometheus' `file_sd_configs`), by rename.
pub fn write(path: &Path, hosts: &[Host], port: u16) -> Result<()> {
    let json = serde_json::json!([{ "targets": targets(hosts, port)?, "labels": {} }]);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, format!("{json}\n")).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_port_is_read_from_the_trainer_arguments() {
        let args = |items: &[&str]| items.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(metrics_port_in(&args(&["train", "--set", "metrics.port=9600"])).unwrap(), Some(9600));
        assert_eq!(metrics_port_in(&args(&["--set=metrics.port=1234"])).unwrap(), Some(1234));
        assert_eq!(metrics_port_in(&args(&["--set", "metrics.enabled=true"])).unwrap(), None);
        assert!(metrics_port_in(&args(&["--set", "metrics.port=x"])).is_err());
    }

    #[test]
    fn every_rank_of_every_host_is_a_target() {
        let hosts = [Host { name: "10.0.0.1".into(), slots: 2 }, Host { name: "node2".into(), slots: 1 }];
        assert_eq!(targets(&hosts, 9400).unwrap(), ["10.0.0.1:9400", "10.0.0.1:9401", "node2:9400"]);
        assert!(targets(&hosts, 65535).is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("targets.json");
        write(&path, &hosts, 9500).unwrap();
        let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(written[0]["targets"][2], "node2:9500");
    }
}
