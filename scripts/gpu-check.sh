#!/usr/bin/env bash
#: GPU check on a machine with torch 2.11 (CUDA 13) and no Rust: NCCL self test, llama-1b bf16 against PyTorch eager and torch.compile, 4 layers of the 7B shape with recomputation, a run whose loss falls; one table.
#
# Here (with Rust): scripts/gpu-bundle, then carry .gpu to the GPU machine with the repository.
# There:            scripts/gpu-check.sh   (PYTHON picks the python whose torch to use; results in $OUT or /tmp/gpu-check)
# Stages (STAGES, in this order by default; each under its own time limit, a failed one does not stop the rest):
#   nccl     every collective's NCCL round trip through a one-rank communicator
#   train    STEPS steps of CONFIG (llama-1b) in bf16: tokens/s, MFU, phases, peak memory, and the loss must fall
#   eager    the same shape, batch and steps in PyTorch eager (transformers, bf16 autocast, fused AdamW)
#   7b       4 layers of the 7B shape at seq 4096, micro-batch 1, with recomputation: MFU and peak memory
#            (the CUDA caching allocator's) against trainer plan's prediction, as for train
#   7b-keep  the same without recomputation
#   compile  as eager, through torch.compile
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# CONFIG and DEVICE=cpu (with a small config and STAGES without compile/7b) dry-run it on a machine without a GPU.
BUNDLE=${BUNDLE:-.gpu} STEPS=${STEPS:-50} WARMUP=${WARMUP:-5} MICRO_BATCH=${MICRO_BATCH:-4} ACCUMULATION=${ACCUMULATION:-2}
CONFIG=${CONFIG:-configs/llama-1b.toml} DEVICE=${DEVICE:-cuda} STAGES=${STAGES:-nccl train eager 7b 7b-keep compile}
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
seq_len=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["train"]["seq_len"])' "$CONFIG")
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
"$trainer" env 2>&1 | tee "$out/env.txt"

# stage NAME LIMIT_S COMMAND...: runs COMMAND under a time limit with its output in $out/NAME.txt,
# sampling the GPU's used memory into $out/NAME.memory, and records its exit status in $out/NAME.status.
stage() {
    local name=$1 limit=$2
    shift 2
    [[ " $STAGES " == *" $name "* ]] || return 0
    echo "== $name"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$out/$name.memory" 2>/dev/null &
    local sampler=$!
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" > >(tee "$out/$name.txt") 2>&1
    echo $? >"$out/$name.status"
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
}

train() { # RUN_NAME CONFIG STEPS MICRO_BATCH ACCUMULATION [--set KEY=VALUE...]: trains, after writing
    # trainer plan's prediction for the same configuration to $out/RUN_NAME.plan
    local run=$1 config=$2 steps=$3 micro=$4 accumulation=$5
    shift 5
    local sets=(--set "train.device=$DEVICE" --set "data.path=$BUNDLE/data/fortunes" --set "train.run_dir=$out/$run"
        --set "train.steps=$steps" --set "train.micro_batch=$micro" --set "train.global_batch=$((micro * accumulation))"
        --set train.eval_every=0 --set train.log_every=1 --set train.sample_tokens=0 --set checkpoint.save_final=false "$@")
    "$trainer" plan --config "$config" "${sets[@]}" >"$out/$run.plan" 2>&1
    "$trainer" train --config "$config" "${sets[@]}"
}

reference() { # [--compile]: the PyTorch reference on CONFIG's shape, batch and sequence length
    "$python" scripts/bench_torch.py --config "$CONFIG" --device "$DEVICE" --batch "$MICRO_BATCH" \
        --accumulation "$ACCUMULATION" --seq "$seq_len" --threads "$(nproc)" "$@"
}

export trainer out python seq_len BUNDLE DEVICE CONFIG MICRO_BATCH ACCUMULATION
export -f train reference
stage nccl 60 "$trainer" check-nccl
stage train 200 train train "$CONFIG" "$STEPS" "$MICRO_BATCH" "$ACCUMULATION" --set optim.warmup_steps=10
stage eager 120 reference --steps 15 --warmup "$WARMUP"
seven_b=(configs/llama-7b.toml 8 1 1 --set model.n_layers=4 --set parallel.tensor=1 --set train.seq_len=4096)
stage 7b 120 train 7b "${seven_b[@]}" --set train.recompute=true
stage 7b-keep 120 train 7b-keep "${seven_b[@]}" --set train.recompute=false
stage compile 240 reference --compile --steps 25 --warmup 15

"$python" scripts/gpu_check_table.py "$out" "$WARMUP" "$CONFIG" "$STAGES"
