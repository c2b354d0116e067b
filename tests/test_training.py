"""End-to-end training on a real corpus with the release `trainer` binary: it learns, it repeats, it refuses bad input clearly."""
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import REPO, binary, run, write_eval_tasks

# The trainer's exit statuses (launcher/src/protocol.rs): an invalid configuration is not retried; other failures may be.
INVALID_CONFIG, FAILED = 78, 1

TINY = REPO / "configs" / "tiny.toml"


def train(data: Path, run_dir: Path, *overrides: str, check=True):
    sets = [f"data.path={data}", f"train.run_dir={run_dir}", "train.threads=2", *overrides]
    args = [binary("trainer"), "train", "--config", TINY]
    for item in sets:
        args += ["--set", item]
    return run(*args, check=check)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_learns_on_fortunes(fortunes_data, tmp_path):
    result = train(fortunes_data, tmp_path, "train.steps=150", "train.eval_every=50", "optim.warmup_steps=15",
                   "train.sample_tokens=8")
    history = records(tmp_path)
    first_loss = history[0]["loss"]
    val_losses = [r["val_loss"] for r in history if "val_loss" in r]
    assert len(val_losses) == 3
    # Random init predicts ~uniformly over 4096 tokens: ln(4096) = 8.3.
    assert first_loss > 7.5
    assert val_losses[-1] < first_loss - 2.5, f"validation loss {val_losses} vs first loss {first_loss}"
    assert val_losses[0] > val_losses[-1]
    assert result.stdout.strip().startswith("The meaning of life is"), result.stdout
    assert (tmp_path / "config.toml").exists()
    # The step's one host synchronization: its scalars read at its end (on CUDA, libtorch's own count).
    assert {r["host_syncs"] for r in history} == {1}


