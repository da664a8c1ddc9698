"""Text classification: reading CSV/TSV/JSON lines/Hub data, features, exact scoring, the
gathered 2-rank evaluation, and `hvdft train classify` end to end on 2 real Horovod ranks."""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from support import HVDFT, WORDS, horovodrun, mpirun, run, toy_rows, write

from hvdft.data.files import Shard, find_split_files
from hvdft.errors import HvdftError
from hvdft.tasks import get_task
from hvdft.tasks.classify import ClassifyOptions, ClassifyTask, classification_scores, escape

TASK = ClassifyTask()


def task_with(encoding: str = "utf-8", **options) -> ClassifyTask:
    return ClassifyTask(ClassifyOptions(**options), encoding)


def read(path: Path, rank: int = 0, world: int = 1, **opts):
    return task_with(**opts).read(str(path), "train", Shard(rank, world))


def unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 1 < len(field):
            out.append({"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}[field[i + 1]])
            i += 2
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


# ----------------------------------------------------------------------------- the task


def test_registered_and_described() -> None:
    task = get_task("classify")
    assert isinstance(task, ClassifyTask)
    assert (task.name, task.pipeline, task.default_metric, task.predictions_suffix) == (
        "classify", "text-classification", "accuracy", ".tsv")
    assert task.metric_names == ("accuracy", "f1_macro")
    from transformers import AutoModelForSequenceClassification

    assert task.model_class() is AutoModelForSequenceClassification


# ----------------------------------------------------------------------------- reading


def test_csv_quoting_commas_tabs_backslashes_newlines(tmp_path: Path) -> None:
    rows = [
        ("hello, world", "pos"),
        ('she said "hi"', "neg"),
        ("a\ttab inside", "pos"),
        ("back\\slash and \\n and \\t literally", "neg"),
        ("two\nlines", "pos"),
        ("  spaces kept  ", "neg"),
    ]
    p = tmp_path / "d.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    split = read(p)
    assert split.total == 6
    assert [(e["text"], e["label"]) for e in split.examples] == rows
    assert [e["text_pair"] for e in split.examples] == [None] * 6
    assert split.examples[0]["line"] == 2


def test_tsv_is_unquoted_quotes_and_backslashes_stay(tmp_path: Path) -> None:
    p = write(tmp_path, "d.tsv", 'sentence\tlabel\n"quoted" start \t1\nit \'s a back\\slash \\" \t0\n\n')
    split = read(p)
    assert [e["text"] for e in split.examples] == ['"quoted" start ', "it 's a back\\slash \\\" "]
    assert [e["label"] for e in split.examples] == ["1", "0"]
    assert [e["line"] for e in split.examples] == [2, 3]


def test_tsv_embedded_tab_is_a_field_count_error(tmp_path: Path) -> None:
    p = write(tmp_path, "d.tsv", "text\tlabel\nok\t1\na\tb\t0\n")
    with pytest.raises(HvdftError, match=r"d\.tsv:3: expected 2 fields"):
        read(p)


def test_header_names_are_stripped_and_crlf_accepted(tmp_path: Path) -> None:
    p = write(tmp_path, "d.csv", " text , label \r\nfine,1\r\n")
    assert [(e["text"], e["label"]) for e in read(p).examples] == [("fine", "1")]


@pytest.mark.parametrize(
    ("header", "chosen"),
    [("sentence,label", "sentence"), ("label,review", "review"), ("content,label", "content"),
     ("review,sentence,text,label", "text"), ("sentence,content,label", "sentence")],
)
def test_default_text_column(tmp_path: Path, header: str, chosen: str) -> None:
    names = header.split(",")
    values = [("1" if n == "label" else f"<{n}>") for n in names]
    p = write(tmp_path, "d.csv", header + "\n" + ",".join(values) + "\n")
    assert read(p).examples[0]["text"] == f"<{chosen}>"


def test_no_text_column_names_the_columns(tmp_path: Path) -> None:
    p = write(tmp_path, "d.csv", "body,label\nx,1\n")
    with pytest.raises(HvdftError) as err:
        read(p)
    msg = str(err.value)
    assert "d.csv:2:" in msg and "body, label" in msg and "--text-column" in msg


def test_explicit_columns_and_missing_column_error(tmp_path: Path) -> None:
    p = write(tmp_path, "d.csv", "body,cls\nx,a\n")
    assert read(p, text_column="body", label_column="cls").examples[0] == {
        "text": "x", "text_pair": None, "label": "a", "line": 2}
    with pytest.raises(HvdftError, match=r"d\.csv:2: no column 'label' \(columns: body, cls\); use --label-column"):
        read(p, text_column="body")
    with pytest.raises(HvdftError, match=r"d\.csv:2: no column 'nope'.*--text-column"):
        read(p, text_column="nope", label_column="cls")


def test_jsonl_missing_key_error_names_the_line(tmp_path: Path) -> None:
    p = write(tmp_path, "d.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b"}\n')
    with pytest.raises(HvdftError, match=r"d\.jsonl:3: no column 'label'"):
        read(p)


@pytest.mark.parametrize(
    ("content", "message"),
    [("text,label\n   ,1\n", r"d\.csv:2: empty text in column 'text'"),
     ("text,label\nok,\n", r"d\.csv:2: missing label in column 'label'"),
     ("text,label\nok, \n", r"d\.csv:2: missing label")],
)
def test_empty_text_or_label(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(HvdftError, match=message):
        read(write(tmp_path, "d.csv", content))


def test_jsonl_null_list_and_missing_values(tmp_path: Path) -> None:
    cases = [('{"text": null, "label": 1}', "empty text"), ('{"text": "x", "label": null}', "missing label"),
             ('{"text": "x", "label": [1, 2]}', "holds a list"), ('{"text": ["x"], "label": 1}', "holds a list")]
    for line, message in cases:
        p = write(tmp_path, "d.jsonl", '{"text": "fine", "label": 0}\n' + line + "\n")
        with pytest.raises(HvdftError, match=r"d\.jsonl:2: .*" + message):
            read(p)


def test_integer_and_string_labels_are_the_same_label(tmp_path: Path) -> None:
    p = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in [
        {"text": "a", "label": 1}, {"text": "b", "label": "1"}, {"text": "c", "label": 1.0},
        {"text": "d", "label": 10}, {"text": "e", "label": " 2 "}, {"text": "f", "label": 0}]) + "\n")
    split = read(p)
    assert [e["label"] for e in split.examples] == ["1", "1", "1", "10", "2", "0"]
    assert TASK.sort_labels(TASK.labels(split)) == ["0", "1", "2", "10"]  # numeric, not "10" < "2"


def test_label_order() -> None:
    assert TASK.sort_labels({"10", "9", "-1", "0"}) == ["-1", "0", "9", "10"]
    assert TASK.sort_labels({"pos", "neg", "neutral"}) == ["neg", "neutral", "pos"]
    assert TASK.sort_labels({"10", "9", "x"}) == ["10", "9", "x"]  # not all integers: alphabetical


def test_pairs(tmp_path: Path, tokenizer) -> None:
    p = write(tmp_path, "d.tsv", "premise\thypothesis\tlabel\nA man sleeps.\tA person rests.\tentailment\n")
    with pytest.raises(HvdftError, match="no text column"):
        read(p)
    opts = {"text_column": "premise", "text_pair_column": "hypothesis"}
    ex = read(p, **opts).examples[0]
    assert (ex["text"], ex["text_pair"], ex["label"]) == ("A man sleeps.", "A person rests.", "entailment")
    with pytest.raises(HvdftError, match="no column 'other'.*--text-pair-column"):
        read(p, text_column="premise", text_pair_column="other")
    batch = {"text": [ex["text"]], "text_pair": [ex["text_pair"]], "label": ["entailment"], "example": [0]}
    feats = TASK.featurize(batch, tokenizer, {"entailment": 0}, 64)
    ids, types = feats["input_ids"][0], feats["token_type_ids"][0]
    sep = tokenizer.sep_token_id
    assert ids[0] == tokenizer.cls_token_id and ids.count(sep) == 2 and ids[-1] == sep
    assert types == [0] * (ids.index(sep) + 1) + [1] * (len(ids) - ids.index(sep) - 1)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a man sleeps. a person rests."


def test_latin1_with_encoding_and_undecodable_byte(tmp_path: Path) -> None:
    p = write(tmp_path, "d.csv", b"text,label\nfine,pos\n" + "caf\xe9 cr\xe8me,neg\n".encode("latin-1"))
    with pytest.raises(HvdftError) as err:
        read(p)
    assert "d.csv:3:" in str(err.value) and "0xe9" in str(err.value) and "--encoding" in str(err.value)
    assert read(p, encoding="latin-1").examples[1]["text"] == "café crème"


def test_utf8_bom_and_non_ascii(tmp_path: Path) -> None:
    p = write(tmp_path, "d.tsv", "\ufefftext\tlabel\nnaïve 😀 \u2028 ok\tpos\n")
    ex = read(p).examples[0]
    assert ex["text"] == "naïve 😀 \u2028 ok" and ex["line"] == 2


def test_shards_are_strided_and_only_the_own_shard_is_validated(tmp_path: Path) -> None:
    lines = ["text,label"] + [f"row {i},{i % 3}" for i in range(7)]
    lines[4] = "row 3,"  # global row 3 has no label: rank 1's problem only
    p = write(tmp_path, "d.csv", "\n".join(lines) + "\n")
    zero = read(p, 0, 2)
    assert zero.total == 7 and zero.ids == [0, 2, 4, 6]
    assert [e["text"] for e in zero.examples] == ["row 0", "row 2", "row 4", "row 6"]
    with pytest.raises(HvdftError, match=r"d\.csv:5: missing label"):
        read(p, 1, 2)


def test_folder_with_split_files(tmp_path: Path) -> None:
    for name in ("train.csv", "dev.csv", "test.csv"):
        write(tmp_path, name, "text,label\nx,1\n")
    found = find_split_files(tmp_path)
    assert {k: v.name for k, v in found.items()} == {"train": "train.csv", "validation": "dev.csv", "test": "test.csv"}
    assert read(found["validation"]).total == 1


def test_empty_file_and_plain_text_are_errors(tmp_path: Path) -> None:
    with pytest.raises(HvdftError, match="no rows"):
        read(write(tmp_path, "d.csv", "text,label\n"))
    with pytest.raises(HvdftError, match=r"\.csv, \.tsv .*\.jsonl"):
        read(write(tmp_path, "d.txt", "some text\n"))


def test_hub_dataset_labels_from_classlabel() -> None:
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"]),
                                  "idx": datasets.Value("int32")})
    ds = datasets.Dataset.from_dict({"sentence": ["bad", "good", "fine", "meh", "great"], "label": [0, 1, 1, 0, 1],
                                     "idx": [0, 1, 2, 3, 4]}, features=features)
    one = TASK.read_hub(ds, "train", Shard(1, 2), "glue")
    assert one.total == 5 and one.ids == [1, 3]
    assert [(e["text"], e["label"]) for e in one.examples] == [("good", "positive"), ("meh", "negative")]
    two = datasets.Features({"sentence": datasets.Value("string"),
                             "label": datasets.ClassLabel(names=["negative", "positive"])})
    withheld = datasets.Dataset.from_dict({"sentence": ["x", "y"], "label": [-1, -1]}, features=two)
    assert TASK.read_hub(withheld, "test", Shard(), "hub") is None  # GLUE's test split: left out by the engine
    partly = datasets.Dataset.from_dict({"sentence": ["x", "y"], "label": [1, -1]}, features=two)
    with pytest.raises(HvdftError, match=r"hub\[test\]: row 1: no label"):
        TASK.read_hub(partly, "test", Shard(), "hub")
    plain = datasets.Dataset.from_dict({"content": ["x", "y"], "label": [3, 7]})
    assert [e["label"] for e in TASK.read_hub(plain, "train", Shard(), "hub").examples] == ["3", "7"]
    with pytest.raises(HvdftError, match=r"no column 'h'.*columns: content, label"):
        task_with(text_pair_column="h").read_hub(plain, "train", Shard(), "hub")


