"""A real Hugging Face model in and out: SmolLM2-135M-Instruct (scripts/fetch-smollm2) fine-tuned from its own
directory, under one rank and split over 3 tensor-parallel ranks (its 9 heads and 3 KV heads), then exported."""
import json

import pytest
from conftest import binary, run


def finetune(model_dir, data, run_dir, ranks):
    config = run_dir.parent / f"{run_dir.name}.toml"
    # No [model]: it comes from config.json. A short context keeps the CPU test fast.
    config.write_text(f'[checkpoint]\ninit_from_hf = "{model_dir}"\n[data]\npath = "{data}"\n'
                      f'[model]\nmax_seq_len = 64\n[parallel]\ntensor = {ranks}\n')
    sets = [f"train.run_dir={run_dir}", "train.steps=2", "train.global_batch=2", "train.micro_batch=1",
            "optim.lr=1e-5", "optim.warmup_steps=0", "train.threads=1", f"train.export_dir={run_dir}/hf"]
    args = ["train", "--config", config] + [a for s in sets for a in ("--set", s)]
    if ranks == 1:
        return run(binary("trainer"), *args)
    return run(binary("launcher"), "run", "--nproc", ranks, "--", *args)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finetuned(smollm2_dir, fortunes_smollm2, tmp_path_factory):
    """SmolLM2 fine-tuned for 2 steps on one rank and on 3 tensor-parallel ranks (that run exported to tp3/hf)."""
    runs = tmp_path_factory.mktemp("finetuned")
    finetune(smollm2_dir, fortunes_smollm2, runs / "one", 1)
    finetune(smollm2_dir, fortunes_smollm2, runs / "tp3", 3)
    return runs


def test_smollm2_finetunes_alike_on_one_rank_and_three_tensor_parallel_ranks(finetuned):
    one, tp3 = losses(finetuned / "one"), losses(finetuned / "tp3")
    # Real weights know English: far below ln(49152) = 10.8 of a random model.
    assert one[0] < 5.0, one
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(one, tp3)), (one, tp3)
    exported = finetuned / "tp3" / "hf"
    names = sorted(p.name for p in exported.iterdir())
    assert names == ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"], names
    config = json.loads((exported / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["num_attention_heads"] == 9
    # The source's special token ids are kept, so that transformers' generate stops at the end of a turn.
    generation = json.loads((exported / "generation_config.json").read_text())
    for key, id in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 2)):
        assert config[key] == generation[key] == id, (key, config, generation)


def chat_data(model_dir, tmp_path):
    """Conversations built from Debian's fortunes (a user asks, the assistant answers with a fortune), prepared as
    fine-tuning shards with SmolLM2's chat template: only the assistant turns are trained."""
    from conftest import FORTUNES
    texts = [t.strip() for t in (FORTUNES / "fortunes").read_text(errors="replace").split("\n%\n") if t.strip()][:64]
    source = tmp_path / "chats.jsonl"
    with source.open("w") as f:
        for i, text in enumerate(texts):
            messages = [{"role": "user", "content": f"Tell me fortune number {i}."},
                        {"role": "assistant", "content": text}]
            f.write(json.dumps({"messages": messages}) + "\n")
    out = tmp_path / "chat-shards"
    run(binary("data-shards"), "prepare", "--format", "chat", "--model-dir", model_dir, "--input", source,
        "--output", out)
    return out


def test_smollm2_chat_finetuning_is_the_same_under_every_layout(smollm2_dir, tmp_path):
    """The loss is the mean over the trained (assistant) tokens of the whole global batch, so one rank with 4
    sequences per micro-batch, 2 data-parallel ranks accumulating 2 micro-batches each, and 3 tensor-parallel ranks
    with 2 micro-batches all take the same steps."""
    data = chat_data(smollm2_dir, tmp_path)
    layouts = {"one": (1, 1, 4), "dp2": (2, 1, 1), "tp3": (3, 3, 2)}
    curves = {}
    for name, (ranks, tensor, micro) in layouts.items():
        run_dir = tmp_path / name
        config = tmp_path / f"{name}.toml"
        config.write_text(f'[checkpoint]\ninit_from_hf = "{smollm2_dir}"\n[data]\npath = "{data}"\n'
                          f'[model]\nmax_seq_len = 128\n[parallel]\ntensor = {tensor}\n')
        sets = [f"train.run_dir={run_dir}", "train.steps=2", "train.global_batch=4", f"train.micro_batch={micro}",
                "optim.lr=1e-5", "optim.warmup_steps=0", "train.threads=1"]
        args = ["train", "--config", config] + [a for s in sets for a in ("--set", s)]
        if ranks == 1:
            run(binary("trainer"), *args)
        else:
            run(binary("launcher"), "run", "--nproc", ranks, "--", *args)
        curves[name] = losses(run_dir)
    one = curves["one"]
    # Real weights: far below ln(49152) = 10.8 of a random model, and learning.
    assert one[0] < 6.0 and one[1] < one[0], one
    for name, curve in curves.items():
        assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(one, curve)), (name, curve, one)


PLAIN = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
         "The three primary colors are", "Water boils at", "The largest planet in the solar system",
         "To make a cup of tea, first", "In 1969, the first person to walk on the Moon was"]
CHATS = ["What is the capital of France?", "Write a haiku about autumn.", "What is 12 times 7?",
         "Name three fruits.", "Explain gravity in one sentence.", "Translate 'good morning' into French.",
         "What is the boiling point of water?", "Give me a synonym for happy."]


