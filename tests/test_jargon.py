"""The Jargon File task (scripts/prepare-jargon): Debian's jargon-text parsed into a chat fine-tuning set and a held-out
multiple-choice task, deterministically, and `trainer eval` on a few of its items with the real SmolLM2."""
import json
import subprocess

import pytest
from conftest import REPO, binary, run

QUESTION = "What does the hacker term {} mean?"


def prepare(model_dir, out):
    report = run(REPO / "scripts" / "prepare-jargon", "--model-dir", model_dir, "--output", out,
                 "--data-shards", binary("data-shards"))
    return json.loads(report.stdout)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def definitions(path):
    """term -> definition of a chat file written by prepare-jargon."""
    result = {}
    for row in read(path):
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant", row
        assert user["content"].startswith("What does the hacker term ") and user["content"].endswith(" mean?")
        result[user["content"][len("What does the hacker term "):-len(" mean?")]] = assistant["content"]
    return result


@pytest.fixture(scope="module")
def jargon(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("jargon")
    return prepare(smollm2_dir, out), out


def test_jargon_entries_split_and_choices(jargon, smollm2_dir, tmp_path):
    report, out = jargon
    train, held = definitions(out / "train.jsonl"), definitions(out / "held-out.jsonl")
    # Every entry of the Jargon File 4.4.7's lexicon (2307 ':term:' headers), from its first to its last.
    assert report["entries"] == len(train) + len(held) == 2307, report
    everything = {**train, **held}
    assert everything["(TM)"].startswith("[Usenet] ASCII rendition of the ™")
    assert everything["/dev/null"].startswith("[from the Unix null device, used as a data sink] A notional")
    assert everything["zorkmid"] == ("The canonical unit of currency in hacker-written games. This originated in Zork "
                                     "but has spread to nethack and is referred to in several other games.")
    # The part-of-speech line before a numbered sense is skipped; cross-reference braces are gone; 300 chars at most.
    assert everything["clock"].startswith("1. [techspeak] The master oscillator")
    assert all("{" not in d and "}" not in d and 8 <= len(d) <= 303 for d in everything.values())
    # Disjoint, about a tenth held out, and the same split and files when prepared again.
    assert not set(train) & set(held) and 0.07 < len(held) / 2307 < 0.13, len(held)
    again = tmp_path / "again"
    prepare(smollm2_dir, again)
    for name in ("train.jsonl", "held-out.jsonl", "held-out-choices.jsonl"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name

    items = read(out / "held-out-choices.jsonl")
    assert len(items) == len(held)
    pool = set(held.values())
    answers = set()
    for term, item in zip(held, items):
        assert item["context"].endswith(f"<|im_start|>user\n{QUESTION.format(term)}<|im_end|>\n<|im_start|>assistant\n")
        assert len(item["choices"]) == 4 == len(set(item["choices"])), item
        assert item["choices"][item["answer"]] == held[term], item
        # The distractors are other held-out definitions: nothing in the task was seen in training.
        assert set(item["choices"]) <= pool, item
        answers.add(item["answer"])
    assert answers == {0, 1, 2, 3}


def test_trainer_eval_scores_jargon_choices(jargon, smollm2_dir, tmp_path):
    _, out = jargon
    few = tmp_path / "few.jsonl"
    few.write_text("".join((out / "held-out-choices.jsonl").read_text().splitlines(keepends=True)[:4]))
    run(binary("trainer"), "eval", "--model", smollm2_dir, "--choices", few, "--seq-len", 160, "--threads", 2,
        "--output", tmp_path / "result.json")
    [result] = json.loads((tmp_path / "result.json").read_text())
    assert result["kind"] == "choices" and result["items"] == 4 and 0 <= result["accuracy"] <= 1, result
    for item, scores in zip(read(few), result["per_item"]):
        assert scores["answer"] == item["answer"] and len(scores["loglikelihoods"]) == 4
        assert all(ll < 0 for ll in scores["loglikelihoods"]), scores


def test_missing_jargon_file_is_named_with_its_package(smollm2_dir, tmp_path):
    res = subprocess.run([str(REPO / "scripts" / "prepare-jargon"), "--model-dir", str(smollm2_dir), "--output",
                          str(tmp_path / "out"), "--source", str(tmp_path / "nope.txt.gz")], capture_output=True, text=True)
    assert res.returncode == 1 and "nope.txt.gz does not exist: install the Debian package jargon-text" in res.stderr
    assert not (tmp_path / "out").exists()
