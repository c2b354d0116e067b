"""Reference side of trainer/tests/generate.rs: transformers' logits processors (repetition penalty, then
temperature, top-k, top-p, min-p, in the order generate() applies them) on the logits and token history the
Rust test wrote."""
import sys

from safetensors.torch import load_file, save_file
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

inputs, output = sys.argv[1:3]
tensors = load_file(inputs)
logits, history = tensors["logits"], tensors["history"]
penalty = RepetitionPenaltyLogitsProcessor(1.3)
warpers = [TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)]


def warp(scores):
    for warper in warpers:
        scores = warper(history, scores)
    return scores


save_file({
    "penalty": penalty(history, logits.clone()).contiguous(),
    "warped": warp(logits.clone()).contiguous(),
    "penalized_warped": warp(penalty(history, logits.clone())).contiguous(),
}, output)
