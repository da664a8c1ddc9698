"""Words a column file cannot hold as-is (whitespace, empty, controls, backslashes): every
one is predicted, written escaped, and read back by `hvdft eval` / `hvdft predict`."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
from support import write

from hvdft.data.files import Shard
from hvdft.errors import HvdftError
from hvdft.tasks.ner import (
    ESCAPE_MARKER,
    NerTask,
    _looks_like_conll,
    escape_field,
    needs_escape,
    unescape_field,
    write_columns,
)

TASK = NerTask()

# every kind of word that breaks a `word gold predicted` line, with its escaped form
ODD = [
    (" ", r"\s"),
    ("  ", r"\s\s"),
    ("", r"\e"),
    ("\t", r"\t"),
    ("a\tb", r"a\tb"),
    ("\n", r"\n"),
    ("line\r\n", r"line\r\n"),
    ("\f\v", r"\f\v"),
    ("New York", r"New\sYork"),
    ("\u00a0", r"\u00a0"),  # NBSP: Python's str.split() cuts there
    ("\u3000", r"\u3000"),  # ideographic space
    ("a\u2028b", r"a\u2028b"),  # line separator: str.splitlines() cuts there
    ("\u0085", r"\u0085"),  # NEL
    ("\u001e", r"\u001e"),  # record separator (isspace)
    ("\x00", r"\u0000"),
    ("\x1b[0m", r"\u001b[0m"),
    ("\ufeff", r"\ufeff"),  # a BOM at the start of a file is dropped by readers
    ("-DOCSTART-", r"\u002dDOCSTART-"),  # would be read as a document marker
    ("-DOCSTART-hvdft-escaped", r"\u002dDOCSTART-hvdft-escaped"),
]
# words that are fine as they are: written unchanged when nothing else in the file needs escaping
PLAIN = ["\\", "\\o/", "C:\\new", "\u200b", "\u2060", "\ufe0f", "👨\u200d👩\u200d👧", "a\u00adb", "é", "\\s", "\\e",
         "-DOCSTART", "x-DOCSTART-", "#", '"', "O"]


@pytest.mark.parametrize("word, escaped", ODD + [("\\", "\\\\"), ("\\o/", "\\\\o/"), ("\\s", "\\\\s"),
                                                  ("\\e", "\\\\e"), ("\u200b", "\u200b"), ("é", "é")])
def test_escape_and_back(word: str, escaped: str) -> None:
    assert escape_field(word) == escaped
    assert unescape_field(escaped, "f", 1) == word
    assert not any(ch.isspace() for ch in escaped) and escaped, "one column for every reader"


def test_which_words_need_escaping() -> None:
    assert all(needs_escape(w) for w, _ in ODD)
    assert not any(needs_escape(w) for w in PLAIN)
    # the rule covers every whitespace and control character there is
    for cp in range(0x110000):
        ch = chr(cp)
        if ch.isspace() or unicodedata.category(ch) == "Cc":
            assert needs_escape(f"a{ch}b"), hex(cp)


@pytest.mark.parametrize("text", ["\\q", "a\\", "\\u12", "\\uzzzz", "a\\e", "\\e\\e"])
def test_unknown_escape_is_a_one_line_error(text: str) -> None:
    with pytest.raises(HvdftError, match=r"^p\.conll:7: unknown escape .* \(the file starts with -DOCSTART-hvdft"):
        unescape_field(text, "p.conll", 7)


def test_files_without_odd_words_are_written_as_before(tmp_path: Path) -> None:
    sentences = [[(w, "O", "O") for w in PLAIN]]
    path = tmp_path / "p.conll"
    write_columns(path, sentences)
    assert path.read_text(encoding="utf-8") == "".join(f"{w} O O\n" for w in PLAIN) + "\n"


def test_an_odd_word_escapes_the_whole_file(tmp_path: Path) -> None:
    words = [w for w, _ in ODD] + PLAIN
    path = tmp_path / "p.conll"
    write_columns(path, [[(w, "B-X", "O") for w in words], [("end", "O", "O")]])
    raw = path.read_bytes()
    assert raw.startswith(f"{ESCAPE_MARKER} O O\n\n".encode())
    lines = raw.decode("utf-8").split("\n")
    body = lines[2:2 + len(words)]
    # every word line splits into 3 columns however it is split (str.split() cuts at any Unicode space)
    assert all(len(line.split()) == 3 and len(line.split(" ")) == 3 for line in body)
    assert [line.split(" ")[0] for line in body] == [escape_field(w) for w in words]
    assert lines[2 + len(words):] == ["", "end O O", "", ""]
    assert len(raw.decode("utf-8").splitlines()) == len(lines) - 1, "no stray line breaks"


def _odd_examples() -> list[dict]:
    words = [w for w, _ in ODD] + PLAIN
    return [{"words": words, "tags": ["O"] * len(words)},
            {"words": ["Acme", " ", "Inc"], "tags": ["B-ORG", "O", "B-ORG"]}]


def test_eval_and_predict_read_the_escaped_form_back(tmp_path: Path) -> None:
    jsonl = write(tmp_path, "test.jsonl", "".join(json.dumps({"tokens": e["words"], "ner_tags": e["tags"]}) + "\n"
                                                  for e in _odd_examples()))
    split = TASK.read(str(jsonl), "test", Shard(0, 1))
    assert [e["words"] for e in split.examples] == [e["words"] for e in _odd_examples()]
    preds = [["B-X"] * len(e["words"]) for e in split.examples]
    # test_predictions.conll, then `hvdft eval` on it: the tag read is the last column
    out = tmp_path / "test_predictions.conll"
    TASK.write_predictions(tmp_path, "test", split.examples, preds)
    again = TASK.read(str(out), "eval", Shard(0, 1))
    assert [e["words"] for e in again.examples] == [e["words"] for e in split.examples]
    assert [e["given"] for e in again.examples] == preds
    assert again.total == 2, "the marker line is not a sentence"
    # `hvdft predict` output (word predicted), then `hvdft predict` on that output
    pred_out = tmp_path / "predicted.conll"
    TASK.write_unlabelled_predictions(pred_out, split.examples, preds)
    lines = pred_out.read_text(encoding="utf-8").split("\n")
    assert lines[0] == f"{ESCAPE_MARKER} O" and all(len(line.split(" ")) == 2 for line in lines if line)
    assert _looks_like_conll(lines)
    unlabelled = TASK.read_unlabelled(str(pred_out), Shard())
    assert [e["words"] for e in unlabelled.examples] == [e["words"] for e in split.examples]
    # sharded: rank 1 reads the second sentence only
    assert TASK.read(str(out), "eval", Shard(1, 2)).examples[0]["words"] == ["Acme", " ", "Inc"]


def test_escaped_tags_and_crlf(tmp_path: Path) -> None:
    """Tags come from JSON too: one with a space in its type is escaped like a word."""
    ex = {"words": ["Aspirin", "tablet"], "tags": ["B-Drug name", "O"], "given": ["B-Drug name", "O"]}
    out = tmp_path / "test_predictions.conll"
    TASK.write_predictions(tmp_path, "test", [ex], [["B-Drug name", "O"]])
    assert out.read_text().split("\n")[2] == r"Aspirin B-Drug\sname B-Drug\sname"
    crlf = write(tmp_path, "crlf.conll", out.read_bytes().replace(b"\n", b"\r\n"))
    back = TASK.read(str(crlf), "eval", Shard(0, 1)).examples[0]
    assert back["words"] == ex["words"] and back["given"] == ["B-Drug name", "O"]


def test_a_bad_escape_in_a_marked_file_names_the_line(tmp_path: Path) -> None:
    p = write(tmp_path, "p.conll", f"{ESCAPE_MARKER} O O\n\nok O O\nC:\\New O O\n")
    with pytest.raises(HvdftError, match=r"p\.conll:4: unknown escape '\\N'"):
        TASK.read(str(p), "eval", Shard(0, 1))
    # without the marker a backslash is just a character (corpora hold `\o/`, paths ...)
    p = write(tmp_path, "q.conll", "ok O\nC:\\new O\n\\s O\n")
    assert TASK.read(str(p), "eval", Shard(0, 1)).examples[0]["words"] == ["ok", "C:\\new", "\\s"]


# ------------------------------------------------------------------ the tokenizer


def featurize(tokenizer, examples, max_length=64):
    batch = {"words": [e["words"] for e in examples], "tags": [e["tags"] for e in examples],
             "example": list(range(len(examples)))}
    return TASK.featurize(batch, tokenizer, {"O": 0, "B-ORG": 1, "B-X": 2}, max_length)


def test_every_odd_word_is_fed_and_predicted(tokenizer) -> None:
    """The tokenizer reduces whitespace, empty, control and zero-width words to nothing;
    featurize feeds each as the unknown token, so each gets its own prediction slot."""
    examples = _odd_examples()
    vanished = [w for w in examples[0]["words"] if not tokenizer.tokenize(w)]
    assert {" ", "  ", "", "\t", "\n", "\u00a0", "\u3000", "\u200b", "\ufeff"} <= set(vanished)
    out = featurize(tokenizer, examples, max_length=16)  # windows too
    for b, ex in enumerate(examples):
        rows = [r for r, e in enumerate(out["example"]) if e == b]
        firsts = [(w, out["input_ids"][r][i]) for r in rows for i, w in enumerate(out["word_index"][r]) if w >= 0]
        assert [w for w, _ in firsts] == list(range(len(ex["words"]))), "one first sub-word per word, in order"
        for w, token in firsts:
            if ex["words"][w] in vanished:
                assert token == tokenizer.unk_token_id, repr(ex["words"][w])
    pieces = [[(w, 2) for w in row if w >= 0] for row in out["word_index"]]
    merged = TASK.merge(examples[0], [p for p, e in zip(pieces, out["example"], strict=True) if e == 0],
                        {0: "O", 1: "B-ORG", 2: "B-X"})
    assert len(merged) == len(examples[0]["words"])


def test_handed_whitespace_tokens_case(tmp_path: Path, tokenizer) -> None:
    lines = [{"tokens": ["Take", "two", "(", "2", ")", " "], "ner_tags": ["O", "B-DOSE", "O", "B-DOSE", "O", "O"]},
             {"tokens": ["Apply", "once", "daily", "  ", "for", "5", "days", "."],
              "ner_tags": ["O", "B-FREQ", "I-FREQ", "O", "O", "B-DUR", "I-DUR", "O"]}]
    path = write(tmp_path, "test.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    split = TASK.read(str(path), "test", Shard(0, 1))
    out = featurize(tokenizer, split.examples)
    assert [sum(w >= 0 for w in row) for row in out["word_index"]] == [6, 8]
    preds = [ex["given"] for ex in split.examples]
    metrics, report = TASK.score(split.examples, preds)
    assert [line.split()[0::4] for line in report.splitlines()[2:5]] == [["DOSE", "2"], ["DUR", "1"], ["FREQ", "1"]]
    path = tmp_path / "test_predictions.conll"
    TASK.write_predictions(tmp_path, "test", split.examples, preds)
    blocks = path.read_text().split("\n\n")
    assert blocks[0] == f"{ESCAPE_MARKER} O O"
    word_lines = [b.split("\n") for b in blocks[1:] if b]
    assert [len(b) for b in word_lines] == [6, 8]
    assert all(len(line.split()) == 3 for b in word_lines for line in b)
    assert word_lines[0][5] == r"\s O O" and word_lines[1][3] == r"\s\s O O"
