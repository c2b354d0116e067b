"""A cluster of hosts on one machine: each host a network namespace with its own address on a private bridge, reached by Open MPI through scripts/netns-rsh as through ssh; torn down completely (processes, namespaces, links)."""
import ipaddress
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RSH_AGENT = REPO / "scripts" / "netns-rsh"


def ip(*args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *map(str, args)], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(map(str, args))} failed: {result.stderr.strip()}")
    return result


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that no interface of this machine is on."""
    used = ip("-o", "-4", "addr").stdout
    nets = [ipaddress.ip_interface(w).network for line in used.splitlines() for w in line.split()[3:4]]
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(n) for n in nets):
            return net
    raise RuntimeError("no free 10.x.y.0/24 for the test cluster")


class Host:
    def __init__(self, cluster: "Cluster", index: int):
        self.name = f"{cluster.prefix}h{index}"
        self.address = str(cluster.subnet.network_address + index)
        self.veth = f"{cluster.prefix}v{index}"

    def __repr__(self):
        return f"{self.name}({self.address})"


class Cluster:
    """`n` hosts `PREFIXh1..n` at .1..n of a free 10.x.y.0/24, bridged to the root namespace at .254."""

    def __init__(self, n: int, workdir: Path):
        missing = [t for t in ("ip", "unshare") if shutil.which(t) is None]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not found: scripts/test installs iproute2 and util-linux")
        if os.geteuid() != 0:
            raise RuntimeError("the test cluster needs root (network namespaces, a bridge)")
        self.prefix = f"mn{os.getpid() % 100000}"
        self.subnet = _free_subnet()
        self.bridge = f"{self.prefix}br"
        self.gateway = str(self.subnet.network_address + 254)
        self.hosts = [Host(self, i) for i in range(1, n + 1)]
        self.workdir = workdir
        self.hosts_file = workdir / "hosts"
        self.hosts_file.write_text("".join(f"{h.address} {h.name}\n" for h in self.hosts))

    def up(self) -> "Cluster":
        # SIGTERM (a timeout, a CI runner stopping) must unwind to `down` as an exception does.
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for h in self.hosts:
            ip("netns", "add", h.name)
            ip("link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.name)
            ip("link", "set", h.veth, "master", self.bridge, "up")
            ip("-n", h.name, "addr", "add", f"{h.address}/24", "dev", "eth0")
            ip("-n", h.name, "link", "set", "eth0", "up")
            ip("-n", h.name, "link", "set", "lo", "up")
            ip("-n", h.name, "route", "add", "default", "via", self.gateway)
        return self

    def kill(self, host: Host):
        """SIGKILL every process in the host's namespace (its ranks, Open MPI's daemon)."""
        for _ in range(20):
            pids = ip("netns", "pids", host.name, check=False).stdout.split()
            if not pids:
                return
            subprocess.run(["kill", "-9", *pids], capture_output=True)
            time.sleep(0.1)

    def link(self, host: Host, state: str):
        ip("-n", host.name, "link", "set", "eth0", state)

    def down(self):
        """Everything this cluster created, also after a failure half-way through `up`."""
        for h in self.hosts:
            if ip("netns", "pids", h.name, check=False).returncode == 0:
                self.kill(h)
                ip("netns", "del", h.name, check=False)
            ip("link", "del", h.veth, check=False)
        ip("link", "del", self.bridge, check=False)

    def env(self, base: dict | None = None) -> dict:
        """The environment for mpirun (and the launcher) to reach these hosts: the rsh agent and its host table, TCP
        on the bridge's subnet between hosts, shared memory within one."""
        net = str(self.subnet)
        return dict(base if base is not None else os.environ,
                    NETNS_RSH_HOSTS=str(self.hosts_file),
                    OMPI_MCA_plm_rsh_agent=str(RSH_AGENT),
                    OMPI_MCA_btl="self,vader,tcp",
                    OMPI_MCA_btl_tcp_if_include=net,
                    OMPI_MCA_oob_tcp_if_include=net)

    def hostfile(self, path: Path, hosts: list[Host], slots: int) -> Path:
        path.write_text("".join(f"{h.address} slots={slots}\n" for h in hosts))
        return path
