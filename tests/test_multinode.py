"""Multi-node for real on one machine: hosts are network namespaces (tests/cluster.py), ranks on different hosts talk over TCP, `launcher run --hostfile` starts them through an rsh agent as through ssh. A TP2xDP2 run over 2 hosts equals one rank in f64, its checkpoint resumes on other layouts and hosts, a real Prometheus scrapes every rank of every host, a lost host is named, or with --elastic the job finishes on the hosts left."""
import json
import shutil
import subprocess
import time
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