def test_smollm2_greedy_generation_equals_transformers(smollm2_dir, tmp_path):
    """`trainer generate` with the KV cache and continuous batching (8 prompts at once) gives transformers'
    greedy tokens on the real model, for plain prompts and through the chat template."""
    import sys
    from conftest import REPO
    for chat, prompts in ((False, [{"prompt": p} for p in PLAIN]),
                          (True, [{"messages": [{"role": "user", "content": c}]} for c in CHATS])):
        path = tmp_path / f"prompts-{chat}.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
        args = ["generate", "--model", smollm2_dir, "--prompts-file", path, "--max-tokens", 64, "--temperature", 0,
                "--batch", 8, "--json", "--threads", 2] + (["--chat"] if chat else [])
        completions = [json.loads(line) for line in run(binary("trainer"), *args).stdout.splitlines()]
        ours = [c["token_ids"] for c in completions]
        reference = run(REPO / ".venv" / "bin" / "python", REPO / "tests" / "reference" / "hf_generate.py",
                        smollm2_dir, path, 64).stdout.splitlines()
        theirs = [json.loads(line) for line in reference]
        eos = 2  # <|im_end|>: transformers keeps it at the end of a finished answer
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert [t for t in a if t != eos] == [t for t in b if t != eos], (chat, prompts[i], a, b)
        if chat:
            assert "Paris" in completions[0]["text"], completions[0]


CHOICES = [
    {"context": "The capital of France is", "choices": [" Paris", " Berlin", " Madrid"], "answer": 0},
    {"context": "Water freezes at a temperature of", "choices": [" 0 degrees Celsius", " 50 degrees Celsius"],
     "answer": 0},
    {"context": "The opposite of hot is", "choices": [" cold", " blue", " loud"], "answer": 0},
    {"context": "Two plus two equals", "choices": [" seven", " four"], "answer": 1},
    {"context": "A cat is a kind of", "choices": [" vegetable", " animal", " planet"], "answer": 1},
    {"context": "", "choices": ["The sun rises in the east.", "The sun rises in the purple."], "answer": 0},
]


def test_smollm2_evaluation_equals_transformers_under_every_layout(finetuned, tmp_path):
    """`trainer eval` on the exported fine-tuned SmolLM2 (its context is 64): loss, perplexity and bits per byte of a
    text in windows, and every choice's log-likelihood, equal transformers' on the same tokens; tensor-parallel
    (3 ranks) and data-parallel (2 ranks) runs give the same numbers."""
    from conftest import FORTUNES, REPO
    model = finetuned / "tp3" / "hf"
    text = tmp_path / "held-out.txt"
    text.write_text((FORTUNES / "fortunes").read_text(errors="replace")[:1500])
    choices = tmp_path / "choices.jsonl"
    choices.write_text("".join(json.dumps(item) + "\n" for item in CHOICES))
    # No --seq-len: the default is the context less one token, 63.
    args = ["eval", "--model", model, "--text", text, "--choices", choices, "--threads", 1]
    reports = {"one": run(binary("trainer"), *args, "--output", tmp_path / "one.json").stdout,
               "tp3": run(binary("launcher"), "run", "--nproc", 3, "--", *args, "--tensor", 3,
                          "--output", tmp_path / "tp3.json").stdout,
               "dp2": run(binary("launcher"), "run", "--nproc", 2, "--", *args, "--output", tmp_path / "dp2.json").stdout}
    reference = json.loads(run(REPO / ".venv" / "bin" / "python", REPO / "tests" / "reference" / "hf_eval.py",
                               model, text, choices, 63).stdout)
    for name, out in reports.items():
        lines = [json.loads(line.split("] ", 1)[-1]) for line in out.splitlines() if "{" in line]
        written = json.loads((tmp_path / f"{name}.json").read_text())
        assert [r["kind"] for r in written] == ["text", "choices"], written
        # The printed lines are the written results without the per-item scores.
        assert lines == [written[0], {k: v for k, v in written[1].items() if k != "per_item"}], (name, lines)
        loss, scores = written
        assert loss["tokens"] == reference["tokens"], (name, loss)
        for key in ("loss", "perplexity", "bits_per_byte"):
            assert abs(loss[key] - reference[key]) <= 1e-4 * reference[key], (name, key, loss, reference)
        assert abs(scores["answer_nll"] - reference["answer_nll"]) <= 1e-4 * reference["answer_nll"], (name, scores)
        assert (scores["accuracy"], scores["accuracy_norm"]) == (reference["accuracy"], reference["accuracy_norm"])
        assert len(scores["per_item"]) == len(CHOICES)
        for item, ours, theirs in zip(CHOICES, scores["per_item"], reference["per_item"]):
            assert ours["bytes"] == theirs["bytes"] and ours["answer"] == item["answer"], (name, ours)
            # Per-choice log-likelihoods within 1e-4 (nats) of transformers'.
            assert all(abs(a - b) <= 1e-4 for a, b in zip(ours["loglikelihoods"], theirs["loglikelihoods"], strict=True)), (
                name, item, ours, theirs)
            best = max(range(len(item["choices"])), key=lambda c: theirs["loglikelihoods"][c])
            assert ours["predicted"] == best, (name, ours, theirs)
    assert reference["accuracy"] >= 5 / 6, reference
