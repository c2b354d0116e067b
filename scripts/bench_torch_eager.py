"""PyTorch eager reference for scripts/bench-cpu: transformers' LlamaForCausalLM + torch.optim.AdamW +
clip_grad_norm_, one training step at a time; prints the median step time in seconds as JSON."""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

parser = argparse.ArgumentParser()
for name, default in [("threads", 2), ("steps", 30), ("warmup", 5), ("batch", 8), ("seq", 256), ("dim", 256),
                      ("layers", 4), ("heads", 8), ("ffn", 688), ("vocab", 4096)]:
    parser.add_argument(f"--{name}", type=int, default=default)
args = parser.parse_args()

torch.set_num_threads(args.threads)
torch.manual_seed(0)
config = LlamaConfig(hidden_size=args.dim, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                     num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                     max_position_embeddings=args.seq, tie_word_embeddings=False)
config._attn_implementation = "sdpa"
model = LlamaForCausalLM(config).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
times = []
for step in range(args.steps):
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    start = time.perf_counter()
    logits = model(input_ids=tokens[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, args.vocab), tokens[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
print(json.dumps({"median_step_seconds": statistics.median(times[args.warmup:]), "loss": loss.item()}))