def test_hub_splits_through_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """--dataset glue --dataset-config sst2: label names from the ClassLabel, the test split
    (labels withheld, -1) left out instead of failing the run. No Horovod, no network."""
    import datasets

    from hvdft import dist
    from hvdft.config import TrainConfig
    from hvdft.data import prepare

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    hub = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["bad", "good", "ok"], "label": [0, 1, 1]}, features=features),
        "validation": datasets.Dataset.from_dict({"sentence": ["meh"], "label": [0]}, features=features),
        "test": datasets.Dataset.from_dict({"sentence": ["?", "!"], "label": [-1, -1]}, features=features),
    })
    monkeypatch.setattr(prepare, "load_hub_dataset", lambda name, config: hub)
    for name, value in (("rank", 0), ("size", 1), ("is_main", True)):
        monkeypatch.setattr(dist, name, lambda value=value: value)
    monkeypatch.setattr(dist, "agree", lambda step: step())
    cfg = TrainConfig(task="classify", dataset="glue", dataset_config="sst2")
    splits = prepare.read_splits(TASK, cfg, splits=("train", "validation", "test"))
    assert sorted(splits) == ["train", "validation"]
    assert TASK.sort_labels(TASK.labels(splits["train"])) == ["negative", "positive"]
    assert splits["validation"].examples == [{"text": "meh", "text_pair": None, "label": "negative", "line": None}]


