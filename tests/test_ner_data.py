"""NER reading and sub-word alignment: every quirk of real CoNLL files."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from support import write

from hvdft.data.files import Shard, read_lines
from hvdft.errors import HvdftError
from hvdft.tasks.ner import NerOptions, NerTask, parse_conll, special_frame, to_iob2

TASK = NerTask()


def read(path: Path, rank: int = 0, world: int = 1):
    return TASK.read(str(path), "train", Shard(rank, world))


def test_columns_spaces_tabs_and_docstart(tmp_path: Path) -> None:
    text = (
        "-DOCSTART- -X- -X- O\n\n"
        "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n"
        "-DOCSTART-\tO\n"  # no blank line after the marker
        "Peter\tB-PER\nBlackburn\tI-PER\n"
        " \t \n"  # whitespace-only line ends a sentence
        "Berlin B-LOC"  # last line without newline
    )
    split = read(write(tmp_path, "a.txt", text))
    assert split.total == 3
    assert [e["words"] for e in split.examples] == [["EU", "rejects"], ["Peter", "Blackburn"], ["Berlin"]]
    assert [e["tags"] for e in split.examples] == [["B-ORG", "O"], ["B-PER", "I-PER"], ["B-LOC"]]
    assert [e["line"] for e in split.examples] == [3, 7, 10]
    assert [e["scheme"] for e in split.examples] == ["IOB2"] * 3


def test_wnut_style_single_tab_breaks_and_odd_unicode(tmp_path: Path) -> None:
    text = "a\tO\n\t\n\ufe0f\tO\nb\u00a0c\tB-person\n\t\n\u3000\tO\n"
    split = read(write(tmp_path, "w.txt", text))
    assert [e["words"] for e in split.examples] == [["a"], ["\ufe0f", "b\u00a0c"], ["\u3000"]]


def test_crlf_and_bom(tmp_path: Path) -> None:
    split = read(write(tmp_path, "c.txt", b"\xef\xbb\xbfA O\r\nB B-X\r\n\r\nC O\r\n"))
    assert [e["words"] for e in split.examples] == [["A", "B"], ["C"]]
    assert split.examples[0]["tags"] == ["O", "B-X"]


def test_every_scheme_is_converted_to_internal_iob2() -> None:
    iob1 = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]
    assert to_iob2(iob1) == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG"]
    assert to_iob2(["B-PER", "I-PER"]) == ["B-PER", "I-PER"]
    assert to_iob2(["S-PER", "O", "B-LOC", "E-LOC"]) == ["B-PER", "O", "B-LOC", "I-LOC"]
    assert to_iob2(["U-ORG", "U-ORG", "B-LOC", "I-LOC", "L-LOC"]) == ["B-ORG", "B-ORG", "B-LOC", "I-LOC", "I-LOC"]
    assert to_iob2(["B", "I", "O", "I"]) == ["B-ENTITY", "I-ENTITY", "O", "B-ENTITY"]


def test_missing_tag_column_names_file_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.txt", "A O\n\nB O\nbroken\n")
    with pytest.raises(HvdftError, match=r"bad\.txt:4: expected 'word \.\.\. tag'"):
        read(p)


def test_unknown_tag_scheme_is_rejected(tmp_path: Path) -> None:
    accepted = re.escape(": hvdft reads O with B-/I- (IOB1, IOB2), B-/I-/E-/S- (IOBES) or B-/I-/L-/U- (BILUO) tags, "
                         "typed (B-PER) or untyped (B)")
    with pytest.raises(HvdftError, match=r"^\S*x\.txt:2: tag 'PER' fits no tag scheme" + accepted + "$"):
        read(write(tmp_path, "x.txt", "A O\nB PER\n"))
    with pytest.raises(HvdftError, match=r"j\.jsonl:2: tag 'b-PER' fits no tag scheme"):
        read(write(tmp_path, "j.jsonl",
                   '{"tokens": ["a"], "ner_tags": ["O"]}\n{"tokens": ["b"], "ner_tags": ["b-PER"]}\n'))


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(HvdftError, match="file not found"):
        read(tmp_path / "nope.txt")
    with pytest.raises(HvdftError, match="no sentences"):
        read(write(tmp_path, "empty.txt", "\n\n-DOCSTART- O\n\n"))


def test_undecodable_byte_names_line(tmp_path: Path) -> None:
    with pytest.raises(HvdftError, match=r"l1\.txt:3: byte 0xe9 is not valid utf-8"):
        read(write(tmp_path, "l1.txt", b"A O\n\ncaf\xe9 O\n"))


def test_each_rank_parses_only_its_shard(tmp_path: Path) -> None:
    # A broken line in sentence 1 is rank 1's problem under 2 ranks, invisible to rank 0.
    p = write(tmp_path, "s.txt", "A O\n\nbroken\n\nC O\n\nD O\n")
    r0 = read(p, 0, 2)
    assert r0.total == 4 and r0.ids == [0, 2] and [e["words"] for e in r0.examples] == [["A"], ["C"]]
    with pytest.raises(HvdftError, match=r"s\.txt:3:"):
        read(p, 1, 2)


def test_jsonl_and_csv(tmp_path: Path) -> None:
    rows = [{"tokens": ["New", "York"], "ner_tags": ["B-LOC", "I-LOC"]}, {"tokens": ["hi"], "ner_tags": ["O"]}]
    j = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    assert [e["words"] for e in read(j).examples] == [["New", "York"], ["hi"]]
    c = write(tmp_path, "d.csv", 'words,tags\n"New York","B-LOC I-LOC"\nhi,O\n')
    split = NerTask(NerOptions(text_column="words", label_column="tags")).read(str(c), "train", Shard())
    assert split.examples[0]["tags"] == ["B-LOC", "I-LOC"]
    with pytest.raises(HvdftError, match=r"d\.csv:2: no column 'tokens'"):
        read(c)
    bad = write(tmp_path, "n.jsonl", json.dumps({"tokens": ["a", "b"], "ner_tags": ["O"]}) + "\n")
    with pytest.raises(HvdftError, match=r"n\.jsonl:1: 2 tokens but 1 tags"):
        read(bad)


def featurize(tokenizer, examples, label2id, max_length=64, label_all=False):
    batch = {"words": [e["words"] for e in examples], "tags": [e["tags"] for e in examples],
             "example": list(range(len(examples)))}
    return NerTask(NerOptions(label_all_tokens=label_all)).featurize(batch, tokenizer, label2id, max_length)


LABELS = {"O": 0, "B-PER": 1, "I-PER": 2}


def test_first_subword_alignment(tokenizer) -> None:
    out = featurize(tokenizer, [{"words": ["Hvdftization", "Ann"], "tags": ["O", "B-PER"]}], LABELS)
    ids, labels, wix = out["input_ids"][0], out["labels"][0], out["word_index"][0]
    pieces = len(tokenizer.tokenize("Hvdftization"))
    assert pieces > 1
    assert labels == [-100, 0] + [-100] * (pieces - 1) + [1, -100]
    assert wix == [-1, 0] + [-1] * (pieces - 1) + [1, -1]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id


def test_label_all_tokens_maps_b_to_i(tokenizer) -> None:
    out = featurize(tokenizer, [{"words": ["Hvdftization"], "tags": ["B-PER"]}], LABELS, label_all=True)
    labels = out["labels"][0]
    assert labels[1] == 1 and set(labels[2:-1]) == {2}


def test_words_reduced_to_nothing_still_get_a_prediction_slot(tokenizer) -> None:
    words = ["a", "\ufe0f", "b", "\u200b"]
    assert tokenizer.tokenize("\ufe0f") == []
    out = featurize(tokenizer, [{"words": words, "tags": ["O"] * 4}], LABELS)
    assert sorted(w for w in out["word_index"][0] if w >= 0) == [0, 1, 2, 3]


def test_long_sentences_are_windowed_not_truncated(tokenizer) -> None:
    words = [f"w{i}" for i in range(100)]
    tags = ["B-PER" if i % 10 == 0 else "O" for i in range(100)]
    out = featurize(tokenizer, [{"words": words, "tags": tags}], LABELS, max_length=16)
    assert len(out["input_ids"]) > 1
    assert all(len(ids) <= 16 for ids in out["input_ids"])
    covered = [w for row in out["word_index"] for w in row if w >= 0]
    assert covered == list(range(100)), "every word gets exactly one first sub-word, in order"
    # and the merged prediction covers every word
    pieces = [[(w, LABELS[tags[w]]) for w in row if w >= 0] for row in out["word_index"]]
    merged = TASK.merge({"words": words}, pieces, {v: k for k, v in LABELS.items()})
    assert merged == tags


def _capture_transformers_warnings():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    return records, handler


def test_no_false_sequence_length_warning() -> None:
    from transformers import AutoTokenizer

    from hvdft.models import resolve_model

    words = [f"word{i}" for i in range(600)]  # about 1,800 sub-words, model limit 512
    records, handler = _capture_transformers_warnings()
    try:
        fresh = AutoTokenizer.from_pretrained(resolve_model("minilm"), use_fast=True)  # it warns once per instance
        out = featurize(fresh, [{"words": words, "tags": ["O"] * 600}], {"O": 0}, max_length=128)
        assert len(out["input_ids"]) > 10 and max(len(r) for r in out["input_ids"]) <= 128
        assert not [r for r in records if "sequence length is longer" in r.getMessage()]
        # the same tokenizer still warns where a sequence really is too long (the check can fail)
        fresh([words], is_split_into_words=True)
        assert [r for r in records if "sequence length is longer" in r.getMessage()]
    finally:
        logging.getLogger("transformers").removeHandler(handler)


def test_special_frame_is_cls_sep(tokenizer) -> None:
    assert special_frame(tokenizer) == ([tokenizer.cls_token_id], [tokenizer.sep_token_id])


def test_bundled_wnut17_parses_with_published_counts_and_attribution() -> None:
    """Needs only the repository: WNUT-2017 ships with hvdft (CC-BY 4.0)."""
    from hvdft.data.prepare import BUNDLED_DATASETS

    bundled = BUNDLED_DATASETS["wnut17"]
    got = tuple(read(bundled / f"{s}.txt").total for s in ("train", "valid", "test"))
    assert got == (3394, 1009, 1287)
    attribution = (bundled / "ATTRIBUTION.md").read_text()
    assert "CC-BY 4.0" in attribution and "WNUT" in attribution


def test_conll2003_parses_with_published_counts(shared_data: Path) -> None:
    """CoNLL-2003 is licence-restricted: never in the repository, only in ../shared/data."""
    got = tuple(read(shared_data / "conll2003" / f"{s}.txt").total for s in ("train", "valid", "test"))
    assert got == (14041, 3250, 3453)
    lines = read_lines(shared_data / "conll2003" / "train.txt")
    total, ids, examples = parse_conll(lines, "train.txt", Shard(1, 3))
    assert total == 14041 and ids[:3] == [1, 4, 7] and len(examples) == len(range(1, 14041, 3))


def test_bundled_wnut17_is_a_copy_of_the_reference_data(shared_data: Path) -> None:
    from hvdft.data.prepare import BUNDLED_DATASETS

    for name in ("train.txt", "valid.txt", "test.txt"):
        assert (BUNDLED_DATASETS["wnut17"] / name).read_bytes() == (shared_data / "wnut17" / name).read_bytes()
