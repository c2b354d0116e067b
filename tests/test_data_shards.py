"""Cross-checks of the data-shards binary against Python `tokenizers` and megatron-core.

The binary comes from $DATA_SHARDS_BIN (default: target/release/data-shards under the repo root);
build it first with `cargo build --release -p data-shards`.
"""

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("DATA_SHARDS_BIN", REPO / "target" / "release" / "data-shards"))
FORTUNES = Path("/usr/share/games/fortunes")
EXCLUDES = ["*.dat", "*.u8"]


def run(*args, **kw):
    if not BIN.exists():
        pytest.fail(f"{BIN} not found; run `cargo build --release -p data-shards` or set DATA_SHARDS_BIN")
    res = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise AssertionError(f"data-shards {' '.join(map(str, args))} failed:\n{res.stderr}")
    return res.stdout


def dump_docs(*source, split="train"):
    out = run("dump-docs", *source, "--split", split)
    return [json.loads(line) for line in out.splitlines()]


def corpus_args():
    args = ["--input", FORTUNES, "--doc-separator", "%"]
    for e in EXCLUDES:
        args += ["--exclude", e]
    return args


def fortunes_documents():
    """The documents as DATA_FORMAT.md defines them, in prepare's order."""
    files = []
    for dirpath, _, names in os.walk(FORTUNES):
        for n in names:
            p = Path(dirpath) / n
            if p.suffix in (".dat", ".u8") or not p.is_file() or p.is_symlink():
                continue
            files.append(p)
    docs = []
    for path in sorted(files, key=lambda p: str(p).encode()):
        text = path.read_bytes().decode("utf-8")
        parts = text.split("\n")
        lines = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
        cur = ""
        for line in lines:
            bare = line[:-1] if line.endswith("\n") else line
            bare = bare[:-1] if bare.endswith("\r") else bare
            if bare == "%":
                if cur.strip():
                    docs.append(cur)
                cur = ""
            else:
                cur += line
        if cur.strip():
            docs.append(cur)
    return docs


def read_shard(path):
    """Parses a shard file with numpy, following docs/DATA_FORMAT.md only."""
    raw = path.read_bytes()
    magic, version, dtype_code, n_tok, n_doc = struct.unpack_from("<8sIIQQ", raw, 0)
    assert magic == b"LLMSHRD\x00" and version == 1
    dtype = {1: np.dtype("<u2"), 2: np.dtype("<u4")}[dtype_code]
    tokens = np.frombuffer(raw, dtype=dtype, count=n_tok, offset=64)
    ends = np.frombuffer(raw, dtype="<u8", count=n_doc, offset=64 + n_tok * dtype.itemsize)
    assert len(raw) == 64 + n_tok * dtype.itemsize + 8 * n_doc
    starts = [0] + ends[:-1].tolist()
    return [tokens[a:b].tolist() for a, b in zip(starts, ends.tolist())]


@pytest.fixture(scope="module")
def fortunes_tokenizer(tmp_path_factory):
    if not FORTUNES.is_dir():
        pytest.skip("fortunes corpus not installed (apt-get install fortunes)")
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    run("train-tokenizer", *corpus_args(), "--vocab-size", "8000", "--output", out)
    return out


def test_trained_tokenizer_loads_in_python(fortunes_tokenizer):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(fortunes_tokenizer))
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.get_vocab_size() == 8000
    text = "Ünïcödé fortune: «You will write Rust» 🦀\n\tindented"
    assert tok.decode(tok.encode(text).ids) == text


def test_fortunes_tokenization_matches_python_tokenizers(fortunes_tokenizer, tmp_path):
    from tokenizers import Tokenizer

    docs = fortunes_documents()
    assert len(docs) > 10000
    tok = Tokenizer.from_file(str(fortunes_tokenizer))
    expected = [e.ids + [0] for e in tok.encode_batch(docs)]

    out = tmp_path / "all"
    run("prepare", *corpus_args(), "--tokenizer", fortunes_tokenizer, "--output", out,
        "--valid-fraction", "0", "--shard-tokens", "200000")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["eos_id"] == 0 and manifest["dtype"] == "u16" and manifest["vocab_size"] == 8000
    got = dump_docs(out)
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"document {i} differs: {docs[i]!r}"

    # The documented format, parsed independently, holds the same documents.
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 1
    parsed = [d for s in shards for d in read_shard(out / s["file"])]
    assert parsed == expected
    assert [s["num_documents"] for s in shards] == [len(read_shard(out / s["file"])) for s in shards]
    assert manifest["splits"]["valid"]["shards"] == []