def test_unlabelled_inputs(tmp_path: Path) -> None:
    text = write(tmp_path, "in.txt", "first text\n\n  \nsecond, with comma\tand tab\n")
    split = TASK.read_unlabelled(str(text), Shard())
    assert split.total == 2
    assert [(e["text"], e["line"], e["label"]) for e in split.examples] == [
        ("first text", 1, None), ("second, with comma\tand tab", 4, None)]
    table = write(tmp_path, "in.csv", "review,label\nnice,\nawful,\n")  # labels, if any, are ignored
    assert [e["text"] for e in TASK.read_unlabelled(str(table), Shard(1, 2)).examples] == ["awful"]
    with pytest.raises(HvdftError, match="nothing to predict"):
        TASK.read_unlabelled(str(write(tmp_path, "empty.txt", "\n\n")), Shard())


# ----------------------------------------------------------------------------- features


def test_featurize_labels_lengths_truncation(tokenizer) -> None:
    batch = {"text": ["good film", "word " * 100, "bad"], "text_pair": [None, None, None],
             "label": ["1", "0", "7"], "example": [0, 1, 2]}
    feats = TASK.featurize(batch, tokenizer, {"0": 0, "1": 1}, 16)
    assert feats["labels"] == [1, 0, -100]  # a label unseen in training is ignored by the loss
    assert feats["example"] == [0, 1, 2]
    assert feats["length"] == [len(ids) for ids in feats["input_ids"]]
    assert len(feats["input_ids"][1]) == 16 and feats["input_ids"][1][-1] == tokenizer.sep_token_id
    assert "token_type_ids" in feats
    unlabelled = dict(batch, label=[None, None, None])
    assert TASK.featurize(unlabelled, tokenizer, {"0": 0}, 16)["labels"] == [-100] * 3


