"""Multi-node for real on one machine: hosts are network namespaces (tests/cluster.py), ranks on different hosts talk over TCP, `launcher run --hostfile` starts them through an rsh agent as through ssh. A TP2xDP2 run over 2 hosts equals one rank in f64, its checkpoint resumes on other layouts and hosts, a real Prometheus scrapes every rank of every host, a lost host is named, or with --elastic the job finishes on the hosts left."""
import json
import shutil
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from conftest import REPO, binary, run

SMALL = REPO / "tests" / "fixtures" / "small-random.toml"
STEPS = 10


def trainer_args(data: Path, run_dir: Path, *overrides: str) -> list:
    """The f64 fixture model on fortunes (vocabulary 4096), 10 steps, evaluated at 5 and 10."""
    args = ["train", "--config", SMALL]
    for item in [f"data.path={data}", f"train.run_dir={run_dir}", f"train.export_dir={run_dir}/final",
                 "model.vocab_size=4096", f"train.steps={STEPS}", "train.log_every=1", *overrides]:
        args += ["--set", item]
    return args


def launch(cluster, hosts, slots: int, args: list, *flags, check=True, timeout=300) -> subprocess.CompletedProcess:
    """`launcher run --hostfile` on `hosts` (each running `slots` ranks) from the root namespace."""
    hostfile = cluster.hostfile(cluster.workdir / f"hostfile-{time.monotonic_ns()}", hosts, slots)
    return run(binary("launcher"), "run", "--hostfile", hostfile, *flags, "--", *args, env=cluster.env(),
               check=check, timeout=timeout)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def assert_same_training(run_dir: Path, reference: Path, first_step: int = 1, weights_within: float = 1e-9):
    """Losses of steps first_step.. equal the reference's to 1e-9 (relative), final weights to `weights_within` of
    each tensor's largest value."""
    got = {r["step"]: r for r in records(run_dir)}
    want = {r["step"]: r for r in records(reference)}
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    for step in range(first_step, STEPS + 1):
        assert relative(got[step]["loss"], want[step]["loss"]) <= 1e-9, (step, got[step]["loss"], want[step]["loss"])
        if "val_loss" in want[step]:
            assert relative(got[step]["val_loss"], want[step]["val_loss"]) <= 1e-9, step
    weights, expected = load_file(run_dir / "final/model.safetensors"), load_file(reference / "final/model.safetensors")
    assert sorted(weights) == sorted(expected)
    for name, value in expected.items():
        assert value.dtype.name == "float64"
        diff = abs(weights[name] - value).max()
        assert diff <= weights_within * abs(value).max(), f"{name}: {diff:e}"


@pytest.fixture(scope="module")
def single(fortunes_data, tmp_path_factory) -> Path:
    """The one-rank run every multi-host run is held to."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    run(binary("trainer"), *trainer_args(fortunes_data, run_dir))
    return run_dir


@pytest.fixture(scope="module")
def one_host(fortunes_data, tmp_path_factory) -> Path:
    """TP2xDP2 on this machine alone (4 ranks through `launcher run`, shared memory between them)."""
    run_dir = tmp_path_factory.mktemp("one-host") / "run"
    run(binary("launcher"), "run", "--nproc", 4, "--", *trainer_args(fortunes_data, run_dir, "parallel.tensor=2"))
    return run_dir


# The single rank's weights differ from any data-parallel run's by up to 1.1e-8 of the largest value, in one row of
# the embedding (a rare token's, where AdamW amplifies the order of the gradient's sum); every other tensor within 2e-11.
SINGLE_RANK_WEIGHTS = 1e-7


@pytest.fixture(scope="module")
def two_host_checkpoint(netns_cluster, fortunes_data, tmp_path_factory) -> Path:
    """TP2xDP2 over 2 hosts stopped after step 5 with its checkpoint."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    launch(netns_cluster, netns_cluster.hosts[:2], 2,
           trainer_args(fortunes_data, run_dir, "parallel.tensor=2", "checkpoint.every=5", "train.stop_at_step=5"))
    assert (run_dir / "checkpoints/step-00000005/manifest.json").exists()
    return run_dir