def test_train_valid_split_preserves_order(fortunes_tokenizer, tmp_path):
    from tokenizers import Tokenizer

    docs = fortunes_documents()
    tok = Tokenizer.from_file(str(fortunes_tokenizer))
    expected = [e.ids + [0] for e in tok.encode_batch(docs)]
    out = tmp_path / "split"
    run("prepare", *corpus_args(), "--tokenizer", fortunes_tokenizer, "--output", out,
        "--valid-fraction", "0.05")
    train, valid = dump_docs(out, split="train"), dump_docs(out, split="valid")
    assert len(train) + len(valid) == len(expected)
    assert 0.02 < len(valid) / len(expected) < 0.08
    # Identical documents go to the same split, so a greedy merge is unambiguous.
    ti = vi = 0
    for e in expected:
        if ti < len(train) and train[ti] == e:
            ti += 1
        else:
            assert vi < len(valid) and valid[vi] == e
            vi += 1
    assert (ti, vi) == (len(train), len(valid))
    assert "ok: valid split" in run("verify", out)
    assert json.loads(run("inspect", out, "--json"))["valid"]["num_documents"] == len(valid)


def _megatron_builder():
    try:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, IndexedDataset
    except ImportError as e:  # pragma: no cover - reported, not hidden
        pytest.fail(f"cannot import megatron.core.datasets.indexed_dataset: {e}")
    return IndexedDatasetBuilder, IndexedDataset


@pytest.mark.parametrize("dtype", ["int32", "uint16"])
def test_megatron_indexed_dataset_round_trip(tmp_path, dtype):
    import torch

    IndexedDatasetBuilder, IndexedDataset = _megatron_builder()
    rng = np.random.default_rng(0)
    prefix = tmp_path / f"mg_{dtype}"
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=getattr(np, dtype))
    docs = []
    for i in range(40):
        n = int(rng.integers(1, 300))
        high = 65535 if dtype == "uint16" else 2**31 - 1
        doc = rng.integers(0, high, size=n).tolist()
        if i % 7 == 3:
            # A document made of several sequences (sentences).
            cut = n // 2
            builder.add_item(torch.tensor(doc[:cut], dtype=torch.int64))
            builder.add_item(torch.tensor(doc[cut:], dtype=torch.int64))
            builder.end_document()
        else:
            builder.add_document(torch.tensor(doc, dtype=torch.int64), [n])
        docs.append(doc)
    builder.finalize(str(prefix) + ".idx")

    # Megatron's own reader agrees with what we built ...
    ds = IndexedDataset(str(prefix))
    assert len(ds.document_indices) == len(docs) + 1
    # ... and so does ours: same tokens, same document boundaries.
    got = dump_docs("--megatron", prefix)
    assert got == docs
    info = json.loads(run("inspect", "--megatron", prefix, "--json"))["megatron"]
    assert info["num_documents"] == len(docs)
    assert info["num_tokens"] == sum(map(len, docs))
    assert info["dtype"] == {"int32": "i32", "uint16": "u16"}[dtype]
    assert "ok: megatron dataset" in run("verify", "--megatron", prefix)


# Fine-tuning data: real chat templates (SmolLM2-135M-Instruct's own, and Llama-3.1's and Qwen2.5's kept as fixtures)
# and tokenizers against transformers.

LONG = " ".join(f"Sentence {i} of a long answer, with some words to make it longer than a few windows." for i in range(60))