def test_featurize_without_token_type_ids() -> None:
    class Tok:
        def __call__(self, texts, pairs=None, truncation=True, max_length=8):
            return {"input_ids": [[1] + [5] * len(t.split()) + [2] for t in texts]}

    feats = TASK.featurize({"text": ["a b", "c"], "text_pair": [None, None], "label": ["x", "y"], "example": [0, 1]},
                           Tok(), {"x": 0, "y": 1}, 8)
    assert "token_type_ids" not in feats and feats["length"] == [4, 3]


def test_predictions_and_merge() -> None:
    logits = torch.tensor([[0.0, 2.0, 0.0], [3.0, 1.0, -1.0]])
    preds = TASK.predictions([{"example": 0}, {"example": 1}], SimpleNamespace(logits=logits), None, None)
    probs = torch.softmax(logits, -1)
    assert [p[0] for p in preds] == [1, 0]
    assert preds[0][1] == pytest.approx(float(probs[0, 1])) and preds[1][1] == pytest.approx(float(probs[1, 0]))
    assert TASK.merge({"text": "x"}, [preds[0]], {0: "a", 1: "b", 2: "c"}) == ("b", pytest.approx(float(probs[0, 1])))


# ----------------------------------------------------------------------------- scoring


def test_score_equals_sklearn() -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    rng = random.Random(7)
    # "d" is only in the gold (unseen in training), "e" only predicted: both count as classes
    gold = [rng.choice("aabbbcd") for _ in range(200)]
    pred = [g if rng.random() < 0.6 else rng.choice("abce") for g in gold]
    examples = [{"text": str(i), "label": g} for i, g in enumerate(gold)]
    metrics, report = TASK.score(examples, [(p, 0.5) for p in pred])
    labels = sorted(set(gold) | set(pred))
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    assert metrics["f1_macro"] == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0), abs=1e-12)
    assert metrics["precision_macro"] == pytest.approx(p.mean(), abs=1e-12)
    assert metrics["recall_macro"] == pytest.approx(r.mean(), abs=1e-12)
    _, per_class, classes, matrix = classification_scores(gold, pred, TASK.sort_labels)
    assert classes == labels
    for i, c in enumerate(classes):
        assert per_class[c][:3] == pytest.approx((p[i], r[i], f[i]), abs=1e-12) and per_class[c][3] == s[i]
    assert matrix == confusion_matrix(gold, pred, labels=labels).tolist()
    assert "confusion matrix" in report and "macro avg" in report
    for i, c in enumerate(classes):  # each class's row: P R F1 support, then its confusion row
        assert f"{c}  {p[i]:9.4f} {r[i]:9.4f} {f[i]:9.4f} {s[i]:9d}" in report
        assert " ".join(f"{v:>2}" for v in matrix[i]) in report


