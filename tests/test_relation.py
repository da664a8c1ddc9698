"""Relation extraction (issue 15): readers, entity markers, windows, the official measure, writers.

The official-measure tests run the organisers' Perl scorer from ../shared/data (never copied
here) and require hvdft's numbers to print exactly as the scorer prints them.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import SHARED_DATA, write

from hvdft.data.files import Shard
from hvdft.errors import HvdftError
from hvdft.tasks.relation import (
    SEMEVAL_LABELS,
    SEMEVAL_RELATIONS,
    RelationOptions,
    RelationTask,
    answer_ids,
    example_from_record,
    featurize_examples,
    mark,
    markup,
    official_scores,
    parse_marked,
    read_relation_file,
    read_semeval,
    score_relations,
    short_label,
    undirected,
    window,
    write_answer_file,
)

# SHARED_DATA honours HVDFT_SHARED_DATA (a worktree whose parent holds no shared/ folder).
RELEASE = SHARED_DATA / "semeval2010_task8" / "SemEval2010_task8_all_data"
SCORER_DIR = RELEASE / "SemEval2010_task8_scorer-v1.2"
SCORER = SCORER_DIR / "semeval2010_task8_scorer-v1.2.pl"
TEST_FULL = RELEASE / "SemEval2010_task8_testing_keys" / "TEST_FILE_FULL.TXT"
TRAIN = RELEASE / "SemEval2010_task8_training" / "TRAIN_FILE.TXT"

SEMEVAL_SAMPLE = (
    '1\t"The system as described above has its greatest application in an arrayed <e1>configuration</e1> '
    'of antenna <e2>elements</e2>."\r\n'
    "Component-Whole(e2,e1)\r\n"
    "Comment: Not a collection: there is structure here, organisation.\r\n"
    "\r\n"
    '2\t"The <e1>child</e1> was carefully wrapped and bound into the <e2>cradle</e2> by means of a cord."\r\n'
    "Other\r\n"
    "Comment:\r\n"
    "\r\n"
    '30\t"The <e1>timer</e1> of the <e2>device</e2> eliminates wasted "standby power" consumption."\r\n'
    "Component-Whole(e1,e2)\r\n"
    "Comment:\r\n"
    "\r\n"
)


def semeval_data() -> Path:
    if not TEST_FULL.is_file():
        pytest.skip(f"{RELEASE} is absent (the SemEval-2010 Task 8 release lives in ../shared/data)")
    return RELEASE


def need_scorer() -> None:
    semeval_data()
    if shutil.which("perl") is None:
        pytest.skip("perl is not installed (the official scorer is a Perl script)")


# ----------------------------------------------------------------------------- markers in text


def test_parse_marked_spans_and_inner_quotes():
    text, e1, e2 = parse_marked('The <e1>timer</e1> of the <e2>device</e2> saves "standby power".')
    assert text == 'The timer of the device saves "standby power".'
    assert text[e1[0]:e1[1]] == "timer" and text[e2[0]:e2[1]] == "device"
    # e2 before e1 is a valid sentence in other corpora
    text, e1, e2 = parse_marked("<e2>Seattle</e2> is home to <e1>Bill</e1>")
    assert (text[e1[0]:e1[1]], text[e2[0]:e2[1]]) == ("Bill", "Seattle")


@pytest.mark.parametrize("sentence, cause", [
    ("The child was wrapped into the <e2>cradle</e2>.", "no <e1>"),
    ("The <e1>child</e1> was wrapped into the cradle.", "no <e2>"),
    ("The <e1>child was wrapped into the <e2>cradle</e2>.", "nested"),
    ("The <e1>child <e2>was</e2></e1> wrapped.", "nested"),
    ("The <e1>child</e1> was wrapped into the <e2>cradle.", "<e2> is not closed"),
    ("The child</e1> <e1>x</e1> <e2>y</e2>", "</e1> without <e1>"),
    ("The <e1>child</e1> <e1>x</e1> <e2>y</e2>", "two <e1>"),
    ("The <e1></e1> was wrapped into the <e2>cradle</e2>.", "encloses no text"),
    ("The <e1> </e1> was wrapped into the <e2>cradle</e2>.", "only white space"),
])
def test_parse_marked_errors(sentence, cause):
    with pytest.raises(ValueError, match=re.escape(cause)):
        parse_marked(sentence)


# ----------------------------------------------------------------------------- SemEval reader


def test_read_semeval_crlf_quotes_labels(tmp_path):
    path = write(tmp_path, "TRAIN_FILE.TXT", SEMEVAL_SAMPLE)
    total, ids, examples = read_semeval(path, Shard(0, 1))
    assert total == 3 and ids == [0, 1, 2]
    assert [ex["id"] for ex in examples] == ["1", "2", "30"]
    assert [ex["label"] for ex in examples] == ["Component-Whole(e2,e1)", "Other", "Component-Whole(e1,e2)"]
    assert [ex["line"] for ex in examples] == [1, 5, 9]
    third = examples[2]
    assert third["text"] == 'The timer of the device eliminates wasted "standby power" consumption.'
    assert "\r" not in third["text"] and not third["text"].startswith('"')
    # the SemEval markup is rebuilt exactly: the file's sentence without its outer quotes
    assert markup(third) == 'The <e1>timer</e1> of the <e2>device</e2> eliminates wasted "standby power" consumption.'


def test_read_semeval_shards_parse_only_their_records(tmp_path):
    broken = SEMEVAL_SAMPLE.replace("<e2>cradle</e2>", "<e2>cradle")  # record 2 (index 1): rank 1's
    path = write(tmp_path, "train.txt", broken)
    total, ids, examples = read_semeval(path, Shard(0, 2))
    assert (total, ids, [ex["id"] for ex in examples]) == (3, [0, 2], ["1", "30"])
    with pytest.raises(HvdftError, match=r"train\.txt:5: <e2> is not closed"):
        read_semeval(path, Shard(1, 2))


def test_read_semeval_structure_errors_on_every_rank(tmp_path):
    # a second label line is a structural error: both ranks find it, whoever owns the record
    bad = SEMEVAL_SAMPLE.replace("Other\r\n", "Other\r\nOther\r\n")
    path = write(tmp_path, "train.txt", bad)
    for rank in (0, 1):
        with pytest.raises(HvdftError, match=r"train\.txt:7: expected 'ID<TAB>\"sentence\"'"):
            read_semeval(path, Shard(rank, 2))


def test_read_semeval_unlabelled_and_key_files(tmp_path):
    test_file = write(tmp_path, "TEST_FILE.txt",
                      '8001\t"The most common <e1>audits</e1> were about <e2>waste</e2>."\r\n'
                      '8002\t"The <e1>company</e1> fabricates plastic <e2>chairs</e2>."\r\n')
    with pytest.raises(HvdftError, match=r"TEST_FILE\.txt:1: no relation line .* TEST_FILE_FULL\.TXT"):
        read_semeval(test_file, Shard(0, 1))
    total, _, examples = read_semeval(test_file, Shard(0, 1), labelled=False)
    assert total == 2 and [ex["label"] for ex in examples] == [None, None]
    key = write(tmp_path, "TEST_FILE_KEY.TXT", "8001\tMessage-Topic\r\n8002\tProduct-Producer\r\n")
    with pytest.raises(HvdftError, match=r"TEST_FILE_KEY\.TXT:1: this is an answer-key line"):
        read_semeval(key, Shard(0, 1))
    undirected_label = write(tmp_path, "t.txt", SEMEVAL_SAMPLE.replace("Component-Whole(e2,e1)", "Component-Whole"))
    with pytest.raises(HvdftError, match=r"t\.txt:2: relation 'Component-Whole' has no direction"):
        read_semeval(undirected_label, Shard(0, 1))
    with pytest.raises(HvdftError, match="no sentences"):
        read_semeval(write(tmp_path, "empty.txt", "\r\n\r\n"), Shard(0, 1))


def test_read_semeval_lf_and_no_trailing_blank(tmp_path):
    text = SEMEVAL_SAMPLE.replace("\r\n", "\n").rstrip("\n")
    total, _, examples = read_semeval(write(tmp_path, "train.txt", text), Shard(0, 1))
    assert total == 3 and examples[-1]["label"] == "Component-Whole(e1,e2)"


def test_read_official_release():
    release = semeval_data()
    task = RelationTask()
    train = task.read(str(TRAIN), "train", Shard(0, 1))
    assert train.total == 8000 and len(train.examples) == 8000
    assert {ex["label"] for ex in train.examples} == set(SEMEVAL_LABELS)
    test = task.read(str(TEST_FULL), "test", Shard(1, 2))
    assert test.total == 2717 and test.ids[:2] == [1, 3] and test.examples[0]["id"] == "8002"
    # every sentence rebuilds to the file's own markup
    lines = TEST_FULL.read_text(encoding="ascii").splitlines()
    for ex in test.examples:
        assert lines[ex["line"] - 1] == f'{ex["id"]}\t"{markup(ex)}"'
    # the ranks' shards, put back in global order, are the one-rank read
    shards = [task.read(str(TEST_FULL), "test", Shard(rank, 3)) for rank in range(3)]
    merged = sorted((gid, ex["id"]) for part in shards for gid, ex in zip(part.ids, part.examples, strict=True))
    whole = task.read(str(TEST_FULL), "test", Shard(0, 1))
    assert [sid for _, sid in merged] == [ex["id"] for ex in whole.examples]
    unlabelled = task.read_unlabelled(str(release / "SemEval2010_task8_testing" / "TEST_FILE.txt"), Shard(0, 1))
    assert unlabelled.total == 2717 and unlabelled.examples[0]["label"] is None


# ----------------------------------------------------------------------------- JSON, TACRED, Hub


def test_json_lines_spans_markers_and_errors(tmp_path):
    rows = [
        {"id": "a", "text": "Bill Gates founded Microsoft.", "e1": [0, 10], "e2": [19, 28], "label": "org:founded_by"},
        {"text": "Seattle is home to Bill.", "e1": {"start": 19, "end": 23, "type": "PERSON", "text": "Bill"},
         "e2": {"start": 0, "end": 7, "type": "CITY"}, "relation": "per:city_of_residence"},
        {"sentence": "The <e1>company</e1> fabricates plastic <e2>chairs</e2>.", "label": "Product-Producer(e2,e1)"},
    ]
    path = write(tmp_path, "train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    total, ids, examples = read_relation_file(path, Shard(0, 1), RelationOptions())
    assert total == 3 and [ex["id"] for ex in examples] == ["a", "2", "3"]
    assert [ex["line"] for ex in examples] == [1, 2, 3]
    first, second, third = examples
    assert first["text"][slice(*first["e1"])] == "Bill Gates" and first["e1_type"] is None
    assert (second["e1_type"], second["e2_type"], second["label"]) == ("PERSON", "CITY", "per:city_of_residence")
    assert third["text"][slice(*third["e2"])] == "chairs"

    def error_of(record: dict) -> str:
        p = write(tmp_path, "bad.jsonl", json.dumps(rows[0]) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(HvdftError) as info:
            read_relation_file(p, Shard(0, 1), RelationOptions())
        return str(info.value)

    base = {"text": "Bill Gates founded Microsoft.", "label": "x"}
    assert error_of({**base, "e1": [0, 10], "e2": [19, 30]}).endswith(
        "bad.jsonl:2: record 2: e2 span [19, 30) is out of range for a text of 29 characters "
        "(offsets are characters, end exclusive)")
    assert "e1 span [0, 9) is 'Bill Gate' but the record says 'Bill Gates'" in error_of(
        {**base, "e1": {"start": 0, "end": 9, "text": "Bill Gates"}, "e2": [19, 28]})
    assert "overlap" in error_of({**base, "e1": [0, 10], "e2": [5, 12]})
    assert "no column 'e2'" in error_of({**base, "e1": [0, 10]})
    assert "offsets must be integers" in error_of({**base, "e1": [0, "10"], "e2": [19, 28]})
    assert "markers and the record has" in error_of({**base, "text": "<e1>Bill</e1> <e2>x</e2>", "e1": [0, 4],
                                                      "e2": [5, 6]})
    assert "no <e2>" in error_of({"text": "<e1>Bill</e1> founded it", "label": "x"})
    assert "no relation in column 'label'" in error_of({**base, "e1": [0, 10], "e2": [19, 28], "label": " "})
    assert "no label column" in error_of({"text": "<e1>a</e1> <e2>b</e2>"})
    # unlabelled reading ignores labels and needs none
    p = write(tmp_path, "predict.jsonl", json.dumps({"text": "<e1>a</e1> <e2>b</e2>"}) + "\n")
    assert read_relation_file(p, Shard(0, 1), RelationOptions(), labelled=False)[2][0]["label"] is None


TACRED = [
    {"id": "e7798fb926b9403cfcd2", "relation": "per:title",
     "token": ["At", "the", "same", "time", ",", "Chief", "Financial", "Officer", "Douglas", "Flint", "-LRB-",
               "sic", "-RRB-", "will", "become", "chairman", "."],
     "subj_start": 8, "subj_end": 9, "obj_start": 5, "obj_end": 7, "subj_type": "PERSON", "obj_type": "TITLE"},
    {"id": "61b3a65fb9b7111c4ca4", "relation": "no_relation",
     "token": ["Tom", "Thabane", "resigned", "in", "October", "last", "year"],
     "subj_start": 0, "subj_end": 1, "obj_start": 4, "obj_end": 4, "subj_type": "PERSON", "obj_type": "DATE"},
]


def test_tacred_json_array(tmp_path):
    path = write(tmp_path, "train.json", json.dumps(TACRED, indent=1))  # TACRED's own files: one JSON array
    total, _, examples = read_relation_file(path, Shard(0, 1), RelationOptions())
    assert total == 2
    ex = examples[0]
    assert ex["id"] == "e7798fb926b9403cfcd2" and ex["label"] == "per:title"
    assert ex["text"][slice(*ex["e1"])] == "Douglas Flint"  # inclusive token indices 8..9
    assert ex["text"][slice(*ex["e2"])] == "Chief Financial Officer"
    assert "( sic )" in ex["text"]  # -LRB- / -RRB- back to brackets
    assert (ex["e1_type"], ex["e2_type"]) == ("PERSON", "TITLE")
    bad = dict(TACRED[1], obj_end=7)
    with pytest.raises(ValueError, match=r"'obj_end' = 7 is out of range for 7 tokens"):
        example_from_record(bad, RelationOptions(), 0, 1, True)
    with pytest.raises(ValueError, match="overlap"):
        example_from_record(dict(TACRED[1], obj_start=1, obj_end=2), RelationOptions(), 0, 1, True)
    with pytest.raises(ValueError, match="subj_start 1 is after subj_end 0"):
        example_from_record(dict(TACRED[1], subj_start=1, subj_end=0), RelationOptions(), 0, 1, True)


def test_read_hub_classlabel_rows():
    datasets = pytest.importorskip("datasets")
    names = sorted(SEMEVAL_LABELS)
    ds = datasets.Dataset.from_dict(
        {"sentence": ["The <e1>company</e1> fabricates plastic <e2>chairs</e2>.",
                      "The <e1>child</e1> was wrapped into the <e2>cradle</e2>.",
                      "The <e1>author</e1> uses a <e2>disassembler</e2>."],
         "relation": [names.index("Product-Producer(e2,e1)"), names.index("Other"),
                      names.index("Instrument-Agency(e2,e1)")]},
        features=datasets.Features({"sentence": datasets.Value("string"),
                                    "relation": datasets.ClassLabel(names=names)}),
    )
    split = RelationTask().read_hub(ds, "train", Shard(0, 2), "sem_eval_2010_task_8")
    assert split.total == 3 and split.ids == [0, 2]
    assert [ex["label"] for ex in split.examples] == ["Product-Producer(e2,e1)", "Instrument-Agency(e2,e1)"]
    withheld = ds.cast_column("relation", datasets.Value("int64")).map(lambda r: {"relation": -1})
    withheld = withheld.cast_column("relation", datasets.ClassLabel(names=names + ["x"]))
    assert RelationTask().read_hub(withheld, "test", Shard(0, 1), "x") is None


# ----------------------------------------------------------------------------- marker alignment


def _batch(examples: list[dict]) -> dict[str, list]:
    batch = {k: [ex[k] for ex in examples] for k in examples[0]}
    batch["example"] = list(range(len(examples)))
    return batch


def _tokens_between(tokenizer, ids: list[int], start: int, closing: str) -> list[str]:
    tokens = tokenizer.convert_ids_to_tokens(ids)
    end = tokens.index(closing, start)
    return tokens[start + 1:end]


def test_marker_tokens_land_on_the_entities(tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    task = RelationTask()
    task.prepare(None, tok, 128)
    before = len(tok)
    task.prepare(None, tok, 128)  # idempotent: a trained model's tokenizer has them already
    assert len(tok) == before == len(tokenizer) + 4
    examples = [
        {"text": "The system has an arrayed configuration of antenna elements.", "e1": [26, 39], "e2": [51, 59],
         "e1_type": None, "e2_type": None, "label": "Component-Whole(e2,e1)"},
        {"text": "Seattle is home to Bill Gates.", "e1": [19, 29], "e2": [0, 7], "e1_type": "PERSON",
         "e2_type": "CITY", "label": "unseen"},
    ]
    features = featurize_examples(_batch(examples), tok, {"Component-Whole(e2,e1)": 3}, 64, "tokens", typed=False)
    assert features["labels"] == [3, -100] and features["example"] == [0, 1]
    for row, ex in enumerate(examples):
        ids = features["input_ids"][row]
        tokens = tok.convert_ids_to_tokens(ids)
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and features["length"][row] == len(ids)
        for entity, closing in (("e1", "</e1>"), ("e2", "</e2>")):
            at = features[f"{entity}_index"][row]
            assert tokens[at] == f"<{entity}>"  # each marker is ONE token, not '<', 'e1', '>'
            inner = _tokens_between(tok, ids, at, closing)
            assert tok.convert_tokens_to_string(inner) == ex["text"][slice(*ex[entity])].lower()
    assert features["e2_index"][1] < features["e1_index"][1]  # the object comes first in that sentence
    # typed markers put the type words inside the markers
    typed = featurize_examples(_batch(examples[1:]), tok, {}, 64, "tokens", typed=True)
    toks = tok.convert_ids_to_tokens(typed["input_ids"][0])
    at = typed["e1_index"][0]
    assert toks[at:at + 6] == ["<e1>", "*", "person", "*", "bill", "gates"]
    # punctuation markers: no new tokens; the @ / # tokens sit where the entities start
    punct = featurize_examples(_batch(examples), tokenizer, {}, 64, "punct", typed=True)
    toks = tokenizer.convert_ids_to_tokens(punct["input_ids"][1])
    assert toks[punct["e1_index"][1]:punct["e1_index"][1] + 7] == ["@", "*", "person", "*", "bill", "gates", "@"]
    assert toks[punct["e2_index"][1]:punct["e2_index"][1] + 6] == ["#", "^", "city", "^", "seattle", "#"]


def test_mark_styles():
    ex = {"text": "Seattle is home to Bill.", "e1": [19, 23], "e2": [0, 7], "e1_type": "PERSON", "e2_type": "CITY"}
    text, blocks = mark(ex, "tokens", typed=False)
    assert text == "<e2>Seattle</e2> is home to <e1>Bill</e1>."
    assert text[slice(*blocks["e1"])] == "<e1>Bill</e1>" and text[slice(*blocks["e2"])] == "<e2>Seattle</e2>"
    assert mark(ex, "tokens", typed=True)[0] == "<e2> ^ city ^ Seattle</e2> is home to <e1> * person * Bill</e1>."
    assert mark(ex, "punct", typed=False)[0] == "# Seattle # is home to @ Bill @."
    assert mark(dict(ex, e1_type="STATE_OR_PROVINCE"), "punct", typed=True)[0] == (
        "# ^ city ^ Seattle # is home to @ * state or province * Bill @.")


def test_window_contains_both_arguments():
    assert window(10, 2, 5, 20) == (0, 10)
    assert window(100, 50, 53, 10) == (47, 57)  # centred on the arguments
    assert window(100, 0, 3, 10) == (0, 10)
    assert window(100, 96, 99, 10) == (90, 100)
    assert window(100, 10, 19, 10) == (10, 20)
    assert window(100, 10, 20, 10) is None  # 11 tokens apart with room for 10


def test_long_sentences_window_and_too_far_apart(tokenizer):
    filler = " ".join(["word"] * 60)
    examples = [
        # arguments close together in a long sentence: a 32-token window around them
        {"text": f"{filler} the cat sat on the mat {filler}", "e1": [len(filler) + 5, len(filler) + 8],
         "e2": [len(filler) + 20, len(filler) + 23], "e1_type": None, "e2_type": None, "label": "A(e1,e2)"},
        # arguments 60 words apart: no 32-token window holds both
        {"text": f"cat {filler} mat", "e1": [0, 3], "e2": [len(filler) + 5, len(filler) + 8],
         "e1_type": None, "e2_type": None, "label": "A(e1,e2)"},
    ]
    task = RelationTask(RelationOptions(markers="punct"))
    features = task.featurize(_batch(examples), tokenizer, {"A(e1,e2)": 0}, 32)
    assert features["example"] == [0]
    assert features["length"] == [32]
    toks = tokenizer.convert_ids_to_tokens(features["input_ids"][0])
    assert toks[features["e1_index"][0]:features["e1_index"][0] + 3] == ["@", "cat", "@"]
    assert toks[features["e2_index"][0]:features["e2_index"][0] + 3] == ["#", "mat", "#"]
    # centred: as many filler words on each side (the window is even, the argument span odd)
    left = features["e1_index"][0] - 1
    right = 32 - 1 - (features["e2_index"][0] + 3)
    assert abs(left - right) <= 1
    from hvdft.data.files import Split

    split = Split("train", "train.jsonl", 2, [0, 1], [dict(ex, id=str(i + 1), line=i + 1)
                                                      for i, ex in enumerate(examples)])
    assert task.describe_missing(split, 1, split.examples[1], 32) == (
        "1 of 2 train examples have their two arguments further apart than 32 tokens (--max-length): "
        "left out of training (e.g. id 2, train.jsonl:2)")
    hub = Split("test", "sem_eval[test]", 2, [0, 1], [dict(split.examples[1], line=None)])
    assert task.describe_missing(hub, 1, hub.examples[0], 32).endswith(
        "predicted as the negative label without the model (the official scorer's treatment of a skipped "
        "example) and scored (e.g. id 2 of sem_eval[test])")
    # evaluation: no row -> the negative label, probability nan, and it is scored
    id2label = {0: "A(e1,e2)", 1: "Other"}
    assert task.merge(split.examples[1], [], id2label)[0] == "Other"
    assert math.isnan(task.merge(split.examples[1], [], id2label)[1])
    metrics, report = task.score(split.examples, [("A(e1,e2)", 0.9), ("Other", math.nan)])
    assert metrics["macro_f1"] == pytest.approx(2 / 3)  # A: P 1/1, R 1/2
    assert report.startswith("1 of 2 examples have their arguments further apart than --max-length")


# ----------------------------------------------------------------------------- the official measure


def test_undirected_and_short_labels():
    assert undirected("Cause-Effect(e2,e1)") == "Cause-Effect"
    assert undirected("Other") == "Other" and undirected("per:title") == "per:title"
    assert short_label("Cause-Effect(e1,e2)") == "C-E1" and short_label("Member-Collection(e2,e1)") == "M-C2"
    assert short_label("Other") == "_O_" and short_label("per:title") == "per:title"


def test_official_measure_by_hand():
    gold = ["A(e1,e2)", "A(e1,e2)", "A(e2,e1)", "B(e1,e2)", "B(e1,e2)", "Other", "Other"]
    pred = ["A(e1,e2)", "A(e2,e1)", "A(e2,e1)", "Other", "B(e1,e2)", "B(e2,e1)", "Other"]
    s = official_scores(gold, pred, "Other")
    # A: right twice (0, 2); one direction error (1) counts as a wrong A prediction: P 2/3, R 2/3
    a = s.relations["A"]
    assert (a.correct, a.predicted, a.wrong_direction, a.gold) == (2, 3, 1, 3)
    assert a.f1 == pytest.approx(200 / 3)
    # B: right once (4); predicted for 4 and 5 (5 is Other in the gold, and reversed): P 1/2, R 1/2
    b = s.relations["B"]
    assert (b.correct, b.predicted, b.wrong_direction, b.gold) == (1, 2, 0, 2)
    assert set(s.relations) == {"A", "B"}  # Other is no relation of the average
    assert f"{s.macro_f1:.2f}" == "58.33"  # (66.67 + 50) / 2; with Other (P 1/2, R 1/2) it would be 55.56
    assert (s.micro_precision, s.micro_recall, s.micro_f1) == pytest.approx((60.0, 60.0, 60.0))
    metrics, report = score_relations(gold, pred, "Other")
    assert metrics["macro_f1"] == pytest.approx(0.58333, abs=1e-5)
    assert metrics["accuracy"] == pytest.approx(4 / 7)  # exact label, direction included
    assert "macro-averaged F1 = 58.33%" in report
    assert "confusion matrix (rows: gold, columns: predicted)" in report
    # without direction A would be perfect: the official measure must not be that
    assert official_scores([undirected(g) for g in gold], [undirected(p) for p in pred], "Other").relations[
        "A"].f1 == pytest.approx(100.0)


def test_official_measure_relations_only_predicted_and_skipped():
    # C appears only in the predictions: it lowers no relation's recall but is not averaged (the scorer's rule)
    s = official_scores(["A(e1,e2)", "Other"], ["A(e1,e2)", "C(e1,e2)"], "Other")
    assert list(s.relations) == ["A"] and s.macro_f1 == 100.0
    # a skipped example (None) is a miss, like Other
    s = official_scores(["A(e1,e2)", "A(e1,e2)"], ["A(e1,e2)", None], "Other")
    assert (s.relations["A"].precision, s.relations["A"].recall) == (100.0, 50.0) and s.skipped == 1
    # TACRED-style labels: no direction, no_relation excluded
    s = official_scores(["per:title", "no_relation", "org:founded_by"], ["per:title", "per:title", "no_relation"],
                        "no_relation")
    assert s.relations["per:title"].precision == 50.0 and s.relations["org:founded_by"].recall == 0.0
    assert f"{s.macro_f1:.2f}" == "33.33"


def _perl(proposed: Path, key: Path) -> str:
    proc = subprocess.run(["perl", str(SCORER), str(proposed), str(key)], cwd=SCORER_DIR, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _official_section(output: str) -> str:
    return output.split("<<< (9+1)-WAY EVALUATION TAKING DIRECTIONALITY INTO ACCOUNT -- OFFICIAL >>>")[1]


def _assert_same_as_scorer(output: str, gold: list[str], pred: list[str | None]) -> None:
    """hvdft's numbers, printed at the scorer's precision, are the scorer's numbers."""
    ours = official_scores(gold, pred, "Other")
    official = float(re.search(r"macro-averaged F1 = (\d+\.\d\d)%", output).group(1))
    assert f"{ours.macro_f1:0.2f}" == f"{official:0.2f}"
    section = _official_section(output)
    macro = re.search(r"MACRO-averaged result \(excluding Other\):\nP = *([\d.]+)%\tR = *([\d.]+)%\tF1 = *([\d.]+)%",
                      section).groups()
    assert (f"{ours.macro_precision:6.2f}".strip(), f"{ours.macro_recall:6.2f}".strip(),
            f"{ours.macro_f1:6.2f}".strip()) == macro
    micro = re.search(r"Micro-averaged result \(excluding Other\):\nP = .*= *([\d.]+)%\s+R = .*= *([\d.]+)%"
                      r"\s+F1 = *([\d.]+)%", section).groups()
    assert (f"{ours.micro_precision:.2f}", f"{ours.micro_recall:.2f}", f"{ours.micro_f1:.2f}") == micro
    for rel, s in ours.relations.items():
        line = re.search(rf"^ *{re.escape(rel)} :\s+P = *(\d+)/\( *(\d+) \+ *(\d+)\) = *([\d.]+)%\s+R = *(\d+)/ *(\d+)"
                         rf" = *([\d.]+)%\s+F1 = *([\d.]+)%", section, re.M)
        assert line, rel
        c, n, wd, p, _, a, r, f1 = line.groups()
        assert (int(c), int(n), int(wd), int(a)) == (s.correct, s.predicted - s.wrong_direction, s.wrong_direction,
                                                      s.gold)
        assert (f"{s.precision:.2f}", f"{s.recall:.2f}", f"{s.f1:.2f}") == (p, r, f1)


