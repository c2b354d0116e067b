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


# Fine-tuning data: the real SmolLM2-135M-Instruct chat template and tokenizer against transformers.

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
]


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2-135M-Instruct directory (scripts/fetch-smollm2 caches it)."""
    res = subprocess.run([str(REPO / "scripts" / "fetch-smollm2")], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"scripts/fetch-smollm2 failed:\n{res.stderr}")
    return Path(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def write_chats(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations))
    return path


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_renders_as_transformers(smollm2_dir, smollm2_tokenizer, tmp_path, add_generation_prompt):
    chats = write_chats(tmp_path / "chats.jsonl", CONVERSATIONS)
    args = ["render-chat", "--model-dir", smollm2_dir, "--input", chats]
    out = run(*args, *(["--add-generation-prompt"] if add_generation_prompt else []))
    rendered = [json.loads(line) for line in out.splitlines()]
    expected = [
        smollm2_tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt)
        for c in CONVERSATIONS
    ]
    assert rendered == expected
    assert rendered[0].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def expected_mask(tokenizer, conversation, text):
    """1 on the tokens that overlap an assistant content plus the <|im_end|> after it, found by searching the
    rendered text (independently of how data-shards finds them)."""
    spans, at = [], 0
    for m in conversation:
        header = f"<|im_start|>{m['role']}\n"
        at = text.index(header + m["content"] + "<|im_end|>", at) + len(header)
        end = at + len(m["content"]) + len("<|im_end|>")
        if m["role"] == "assistant":
            spans.append((at, end))
        at = end
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [int(any(a < e and b > s for s, e in spans)) for a, b in offsets]


def test_chat_shards_hold_transformers_tokens_and_mask_only_assistant_turns(smollm2_dir, smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    chats = write_chats(tmp_path / "chats.jsonl", CONVERSATIONS)
    out = tmp_path / "sft"
    run("prepare", "--format", "chat", "--model-dir", smollm2_dir, "--input", chats, "--output", out,
        "--valid-fraction", "0")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["eos_token"] == "<|im_end|>"
    assert manifest["eos_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    docs = [json.loads(line) for line in run("dump-docs", out, "--mask").splitlines()]
    assert len(docs) == len(CONVERSATIONS)
    trained = 0
    for conversation, doc in zip(CONVERSATIONS, docs):
        ids = tok.apply_chat_template(conversation, tokenize=True, return_dict=False)
        assert doc["tokens"] == ids
        text = tok.apply_chat_template(conversation, tokenize=False)
        assert doc["loss_mask"] == expected_mask(tok, conversation, text)
        trained += sum(doc["loss_mask"])
        if not any(m["content"][:1].isspace() for m in conversation):
            # No token straddles a turn's start: the masked runs are exactly the assistant contents + <|im_end|>.
            runs, run_ids = [], []
            for t, m in zip(doc["tokens"] + [None], doc["loss_mask"] + [0]):
                if m:
                    run_ids.append(t)
                elif run_ids:
                    runs.append(tok.decode(run_ids))
                    run_ids = []
            assert runs == [m["content"] + "<|im_end|>" for m in conversation if m["role"] == "assistant"]
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
