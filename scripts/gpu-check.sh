#!/usr/bin/env bash
#: GPU check on a machine with torch 2.11 (CUDA 13) and no Rust: the NCCL round trip of every collective on a CUDA device, then a few bf16 training steps of the 1B preset, reporting tokens/s, MFU and peak memory.
#
# Here (with Rust): scripts/gpu-bundle, then carry .gpu to the GPU machine with the repository.
# There:            scripts/gpu-check.sh   (PYTHON picks the python whose torch to use; results in $OUT or /tmp/gpu-check)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# CONFIG and DEVICE=cpu (with a small config) dry-run the script on a machine without a GPU.
BUNDLE=${BUNDLE:-.gpu} STEPS=${STEPS:-8} WARMUP=${WARMUP:-3} MICRO_BATCH=${MICRO_BATCH:-4} ACCUMULATION=${ACCUMULATION:-2}
CONFIG=${CONFIG:-configs/llama-1b.toml} DEVICE=${DEVICE:-cuda}
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
python=${PYTHON:-python3}
[ -x "$BUNDLE/bin/trainer" ] || { echo "no $BUNDLE/bin/trainer: run scripts/gpu-bundle on the build machine and bring $BUNDLE" >&2; exit 2; }

# The trainer's rpath names the build machine's venv: point the loader at this machine's torch,
# its nvidia libraries, the bundled libraries this machine lacks, and a libnccl.so name for cudarc.
torch_dir=$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))') || exit 2
site=$(dirname "$torch_dir")
links=$(mktemp -d)
trap 'rm -rf "$links"' EXIT
ln -s "$site/nvidia/nccl/lib/libnccl.so.2" "$links/libnccl.so"
for lib in "$BUNDLE"/lib/*; do
    ldconfig -p | grep -q "/$(basename "$lib")\$" || ln -s "$(realpath "$lib")" "$links/"
done
nvidia_libs=$(ls -d "$site"/nvidia/*/lib 2>/dev/null | paste -sd:)
export LD_LIBRARY_PATH="$links:$torch_dir/lib:$nvidia_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
trainer=$(realpath "$BUNDLE/bin/trainer")
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$out/gpu.txt"

echo "== trainer env"
"$trainer" env 2>&1 | tee "$out/env.txt" || status=1

echo "== NCCL round trip of every collective (one-rank communicator on cuda:0)"
"$trainer" check-nccl 2>&1 | tee "$out/check-nccl.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== $STEPS steps of $CONFIG on $DEVICE (micro-batch $MICRO_BATCH x $ACCUMULATION)"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$out/memory.csv" 2>/dev/null &
sampler=$!
"$trainer" train --config "$CONFIG" --set "train.device=$DEVICE" \
    --set "data.path=$BUNDLE/data/fortunes" --set "train.run_dir=$out/run" --set "train.steps=$STEPS" \
    --set "train.micro_batch=$MICRO_BATCH" --set "train.global_batch=$((MICRO_BATCH * ACCUMULATION))" \
    --set train.eval_every=0 --set train.log_every=1 --set train.sample_tokens=0 \
    --set checkpoint.save_final=false 2>&1 | tee "$out/train.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
kill "$sampler" 2>/dev/null
wait "$sampler" 2>/dev/null

"$python" - "$out" "$WARMUP" "$CONFIG" <<'PY' || status=1
import json, statistics, sys
from pathlib import Path
out, warmup, config = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
records = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
assert len(records) > warmup, f"only {len(records)} steps ran"
timed = records[warmup:]
memory = [int(v) for v in (out / "memory.csv").read_text().split() if v.strip().isdigit()]
print(f"{config}, after {warmup} warm-up steps, median of {len(timed)}:")
print(f"  tokens/s {statistics.median(r['tokens_per_s'] for r in timed):,.0f}")
print(f"  MFU      {statistics.median(r['mfu'] for r in timed):.3f} (of metrics.peak_flops; 989 TFLOP/s dense bf16 on a GPU)")
print(f"  step     {statistics.median(r['step_seconds'] for r in timed):.3f} s; phases "
      + ", ".join(f"{k} {statistics.median(r['phase_seconds'][k] for r in timed):.3f}" for k in timed[0]["phase_seconds"]))
print(f"  peak GPU memory used {max(memory, default=0) / 1024:.1f} GiB (nvidia-smi, sampled every 100 ms)")
print(f"  losses {[round(r['loss'], 3) for r in records]}")
PY
echo "gpu-check: $([ $status -eq 0 ] && echo passed || echo FAILED)"
exit $status
