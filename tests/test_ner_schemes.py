"""Tag schemes: IOB1, IOB2, IOBES, BILUO, typed and untyped; read, trained as IOB2,
written back as given, scored with seqeval in strict mode with the matching scheme."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities
from seqeval.scheme import BILOU, IOB1, IOB2, IOBES, Entities
from support import write

from hvdft.data.files import Shard
from hvdft.errors import HvdftError
from hvdft.tasks.ner import (
    UNTYPED,
    NerTask,
    TagScheme,
    detect_scheme,
    entity_tags,
    parse_tag,
    score_tags,
    tag_entities,
    to_iob2,
)

TASK = NerTask()
SEQEVAL = {"IOB1": IOB1, "IOB2": IOB2, "IOBES": IOBES, "BILUO": BILOU}
ALL_SCHEMES = [TagScheme(name, untyped) for name in ("IOB1", "IOB2", "IOBES", "BILUO") for untyped in (False, True)]

# The handed case (../shared/cases/bilou/test.txt): spaCy-style BILUO.
BILUO_TEST = "Soylent\tU-ORG\nshares\tO\nfell\tO\n.\tO\n\nWayne\tB-ORG\nEnterprises\tL-ORG\nbid\tO\n.\tO\n"


def read(path: Path, rank: int = 0, world: int = 1):
    return TASK.read(str(path), "test", Shard(rank, world))


# ------------------------------------------------------------------ single tags


@pytest.mark.parametrize("tag, parsed", [
    ("O", ("O", None)), ("B-PER", ("B", "PER")), ("I-creative-work", ("I", "creative-work")),
    ("E-LOC", ("E", "LOC")), ("S-LOC", ("S", "LOC")), ("L-ORG", ("L", "ORG")), ("U-ORG", ("U", "ORG")),
    ("B", ("B", None)), ("I", ("I", None)), ("L", ("L", None)), ("U", ("U", None)), ("E", ("E", None)),
    ("B-Drug name", ("B", "Drug name")),
    ("PER", None), ("B-", None), ("b-PER", None), ("B_PER", None), ("X-PER", None), ("", None), ("O-PER", None),
    (" B-PER", None), ("B- PER", None), ("B-X\nY", None), ("BI", None), ("o", None),
])
def test_parse_tag(tag: str, parsed) -> None:
    assert parse_tag(tag) == parsed


# ------------------------------------------------------------------ decoding and encoding


def test_decoding_each_scheme() -> None:
    spans = [("ORG", 0, 1), ("LOC", 2, 5), ("LOC", 5, 6)]
    assert tag_entities(["U-ORG", "O", "B-LOC", "I-LOC", "L-LOC", "U-LOC"]) == spans
    assert tag_entities(["S-ORG", "O", "B-LOC", "I-LOC", "E-LOC", "S-LOC"]) == spans
    assert tag_entities(["B-ORG", "O", "B-LOC", "I-LOC", "I-LOC", "B-LOC"]) == spans
    assert tag_entities(["I-ORG", "O", "I-LOC", "I-LOC", "I-LOC", "B-LOC"]) == spans  # IOB1
    assert tag_entities(["U", "O", "B", "I", "L", "U"]) == [(None, 0, 1), (None, 2, 5), (None, 5, 6)]
    assert tag_entities(["U-ORG", "U-ORG"]) == [("ORG", 0, 1), ("ORG", 1, 2)]  # two entities, not one


def test_encoding_each_scheme() -> None:
    spans = [("ORG", 0, 1), ("LOC", 2, 5), ("LOC", 5, 6), ("PER", 7, 9)]
    n = 9
    assert entity_tags(spans, n, "BILUO") == ["U-ORG", "O", "B-LOC", "I-LOC", "L-LOC", "U-LOC", "O", "B-PER", "L-PER"]
    assert entity_tags(spans, n, "IOBES") == ["S-ORG", "O", "B-LOC", "I-LOC", "E-LOC", "S-LOC", "O", "B-PER", "E-PER"]
    assert entity_tags(spans, n, "IOB2") == ["B-ORG", "O", "B-LOC", "I-LOC", "I-LOC", "B-LOC", "O", "B-PER", "I-PER"]
    # IOB1: B- only where an entity directly follows one of its own type
    assert entity_tags(spans, n, "IOB1") == ["I-ORG", "O", "I-LOC", "I-LOC", "I-LOC", "B-LOC", "O", "I-PER", "I-PER"]
    assert entity_tags([(None, 0, 1), (None, 1, 3)], 3, "BILUO") == ["U", "B", "L"]
    assert entity_tags([(None, 0, 1), (None, 1, 3)], 3, "IOB1") == ["I", "B", "I"]


def test_ill_formed_sequences_decode_as_conlleval_does() -> None:
    """For B/I/E/S/O, every sequence (also a model's ill-formed output) decodes to the spans
    of seqeval's default mode, which is conlleval's reading."""
    rng = random.Random(0)
    tags = ["O", "B-A", "I-A", "E-A", "S-A", "B-B", "I-B", "E-B", "S-B", "B", "I", "E", "S"]
    for _ in range(3000):
        seq = [rng.choice(tags) for _ in range(rng.randint(1, 9))]
        if any("-" in t for t in seq) and any(t in "BIES" for t in seq):
            continue  # typed and untyped are not mixed in one file
        ours = [(k or "_", s, e - 1) for k, s, e in tag_entities(seq)]
        assert ours == get_entities(seq), seq


def _random_entities(rng: random.Random, n: int, types: list) -> list:
    spans, i = [], 0
    while i < n:
        if rng.random() < 0.45:
            stop = min(n, i + rng.randint(1, 4))
            spans.append((rng.choice(types), i, stop))
            i = stop
        else:
            i += 1
    return spans


@pytest.mark.parametrize("scheme", ["IOB1", "IOB2", "IOBES", "BILUO"])
@pytest.mark.parametrize("types", [["A", "B"], [None]], ids=["typed", "untyped"])
def test_encodings_are_well_formed_for_seqeval_strict_and_round_trip(scheme: str, types: list) -> None:
    rng = random.Random(1)
    for _ in range(1500):
        n = rng.randint(1, 10)
        spans = _random_entities(rng, n, types)
        tags = entity_tags(spans, n, scheme)
        assert tag_entities(tags) == spans, tags
        strict = Entities([tags], SEQEVAL[scheme]).entities[0]
        assert [(e.tag, e.start, e.end) for e in strict] == [(k or "_", s, e) for k, s, e in spans], tags
        assert TagScheme(scheme, types == [None]).encode(to_iob2(tags)) == tags, "written back as given"


# ------------------------------------------------------------------ one scheme per file


def _sentences(*tag_rows: str):
    return [[(i + 1, t) for i, t in enumerate(row.split())] for row in tag_rows]


@pytest.mark.parametrize("rows, expected", [
    (["O O", "O"], TagScheme("IOB2")),
    (["B-PER I-PER O B-LOC"], TagScheme("IOB2")),
    (["I-PER I-PER O I-LOC B-LOC"], TagScheme("IOB1")),
    (["B-PER O", "I-LOC O I-ORG I-ORG"], TagScheme("IOB1")),  # more entities begin with I- than B-
    (["B-PER O", "I-LOC O B-ORG"], TagScheme("IOB2")),  # a stray I- in IOB2 data
    (["B-PER E-PER O", "O O"], TagScheme("IOBES")),
    (["S-PER"], TagScheme("IOBES")),
    (["B-PER L-PER", "B-PER I-PER"], TagScheme("BILUO")),
    (["U-ORG"], TagScheme("BILUO")),
    (["B I O", "O B"], TagScheme("IOB2", True)),
    (["I I O"], TagScheme("IOB1", True)),
    (["U O B L"], TagScheme("BILUO", True)),
    (["S B E"], TagScheme("IOBES", True)),
    (["B-PER PER X-1 O", "U-ORG"], TagScheme("BILUO")),  # tags fitting no scheme are the shard owner's error
])
def test_detect_scheme(rows: list[str], expected: TagScheme) -> None:
    assert detect_scheme(_sentences(*rows), "f.txt") == expected


def test_iobes_and_biluo_in_one_file_is_an_error_naming_both(tmp_path: Path) -> None:
    p = write(tmp_path, "mix.txt", "A S-PER\nb O\n\nC U-ORG\n")
    msg = r"mix\.txt:4: tag 'U-ORG' is BILUO, but line 1 has 'S-PER', which is IOBES: one file must use one tag scheme$"
    # sentence 0 is rank 0's, sentence 1 rank 1's: each rank reads only its own, yet both see the clash
    for rank in (0, 1):
        with pytest.raises(HvdftError, match=msg):
            read(p, rank, 2)
    rows = [{"tokens": ["A"], "ner_tags": ["B-PER"]}, {"tokens": ["B", "C"], "ner_tags": ["B-LOC", "L-LOC"]},
            {"tokens": ["D", "E"], "ner_tags": ["B-LOC", "E-LOC"]}]
    j = write(tmp_path, "mix.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(HvdftError, match=r"mix\.jsonl:3: tag 'E-LOC' is IOBES, but line 2 has 'L-LOC', which is BILUO"):
        read(j, 0, 2)


def test_typed_and_untyped_in_one_file_is_an_error(tmp_path: Path) -> None:
    p = write(tmp_path, "t.txt", "A B\nb I\n\nC B-PER\n")
    with pytest.raises(HvdftError, match=r"t\.txt:4: tag 'B-PER' is typed, but line 1 has 'B', which is untyped: "
                                         r"one file must use typed or untyped tags, not both$"):
        read(p, 1, 2)


# ------------------------------------------------------------------ reading files


def test_biluo_file_reads_as_iob2_and_keeps_the_given_tags(tmp_path: Path) -> None:
    split = read(write(tmp_path, "test.txt", BILUO_TEST))
    assert [e["given"] for e in split.examples] == [["U-ORG", "O", "O", "O"], ["B-ORG", "L-ORG", "O", "O"]]
    assert [e["tags"] for e in split.examples] == [["B-ORG", "O", "O", "O"], ["B-ORG", "I-ORG", "O", "O"]]
    assert {e["scheme"] for e in split.examples} == {"BILUO"}
    assert TASK.sort_labels(set(TASK.labels_of_examples(split.examples))) == ["O", "B-ORG", "I-ORG"]


def test_untyped_biomedical_file(tmp_path: Path) -> None:
    # NCBI-disease as distributed with BioBERT: word<TAB>B/I/O
    text = "Identification\tO\nof\tO\nAPC2\tO\n,\tO\nadenomatous\tB\npolyposis\tI\ncoli\tI\n.\tO\n\nDMD\tB\n"
    split = read(write(tmp_path, "train.tsv.txt", text))
    assert split.examples[0]["tags"][4:7] == ["B-ENTITY", "I-ENTITY", "I-ENTITY"]
    assert split.examples[0]["given"][4:7] == ["B", "I", "I"]
    assert [e["scheme"] for e in split.examples] == ["IOB2/untyped"] * 2
    assert TASK.sort_labels(set(TASK.labels_of_examples(split.examples))) == ["O", f"B-{UNTYPED}", f"I-{UNTYPED}"]


def test_iob1_file_keeps_iob1(tmp_path: Path) -> None:
    split = read(write(tmp_path, "iob1.txt", "U.N.\tI-ORG\nofficial\tO\nEkeus\tI-PER\nPeter\tB-PER\n"))
    ex = split.examples[0]
    assert ex["scheme"] == "IOB1" and ex["tags"] == ["B-ORG", "O", "B-PER", "B-PER"]
    assert TASK.merge(ex, [[(0, 1), (2, 2), (3, 2)]], {0: "O", 1: "B-ORG", 2: "B-PER"}) == ex["given"]


def test_iobes_jsonl_and_csv(tmp_path: Path) -> None:
    j = write(tmp_path, "d.jsonl", json.dumps({"tokens": ["New", "York", "is", "big"],
                                               "ner_tags": ["B-LOC", "E-LOC", "O", "S-ADJ"]}) + "\n")
    ex = read(j).examples[0]
    assert (ex["tags"], ex["scheme"]) == (["B-LOC", "I-LOC", "O", "B-ADJ"], "IOBES")
    c = write(tmp_path, "d.csv", 'tokens,ner_tags\n"Acme Inc rose","B L O"\n')
    ex = read(c).examples[0]
    assert (ex["tags"], ex["given"], ex["scheme"]) == (["B-ENTITY", "I-ENTITY", "O"], ["B", "L", "O"], "BILUO/untyped")


def test_hub_dataset_with_biluo_names() -> None:
    datasets = pytest.importorskip("datasets")
    names = ["O", "B-ORG", "I-ORG", "L-ORG", "U-ORG"]
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    ds = datasets.Dataset.from_dict({"tokens": [["Acme", "Holdings", "hired"], ["Globex", "cut"], ["x"]],
                                     "ner_tags": [[1, 3, 0], [4, 0], [0]]}, features=features)
    split = TASK.read_hub(ds, "train", Shard(1, 2), "corp")
    assert split.ids == [1] and split.examples[0]["given"] == ["U-ORG", "O"]
    assert split.examples[0]["tags"] == ["B-ORG", "O"] and split.examples[0]["scheme"] == "BILUO"


def test_schemes_may_differ_between_files(tmp_path: Path) -> None:
    """Train in BILUO, test in IOB2: both are the same IOB2 inside; each file is written
    back and scored in its own scheme."""
    train = read(write(tmp_path, "train.txt", "Acme B-ORG\nInc L-ORG\n\nHooli U-ORG\n"))
    test = read(write(tmp_path, "test.txt", "Hooli B-ORG\nInc I-ORG\n"))
    assert set(TASK.labels_of_examples(train.examples)) == set(TASK.labels_of_examples(test.examples))
    pred = TASK.merge(test.examples[0], [[(0, 1), (1, 2)]], {0: "O", 1: "B-ORG", 2: "I-ORG"})
    assert pred == ["B-ORG", "I-ORG"]
    assert TASK.merge(train.examples[0], [[(0, 1), (1, 2)]], {0: "O", 1: "B-ORG", 2: "I-ORG"}) == ["B-ORG", "L-ORG"]


# ------------------------------------------------------------------ predictions and scores


def _predict(examples, labels_by_example):
    """What the engine does: merge each example's model labels (IOB2) into a prediction."""
    id2label = dict(enumerate(sorted({t for labels in labels_by_example for t in labels} | {"O"})))
    label2id = {v: k for k, v in id2label.items()}
    return [TASK.merge(ex, [[(w, label2id[t]) for w, t in enumerate(labels)]], id2label)
            for ex, labels in zip(examples, labels_by_example, strict=True)]


def test_biluo_predictions_written_back_and_scored(tmp_path: Path) -> None:
    split = read(write(tmp_path, "test.txt", BILUO_TEST))
    # the model finds Soylent, and Wayne alone (Enterprises missed)
    preds = _predict(split.examples, [["B-ORG", "O", "O", "O"], ["B-ORG", "O", "O", "O"]])
    assert preds == [["U-ORG", "O", "O", "O"], ["U-ORG", "O", "O", "O"]]
    metrics, report = TASK.score(split.examples, preds)
    assert (metrics["precision"], metrics["recall"], metrics["f1"]) == (0.5, 0.5, 0.5)
    assert metrics["accuracy"] == 6 / 8  # per word, in BILUO: Wayne (B- vs U-) and Enterprises (L- vs O) wrong
    org = next(line.split() for line in report.splitlines() if line.split()[:1] == ["ORG"])
    assert org == ["ORG", "0.5000", "0.5000", "0.5000", "2"]
    out = tmp_path / "test_predictions.conll"
    TASK.write_predictions(tmp_path, "test", split.examples, preds)
    rows = [line.split(" ") for line in out.read_text().splitlines() if line]
    assert [r[1] for r in rows] == [line.split("\t")[1] for line in BILUO_TEST.splitlines() if line]
    assert [r[2] for r in rows] == ["U-ORG", "O", "O", "O", "U-ORG", "O", "O", "O"]


def test_adjacent_single_token_entities_count_twice() -> None:
    """Why strict mode with the matching class: seqeval's default (conlleval) mode does not
    know U-/L-, so two adjacent U-ORG would be one entity there."""
    gold = [["U-ORG", "U-ORG", "O"]]
    metrics, report = score_tags(gold, gold, TagScheme("BILUO"))
    assert metrics["f1"] == 1.0 and report.split("\n")[2].split()[-1] == "2"
    with pytest.warns(UserWarning, match="seems not to be NE tag"):
        assert len(get_entities(gold[0])) == 1


def test_untyped_scores_under_entity(tmp_path: Path) -> None:
    split = read(write(tmp_path, "test.txt", "a B\nb I\nc O\nd B\n\ne O\nf B\n"))
    preds = _predict(split.examples, [["B-ENTITY", "I-ENTITY", "O", "O"], ["O", "B-ENTITY"]])
    assert preds == [["B", "I", "O", "O"], ["O", "B"]]
    metrics, report = TASK.score(split.examples, preds)
    assert re.search(r"^\s+ENTITY\s+1\.0000\s+0\.6667\s+0\.8000\s+3$", report, re.M), report
    assert "_ " not in report
    out = tmp_path / "test_predictions.conll"
    TASK.write_predictions(tmp_path, "test", split.examples, preds)
    assert out.read_text() == "a B B\nb I I\nc O O\nd B O\n\ne O O\nf B B\n\n"


def test_ill_formed_gold_is_written_as_given_and_scored_as_conlleval_reads_it(tmp_path: Path) -> None:
    # IOB2 file with a stray I-PER after O; a BILUO file whose B-ORG is never closed
    split = read(write(tmp_path, "g.txt", "a B-PER\nb O\nc I-PER\nd B-LOC\n"))
    preds = _predict(split.examples, [["B-PER", "O", "B-PER", "B-LOC"]])
    assert TASK.score(split.examples, preds)[0]["f1"] == 1.0
    out = tmp_path / "test_predictions.conll"
    TASK.write_predictions(tmp_path, "test", split.examples, preds)
    assert [line.split()[1] for line in out.read_text().splitlines() if line] == ["B-PER", "O", "I-PER", "B-LOC"]
    split = read(write(tmp_path, "h.txt", "a B-ORG\nb O\nc U-ORG\n"))
    preds = _predict(split.examples, [["B-ORG", "O", "B-ORG"]])
    assert preds == [["U-ORG", "O", "U-ORG"]]
    assert TASK.score(split.examples, preds)[0]["f1"] == 1.0


def test_a_model_trained_on_iobes_labels_still_predicts_in_the_file_scheme(tmp_path: Path) -> None:
    """Models made before this change have E-/S- labels in id2label."""
    split = read(write(tmp_path, "t.txt", BILUO_TEST))
    id2label = {0: "O", 1: "B-ORG", 2: "I-ORG", 3: "E-ORG", 4: "S-ORG"}
    merged = TASK.merge(split.examples[1], [[(0, 1), (1, 3), (2, 0), (3, 4)]], id2label)
    assert merged == ["B-ORG", "L-ORG", "O", "U-ORG"]


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: s.key)
def test_scores_equal_iob2_scores_and_the_former_default_mode_scores(scheme: TagScheme) -> None:
    """Strict mode in the file's scheme counts exactly the entities of the IOB2 scoring, and
    for the model's raw IOB2 labels (ill-formed ones too) exactly what seqeval's default
    mode counted before this change."""
    rng = random.Random(2)
    types = [None] if scheme.untyped else ["A", "B", "C"]
    examples, raw = [], []
    for _ in range(300):
        n = rng.randint(1, 8)
        given = entity_tags(_random_entities(rng, n, types), n, scheme.name)
        examples.append({"words": ["w"] * n, "tags": to_iob2(given), "given": given, "scheme": scheme.key})
        labels = ["O"] + [f"{p}-{t or UNTYPED}" for p in "BI" for t in types]
        raw.append([rng.choice(labels) for _ in range(n)])
    preds = _predict(examples, raw)
    metrics, report = TASK.score(examples, preds)
    gold = [ex["tags"] for ex in examples]
    iob2_metrics, iob2_report = score_tags(gold, [TagScheme().encode(r) for r in raw], TagScheme())
    accuracy = metrics.pop("accuracy")  # per word in the file's scheme: what the predictions file shows
    iob2_metrics.pop("accuracy")
    assert metrics == iob2_metrics and report == iob2_report
    shown = [(g, p) for ex, pred in zip(examples, preds, strict=True) for g, p in zip(ex["given"], pred, strict=True)]
    assert accuracy == sum(g == p for g, p in shown) / len(shown)
    for name, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
        assert metrics[name] == pytest.approx(fn(gold, raw), abs=1e-12), name
    assert report == classification_report(gold, raw, digits=4, zero_division=0)
    assert 0 < metrics["f1"] < 1


def test_sort_labels() -> None:
    labels = {"O", "I-PER", "B-PER", "B-LOC", "I-LOC", "S-LOC", "U-PER", "L-PER"}
    assert TASK.sort_labels(labels) == ["O", "B-LOC", "I-LOC", "S-LOC", "B-PER", "I-PER", "L-PER", "U-PER"]