def test_score_edge_cases() -> None:
    metrics, report = TASK.score([{"label": "1"}, {"label": "1"}], [("1", 0.9), ("1", 0.8)])
    assert metrics == {"accuracy": 1.0, "f1_macro": 1.0, "precision_macro": 1.0, "recall_macro": 1.0}
    metrics, _ = TASK.score([{"label": "10"}, {"label": "2"}], [("2", 0.9), ("10", 0.8)])
    assert metrics["accuracy"] == 0.0 and metrics["f1_macro"] == 0.0


def test_unseen_gold_labels_are_counted_and_kept(tmp_path: Path) -> None:
    split = read(write(tmp_path, "d.csv", "text,label\na,pos\nb,other\nc,other\n"))
    assert TASK.unseen_labels(split, {"pos": 0, "neg": 1}) == {"other": 2}
    metrics, report = TASK.score(split.examples, [("pos", 0.9)] * 3)
    assert metrics["accuracy"] == pytest.approx(1 / 3) and "other" in report


def test_prediction_files_escape_and_keep_order(tmp_path: Path) -> None:
    examples = [{"text": "tab\there", "text_pair": None, "label": "1"},
                {"text": "new\nline \\ back", "text_pair": None, "label": "0"}]
    out = tmp_path / "test_predictions.tsv"
    TASK.write_predictions(tmp_path, "test", examples, [("0", 0.75), ("0", 0.5)])
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[0] == "text\tgold\tpredicted\tprobability" and lines[-1] == ""
    rows = [line.split("\t") for line in lines[1:-1]]
    assert rows == [["tab\\there", "1", "0", "0.750000"], ["new\\nline \\\\ back", "0", "0", "0.500000"]]
    assert [unescape(r[0]) for r in rows] == [e["text"] for e in examples]
    assert escape("a\\tb") == "a\\\\tb"  # a literal backslash-t is not a tab
    TASK.write_unlabelled_predictions(out, examples, [("1", 0.6), ("0", 0.9)])
    assert out.read_text().split("\n")[:2] == ["text\tpredicted\tprobability", "tab\\there\t1\t0.600000"]
    pairs = [{"text": "a", "text_pair": "b", "label": "x"}]
    TASK.write_predictions(tmp_path, "test", pairs, [("x", 1.0)])
    assert out.read_text().split("\n")[:2] == ["text\ttext_pair\tgold\tpredicted\tprobability", "a\tb\tx\tx\t1.000000"]


def test_sst2_parses(shared_data: Path) -> None:
    path = shared_data / "sst2" / "train.tsv"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    zero, one = read(path, 0, 2), read(path, 1, 2)
    assert zero.total == one.total == 67349
    assert len(zero.examples) + len(one.examples) == 67349
    assert TASK.sort_labels(TASK.labels(zero) | TASK.labels(one)) == ["0", "1"]
    assert zero.examples[0] == {"text": "hide new secretions from the parental units ", "text_pair": None,
                                "label": "0", "line": 2}
    everything = zero.examples + one.examples
    assert all(e["text"].endswith(" ") for e in everything), "texts are kept as written"
    assert sorted(e["line"] for e in everything) == list(range(2, 67351)), "one row per line"
    dev = read(shared_data / "sst2" / "dev.tsv")
    assert dev.total == 872


# ----------------------------------------------------------------------------- multi-rank

