"""A real Hugging Face model in and out: SmolLM2-135M-Instruct (scripts/fetch-smollm2) fine-tuned from its own
directory, under one rank and split over 3 tensor-parallel ranks (its 9 heads and 3 KV heads), then exported."""
import json

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


def test_smollm2_finetunes_alike_on_one_rank_and_three_tensor_parallel_ranks(smollm2_dir, fortunes_smollm2, tmp_path):
    finetune(smollm2_dir, fortunes_smollm2, tmp_path / "one", 1)
    finetune(smollm2_dir, fortunes_smollm2, tmp_path / "tp3", 3)
    one, tp3 = losses(tmp_path / "one"), losses(tmp_path / "tp3")
    # Real weights know English: far below ln(49152) = 10.8 of a random model.
    assert one[0] < 5.0, one
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(one, tp3)), (one, tp3)
    exported = tmp_path / "tp3" / "hf"
    names = sorted(p.name for p in exported.iterdir())
    assert names == ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"], names
    config = json.loads((exported / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["num_attention_heads"] == 9
