"""`trainer generate` on a briefly trained tiny model: greedy tokens equal transformers' generate() from the Hugging Face
export, from the TP2 x DP2 checkpoint on one rank and tensor-parallel over 2 ranks; seeds, stops and bad arguments."""
import json
from pathlib import Path

import pytest
from conftest import REPO, binary, run

INVALID_CONFIG = 78
PROMPTS = ["The meaning of life is", "Q: What is the", "You will be", "A man walks into"]
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def trained(fortunes_data, tmp_path_factory) -> dict:
    """The tiny model after 80 steps on 4 ranks (tensor 2 x data 2, ZeRO), its last checkpoint and its export."""
    work = tmp_path_factory.mktemp("generate")
    args = [binary("launcher"), "run", "--nproc", 4, "--", "train", "--config", REPO / "configs" / "tiny.toml"]
    for item in [f"data.path={fortunes_data}", f"train.run_dir={work / 'run'}", "train.threads=1", "parallel.tensor=2",
                 "train.steps=80", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=2",
                 "train.eval_every=0", "optim.warmup_steps=8", "train.sample_tokens=0"]:
        args += ["--set", item]
    run(*args)
    checkpoint = work / "run" / "checkpoints" / "step-00000080"
    hf = work / "hf"
    run(binary("trainer"), "export-hf", "--checkpoint", checkpoint, "--output", hf)
    return {"checkpoint": checkpoint, "hf": hf}


def generate(model: Path, *options, ranks: int = 1, prompts=PROMPTS, check=True):
    """`trainer generate --json` (under `launcher run` for several ranks): one dict per prompt, or the process."""
    args = ["generate", "--model", model, "--json", "--threads", 1, *options]
    for prompt in prompts:
        args += ["--prompt", prompt]
    if ranks > 1:
        result = run(binary("launcher"), "run", "--nproc", ranks, "--", *args, check=check)
    else:
        result = run(binary("trainer"), *args, check=check)
    if not check:
        return result
    lines = [line.removeprefix("[rank 0] ") for line in result.stdout.splitlines()]
    assert not any(line.startswith("[rank 1]") for line in lines), "only rank 0 prints"
    return [json.loads(line) for line in lines if line.startswith("{")]


GREEDY = ("--temperature", 0, "--max-tokens", NEW_TOKENS, "--ignore-eos")


def test_greedy_generation_equals_transformers_from_every_source(trained):
    import torch
    from transformers import AutoModelForCausalLM

    ours = generate(trained["hf"], *GREEDY)
    assert [len(o["token_ids"]) for o in ours] == [NEW_TOKENS] * len(PROMPTS)
    model = AutoModelForCausalLM.from_pretrained(trained["hf"], dtype=torch.float32)
    for o in ours:
        prompt = torch.tensor([o["prompt_token_ids"]])
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
        assert out[0, prompt.shape[1]:].tolist() == o["token_ids"], f"{o['prompt']!r}: transformers differs"
    tokens = [o["token_ids"] for o in ours]
    # The checkpoint of the TP2 x DP2 run, loaded on one rank; the same, tensor-parallel over 2 ranks; no cache.
    assert [o["token_ids"] for o in generate(trained["checkpoint"], *GREEDY)] == tokens
    assert [o["token_ids"] for o in generate(trained["checkpoint"], *GREEDY, ranks=2)] == tokens
    assert [o["token_ids"] for o in generate(trained["checkpoint"], *GREEDY, "--no-kv-cache")] == tokens
    bf16 = generate(trained["checkpoint"], *GREEDY, "--dtype", "bfloat16", "--batch", 2)
    assert [len(o["token_ids"]) for o in bf16] == [NEW_TOKENS] * len(PROMPTS)


def test_seeds_repeat_and_stops_end_the_output(trained):
    sampled = ("--temperature", 0.9, "--top-p", 0.95, "--top-k", 50, "--max-tokens", 24, "--ignore-eos")
    first = generate(trained["checkpoint"], *sampled, "--seed", 7)
    assert first == generate(trained["checkpoint"], *sampled, "--seed", 7, "--batch", 1)
    assert first != generate(trained["checkpoint"], *sampled, "--seed", 8)

    greedy = generate(trained["checkpoint"], *GREEDY)
    # The model's end-of-text token (id 0 in the fortunes tokenizer) stops it unless --ignore-eos.
    stopped = generate(trained["checkpoint"], "--temperature", 0, "--max-tokens", NEW_TOKENS)
    for full, cut in zip(greedy, stopped):
        if 0 in full["token_ids"]:
            assert cut["token_ids"] == full["token_ids"][:full["token_ids"].index(0)]
            assert (cut["finish_reason"], cut["stop_reason"]) == ("stop", 0)
        else:
            assert cut == full
    # A stop string taken from the middle of the greedy text: the text ends before its first occurrence.
    text = greedy[0]["text"]
    stop = text.strip()[len(text.strip()) // 2:][:3]
    assert stop, text
    cut = generate(trained["checkpoint"], *GREEDY, "--stop", stop, prompts=PROMPTS[:1])[0]
    assert cut["text"] == text[:text.index(stop)] and cut["finish_reason"] == "stop" and cut["stop_reason"] == stop


@pytest.mark.parametrize("options, expected", [
    (["--temperature", -1], "temperature = -1 must be >= 0"),
    (["--top-p", 1.5], "top_p = 1.5 must be in (0, 1]"),
    (["--top-p", 0], "top_p = 0 must be in (0, 1]"),
    (["--max-tokens", 300], "max_tokens = 300 after a prompt of 5 tokens exceeds the context of 256 tokens"),
    (["--chat"], "--chat: the model has no chat template"),
])
def test_bad_arguments_are_refused_clearly(trained, options, expected):
    result = generate(trained["checkpoint"], *options, prompts=PROMPTS[:1], check=False)
    assert result.returncode == INVALID_CONFIG, result.stderr
    assert expected in result.stderr and "panicked" not in result.stderr, result.stderr


def test_a_path_that_holds_no_model_is_refused(tmp_path):
    result = run(binary("trainer"), "generate", "--model", tmp_path, "--prompt", "x", check=False)
    assert result.returncode == INVALID_CONFIG
    assert "is neither a checkpoint" in result.stderr and "panicked" not in result.stderr, result.stderr