GATHER_SCRIPT = '''
import json, sys
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from hvdft import dist
from hvdft.data.prepare import tokenize
from hvdft.data.files import Shard
from hvdft.evaluate import Evaluator
from hvdft.models import resolve_model
from hvdft.tasks.classify import ClassifyTask

dist.init()
task = ClassifyTask()
split = task.read(sys.argv[1], "validation", Shard(dist.rank(), dist.size()))
labels = ["a", "b", "c"]  # gold also holds "d": unseen in training, scored, ignored by the loss
path = resolve_model("minilm")
config = AutoConfig.from_pretrained(path, num_labels=3, id2label=dict(enumerate(labels)),
                                    label2id={k: i for i, k in enumerate(labels)})
torch.manual_seed(0)
model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
torch.nn.init.normal_(model.classifier.weight, std=3.0)
dist.broadcast_parameters(model)
tok = AutoTokenizer.from_pretrained(path)
features = tokenize(task, split, tok, config.label2id, max_length=32, cache_dir=sys.argv[3])
result = Evaluator(task, model, dict(enumerate(labels)), 4, tok.pad_token_id)(split, features)
if dist.is_main():
    json.dump({"metrics": result.metrics, "gold": [e["label"] for e in result.examples],
               "texts": [e["text"] for e in result.examples],
               "predictions": result.predictions, "report": result.report}, open(sys.argv[2], "w"))
dist.shutdown()
'''


@pytest.mark.slow
def test_gathered_metrics_equal_single_process(tmp_path: Path) -> None:
    from sklearn.metrics import accuracy_score, f1_score

    rng = random.Random(3)
    data = tmp_path / "dev.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(37):
            w.writerow([" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) + f" {i}", rng.choice("aabcd")])
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run([sys.executable, str(script), str(data), str(one), str(tmp_path / "cache")], timeout=300)
    run([*horovodrun(), sys.executable, str(script), str(data), str(two), str(tmp_path / "cache")], timeout=400)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert len(b["gold"]) == 37 and b["texts"] == [e["text"] for e in read(data).examples], "input order"
    assert b["gold"] == a["gold"]
    assert [p[0] for p in b["predictions"]] == [p[0] for p in a["predictions"]]
    # fp32 logits of a text padded within other batches differ in the last bits
    assert [p[1] for p in b["predictions"]] == pytest.approx([p[1] for p in a["predictions"]], rel=1e-5)
    pred = [p[0] for p in b["predictions"]]
    assert len(set(pred)) > 1, "the seeded head predicts more than one class"
    for m in ("accuracy", "f1_macro", "precision_macro", "recall_macro"):
        assert b["metrics"][m] == a["metrics"][m]
    assert b["metrics"]["accuracy"] == pytest.approx(accuracy_score(b["gold"], pred), abs=1e-12)
    assert b["metrics"]["f1_macro"] == pytest.approx(
        f1_score(b["gold"], pred, average="macro", zero_division=0), abs=1e-12)
    assert b["metrics"]["loss"] == pytest.approx(a["metrics"]["loss"], rel=1e-6)
    assert b["report"] == a["report"]


def _check_outputs(out: Path, test_rows: list[tuple[str, str]], labels: list[str], metric: str) -> dict:
    results = json.loads((out / "all_results.json").read_text())
    for key in ("eval_accuracy", "eval_f1_macro", "eval_precision_macro", "eval_recall_macro", "eval_loss",
                "test_accuracy", "test_f1_macro", "train_runtime", "train_tokens_per_second", "world_size"):
        assert key in results, key
    assert results["world_size"] == 2 and results["train_steps"] == 4 and results["train_runtime"] > 0
    assert results["best_eval_metric"] == results[f"eval_{metric}"]

    config = json.loads((out / "config.json").read_text())
    assert config["hvdft_task"] == "classify" and list(config["id2label"].values()) == labels
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert (out / "model.safetensors").stat().st_size > 1_000_000 and (out / "tokenizer.json").exists()

    for name in ("eval_report.txt", "test_report.txt"):
        text = (out / name).read_text()
        assert "macro avg" in text and "f1-score" in text and "confusion matrix (rows: gold" in text

    lines = (out / "test_predictions.tsv").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "text\tgold\tpredicted\tprobability" and lines[-1] == ""
    rows = [line.split("\t") for line in lines[1:-1]]
    assert [(r[0], r[1]) for r in rows] == test_rows, "one row per test example, in input order"
    assert all(r[2] in labels and 0 < float(r[3]) <= 1 for r in rows)
    # the gathered test metrics are those of a single-process computation on the same predictions
    gold, pred = [r[1] for r in rows], [r[2] for r in rows]
    metrics, _, _, _ = classification_scores(gold, pred, TASK.sort_labels)
    from sklearn.metrics import accuracy_score, f1_score

    assert results["test_accuracy"] == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    assert results["test_f1_macro"] == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0),
                                                     abs=1e-12)
    assert results["test_accuracy"] == metrics["accuracy"]
    assert results["test_accuracy"] >= 0.8, "the toy set is learnable in 4 steps"

    from transformers import pipeline

    classifier = pipeline("text-classification", model=str(out))
    for (text, _), r in list(zip(test_rows, rows, strict=True))[:4]:
        got = classifier(text)[0]
        assert got["label"] == r[2] and got["score"] == pytest.approx(float(r[3]), abs=1e-4)
    assert not list(out.glob(".*tmp*")), "no temporary files left"
    return results


