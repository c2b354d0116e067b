"""Shared fixtures of the end-to-end suite: the built binaries and a prepared real corpus."""
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FORTUNES = Path("/usr/share/games/fortunes")


def binary(name: str) -> Path:
    """A release binary of the workspace (the test command builds them first)."""
    path = Path(os.environ.get(f"{name.upper().replace('-', '_')}_BIN", REPO / "target" / "release" / name))
    assert path.exists(), f"{path} is missing: run scripts/setup (it builds the release binaries)"
    return path


def run(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def write_eval_tasks(directory: Path) -> list[str]:
    """A multiple-choice task and a held-out text from Debian's fortunes; the `--set` items naming them in `[eval]`."""
    fortunes = [t.strip() for t in (FORTUNES / "fortunes").read_text(errors="replace")
                .split("\n%\n") if 20 < len(t.strip()) < 200][:40]
    words = [f.split() for f in fortunes]
    items = []
    for i, w in enumerate(words[:12]):
        cut = len(w) // 2
        endings = [words[(i + k) % len(words)] for k in range(4)]
        choices = [" " + " ".join(e[len(e) // 2:]) for e in endings]
        items.append({"context": " ".join(w[:cut]), "choices": choices[i % 4:] + choices[:i % 4], "answer": (-i) % 4})
    choices, text = directory / "fortune-endings.jsonl", directory / "held-out.txt"
    choices.write_text("".join(json.dumps(item) + "\n" for item in items))
    text.write_text("\n\n".join(fortunes[12:]))
    return [f'eval.choices=["{choices}"]', f'eval.texts=["{text}"]']


@pytest.fixture(scope="session")
def fortunes_data(tmp_path_factory) -> Path:
    """Debian's fortunes, tokenized with a 4096-token BPE trained on it, as token shards."""
    work = tmp_path_factory.mktemp("fortunes")
    corpus = ["--input", FORTUNES, "--exclude", "*.dat", "--exclude", "*.u8", "--doc-separator", "%"]
    tokenizer = work / "tokenizer.json"
    run(binary("data-shards"), "train-tokenizer", *corpus, "--vocab-size", 4096, "--output", tokenizer)
    out = work / "shards"
    run(binary("data-shards"), "prepare", *corpus, "--tokenizer", tokenizer, "--output", out, "--valid-fraction", 0.02)
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a Hugging Face directory (scripts/fetch-smollm2: fetched and converted
    once, then cached outside the repo)."""
    return Path(run(REPO / "scripts" / "fetch-smollm2").stdout.strip())


@pytest.fixture(scope="session")
def fortunes_smollm2(tmp_path_factory, smollm2_dir) -> Path:
    """Debian's fortunes tokenized with SmolLM2's own tokenizer."""
    out = tmp_path_factory.mktemp("fortunes-smollm2") / "shards"
    corpus = ["--input", FORTUNES, "--exclude", "*.dat", "--exclude", "*.u8", "--doc-separator", "%"]
    run(binary("data-shards"), "prepare", *corpus, "--tokenizer", smollm2_dir / "tokenizer.json", "--output", out,
        "--valid-fraction", 0.02)
    return out


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node Slurm (slurmctld + slurmd, no munge, no cgroups) with its state in a temp dir; yields the
    environment (SLURM_CONF) for Slurm's commands. Stopped at the end by its own pids."""
    import shutil
    import socket
    import time
    missing = [c for c in ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")
               if shutil.which(c, path=os.environ.get("PATH", "") + ":/usr/sbin") is None]
    if missing:
        pytest.fail(f"Slurm is not installed ({', '.join(missing)} not found): scripts/test installs the Debian "
                    "packages slurm-wlm and munge (apt-get install slurm-wlm munge)")
    base = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (base / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    node = subprocess.run(["/usr/sbin/slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    node = node.splitlines()[0]
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    conf = base / "slurm.conf"
    # proctrack/linuxproc: the default cgroup tracker fails every step here while sbatch --wait still returns 0.
    conf.write_text(f"""ClusterName=pytest
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/none
CredType=cred/none
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmix
MailProg=/bin/true
ReturnToService=2
MinJobAge=300
KillWait=5
{node} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = dict(os.environ, SLURM_CONF=str(conf))
    pids = []
    try:
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([f"/usr/sbin/{daemon}"], env=env, check=True)  # daemonizes, pid in its pid file
            pid_file = base / f"{daemon}.pid"
            for _ in range(100):
                if pid_file.exists() and pid_file.read_text().strip():
                    break
                time.sleep(0.05)
            pids.append(int(pid_file.read_text()))
        state = ""
        for _ in range(150):
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.2)
        assert state == "idle", f"the Slurm node did not become idle ({state!r}); logs in {base}/log"
        yield env
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)
        deadline = time.time() + 10
        for pid in pids:
            while time.time() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, 9)


@pytest.fixture(scope="session")
def tiny_checkpoint(fortunes_data, tmp_path_factory) -> Path:
    """The tiny model after 10 steps on one rank (its outputs differ from prompt to prompt): a checkpoint directory."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    args = [binary("trainer"), "train", "--config", REPO / "configs" / "tiny.toml"]
    for item in [f"data.path={fortunes_data}", f"train.run_dir={run_dir}", "train.threads=1", "train.steps=10",
                 "train.seq_len=64", "train.global_batch=4", "train.micro_batch=4", "train.eval_every=0",
                 "optim.warmup_steps=2", "train.sample_tokens=0"]:
        args += ["--set", item]
    run(*args)
    return run_dir / "checkpoints"


class Server:
    """A `trainer serve` process (under `launcher run` for several ranks) on a free port of 127.0.0.1, ready
    (/health answered 200); `stop()` ends it by its own pid."""

    def __init__(self, model, *options, ranks: int = 1, name: str = "model", log: Path):
        import time
        import urllib.error
        import urllib.request
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        args = ["serve", "--model", model, "--served-model-name", name, "--port", self.port, "--threads", 1,
                *options]
        command = [binary("trainer"), *args] if ranks == 1 else [binary("launcher"), "run", "--nproc", ranks, "--",
                                                                  *args]
        self.log = log
        self.process = subprocess.Popen([str(a) for a in command], stdout=open(log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        self.health_seen = set()  # the statuses of /health while it started
        while True:
            assert self.process.poll() is None, f"the server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the server did not become ready:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    self.health_seen.add(response.status)
                    return
            except urllib.error.HTTPError as error:
                self.health_seen.add(error.code)
            except OSError:
                pass
            time.sleep(0.1)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def netns_cluster(tmp_path_factory):
    """Three hosts, each a network namespace of this machine on a private bridge (tests/cluster.py), reached through
    scripts/netns-rsh as through ssh. Torn down at the end, also after a failure: every process in them killed, the
    namespaces, links and bridge deleted."""
    from cluster import Cluster
    cluster = Cluster(3, tmp_path_factory.mktemp("cluster"))
    try:
        yield cluster.up()
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def netns_slurm(netns_cluster, tmp_path_factory):
    """A Slurm of two nodes, the first two hosts of `netns_cluster`: slurmctld in the root namespace on the bridge's
    address, one slurmd per host (its namespace, its host name, its own spool, pid, log and TmpFS: %n). Separate
    from `slurm_cluster` (its own ports and files). Yields the environment for Slurm's commands and Open MPI."""
    import socket
    import time
    base = tmp_path_factory.mktemp("netns-slurm")
    hosts = netns_cluster.hosts[:2]
    for sub in ["state", "log", *(f"spool/{h.name}" for h in hosts), *(f"tmp/{h.name}" for h in hosts)]:
        (base / sub).mkdir(parents=True)
    conf = base / "slurm.conf"
    nodes = "".join(f"NodeName={h.name} NodeAddr={h.address} CPUs={os.cpu_count()} State=UNKNOWN\n" for h in hosts)
    # ip netns exec mounts a fresh /sys: slurmd needs this machine's cgroup hierarchies there again (v2 unified, or
    # the v1 controllers with systemd's and the unified ones, as this machine mounts them).
    kind = subprocess.run(["stat", "-fc", "%T", "/sys/fs/cgroup"], capture_output=True, text=True).stdout.strip()
    if kind == "cgroup2fs":
        cgroups = "mount -t cgroup2 cgroup2 /sys/fs/cgroup"
    else:
        v1 = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "none,name=systemd")
        cgroups = " && ".join(
            ["mount -t tmpfs cgroup /sys/fs/cgroup"]
            + [f"mkdir /sys/fs/cgroup/{c.split('=')[-1]} && mount -t cgroup -o {c} cgroup /sys/fs/cgroup/{c.split('=')[-1]}"
               for c in v1]
            + ["mkdir /sys/fs/cgroup/unified && mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified"])
    conf.write_text(f"""ClusterName=netns
SlurmctldHost={socket.gethostname().split('.')[0]}({netns_cluster.gateway})
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/%n
TmpFS={base}/tmp/%n
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd-%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmix
MailProg=/bin/true
ReturnToService=2
MinJobAge=300
KillWait=5
{nodes}PartitionName=netns Nodes={','.join(h.name for h in hosts)} Default=YES MaxTime=INFINITE State=UP
""")
    env = netns_cluster.env(dict(os.environ, SLURM_CONF=str(conf)))
    pid_files = [base / "slurmctld.pid", *(base / f"slurmd-{h.name}.pid" for h in hosts)]
    try:
        subprocess.run(["/usr/sbin/slurmctld"], env=env, check=True)
        for h in hosts:
            subprocess.run(["ip", "netns", "exec", h.name, "unshare", "--uts", "sh", "-c",
                            f"hostname {h.name} && {cgroups} && exec /usr/sbin/slurmd"], env=env, check=True)
        states = ""
        for _ in range(150):
            states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if states.split() == ["idle", "idle"]:
                break
            time.sleep(0.2)
        assert states.split() == ["idle", "idle"], f"the two Slurm nodes are not idle ({states!r}); logs in {base}/log"
        yield env
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)
        deadline = time.time() + 10
        for pid_file in pid_files:
            pid = int(pid_file.read_text()) if pid_file.exists() else None
            while pid and time.time() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)
            if pid and Path(f"/proc/{pid}").exists():
                os.kill(pid, 9)
