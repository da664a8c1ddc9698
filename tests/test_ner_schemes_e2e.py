"""End to end on 2 real Horovod ranks: `hvdft train ner` on BILUO data (JSON lines from
spaCy, whitespace tokens kept, one sentence over the tokenizer's 512 limit) and on
untyped B/I/O data (as biomedical corpora ship); the reports, the label set and the
predictions files are checked, and `hvdft eval` / `hvdft predict` read the escaped
predictions file back."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from support import HVDFT, horovodrun, make_tiny_model, run_ok

from hvdft.tasks.ner import ESCAPE_MARKER, entity_tags, escape_field, tag_entities, unescape_field

pytestmark = pytest.mark.slow

ORGS = [["Acme"], ["Globex", "Corp"], ["Blue", "River", "Group"], ["Initech"], ["Umbra", "Ltd"]]
PEOPLE = [["Ann"], ["Bo", "Li"], ["Carla", "de", "Souza"]]
FILLER = ["hired", "staff", "today", "and", "cut", "prices", "in", "the", "north", " ", "  ", "\u00a0", ""]


def biluo_sentences(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words, spans = [], []
        for part in range(rng.randint(1, 3)):
            if part:
                words += [rng.choice(FILLER) for _ in range(rng.randint(1, 3))]
            kind, name = ("ORG", rng.choice(ORGS)) if rng.random() < 0.6 else ("PER", rng.choice(PEOPLE))
            spans.append((kind, len(words), len(words) + len(name)))
            words += name
        words.append(".")
        out.append((words, entity_tags(spans, len(words), "BILUO")))
    return out


def write_jsonl(path: Path, rows: list[tuple[list[str], list[str]]]) -> Path:
    path.write_text("".join(json.dumps({"tokens": w, "ner_tags": t}) + "\n" for w, t in rows), encoding="utf-8")
    return path


def support(report: str) -> dict[str, int]:
    rows = [line.split() for line in report.splitlines()]
    return {r[0]: int(r[-1]) for r in rows if len(r) == 5 and r[0] not in ("micro", "macro", "weighted")}


def word_blocks(path: Path) -> list[list[list[str]]]:
    """Sentences of a predictions file: word lines as their space-separated fields."""
    text = path.read_text(encoding="utf-8")
    return [[line.split(" ") for line in block.split("\n")] for block in text.split("\n\n") if block.strip()]


def train_args(model: Path, folder: Path, suffix: str, out: Path) -> list[str]:
    return [HVDFT, "train", "ner", "--model", str(model), "--train-file", str(folder / f"train{suffix}"),
            "--validation-file", str(folder / f"dev{suffix}"), "--test-file", str(folder / f"test{suffix}"),
            "--epochs", "1", "--max-steps", "3", "--batch-size", "4", "--max-length", "64", "--lr", "1e-3",
            "--cache-dir", str(folder / "cache"), "--output-dir", str(out)]


def test_biluo_jsonl_with_whitespace_tokens(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "tiny")
    train = biluo_sentences(24, seed=1)
    train.append(([f"w{i}" for i in range(600)] + ["Acme"], ["O"] * 600 + ["U-ORG"]))  # 600+ sub-words > 512
    test = biluo_sentences(9, seed=3)
    test.append((["Acme", " ", "", "rose", "\u00a0", "."], ["U-ORG", "O", "O", "O", "O", "O"]))
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "dev.jsonl", biluo_sentences(6, seed=2))
    write_jsonl(tmp_path / "test.jsonl", test)
    out = tmp_path / "out"
    result = run_ok([*horovodrun(2), *train_args(model, tmp_path, ".jsonl", out)], timeout=600)
    assert "Token indices sequence length" not in result.output

    gold_entities = [k for _, tags in test for k, _, _ in tag_entities(tags)]
    assert support((out / "test_report.txt").read_text()) == {
        "ORG": gold_entities.count("ORG"), "PER": gold_entities.count("PER")}
    labels = set(json.loads((out / "config.json").read_text())["id2label"].values())
    assert labels == {"O", "B-ORG", "I-ORG", "B-PER", "I-PER"}, "IOB2 inside: what pipeline aggregation groups"

    predictions = out / "test_predictions.conll"
    assert predictions.read_text(encoding="utf-8").startswith(f"{ESCAPE_MARKER} O O\n\n")
    blocks = word_blocks(predictions)[1:]  # after the marker
    assert len(blocks) == len(test)
    for (words, tags), block in zip(test, blocks, strict=True):
        assert all(len(row) == 3 for row in block)
        assert [unescape_field(r[0], "p", 0) for r in block] == words
        assert [r[0] for r in block] == [escape_field(w) for w in words]
        assert [r[1] for r in block] == tags, "gold written back as given (U-/L- kept)"
        predicted = [r[2] for r in block]
        assert all(re.fullmatch(r"O|[BILU]-(ORG|PER)", t) for t in predicted), predicted
        assert entity_tags(tag_entities(predicted), len(predicted), "BILUO") == predicted, "well-formed BILUO"

    # `hvdft eval` reads the escaped file (its tag column is the last: the predictions)
    run_ok([HVDFT, "eval", "--model", str(out), "--data", str(predictions), "--output-dir", str(tmp_path / "ev")],
           timeout=300)
    assert json.loads((tmp_path / "ev" / "eval_results.json").read_text())["sentences"] == len(test)
    # `hvdft predict` on 2 ranks reads it too, and writes every word back, escaped
    again = tmp_path / "again.conll"
    run_ok([*horovodrun(2), HVDFT, "predict", "--model", str(out), "--input", str(predictions), "--output", str(again)],
           timeout=300)
    blocks = word_blocks(again)
    assert blocks[0] == [[ESCAPE_MARKER, "O"]]
    assert [[unescape_field(r[0], "p", 0) for r in b] for b in blocks[1:]] == [w for w, _ in test]
    assert all(len(r) == 2 for b in blocks[1:] for r in b)


def test_untyped_conll(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "tiny")

    def untyped(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
        rows = []
        for words, tags in biluo_sentences(n, seed):
            words = [w if w.strip() else "and" for w in words]  # CoNLL cannot hold whitespace words
            rows.append((words, entity_tags([(None, s, e) for _, s, e in tag_entities(tags)], len(words), "IOB2")))
        return rows

    for name, rows in (("train", untyped(24, 1)), ("dev", untyped(6, 2)), ("test", untyped(9, 3))):
        text = "".join("".join(f"{w}\t{t}\n" for w, t in zip(words, tags, strict=True)) + "\n" for words, tags in rows)
        (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
    test = [[line.split("\t") for line in block.split("\n") if line]
            for block in (tmp_path / "test.txt").read_text().split("\n\n") if block.strip()]
    out = tmp_path / "out"
    run_ok([*horovodrun(2), *train_args(model, tmp_path, ".txt", out)], timeout=600)

    n_entities = sum(tag == "B" for sentence in test for _, tag in sentence)
    assert support((out / "test_report.txt").read_text()) == {"ENTITY": n_entities}
    labels = set(json.loads((out / "config.json").read_text())["id2label"].values())
    assert labels == {"O", "B-ENTITY", "I-ENTITY"}
    blocks = word_blocks(out / "test_predictions.conll")
    assert len(blocks) == len(test)
    for sentence, block in zip(test, blocks, strict=True):
        assert [r[:2] for r in block] == [[w, t] for w, t in sentence], "words and bare gold tags as given"
        assert all(r[2] in ("B", "I", "O") for r in block)
