//! Which hosts still answer: each is asked, through the rsh agent that starts Open MPI's daemons (ssh on a cluster), to run `launcher answer` and connect back to this launcher within a deadline.
use crate::slurm::quote;
use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The environment variable (Open MPI's MCA parameter) that names the program mpirun reaches other hosts with.
pub const RSH_AGENT_VAR: &str = "OMPI_MCA_plm_rsh_agent";

/// How a host is asked whether it answers.
#[derive(Debug, Clone)]
pub struct Prober {
    /// The rsh agent and its arguments: `AGENT... HOST COMMAND` runs COMMAND on HOST.
    pub agent: Vec<String>,
    /// This launcher's executable, which the hosts run from the shared file system, as they run the trainer.
    pub exe: PathBuf,
    /// How long a host has to answer.
    pub timeout: Duration,
}

/// The rsh agent mpirun uses: `OMPI_MCA_plm_rsh_agent` (its first alternative, as in `ssh : rsh`), else ssh.
pub fn rsh_agent(value: Option<&str>) -> Vec<String> {
    let first = value.and_then(|v| v.split(':').next()).map(str::trim).filter(|v| !v.is_empty());
    first.unwrap_or("ssh").split_whitespace().map(String::from).collect()
}

/// This machine's address on the route to `host` (what the host connects back to); no packet is sent.
fn address_towards(host: &str) -> Result<IpAddr> {
    let target = (host, 9)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve host {host}"))?
        .find(SocketAddr::is_ipv4)
        .with_context(|| format!("host {host} has no IPv4 address"))?;
    let socket = UdpSocket::bind("0.0.0.0:0").context("cannot open a UDP socket")?;
    socket.connect(target).with_context(|| format!("no route to host {host}"))?;
    Ok(socket.local_addr()?.ip())
}

impl Prober {
    /// Whether each of `hosts` answered within the timeout (in their order); stops asking early once `stop` is set.
    pub fn answering(&self, hosts: &[String], stop: &AtomicBool) -> Result<Vec<bool>> {
        let listener = TcpListener::bind("0.0.0.0:0").context("cannot listen for the hosts' answers")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let exe = quote(self.exe.to_str().context("the launcher's path is not UTF-8")?);
        let mut asked: Vec<Option<Child>> = Vec::new();
        for (index, host) in hosts.iter().enumerate() {
            let child = address_towards(host).ok().and_then(|address| {
                let mut command = Command::new(&self.agent[0]);
                command.args(&self.agent[1..]).arg(host);
                command.arg(format!("{exe} answer {address}:{port} {index}"));
                command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()
            });
            asked.push(child);
        }
        let mut answered = vec![false; hosts.len()];
        let deadline = Instant::now() + self.timeout;
        while Instant::now() < deadline
            && !stop.load(Ordering::SeqCst)
            && answered.iter().zip(&asked).any(|(done, a)| !done && a.is_some())
        {
            match listener.accept() {
                Ok((stream, _)) => {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut line = String::new();
                    if BufReader::new(stream).read_line(&mut line).is_ok() {
                        if let Some(slot) = line.trim().parse::<usize>().ok().and_then(|i| answered.get_mut(i)) {
                            *slot = true;
                        }
                    }
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                Err(err) => return Err(err).context("accepting the hosts' answers"),
            }
        }
        for mut child in asked.into_iter().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(answered)
    }
}

/// On a probed host: connect to the launcher at `address` and say which host this is.
pub fn answer(address: SocketAddr, token: &str) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(10))
        .with_context(|| format!("cannot reach the launcher at {address}"))?;
    stream.write_all(format!("{token}\n").as_bytes()).context("cannot answer the launcher")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_is_mpiruns() {
        assert_eq!(rsh_agent(None), ["ssh"]);
        assert_eq!(rsh_agent(Some("ssh -x : rsh")), ["ssh", "-x"]);
        assert_eq!(rsh_agent(Some("/opt/netns-rsh")), ["/opt/netns-rsh"]);
        assert_eq!(rsh_agent(Some("  ")), ["ssh"]);
    }
}