def test_same_seed_same_losses(fortunes_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for run_dir in (a, b):
        train(fortunes_data, run_dir, "train.steps=6", "train.eval_every=3")
    keys = ("loss", "grad_norm", "lr", "val_loss")
    assert [[r.get(k) for k in keys] for r in records(a)] == [[r.get(k) for k in keys] for r in records(b)]
    c = tmp_path / "c"
    train(fortunes_data, c, "train.steps=6", "train.eval_every=3", "train.seed=99")
    assert records(c)[0]["loss"] != records(a)[0]["loss"], "another seed must give another run"


@pytest.mark.parametrize(
    "overrides, expected, status",
    [
        (["train.colour=1"], "unknown field `colour`", INVALID_CONFIG),
        (["train.steps=\"ten\""], "key `train.steps`: invalid type: string \"ten\"", INVALID_CONFIG),
        (["model.n_heads=6"], "model.n_heads = 6 must divide model.dim = 256", INVALID_CONFIG),
        (["optim.lr=-1e-3"], "optim.lr = -0.001 must be a positive number", INVALID_CONFIG),
        (["train.steps=0"], "train.steps = 0 must be > 0", INVALID_CONFIG),
        (["data.path=/nonexistent/data"], "/nonexistent/data", FAILED),
        (["model.vocab_size=1000"], "raise model.vocab_size to at least 4096", INVALID_CONFIG),
        (["train.threads=100000"], "invalid config train.threads = 100000: this machine has", INVALID_CONFIG),
        (["model.dim=1000000000"], "parameters (model.dim = 1000000000", INVALID_CONFIG),
        (["parallel.collective_timeout_s=1e300"], "parallel.collective_timeout_s = 1e300 is more than", INVALID_CONFIG),
        (["model.dim=32768", "model.n_heads=256", "model.n_layers=64"], "GiB (1 on this node; `trainer plan`", INVALID_CONFIG),
    ],
)
def test_bad_config_is_refused_clearly(fortunes_data, tmp_path, overrides, expected, status):
    """Refused with a message naming key, value and rule, and with the status that says whether a restart can help:
    a missing data directory may appear (a file system coming back), an invalid value cannot change."""
    result = train(fortunes_data, tmp_path, *overrides, check=False)
    assert result.returncode == status, result.stderr
    assert expected in result.stderr, result.stderr
    assert "panicked" not in result.stderr and "RUST_BACKTRACE" not in result.stderr


def test_unreadable_toml_is_refused_clearly(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\ndim = 3\n")
    result = run(binary("trainer"), "train", "--config", bad, check=False)
    assert result.returncode == INVALID_CONFIG
    assert f"invalid config {bad}" in result.stderr and "not valid TOML" in result.stderr, result.stderr
    missing = run(binary("trainer"), "train", "--config", tmp_path / "absent.toml", check=False)
    assert missing.returncode == INVALID_CONFIG and "cannot read config file" in missing.stderr


def test_a_model_and_a_data_path_are_a_whole_config(fortunes_data, tmp_path):
    """Every other key has a default; `--print-config` shows them all, resolved for this world, and that text is
    itself a config that runs (here and under the launcher, where the default global batch follows the ranks)."""
    import tomllib

    config = tmp_path / "small.toml"
    config.write_text("[model]\ndim = 64\nn_layers = 2\nn_heads = 4\nffn_dim = 176\nvocab_size = 4096\n"
                      f"max_seq_len = 64\n\n[data]\npath = \"{fortunes_data}\"\n")
    resolved = tomllib.loads(run(binary("trainer"), "train", "--config", config, "--print-config").stdout)
    train_section, optim = resolved["train"], resolved["optim"]
    assert (train_section["seq_len"], train_section["global_batch"], train_section["micro_batch"]) == (64, 1, 1)
    assert train_section["run_dir"] == "runs/small" and train_section["device"] == "cpu"
    assert optim["min_lr"] == pytest.approx(optim["lr"] / 10) and resolved["parallel"]["zero"] is True
    assert train_section["preempt_signals"] == ["SIGTERM", "SIGUSR1"]
    run_dir = tmp_path / "run"
    run(binary("trainer"), "train", "--config", config, "--set", "train.steps=3", "--set", f"train.run_dir={run_dir}")
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3]
    printed = run(binary("launcher"), "run", "--nproc", 2, "--", "train", "--config", config, "--print-config").stdout
    assert "global_batch = 2" in printed, printed


def test_llama_7b_parameter_count():
    result = run(binary("trainer"), "params", "--config", REPO / "configs" / "llama-7b.toml")
    assert result.stdout.strip() == "6,738,415,616"


def test_tensor_and_data_parallel_run_through_the_launcher(fortunes_data, tmp_path):
    """The demo's layout: 4 ranks, tensor 2 x data 2, started by `launcher run` through real mpirun."""
    args = [binary("launcher"), "run", "--nproc", 4, "--", "train", "--config", TINY]
    for item in [f"data.path={fortunes_data}", f"train.run_dir={tmp_path}", "train.threads=1", "parallel.tensor=2",
                 "train.steps=30", "train.eval_every=30", "optim.warmup_steps=5", "train.log_every=10"]:
        args += ["--set", item]
    result = run(*args)
    assert "[rank 0] " in result.stderr and "world=4 tensor_parallel=2 data_parallel=2" in result.stderr
    history = records(tmp_path)
    assert len(history) == 30
    assert history[-1]["val_loss"] < history[0]["loss"] - 1.0, history[-1]


def test_non_finite_gradients_skip_the_update(fortunes_data, tmp_path):
    """An absurd learning rate blows the weights up; the next steps' NaN gradients must skip updates, not crash."""
    result = train(fortunes_data, tmp_path, "train.steps=4", "train.eval_every=0", "optim.lr=1e30",
                   "optim.warmup_steps=0", "optim.grad_clip=0", "train.sample_tokens=0")
    assert "update skipped" in result.stderr, result.stderr
    assert len(records(tmp_path)) == 4


def test_a_diverged_run_stops_without_saving(fortunes_data, tmp_path):
    """Every update skipped for optim.max_skipped_steps steps in a row ends the run with an error, and the broken
    run saves no checkpoint."""
    result = train(fortunes_data, tmp_path, "train.steps=20", "train.eval_every=0", "optim.lr=1e30",
                   "optim.warmup_steps=0", "optim.grad_clip=0", "optim.max_skipped_steps=3", "checkpoint.every=1",
                   check=False)
    assert result.returncode == 1, result.stderr
    assert "the run has diverged: the gradient norm was not finite in steps 2..4" in result.stderr, result.stderr
    assert len(records(tmp_path)) == 3
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert saved == ["step-00000001"], saved


def test_resuming_past_the_schedule_is_refused(fortunes_data, tmp_path):
    train(fortunes_data, tmp_path, "train.steps=3", "train.eval_every=0", "train.sample_tokens=0")
    again = train(fortunes_data, tmp_path, "train.steps=3", "train.eval_every=0", check=False)
    assert again.returncode == INVALID_CONFIG and "the checkpoint resumed is at step 3, so nothing is left" in again.stderr
    fewer = train(fortunes_data, tmp_path, "train.steps=2", "train.eval_every=0", check=False)
    assert fewer.returncode == INVALID_CONFIG and "invalid config train.steps = 2" in fewer.stderr, fewer.stderr
    early = train(fortunes_data, tmp_path, "train.steps=6", "train.stop_at_step=2", check=False)
    assert early.returncode == INVALID_CONFIG and "train.stop_at_step = 2 is not after" in early.stderr, early.stderr
    assert len(records(tmp_path)) == 3


def test_trains_on_a_megatron_indexed_dataset(tmp_path):
    """data.format = "megatron": the trainer reads a dataset written by megatron-core's own builder."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "corpus_text_document"
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    rng = np.random.default_rng(1)
    for _ in range(200):
        length = int(rng.integers(50, 400))
        builder.add_document(torch.tensor(rng.integers(1, 4096, size=length)), [length])
    builder.finalize(str(prefix) + ".idx")
    run_dir = tmp_path / "run"
    train(prefix, run_dir, "data.format=megatron", "train.steps=3", "train.eval_every=0", "train.sample_tokens=0")
    history = records(run_dir)
    assert [r["step"] for r in history] == [1, 2, 3]
    assert history[0]["loss"] > 7.5, "random tokens over a 4096 vocabulary start near ln(4096)"
    result = train(tmp_path / "missing_prefix", tmp_path / "r2", "data.format=megatron", "train.eval_every=0",
                   "train.sample_tokens=0", check=False)
    assert result.returncode == FAILED and "cannot read data.path" in result.stderr, result.stderr


def test_gpu_check_runs_its_pipeline_from_a_bundle_on_cpu(fortunes_data, tmp_path):
    """scripts/gpu-check.sh (for a GPU machine without Rust) from a scripts/gpu-bundle bundle, dry-run on CPU with
    the tiny config: NCCL loads through its LD_LIBRARY_PATH link, the missing GPU is reported clearly, and the
    table shows the training run (tokens/s, MFU, phases, host syncs) against the PyTorch eager reference."""
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    env = {**os.environ, "BUNDLE": str(bundle), "DATA": str(fortunes_data)}
    run(REPO / "scripts" / "gpu-bundle", env=env)
    assert (bundle / "lib" / "libmpi.so.40").exists() and (bundle / "data" / "fortunes" / "manifest.json").exists()
    env.update(OUT=str(out), PYTHON=sys.executable, CONFIG="configs/tiny.toml", DEVICE="cpu", STEPS="4", WARMUP="2",
               STAGES="nccl train eager")
    result = run(REPO / "scripts" / "gpu-check.sh", env=env, check=False)
    text = result.stdout + result.stderr
    assert result.returncode == 1, text  # the NCCL round trip needs a GPU
    assert "nccl: 2." in text and "cannot load the NVIDIA driver's libcuda.so.1" in text, text
    assert "tokens/s" in text and "MFU" in text and "communication" in text, text
    assert len((out / "train" / "metrics.jsonl").read_text().splitlines()) == 4
    assert "ours / eager = " in text and "host syncs per step 1" in text, text


def test_masked_training_is_exact_under_tensor_and_data_parallelism(fortunes_data, tmp_path):
    """In f64, fine-tuning on prompt/completion data (only completions trained, documents packed) takes the same
    steps on one rank and on 4 ranks (tensor 2 x data 2, with accumulation): losses and final weights within 1e-9,
    with untied and tied embeddings."""
    import torch
    from safetensors.torch import load_file
    fortunes = [t.strip() for t in (Path("/usr/share/games/fortunes") / "fortunes").read_text(errors="replace")
                .split("\n%\n") if t.strip()][:80]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"Fortune {i}:", "completion": " " + text}) + "\n"
                              for i, text in enumerate(fortunes)))
    data = tmp_path / "sft"
    run(binary("data-shards"), "prepare", "--format", "prompt-completion", "--tokenizer",
        fortunes_data / "tokenizer.json", "--input", source, "--output", data)
    for tied in ("false", "true"):
        results = {}
        for name, ranks, tensor, micro in (("one", 1, 1, 4), ("tp2dp2", 4, 2, 1)):
            run_dir = tmp_path / f"{name}-{tied}"
            sets = [f"data.path={data}", f"train.run_dir={run_dir}", "train.threads=1", "train.dtype=float64",
                    "model.n_layers=2", f"model.tie_word_embeddings={tied}", f"parallel.tensor={tensor}",
                    "train.steps=3", "train.global_batch=8", f"train.micro_batch={micro}", "train.eval_every=0",
                    "train.sample_tokens=0", f"train.export_dir={run_dir}/hf"]
            args = ["train", "--config", TINY] + [a for s in sets for a in ("--set", s)]
            run(*([binary("trainer")] if ranks == 1 else [binary("launcher"), "run", "--nproc", ranks, "--"]), *args)
            results[name] = ([r["loss"] for r in records(run_dir)], load_file(run_dir / "hf" / "model.safetensors"))
        (losses_one, weights_one), (losses_tp, weights_tp) = results["one"], results["tp2dp2"]
        assert all(abs(a - b) <= 1e-9 * abs(a) for a, b in zip(losses_one, losses_tp)), (tied, losses_one, losses_tp)
        assert ("lm_head.weight" in weights_one) == (tied == "false")
        worst = max((weights_one[k] - weights_tp[k]).abs().max().item() for k in weights_one)
        assert worst <= 1e-9, (tied, worst)
        assert torch.isfinite(torch.tensor(losses_one)).all() and losses_one[-1] < losses_one[0], losses_one


def test_evaluations_during_training_equal_trainer_eval_of_the_checkpoint(fortunes_data, tmp_path):
    """`[eval]` tasks scored every train.eval_every steps by a TP2xDP2 run (f64) land in metrics.jsonl and equal, to
    1e-9, what `trainer eval` on one rank gives for the checkpoint saved at that step; a bad task file is refused
    before the first step."""
    tasks = write_eval_tasks(tmp_path)
    run_dir = tmp_path / "run"
    sets = [f"data.path={fortunes_data}", f"train.run_dir={run_dir}", "train.threads=1", "train.dtype=float64",
            "model.n_layers=2", "parallel.tensor=2", "train.steps=4", "train.global_batch=4", "train.micro_batch=1",
            "train.seq_len=64", "train.eval_every=2", "train.eval_sequences=4", "train.sample_tokens=0",
            "checkpoint.every=2", "checkpoint.keep_last=2", *tasks]
    args = ["train", "--config", TINY] + [a for s in sets for a in ("--set", s)]
    result = run(binary("launcher"), "run", "--nproc", 4, "--", *args)
    assert "eval fortune-endings: accuracy " in result.stderr, result.stderr[-3000:]
    history = records(run_dir)
    assert [r["step"] for r in history if "eval" in r] == [2, 4]
    for step in (2, 4):
        logged = next(r["eval"] for r in history if r["step"] == step)
        output = tmp_path / f"eval-{step}.json"
        run(binary("trainer"), "eval", "--model", run_dir / "checkpoints" / f"step-{step:08d}", "--threads", 2,
            "--choices", tmp_path / "fortune-endings.jsonl", "--text", tmp_path / "held-out.txt", "--seq-len", 64,
            "--output", output)
        expected = {Path(r["source"]).stem: r for r in json.loads(output.read_text())}
        for task, scores in logged.items():
            assert set(scores) == ({"accuracy", "accuracy_norm", "answer_nll"} if task == "fortune-endings"
                                   else {"loss", "perplexity", "bits_per_byte"}), scores
            for name, value in scores.items():
                assert abs(value - expected[task][name]) <= 1e-9 * max(1.0, abs(value)), (step, task, name, value,
                                                                                        expected[task])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["b"], "answer": 0}\n')
    refused = train(fortunes_data, tmp_path / "refused", "train.eval_every=2", f'eval.choices=["{bad}"]', check=False)
    assert refused.returncode == INVALID_CONFIG, refused.stderr
    assert "eval.choices" in refused.stderr and "needs two choices at least" in refused.stderr, refused.stderr
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()
    never = train(fortunes_data, tmp_path / "never", "train.eval_every=0", tasks[1], check=False)
    assert never.returncode == INVALID_CONFIG and "would never run" in never.stderr, never.stderr