def _imperfect(gold: list[str], seed: int = 7) -> list[str]:
    """A deliberately imperfect prediction set: direction flips, Other confusions both ways,
    wrong relations."""
    rng = random.Random(seed)
    relations = sorted(SEMEVAL_LABELS - {"Other"})
    pred = []
    for g in gold:
        u = rng.random()
        if g != "Other" and u < 0.12:
            d = "(e2,e1)" if g.endswith("(e1,e2)") else "(e1,e2)"
            pred.append(undirected(g) + d)  # right relation, wrong direction
        elif g != "Other" and u < 0.22:
            pred.append("Other")
        elif g == "Other" and u < 0.25:
            pred.append(rng.choice(relations))
        elif u < 0.28:
            pred.append(rng.choice(relations))
        else:
            pred.append(g)
    return pred


@pytest.mark.needs_shared_data
def test_official_scorer_agrees_on_the_answer_file(tmp_path):
    """The answer file hvdft writes, scored by the official Perl scorer against the gold of
    TEST_FILE_FULL.TXT, gives the macro-F1 hvdft reports, to the scorer's printed precision."""
    need_scorer()
    task = RelationTask()
    test = task.read(str(TEST_FULL), "test", Shard(0, 1))
    gold = [ex["label"] for ex in test.examples]
    pred = _imperfect(gold)
    predictions = [(p, 0.5) for p in pred]
    task.write_predictions(tmp_path, "test", test.examples, predictions)
    answers, key = tmp_path / "test_answers.txt", tmp_path / "test_answer_key.txt"
    # the key hvdft writes is the official gold: the scorer's format, taken from the release
    # file independently of hvdft's reader
    lines = TEST_FULL.read_bytes().decode("ascii").split("\r\n")
    expected_key = [f"{m.group(1)}\t{lines[i + 1]}" for i, line in enumerate(lines)
                    if (m := re.match(r"^(\d+)\t", line))]
    assert key.read_text(encoding="ascii").splitlines() == expected_key
    assert sum(p != g for p, g in zip(pred, gold, strict=True)) > 400  # imperfect, in every way:
    assert any(p != g and undirected(p) == undirected(g) for p, g in zip(pred, gold, strict=True))
    output = _perl(answers, key)
    _assert_same_as_scorer(output, gold, pred)
    metrics, report = task.score(test.examples, predictions)
    official = re.search(r"macro-averaged F1 = (\d+\.\d\d)%", output).group(1)
    assert f"{metrics['macro_f1'] * 100:.2f}" == official
    assert f"macro-averaged F1 = {official}%" in report
    assert 0 < float(official) < 100
    # the 19-way accuracy is the scorer's (2*9+1)-way accuracy
    first = output.split("<<< (9+1)-WAY EVALUATION IGNORING DIRECTIONALITY >>>")[0]
    accuracy = re.search(r"Accuracy \(calculated for the above confusion matrix\) = \d+/\d+ = *([\d.]+)%", first)
    assert f"{metrics['accuracy'] * 100:.2f}" == accuracy.group(1)
    # and the key really scores: the gold against itself is 100
    assert "macro-averaged F1 = 100.00%" in _perl(key, key)


