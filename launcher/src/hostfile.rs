//! Open MPI hostfiles: the hosts of a job and their slots (ranks per host), read with clear errors and written for a subset of them.
use anyhow::{bail, Context, Result};
use std::path::Path;

/// One host of a hostfile: its name (or address) and how many ranks it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub slots: u32,
}

/// Reads `path`: one host per line, `NAME slots=N` (other `key=value` words, such as Open MPI's `max_slots`, are
/// kept out of the launcher's count), `#` comments and blank lines ignored.
pub fn read(path: &Path) -> Result<Vec<Host>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read hostfile {}", path.display()))?;
    parse(&text).with_context(|| format!("hostfile {}", path.display()))
}

fn parse(text: &str) -> Result<Vec<Host>> {
    let mut hosts: Vec<Host> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        let Some(name) = words.next() else { continue };
        if name.contains('=') {
            bail!("line {number}: {line:?} must start with a host name or address, then slots=N");
        }
        let mut slots = None;
        for word in words {
            let Some((key, value)) = word.split_once('=') else {
                bail!("line {number}: {word:?} is not key=value (one host per line: NAME slots=N)");
            };
            if key == "slots" {
                let n: u32 = value.parse().ok().filter(|&n| n > 0).with_context(|| {
                    format!("line {number}: slots={value} must be a whole number of ranks, at least 1")
                })?;
                slots = Some(n);
            }
        }
        let Some(slots) = slots else {
            bail!("line {number}: host {name} has no slots=N: give the number of ranks it runs (e.g. `{name} slots=8`)")
        };
        if hosts.iter().any(|h| h.name == name) {
            bail!("line {number}: host {name} is listed twice; give it once with all its slots");
        }
        hosts.push(Host { name: name.to_string(), slots });
    }
    if hosts.is_empty() {
        bail!("no hosts in it (one per line: NAME slots=N)");
    }
    Ok(hosts)
}

/// The hostfile text of `hosts`, in their order (Open MPI fills each host's slots before the next: ranks of one host
/// are contiguous, so a tensor-parallel group of `slots` ranks stays on one host).
pub fn text(hosts: &[Host]) -> String {
    hosts.iter().map(|h| format!("{} slots={}\n", h.name, h.slots)).collect()
}

/// The ranks the hosts run together.
pub fn total_slots(hosts: &[Host]) -> u32 {
    hosts.iter().map(|h| h.slots).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_slots_are_read_with_comments_and_other_keys() {
        let hosts = parse("# cluster\nnode1 slots=2 max_slots=4\n\n  10.0.0.2   slots=8  # second\n").unwrap();
        assert_eq!(hosts, [Host { name: "node1".into(), slots: 2 }, Host { name: "10.0.0.2".into(), slots: 8 }]);
        assert_eq!(total_slots(&hosts), 10);
        assert_eq!(parse(&text(&hosts)).unwrap(), hosts);
    }

    #[test]
    fn bad_lines_are_refused_naming_the_line_and_the_fix() {
        for (text, expected) in [
            ("node1\n", "line 1: host node1 has no slots=N"),
            ("node1 slots=2\nnode2 slots=0\n", "line 2: slots=0 must be a whole number"),
            ("node1 slots=x\n", "slots=x must be a whole number"),
            ("node1 slots=2 4\n", "\"4\" is not key=value"),
            ("slots=2\n", "must start with a host name"),
            ("a slots=1\na slots=1\n", "line 2: host a is listed twice"),
            ("# nothing\n", "no hosts in it"),
        ] {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }
}