def test_tp2_dp2_over_two_hosts_equals_one_host(netns_cluster, fortunes_data, one_host, single, tmp_path):
    run_dir = tmp_path / "run"
    result = launch(netns_cluster, netns_cluster.hosts[:2], 2,
                    trainer_args(fortunes_data, run_dir, "parallel.tensor=2"))
    assert_same_training(run_dir, one_host)
    assert_same_training(run_dir, single, weights_within=SINGLE_RANK_WEIGHTS)
    assert "world=4 tensor_parallel=2 data_parallel=2" in result.stderr, result.stderr


@pytest.mark.parametrize("hosts, slots, layout", [(1, 2, "parallel.tensor=2"), (2, 2, "parallel.tensor=1")],
                         ids=["one-host-tp2-dp1", "two-hosts-tp1-dp4"])
def test_two_host_checkpoint_resumes_on_another_layout(netns_cluster, fortunes_data, single, two_host_checkpoint,
                                                       tmp_path, hosts, slots, layout):
    run_dir = tmp_path / "run"
    shutil.copytree(two_host_checkpoint, run_dir, symlinks=True)
    result = launch(netns_cluster, netns_cluster.hosts[:hosts], slots, trainer_args(fortunes_data, run_dir, layout))
    assert "resumed from" in result.stderr and "(step 5, saved by 4 ranks with tensor parallel 2)" in result.stderr
    assert_same_training(run_dir, single, first_step=6, weights_within=SINGLE_RANK_WEIGHTS)


LOSS_STEPS = 40
# 3 hosts x TP2 = DP3, then 2 hosts = DP2: 12 sequences per step either way (2 or 3 micro-batches of 2 per rank).
LOSS_RUN = [f"train.steps={LOSS_STEPS}", "parallel.tensor=2", "train.global_batch=12", "train.micro_batch=2",
            "train.eval_every=0", "checkpoint.every=3", "parallel.collective_timeout_s=5"]


@pytest.fixture(scope="module")
def single_long(fortunes_data, tmp_path_factory) -> Path:
    """The uninterrupted one-rank run the node-loss runs are held to."""
    run_dir = tmp_path_factory.mktemp("single-long") / "run"
    run(binary("trainer"), *trainer_args(fortunes_data, run_dir, *LOSS_RUN, "parallel.tensor=1"))
    return run_dir


