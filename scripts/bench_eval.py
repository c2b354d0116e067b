"""transformers' side of scripts/bench-eval: multiple-choice items scored as `trainer eval` scores them (each choice's
tokens after its context's, batches of 8 in file order, padded right, fp32, no_grad); prints the scored tokens and
the tokens/s of the scoring loop (tokenization and model loading left out) as JSON."""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, choices_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
sequences = []
for line in open(choices_path):
    item = json.loads(line)
    context = tokenizer(item["context"], add_special_tokens=False).input_ids
    for choice in item["choices"]:
        continuation = tokenizer(choice, add_special_tokens=False).input_ids
        sequences.append((context + continuation, len(context)))

started = time.perf_counter()
scores = []
with torch.no_grad():
    for at in range(0, len(sequences), 8):
        batch = sequences[at:at + 8]
        longest = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([s + [0] * (longest - len(s)) for s, _ in batch])
        mask = torch.tensor([[float(first <= t < len(s)) for t in range(1, longest)] for s, first in batch])
        logits = model(input_ids=ids[:, :-1]).logits
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        scores.extend((losses.double() * mask).sum(1).tolist())
seconds = time.perf_counter() - started
tokens = sum(len(ids) for ids, _ in sequences)
print(json.dumps({"sequences": len(sequences), "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}))