@pytest.mark.needs_shared_data
@pytest.mark.parametrize("number", [1, 2, 3, 5])
def test_official_scorer_agrees_on_its_own_examples(tmp_path, number):
    """The release's worked examples (partial answer files: skipped ids count as Other)."""
    need_scorer()

    def read(path: Path) -> dict[str, str]:
        return dict(line.split("\t") for line in path.read_text(encoding="ascii").splitlines() if line.strip())

    key = read(SCORER_DIR / f"answer_key{number}.txt")
    proposed = read(SCORER_DIR / f"proposed_answer{number}.txt")
    ids = sorted(key, key=int)
    gold = [key[i] for i in ids]
    pred = [proposed.get(i) for i in ids]
    output = (SCORER_DIR / f"result_scores{number}.txt").read_text(encoding="ascii")
    _assert_same_as_scorer(output, gold, pred)
    # and our writer's file reproduces the proposed answers for the scorer
    write_answer_file(tmp_path / "answers.txt", ids, pred)
    assert read(tmp_path / "answers.txt") == proposed


# ----------------------------------------------------------------------------- writers


def test_write_predictions_tsv_and_answer_files(tmp_path):
    task = RelationTask()
    examples = [
        {"id": "8002", "text": 'The company\tfabricates "plastic" chairs.', "e1": [4, 11], "e2": [33, 39],
         "e1_type": None, "e2_type": None, "label": "Product-Producer(e2,e1)", "line": 1},
        {"id": "8001", "text": "The audits were about waste.", "e1": [4, 10], "e2": [22, 27], "e1_type": None,
         "e2_type": None, "label": "Other", "line": 5},
    ]
    predictions = [("Product-Producer(e1,e2)", 0.61234567), ("Other", math.nan)]
    task.write_predictions(tmp_path, "test", examples, predictions)
    rows = (tmp_path / "test_predictions.tsv").read_text(encoding="utf-8").splitlines()
    assert rows == [
        "id\tsentence\tgold\tpredicted\tprobability",
        '8002\tThe <e1>company</e1>\\tfabricates "plastic" <e2>chairs</e2>.\tProduct-Producer(e2,e1)\t'
        "Product-Producer(e1,e2)\t0.612346",
        "8001\tThe <e1>audits</e1> were about <e2>waste</e2>.\tOther\tOther\tnan",
    ]
    assert (tmp_path / "test_answers.txt").read_bytes() == b"8002\tProduct-Producer(e1,e2)\n8001\tOther\n"
    assert (tmp_path / "test_answer_key.txt").read_bytes() == b"8002\tProduct-Producer(e2,e1)\n8001\tOther\n"
    # eval reports write no predictions; non-SemEval labels get no answer files (the scorer rejects them)
    task.write_predictions(tmp_path / "x", "eval", examples, predictions)
    assert not (tmp_path / "x").exists()
    other = tmp_path / "tacred"
    other.mkdir()
    task.write_predictions(other, "test", [dict(examples[0], label="per:title")], [("per:title", 0.9)])
    assert sorted(p.name for p in other.iterdir()) == ["test_predictions.tsv"]
    assert answer_ids([{"id": "a"}, {"id": "b"}]) == ["1", "2"]
    assert answer_ids([{"id": "12"}, {"id": "3"}]) == ["12", "3"]
    task.write_unlabelled_predictions(tmp_path / "predict.tsv", examples, predictions)
    assert (tmp_path / "predict.tsv").read_text().splitlines()[0] == "id\tsentence\tpredicted\tprobability"


