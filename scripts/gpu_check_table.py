"""The table of scripts/gpu-check.sh from what its stages left in OUT; exits 1 when a stage failed."""
import json
import statistics
import sys
from pathlib import Path

out, warmup, config, stages = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4].split()
GIB = 1024**3


def status(stage):
    path = out / f"{stage}.status"
    return int(path.read_text()) if path.exists() else None


def peak_memory_gib(stage):
    path = out / f"{stage}.memory"
    used = [int(v) for v in path.read_text().split() if v.strip().isdigit()] if path.exists() else []
    return max(used) / 1024 if used else None


def steps(run):
    path = out / run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def reference(stage):
    path = out / f"{stage}.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return next((json.loads(l) for l in reversed(lines) if l.startswith("{")), None)


def plan_tensors_gib(stage):
    """trainer plan's "= tensors at peak" for the configured recomputation (the column marked *), in GiB."""
    path = out / f"{stage}.plan"
    lines = path.read_text().splitlines() if path.exists() else []
    header = next((l for l in lines if l.startswith(("GiB", "MiB"))), None)
    peak = next((l for l in lines if l.startswith("= tensors at peak")), None)
    if header is None or peak is None:
        return None
    configured = 1 if "recompute on*" in header else 0
    value = float(peak.split()[-2 + configured])
    return value if header.startswith("GiB") else value / 1024


def median(records, key):
    timed = records[warmup:] if len(records) > warmup else []
    return statistics.median(r[key] for r in timed) if timed else None


rows, failed = [], []
ours = {}
for stage in stages:
    code = status(stage)
    row = {"stage": stage, "result": "passed" if code == 0 else f"FAILED (exit {code})", "note": ""}
    if code == 124:
        row["result"] = "FAILED (time limit)"
    if stage in ("train", "7b", "7b-keep"):
        records = steps(stage)
        row.update(tokens_per_s=median(records, "tokens_per_s"), mfu=median(records, "mfu"),
                   step_s=median(records, "step_seconds"))
        timed = records[warmup:]
        if timed:
            row["note"] = "phases " + ", ".join(
                f"{k} {statistics.median(r['phase_seconds'][k] for r in timed):.3f}" for k in timed[0]["phase_seconds"])
        peaks = [r["peak_memory_bytes"] for r in timed if r.get("peak_memory_bytes") is not None]
        planned = plan_tensors_gib(stage)
        if peaks and planned:
            measured = max(peaks) / GIB
            row["note"] += f"; tensors' peak {measured:.2f} GiB, plan {planned:.2f} ({measured / planned - 1:+.1%})"
            if abs(measured / planned - 1) > 0.10 and code == 0:
                row["result"] = "FAILED (plan off)"
        syncs = [r["host_syncs"] for r in timed]
        if syncs:
            row["note"] += f"; host syncs per step {max(syncs)}"
            if max(syncs) > 1 and code == 0:
                row["result"] = "FAILED (host syncs)"
        if stage == "train":
            ours = row
            losses = [r["loss"] for r in records]
            if losses:
                tail = losses[-max(1, len(losses) // 4):]
                falls = statistics.mean(tail) < 0.9 * losses[0]
                row["note"] = f"loss {losses[0]:.2f} -> {statistics.mean(tail):.2f} over {len(losses)} steps" + (
                    "" if falls else " (DID NOT FALL by 10%)") + "; " + row["note"]
                if not falls and code == 0:
                    row["result"] = "FAILED (loss)"
    elif stage in ("eager", "compile"):
        result = reference(stage)
        if result:
            row.update(tokens_per_s=result["tokens_per_s"], step_s=result["median_step_seconds"])
            if ours.get("tokens_per_s"):
                row["mfu"] = ours["mfu"] * result["tokens_per_s"] / ours["tokens_per_s"]
                row["note"] = f"ours / {stage} = {ours['tokens_per_s'] / result['tokens_per_s']:.2f}"
            row["note"] += f"; first step {result['first_step_seconds']:.1f} s"
    row["peak_gib"] = peak_memory_gib(stage)
    if not row["result"].startswith("passed"):
        failed.append(stage)
    rows.append(row)


def cell(value, width, spec):
    return f"{'-' if value is None else format(value, spec):>{width}}"


print(f"\n{config}: median after {warmup} warm-up steps; MFU of metrics.peak_flops (989 TFLOP/s dense bf16 on a GPU; eager/compile: same FLOPs per token)")
print(f"| {'stage':<8} | {'result':<20} | {'tokens/s':>10} | {'MFU':>5} | {'step s':>7} | {'peak GiB':>8} | note")
print(f"|{'-' * 10}|{'-' * 22}|{'-' * 12}|{'-' * 7}|{'-' * 9}|{'-' * 10}|-----")
for r in rows:
    print(f"| {r['stage']:<8} | {r['result']:<20} | {cell(r.get('tokens_per_s'), 10, ',.0f')} | "
          f"{cell(r.get('mfu'), 5, '.3f')} | {cell(r.get('step_s'), 7, '.3f')} | {cell(r['peak_gib'], 8, '.1f')} | {r['note']}")
print("peak GiB: nvidia-smi's used memory of the whole GPU, sampled every 100 ms (CUDA context included)")
print(f"gpu-check: {'FAILED: ' + ' '.join(failed) if failed else 'passed'}")
sys.exit(1 if failed else 0)
