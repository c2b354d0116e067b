"""Reference side of tests/test_hf_models.py's evaluation test: the same scores as `trainer eval` with
transformers. Text: the document after a prefix token, in disjoint windows of SEQ_LEN predicted tokens; choices:
each choice's log-likelihood after its context (lm-evaluation-harness's loglikelihood), per item."""
import json
import math
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, text_path, choices_path, seq_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
prefix = tokenizer.convert_tokens_to_ids("<|endoftext|>")


def nll(ids, first_scored):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    losses = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    return losses[first_scored - 1:].sum().item()


text = open(text_path).read()
ids = [prefix] + tokenizer(text, add_special_tokens=False).input_ids
total, start = 0.0, 0
while start + 1 < len(ids):
    total += nll(ids[start:start + seq_len + 1], 1)
    start += seq_len
tokens = len(ids) - 1
report = {"loss": total / tokens, "perplexity": math.exp(total / tokens),
          "bits_per_byte": total / math.log(2) / len(text.encode()), "tokens": tokens}

correct = correct_norm = 0
answer_nll = 0.0
per_item = []
items = [json.loads(line) for line in open(choices_path)]
for item in items:
    context = tokenizer(item["context"], add_special_tokens=False).input_ids or [prefix]
    scores = []
    for choice in item["choices"]:
        continuation = tokenizer(choice, add_special_tokens=False).input_ids
        scores.append(nll(context + continuation, len(context)))
    correct += min(range(len(scores)), key=lambda c: scores[c]) == item["answer"]
    correct_norm += min(range(len(scores)), key=lambda c: scores[c] / len(item["choices"][c].encode())) == item["answer"]
    answer_nll += scores[item["answer"]]
    per_item.append({"loglikelihoods": [-x for x in scores], "bytes": [len(c.encode()) for c in item["choices"]]})
report.update(accuracy=correct / len(items), accuracy_norm=correct_norm / len(items), answer_nll=answer_nll / len(items),
              per_item=per_item)
print(json.dumps(report))