# ----------------------------------------------------------------------------- the model


def test_model_with_markers_loads_in_a_pipeline(tmp_path):
    """build_model resizes the embeddings to the marker tokenizer; the saved folder loads in
    transformers.pipeline('text-classification') and classifies SemEval markup."""
    import torch
    from support import make_tiny_model
    from transformers import AutoConfig, AutoTokenizer, pipeline

    source = make_tiny_model(tmp_path / "tiny")
    task = RelationTask()
    tokenizer = AutoTokenizer.from_pretrained(source)
    task.prepare(None, tokenizer, 128)
    labels = ["Other", "Product-Producer(e2,e1)"]
    config = AutoConfig.from_pretrained(source, num_labels=2, id2label=dict(enumerate(labels)),
                                        label2id={label: i for i, label in enumerate(labels)})
    torch.manual_seed(0)
    model = task.build_model(str(source), config, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 30522 + 4
    out = tmp_path / "out"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    classify = pipeline("text-classification", model=str(out), device=-1)
    sentence = "The <e1>company</e1> fabricates plastic <e2>chairs</e2>."
    result = classify(sentence)[0]
    assert result["label"] in labels and 0 < result["score"] <= 1
    # the pipeline sees the markers as the task's rows do: one token each
    ids = classify.tokenizer(sentence)["input_ids"]
    assert [classify.tokenizer.convert_ids_to_tokens(i) for i in ids].count("<e1>") == 1
    # the pipeline's logits are the model's on the task's own features
    features = task.featurize(_batch([{"text": "The company fabricates plastic chairs.", "e1": [4, 11],
                                       "e2": [31, 37], "e1_type": None, "e2_type": None, "label": None}]),
                              tokenizer, {}, 64)
    assert features["input_ids"][0] == ids
    reloaded = task.build_model(str(out), AutoConfig.from_pretrained(out), AutoTokenizer.from_pretrained(out))
    with torch.no_grad():
        logits = reloaded(input_ids=torch.tensor([ids])).logits
    pred = task.merge({}, task.predictions([{}], logits), dict(enumerate(labels)))
    assert pred[0] == result["label"] and pred[1] == pytest.approx(result["score"], abs=1e-5)


def test_task_shape():
    task = RelationTask()
    assert task.name == "re" and task.pipeline == "text-classification"
    assert task.default_metric == "macro_f1" and set(task.metric_names) == {"macro_f1", "micro_f1", "accuracy"}
    assert task.marker_tokens() == ["<e1>", "</e1>", "<e2>", "</e2>"]
    assert RelationTask(RelationOptions(markers="punct")).marker_tokens() == []
    with pytest.raises(HvdftError, match="--markers must be one of tokens, punct"):
        RelationTask(RelationOptions(markers="brackets"))
    assert len(SEMEVAL_LABELS) == 19 and len(SEMEVAL_RELATIONS) == 9


@pytest.mark.needs_shared_data
def test_plain_reference_loop_runs_and_matches_the_scorer(tmp_path):
    """benchmarks/plain_re.py on a small slice (tiny random model): it trains, and its
    official number is the Perl scorer's on the answer file it writes."""
    need_scorer()
    from support import ROOT, make_tiny_model, run

    model = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "plain.json"
    run([sys.executable, str(ROOT / "benchmarks" / "plain_re.py"), "--model", str(model),
         "--train-file", str(TRAIN), "--test-file", str(TEST_FULL), "--max-train-samples", "48",
         "--max-eval-samples", "40", "--batch-size", "16", "--epochs", "1", "--threads", "1",
         "--output", str(out), "--answers", str(tmp_path / "answers.txt"), "--scorer", str(SCORER)], timeout=600)
    result = json.loads(out.read_text())
    assert result["steps"] == 3 and result["train_sentences"] == 48 and result["test_sentences"] == 40
    assert f"macro-averaged F1 = {result['macro_f1']:.2f}%" in result["perl_official"]
    assert len((tmp_path / "answers.txt").read_text().splitlines()) == 40