@pytest.mark.slow
def test_train_classify_two_ranks_horovodrun(tmp_path: Path) -> None:
    """CSV train, JSON-lines validation with integer labels, TSV test: "1" and 1 are one label."""
    train, dev, test = toy_rows(60, 1), toy_rows(20, 2), toy_rows(21, 3)
    with open(tmp_path / "train.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        w.writerows(train)
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in dev))
    (tmp_path / "test.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in test))
    out = tmp_path / "run"
    proc = run([*horovodrun(), HVDFT, "train", "classify", "--model", "minilm", "--train-file",
                str(tmp_path / "train.csv"), "--validation-file", str(tmp_path / "dev.jsonl"), "--test-file",
                str(tmp_path / "test.tsv"), "--epochs", "1", "--max-steps", "4", "--batch-size", "8",
                "--lr", "1e-4", "--log-every", "2", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")],
               timeout=600)
    assert "2 rank(s)" in proc.stdout and "16 global" in proc.stdout
    results = _check_outputs(out, [(t, str(y)) for t, y in test], ["0", "1"], "accuracy")

    # predict: plain text, sharded over 2 ranks, input order, blank lines skipped
    texts = ["a wonderful film", "", "the plot was dreadful", "moving\tand superb", "dull"]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    pred = tmp_path / "pred.tsv"
    run([*horovodrun(), HVDFT, "predict", "--model", str(out), "--input", str(src), "--output", str(pred)], timeout=300)
    lines = pred.read_text(encoding="utf-8").split("\n")
    assert lines[0] == "text\tpredicted\tprobability"
    rows = [line.split("\t") for line in lines[1:-1]]
    assert [r[0] for r in rows] == ["a wonderful film", "the plot was dreadful", "moving\\tand superb", "dull"]
    assert all(r[1] in ("0", "1") for r in rows)

    # eval (one process) reproduces the run's test score
    report = tmp_path / "eval"
    run([HVDFT, "eval", "--model", str(out), "--data", str(tmp_path / "test.tsv"), "--output-dir", str(report)],
        timeout=300)
    scores = json.loads((report / "eval_results.json").read_text())
    assert scores["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-12)
    assert scores["f1_macro"] == pytest.approx(results["test_f1_macro"], abs=1e-12)
    assert "confusion matrix" in (report / "eval_report.txt").read_text()


@pytest.mark.slow
def test_train_classify_two_ranks_mpirun(tmp_path: Path) -> None:
    """A folder of JSON-lines splits, a 'review' column, string labels, --metric f1_macro."""
    data = tmp_path / "data"
    data.mkdir()
    names = {0: "negative", 1: "positive"}
    splits = {"train": toy_rows(60, 4), "valid": toy_rows(20, 5), "test": toy_rows(15, 6)}
    for name, rows in splits.items():
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"review": t, "label": names[y]}) + "\n"
                                                    for t, y in rows))
    out = tmp_path / "run"
    proc = run([*mpirun(), HVDFT, "train", "classify", "--model", "minilm", "--dataset", str(data), "--epochs", "1",
                "--max-steps", "4", "--batch-size", "8", "--lr", "1e-4", "--metric", "f1_macro",
                "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")], timeout=600)
    assert "[mpi]" in proc.stdout
    _check_outputs(out, [(t, names[y]) for t, y in splits["test"]], ["negative", "positive"], "f1_macro")
