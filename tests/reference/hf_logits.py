"""Reference side of trainer/tests/checkpoint.rs: loads an exported directory with transformers'
from_pretrained and saves its logits for the given tokens."""
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

model_dir, tokens_path, out_path = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
tokens = load_file(tokens_path)["tokens"]
with torch.no_grad():
    logits = model(input_ids=tokens).logits
save_file({"logits": logits.contiguous()}, out_path)
