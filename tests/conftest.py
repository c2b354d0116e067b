"""Shared fixtures of the end-to-end suite: the built binaries and a prepared real corpus."""
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FORTUNES = Path("/usr/share/games/fortunes")


def binary(name: str) -> Path:
    """A release binary of the workspace (the test command builds them first)."""
    path = Path(os.environ.get(f"{name.upper().replace('-', '_')}_BIN", REPO / "target" / "release" / name))
    assert path.exists(), f"{path} is missing: run scripts/setup (it builds the release binaries)"
    return path


def run(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def fortunes_data(tmp_path_factory) -> Path:
    """Debian's fortunes, tokenized with a 4096-token BPE trained on it, as token shards."""
    work = tmp_path_factory.mktemp("fortunes")
    corpus = ["--input", FORTUNES, "--exclude", "*.dat", "--exclude", "*.u8", "--doc-separator", "%"]
    tokenizer = work / "tokenizer.json"
    run(binary("data-shards"), "train-tokenizer", *corpus, "--vocab-size", 4096, "--output", tokenizer)
    out = work / "shards"
    run(binary("data-shards"), "prepare", *corpus, "--tokenizer", tokenizer, "--output", out, "--valid-fraction", 0.02)
    return out
