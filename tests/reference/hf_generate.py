"""Reference side of tests/test_hf_models.py: transformers' greedy generate() for each prompt of a JSONL file
({"prompt": text} or, with --chat, {"messages": [...]}), printing one JSON list of new token ids per line."""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, prompts_path, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
for line in open(prompts_path):
    prompt = json.loads(line)
    if "messages" in prompt:
        text = tokenizer.apply_chat_template(prompt["messages"], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tokenizer(prompt["prompt"], return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new, do_sample=False)
    print(json.dumps(out[0, ids.shape[1]:].tolist()), flush=True)