CONVERSATIONS = [
    # No system message: the template adds SmolLM2's default one.
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help you today?"}],
    # A system message and several turns.
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And times 3?"},
        {"role": "assistant", "content": "12, since (2+2)*3 = 12."},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "You're welcome."},
    ],
    # Unicode, newlines and tabs inside the contents.
    [
        {"role": "user", "content": "Ünïcödé «quotes» 🦀 日本語?\nSecond line\twith a tab"},
        {"role": "assistant", "content": "Sí — 日本語 🦀\n\nDone.\n"},
    ],
    # Contents that start and end with whitespace: a token may straddle the assistant header.
    [
        {"role": "user", "content": "  indented question  "},
        {"role": "assistant", "content": "\n  def f():\n\treturn 1\n"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": " Fine "},
    ],
    # Empty contents: an empty answer trains only the end-of-turn token.
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "You sent an empty message."}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi."}],
    # Long contents (several thousand characters) and a long exchange.
    [{"role": "user", "content": "Write a lot."}, {"role": "assistant", "content": LONG}],
    [{"role": "system", "content": LONG}, {"role": "user", "content": "Summarize."}, {"role": "assistant", "content": "Long."}],
    [m for i in range(8) for m in ({"role": "user", "content": f"Question {i}?"},
                                  {"role": "assistant", "content": f"Answer {i}."})],
    # Scripts and symbols: CJK, Cyrillic, Arabic, Devanagari, emoji sequences, combining marks, math.
    [{"role": "user", "content": "Привет, как дела?"}, {"role": "assistant", "content": "Хорошо, спасибо! А у вас?"}],
    [{"role": "user", "content": "مرحبا"}, {"role": "assistant", "content": "أهلاً وسهلاً بك"}],
    [{"role": "user", "content": "नमस्ते"}, {"role": "assistant", "content": "नमस्ते! आप कैसे हैं?"}],
    [{"role": "user", "content": "👩‍👩‍👧‍👦 🏳️‍🌈 e\u0301"}, {"role": "assistant", "content": "Family, flag, and an é with a combining accent."}],
    [{"role": "user", "content": "∀x ∈ ℝ: x² ≥ 0?"}, {"role": "assistant", "content": "Yes: x² = x·x ≥ 0 for real x."}],
    # Text that looks like markup, template syntax or the special tokens' neighbours.
    [{"role": "user", "content": "What is {{ x }} and {% if %}?"}, {"role": "assistant", "content": "Jinja syntax: {{ x }}."}],
    [{"role": "user", "content": "<html><body>hi</body></html>"}, {"role": "assistant", "content": "<p>An HTML page.</p>"}],
    [{"role": "user", "content": "Quote \"this\" and 'that' \\ backslash"}, {"role": "assistant", "content": "\"Done\" \\"}],
    [{"role": "user", "content": "Code please"},
     {"role": "assistant", "content": "```python\nfor i in range(3):\n    print(i)\n```"}],
    # Whitespace-only and newline-heavy contents.
    [{"role": "user", "content": "\n\n\n"}, {"role": "assistant", "content": "Blank lines.\n\n\n"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
     {"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}],
    # Consecutive user turns before an answer.
    [{"role": "user", "content": "First part."}, {"role": "user", "content": "Second part."},
     {"role": "assistant", "content": "Both parts read."}],
]

# The other real templates, as their models' tokenizer_config.json hold them (tests/fixtures/chat-templates/, the
# template text copied unchanged from Meta-Llama-3.1-8B-Instruct's and Qwen2.5-7B-Instruct's), applied with SmolLM2's
# tokenizer; Llama-3's header and end-of-turn tokens are added to it as special tokens, as Llama-3's tokenizer has them.
# Each template's turns: the text before an assistant content and what the content becomes followed by the
# end-of-turn token (Llama-3.1 trims contents).
TEMPLATES = {
    "smollm2": (None, lambda role: f"<|im_start|>{role}\n", lambda content: content + "<|im_end|>"),
    "llama-3.1": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"],
                  lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n",
                  lambda content: content.strip() + "<|eot_id|>"),
    "qwen2.5": ([], lambda role: f"<|im_start|>{role}\n", lambda content: content + "<|im_end|>"),
}


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2-135M-Instruct directory (scripts/fetch-smollm2 caches it)."""
    res = subprocess.run([str(REPO / "scripts" / "fetch-smollm2")], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"scripts/fetch-smollm2 failed:\n{res.stderr}")
    return Path(res.stdout.strip().splitlines()[-1])


def write_chats(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations))
    return path


@pytest.fixture(scope="session", params=list(TEMPLATES))
def chat_model(request, smollm2_dir, tmp_path_factory):
    """A model directory with a real chat template and its transformers tokenizer: SmolLM2's own, or SmolLM2's
    tokenizer with a fixture's tokenizer_config.json (template, bos and eos tokens) and the template's special
    tokens added to tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoTokenizer

    name = request.param
    added, _, _ = TEMPLATES[name]
    if added is None:
        return name, smollm2_dir, AutoTokenizer.from_pretrained(str(smollm2_dir))
    model_dir = tmp_path_factory.mktemp(name)
    tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    tokenizer.save(str(model_dir / "tokenizer.json"))
    config = json.loads((REPO / "tests" / "fixtures" / "chat-templates" / f"{name}.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps(dict(config, tokenizer_class="PreTrainedTokenizerFast")))
    return name, model_dir, AutoTokenizer.from_pretrained(str(model_dir))


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_renders_as_transformers(chat_model, tmp_path, add_generation_prompt):
    name, model_dir, tok = chat_model
    chats = write_chats(tmp_path / "chats.jsonl", CONVERSATIONS)
    args = ["render-chat", "--model-dir", model_dir, "--input", chats]
    out = run(*args, *(["--add-generation-prompt"] if add_generation_prompt else []))
    rendered = [json.loads(line) for line in out.splitlines()]
    expected = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt)
                for c in CONVERSATIONS]
    assert len(rendered) == len(expected) >= 20
    for conversation, ours, theirs in zip(CONVERSATIONS, rendered, expected):
        assert ours == theirs, (name, conversation)
    assert rendered[0].startswith({"smollm2": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM",
                                   "llama-3.1": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                                                "Cutting Knowledge Date: December 2023",
                                   "qwen2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud."}[name])


def expected_mask(tokenizer, conversation, text, header, body):
    """1 on the tokens that overlap an assistant turn's body (its content as the template writes it plus the
    end-of-turn token), found by searching the rendered text turn by turn (independently of how data-shards finds
    them, which is by rendering prefixes)."""
    spans, at = [], 0
    for m in conversation:
        if m["role"] == "assistant":
            at = text.index(header("assistant") + body(m["content"]), at) + len(header("assistant"))
            spans.append((at, at + len(body(m["content"]))))
        else:
            at = text.index(body(m["content"]), at)
        at += len(body(m["content"]))
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [int(any(a < e and b > s for s, e in spans)) for a, b in offsets]


def test_chat_shards_hold_transformers_tokens_and_mask_only_assistant_turns(chat_model, tmp_path):
    name, model_dir, tok = chat_model
    _, header, body = TEMPLATES[name]
    eos = body("")
    chats = write_chats(tmp_path / "chats.jsonl", CONVERSATIONS)
    out = tmp_path / "sft"
    run("prepare", "--format", "chat", "--model-dir", model_dir, "--input", chats, "--output", out,
        "--valid-fraction", "0")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["eos_token"] == eos
    assert manifest["eos_id"] == tok.convert_tokens_to_ids(eos)
    docs = [json.loads(line) for line in run("dump-docs", out, "--mask").splitlines()]
    assert len(docs) == len(CONVERSATIONS)
    trained = 0
    for conversation, doc in zip(CONVERSATIONS, docs):
        ids = tok.apply_chat_template(conversation, tokenize=True, return_dict=False)
        assert doc["tokens"] == ids, (name, conversation)
        text = tok.apply_chat_template(conversation, tokenize=False)
        assert doc["loss_mask"] == expected_mask(tok, conversation, text, header, body), (name, conversation)
        trained += sum(doc["loss_mask"])
        if not any(m["content"][:1].isspace() for m in conversation):
            # No token straddles a turn's start: the masked runs are exactly the assistant bodies.
            runs, run_ids = [], []
            for t, m in zip(doc["tokens"] + [None], doc["loss_mask"] + [0]):
                if m:
                    run_ids.append(t)
                elif run_ids:
                    runs.append(tok.decode(run_ids))
                    run_ids = []
            # Consecutive assistant turns do not occur here; a masked run is one body.
            assert runs == [body(m["content"]) for m in conversation if m["role"] == "assistant"], (name, runs)
    assert manifest["splits"]["train"]["num_loss_tokens"] == trained
    assert "ok: train split" in run("verify", out)

    # The shard file itself, parsed as docs/DATA_FORMAT.md describes version 2: the mask bits follow the table.
    shard = manifest["splits"]["train"]["shards"][0]
    raw = (out / shard["file"]).read_bytes()
    magic, version, code, n_tok, n_doc = struct.unpack_from("<8sIIQQ", raw, 0)
    assert (magic, version, code) == (b"LLMSHRD\x00", 2, 1)
    mask_at = 64 + 2 * n_tok + 8 * n_doc
    assert len(raw) == mask_at + (n_tok + 7) // 8
    bits = np.unpackbits(np.frombuffer(raw, np.uint8, offset=mask_at), bitorder="little")[:n_tok]
    assert bits.tolist() == [m for d in docs for m in d["loss_mask"]]


def test_chat_that_the_template_cannot_split_is_refused(smollm2_dir, tmp_path):
    # An assistant turn first: SmolLM2's template puts its default system prompt in front of the conversation,
    # but not in front of the generation prompt of the empty prefix, so that prefix does not start the rendering.
    chats = write_chats(tmp_path / "chats.jsonl", [CONVERSATIONS[0], [{"role": "assistant", "content": "Hi"}]])
    res = subprocess.run([str(BIN), "prepare", "--format", "chat", "--model-dir", str(smollm2_dir), "--input",
                          str(chats), "--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert res.returncode == 1
    assert f"{chats}: line 2:" in res.stderr and "assistant message 0 cannot be told apart" in res.stderr
    assert not (tmp_path / "out").exists()
