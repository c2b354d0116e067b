"""PyTorch reference for the benchmarks: transformers' LlamaForCausalLM + AdamW + clip_grad_norm_, eager or torch.compile'd, on CPU (fp32) or CUDA (bf16 autocast over fp32 weights, fused AdamW); prints the median step as JSON."""
import argparse
import json
import statistics
import time
import tomllib

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

SHAPE = {"dim": 256, "layers": 4, "heads": 8, "kv_heads": None, "ffn": 688, "vocab": 4096, "rope_theta": 10000.0}
FROM_CONFIG = {"dim": "dim", "layers": "n_layers", "heads": "n_heads", "kv_heads": "n_kv_heads", "ffn": "ffn_dim",
               "vocab": "vocab_size", "rope_theta": "rope_theta"}

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--config", help="take the model shape from this trainer config's [model] section")
parser.add_argument("--device", default="cpu", help="cpu or cuda")
parser.add_argument("--compile", action="store_true", help="torch.compile the model (the first steps compile)")
for name, default in [("threads", 2), ("steps", 30), ("warmup", 5), ("batch", 8), ("accumulation", 1), ("seq", 256)]:
    parser.add_argument(f"--{name}", type=int, default=default)
for name in SHAPE:
    parser.add_argument(f"--{name.replace('_', '-')}", type=type(SHAPE[name] or 0), default=None)
args = parser.parse_args()
shape = dict(SHAPE)
if args.config:
    with open(args.config, "rb") as f:
        model = tomllib.load(f)["model"]
    shape.update({k: model[v] for k, v in FROM_CONFIG.items() if v in model})
shape.update({k: getattr(args, k) for k in SHAPE if getattr(args, k) is not None})

cuda = args.device.startswith("cuda")
torch.set_num_threads(args.threads)
torch.manual_seed(0)
config = LlamaConfig(hidden_size=shape["dim"], intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
                     num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"] or shape["heads"],
                     vocab_size=shape["vocab"], rope_theta=shape["rope_theta"], max_position_embeddings=args.seq,
                     tie_word_embeddings=False)
config._attn_implementation = "sdpa"
model = LlamaForCausalLM(config).to(args.device).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                              fused=cuda or None)
forward = torch.compile(model) if args.compile else model
autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
times = []
for step in range(args.steps):
    batches = torch.randint(0, shape["vocab"], (args.accumulation, args.batch, args.seq + 1), device=args.device)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for tokens in batches:
        with autocast:
            logits = forward(input_ids=tokens[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, shape["vocab"]), tokens[:, 1:].reshape(-1))
        (loss / args.accumulation).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
median = statistics.median(times[args.warmup:])
print(json.dumps({"median_step_seconds": median,
                  "tokens_per_s": args.accumulation * args.batch * args.seq / median,
                  "first_step_seconds": times[0],
                  "peak_memory_bytes": torch.cuda.max_memory_reserved() if cuda else None,
                  "loss": loss.item()}))
