"""`launcher slurm` on a real one-node Slurm: a 2-rank CPU job trains and checkpoints, a preempted job saves, requeues itself and ends bit for bit like an uninterrupted run, and a job whose ranks exit 78 (invalid configuration) is not requeued."""
import json
import os
import subprocess
import time
from pathlib import Path

from conftest import REPO, binary, run

TINY = REPO / "configs" / "tiny.toml"
STEPS = 60
# A small model on one thread per rank (bitwise repeatable), checkpointing every 5 steps.
SMALL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_dim=172",
         "model.max_seq_len=64", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=2",
         "train.threads=1", "train.log_every=1", "train.eval_every=20", "train.eval_sequences=4",
         "train.sample_tokens=4", f"train.steps={STEPS}", "checkpoint.every=5"]


def trainer_args(data: Path, run_dir: Path) -> list:
    args = ["train", "--config", TINY]
    for item in [f"data.path={data}", f"train.run_dir={run_dir}", f"train.export_dir={run_dir}/final", *SMALL]:
        args += ["--set", item]
    return args


def slurm_command(jobs: Path, name: str, *flags) -> list:
    return [binary("launcher"), "slurm", "--nodes", 1, "--gpus-per-node", 0, "--ntasks-per-node", 2,
            "--cpus-per-task", 1, "--job-name", name, "--output-dir", jobs, *flags]


def records(run_dir: Path) -> list:
    """What must repeat exactly: per step loss, learning rate, gradient norm, validation loss."""
    keys = ("step", "loss", "lr", "grad_norm", "val_loss")
    return [[json.loads(line).get(k) for k in keys] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def job_field(env, job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith(field + "=")), "")


def wait_for(what: str, timeout: float, check):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_a_two_rank_job_trains_checkpoints_and_writes_prometheus_targets(slurm_cluster, fortunes_data, tmp_path):
    run_dir, jobs = tmp_path / "run", tmp_path / "jobs"
    result = run(*slurm_command(jobs, "train2", "--submit", "--wait"), "--", *trainer_args(fortunes_data, run_dir),
                 env=slurm_cluster, timeout=600)
    job = result.stdout.splitlines()[0]
    out = (jobs / f"train2-{job}.out").read_text()
    # sbatch's status alone proves little (a failed step can still end in 0): check what the job did.
    assert "training step ended with exit status 0" in out, out
    history = records(run_dir)
    assert [r[0] for r in history] == list(range(1, STEPS + 1)), out
    assert all(r[1] > 0 for r in history)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:08d}"
    assert (run_dir / "final" / "model.safetensors").exists()
    host = subprocess.run(["scontrol", "show", "hostnames", job_field(slurm_cluster, job, "NodeList")],
                          env=slurm_cluster, capture_output=True, text=True).stdout.split()
    targets = json.loads((jobs / "prometheus-targets.json").read_text())
    assert targets == [{"targets": [f"{h}:{9400 + r}" for h in host for r in (0, 1)],
                        "labels": {"job_name": "train2", "slurm_job_id": job}}]
    # The ranks were started by srun --mpi=pmix and joined one MPI job of 2 (tensor x data = 1 x 2).
    assert "data_parallel=2" in out or "data_parallel: 2" in out, out


def test_a_preempted_job_requeues_and_ends_like_an_uninterrupted_run(slurm_cluster, fortunes_data, tmp_path):
    reference = tmp_path / "reference"
    run(binary("launcher"), "run", "--nproc", 2, "--", *trainer_args(fortunes_data, reference), timeout=600)

    run_dir, jobs = tmp_path / "run", tmp_path / "jobs"
    submit = subprocess.Popen([str(a) for a in slurm_command(jobs, "preempt", "--submit", "--wait")] + ["--"]
                              + [str(a) for a in trainer_args(fortunes_data, run_dir)],
                              env=slurm_cluster, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = submit.stdout.readline().strip()
        assert job.isdigit(), f"no job id from launcher slurm --submit: {job!r}"
        metrics = run_dir / "metrics.jsonl"
        wait_for("training to log 3 steps", 300,
                 lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
        # The batch script's trap forwards USR1 to the ranks: they finish the step, save and exit 75.
        run("scancel", "--batch", "--signal=USR1", job, env=slurm_cluster)
        wait_for("the job to be requeued (PENDING)", 120, lambda: job_field(slurm_cluster, job, "JobState") == "PENDING")
        saved = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
        assert 3 <= saved < STEPS, f"saved at step {saved}"
        # A requeued job waits ~2 min (BeginTime); start it now.
        run("scontrol", "update", f"jobid={job}", "StartTime=now", env=slurm_cluster)
        stdout, stderr = submit.communicate(timeout=600)
    finally:
        if submit.poll() is None:
            subprocess.run(["scancel", job], env=slurm_cluster)
            submit.kill()
    out = (jobs / f"preempt-{job}.out").read_text()
    assert submit.returncode == 0, f"{stderr}\n{out}"
    assert "received SIGUSR1; forwarding it to the training step" in out, out
    assert "exited 75 (preempted); requeueing the job" in out, out
    assert f"job {job} (restart 1): training step ended with exit status 0" in out, out
    assert job_field(slurm_cluster, job, "Restarts") == "1"
    assert "resumed from" in out and f"step-{saved:08d}" in out, out
    assert records(run_dir) == records(reference)
    assert (run_dir / "final" / "model.safetensors").read_bytes() == (reference / "final" / "model.safetensors").read_bytes()


def test_a_job_whose_ranks_exit_78_is_not_requeued(slurm_cluster, tmp_path):
    # 78 (invalid configuration) is decided on by status alone: whatever the ranks print, it is never requeued.
    jobs = tmp_path / "jobs"
    script = "echo 'error: invalid config a.toml' >&2; exit 78"
    result = run(*slurm_command(jobs, "badconfig", "--program", "/bin/sh", "--submit", "--wait"), "--", "-c", script,
                 env=slurm_cluster, check=False, timeout=300)
    job = result.stdout.splitlines()[0]
    out = (jobs / f"badconfig-{job}.out").read_text()
    assert result.returncode == 78, f"{result.stderr}\n{out}"
    assert "the trainer refused its configuration (exit status 78); not requeueing" in out, out
    assert "requeueing the job" not in out, out
    assert job_field(slurm_cluster, job, "Restarts") == "0"
    assert job_field(slurm_cluster, job, "JobState") == "FAILED"
