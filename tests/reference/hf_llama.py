"""Reference side of trainer/tests/hf_parity.rs: transformers' LlamaForCausalLM (eager attention)
on the weights and tokens the Rust test wrote; saves logits, loss and every parameter's gradient."""
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

directory = sys.argv[1]
torch.manual_seed(0)
config = LlamaConfig.from_pretrained(directory)
config._attn_implementation = "eager"
model = LlamaForCausalLM(config).to(torch.float32)
missing, unexpected = model.load_state_dict(load_file(f"{directory}/model.safetensors"), strict=False)
# A tied head is the embedding's parameter itself: the file holds it once.
assert not unexpected and missing == (["lm_head.weight"] if config.tie_word_embeddings else []), (missing, unexpected)
assert model.lm_head.weight is model.model.embed_tokens.weight or not config.tie_word_embeddings
tokens = load_file(f"{directory}/tokens.safetensors")["tokens"]
# labels = input ids: transformers shifts them, so the loss is over predicting tokens[:, 1:]
# from tokens[:, :-1], exactly our training objective on a window of seq + 1 tokens.
out = model(input_ids=tokens, labels=tokens)
out.loss.backward()
result = {"logits": out.logits[:, :-1].contiguous(), "loss": out.loss.detach().reshape(1)}
for name, parameter in model.named_parameters():
    result[f"grad.{name}"] = parameter.grad.contiguous()
save_file(result, f"{directory}/reference.safetensors")