def lose_a_host_mid_run(cluster, run_dir: Path, args: list, *flags, link_first=False):
    """Starts the job on the 3 hosts, and once it has logged 8 steps kills every process of the third host and takes
    its link down (with `link_first`, the link goes first and the processes only once a survivor has reported its
    collective timeout); returns how the launcher ended and the last step logged before the loss."""
    lost = cluster.hosts[2]
    hostfile = cluster.hostfile(cluster.workdir / f"hostfile-{time.monotonic_ns()}", cluster.hosts, 2)
    command = [str(a) for a in [binary("launcher"), "run", "--hostfile", hostfile, *flags, "--", *args]]
    launcher = subprocess.Popen(command, env=cluster.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(launcher.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").exists() or len(records(run_dir)) < 8:
            assert launcher.poll() is None and time.time() < deadline, "".join(err)
            time.sleep(0.05)
        cluster.link(lost, "down")
        before = records(run_dir)[-1]["step"]
        if link_first:
            deadline = time.time() + 60
            while not any("timed out after" in line for line in err):
                assert launcher.poll() is None and time.time() < deadline, "".join(err)
                time.sleep(0.05)
        cluster.kill(lost)
        launcher.wait(timeout=300)
        reader.join(timeout=30)
        return subprocess.CompletedProcess(command, launcher.returncode, "", "".join(err)), before
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        cluster.link(lost, "up")


def test_elastic_job_loses_a_host_and_finishes_on_the_others(netns_cluster, fortunes_data, single_long, tmp_path):
    run_dir = tmp_path / "run"
    result, before = lose_a_host_mid_run(netns_cluster, run_dir, trainer_args(fortunes_data, run_dir, *LOSS_RUN),
                                         "--elastic", "--max-restarts", 2, "--restart-backoff", 0.5,
                                         "--lost-host-grace", 5)
    lost = netns_cluster.hosts[2].address
    assert result.returncode == 0, result.stderr[-5000:]
    assert f"lost host(s): {lost}" in result.stderr, result.stderr[-5000:]
    kept = f"{netns_cluster.hosts[0].address}, {netns_cluster.hosts[1].address}"
    assert f"starting 4 rank(s) on the 2 host(s) that do: {kept}" in result.stderr, result.stderr[-5000:]
    assert "world=4 tensor_parallel=2 data_parallel=2" in result.stderr
    # The restart resumed from a checkpoint saved before the loss (an async save of the newest may not have been
    # committed when the host went), not from the start and not past where it was.
    resumed = [int(line.split("(step ")[1].split(",")[0]) for line in result.stderr.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and resumed[0] % 3 == 0 and 3 <= resumed[0] <= before, (resumed, before)
    # No step lost or repeated, and every step is the uninterrupted one-rank run's (the data cursor continued).
    history = records(run_dir)
    assert [r["step"] for r in history] == list(range(1, LOSS_STEPS + 1))
    for got, want in zip(history, records(single_long)):
        assert relative(got["loss"], want["loss"]) <= 1e-9, (got, want)
    # The host back (its link up, nothing of the job left on it): a later run of the job, continued for 3 more steps
    # from its final checkpoint, uses all 3 hosts again.
    more = trainer_args(fortunes_data, run_dir, *LOSS_RUN, f"train.steps={LOSS_STEPS + 3}")
    again = launch(netns_cluster, netns_cluster.hosts, 2, more, "--elastic", "--max-restarts", 1,
                   "--lost-host-grace", 5)
    assert "world=6 tensor_parallel=2 data_parallel=3" in again.stderr, again.stderr[-5000:]
    assert f"(step {LOSS_STEPS}, saved by 4 ranks with tensor parallel 2)" in again.stderr, again.stderr[-5000:]
    assert "do not answer" not in again.stderr, again.stderr[-5000:]
    assert [r["step"] for r in records(run_dir)] == list(range(1, LOSS_STEPS + 4))


def test_without_elastic_the_failure_names_the_lost_host(netns_cluster, fortunes_data, tmp_path):
    run_dir = tmp_path / "run"
    result, _ = lose_a_host_mid_run(netns_cluster, run_dir, trainer_args(fortunes_data, run_dir, *LOSS_RUN),
                                    "--lost-host-grace", 5, link_first=True)
    assert result.returncode != 0
    lost = netns_cluster.hosts[2].address
    failed = [line for line in result.stderr.splitlines() if line.startswith("launcher: job failed (")]
    assert len(failed) == 1 and f"; lost host(s): {lost} (no answer within 5 s)" in failed[0], result.stderr[-5000:]
    # A survivor on another host, waiting on the lost host's ranks over TCP, failed within the collective timeout
    # naming itself, the operation and the group.
    timeouts = [line for line in result.stderr.splitlines() if "timed out after 5.0s" in line]
    assert timeouts and "error: rank " in timeouts[0] and " group: " in timeouts[0], result.stderr[-5000:]
    assert any(op in timeouts[0] for op in ("all_reduce(Sum) of ", "reduce_scatter of ", "all_gather into ")), timeouts


def test_prometheus_scrapes_every_rank_of_both_hosts_through_file_sd(netns_cluster, fortunes_data, tmp_path):
    """Each host's ranks serve metrics on that host's address (the same ports on every host); the launcher writes
    every host:port to the file-SD targets that a real Prometheus in the root namespace follows."""
    from test_metrics import free_port, http_get, tool
    hosts = netns_cluster.hosts[:2]
    targets, port = tmp_path / "targets.json", 9400
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: trainer\n"
                      f"    file_sd_configs:\n      - files: ['{targets}']\n")
    prom_port = free_port()
    api = f"http://127.0.0.1:{prom_port}"
    prom_log = open(tmp_path / "prometheus.log", "w")
    prom = subprocess.Popen([tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                            stdout=prom_log, stderr=subprocess.STDOUT)
    run_dir = tmp_path / "run"
    hostfile = netns_cluster.hostfile(tmp_path / "hostfile", hosts, 2)
    args = trainer_args(fortunes_data, run_dir, "parallel.tensor=2", "train.steps=2000", "train.eval_every=0",
                        "metrics.enabled=true", "metrics.address=0.0.0.0", f"metrics.port={port}")
    command = [str(a) for a in [binary("launcher"), "run", "--hostfile", hostfile, "--prometheus-targets", targets,
                                "--", *args]]
    launcher = subprocess.Popen(command, env=netns_cluster.env(), stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / "launcher.err", "w"))

    def query(expr: str) -> list[dict]:
        url = f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        return json.loads(http_get(url))["data"]["result"]

    try:
        expected = {f"{h.address}:{port + r}" for h in hosts for r in range(2)}
        deadline = time.time() + 120
        while True:
            assert launcher.poll() is None and prom.poll() is None, (tmp_path / "launcher.err").read_text()[-3000:]
            assert time.time() < deadline, (tmp_path / "launcher.err").read_text()[-3000:]
            try:
                stepped = query("trainer_step >= 3")
            except OSError:
                stepped = []
            if {s["metric"]["instance"] for s in stepped} == expected:
                break
            time.sleep(0.5)
        assert set(json.loads(targets.read_text())[0]["targets"]) == expected
        assert {s["metric"]["rank"] for s in stepped} == {"0", "1", "2", "3"}
        by_rank = {s["metric"]["rank"]: s["metric"]["instance"] for s in stepped}
        # Ranks 0-1 (one tensor-parallel group) on the first host, 2-3 on the second.
        assert [by_rank[str(r)].split(":")[0] for r in range(4)] == [hosts[0].address] * 2 + [hosts[1].address] * 2
        assert {s["metric"]["instance"] for s in query('up{job="trainer"} == 1')} == expected
    finally:
        launcher.terminate()
        try:
            launcher.wait(timeout=120)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
        prom.terminate()
        prom.wait(timeout=30)
        prom_log.close()


def test_a_resume_on_fewer_hosts_keeps_the_checkpoints_global_batch(netns_cluster, fortunes_data, single, tmp_path):
    """Without train.global_batch, 4 data-parallel ranks on 2 hosts take 8 sequences per step (one micro-batch of 2
    each); resumed on 1 host of 2 ranks, the run keeps those 8 (two micro-batches each) instead of taking 4."""
    run_dir = tmp_path / "run"
    unset = ["train.global_batch=0", "train.micro_batch=2", "checkpoint.every=3"]
    launch(netns_cluster, netns_cluster.hosts[:2], 2,
           trainer_args(fortunes_data, run_dir, *unset, "train.stop_at_step=3"))
    result = launch(netns_cluster, netns_cluster.hosts[:1], 2, trainer_args(fortunes_data, run_dir, *unset))
    assert "accumulation=2" in result.stderr and "(step 3, saved by 4 ranks" in result.stderr, result.stderr[-3000:]
    assert_same_training(run_dir, single, first_step=4, weights_within=SINGLE_RANK_WEIGHTS)


def test_sbatch_over_two_slurmd_hosts_trains_like_one_rank(netns_slurm, netns_cluster, fortunes_data, single, tmp_path):
    """`launcher slurm --nodes 2 --submit --wait`: srun --mpi=pmix starts 2 ranks on each of two slurmd hosts."""
    run_dir, jobs = tmp_path / "run", tmp_path / "jobs"
    result = run(binary("launcher"), "slurm", "--nodes", 2, "--gpus-per-node", 0, "--ntasks-per-node", 2,
                 "--cpus-per-task", 1, "--job-name", "two-hosts", "--output-dir", jobs, "--submit", "--wait", "--",
                 *trainer_args(fortunes_data, run_dir, "parallel.tensor=2"), env=netns_slurm, timeout=600)
    job = result.stdout.splitlines()[0]
    out = (jobs / f"two-hosts-{job}.out").read_text()
    names = [h.name for h in netns_cluster.hosts[:2]]
    assert "training step ended with exit status 0" in out, out
    assert f"starting 4 rank(s) on {names[0][:-1]}[1-2]" in out or all(n in out for n in names), out
    assert "world=4 tensor_parallel=2 data_parallel=2" in out, out
    assert_same_training(run_dir, single, weights_within=SINGLE_RANK_WEIGHTS)
    targets = json.loads((jobs / "prometheus-targets.json").read_text())[0]["targets"]
    assert targets == [f"{n}:{9400 + r}" for n in names for r in range(2)]
