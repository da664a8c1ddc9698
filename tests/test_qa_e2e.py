"""`hvdft train qa` through the engine on 2 real Horovod ranks, and `hvdft predict` / `hvdft eval`
on QA models, on 1 and 2 ranks (issue 14).

The fixture is written here: paragraphs of distinct one-token words, longer than several
windows at --max-length 64 --doc-stride 16, with answers at window edges (the last word
of window 0, the first word of window 1, across the end of window 0, the context's last
word before its newline); contexts that start with a space and end with "\\n". A tiny
random BERT: the numbers do not matter, the plumbing does. What is checked: every output
file, the best model by F1, gathered evaluation equal to single-process evaluation (the
2-rank run, `hvdft eval` on 1 and on 2 ranks: identical predictions.json and metrics;
the metrics recomputed from predictions.json with the official measure), v2.0 null
answers and the threshold, predict on JSON lines and SQuAD JSON, one-line errors.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from support import HVDFT, horovodrun, make_tiny_model, one_line_errors, run_job, run_ok

from hvdft.tasks import squad_metric
from hvdft.tasks.qa import QaOptions, featurize

pytestmark = pytest.mark.slow

MAX_LENGTH, DOC_STRIDE = 64, 16
TIMEOUT = 600  # a loaded 2-core machine; a quiet one takes 20-40 s per job


@pytest.fixture(scope="module")
def words(tokenizer) -> list[str]:
    """400 distinct lower-case words that MiniLM keeps whole: token i of a context is its word i."""
    vocab = sorted(w for w in tokenizer.get_vocab() if w.isascii() and w.isalpha() and w.islower() and 4 <= len(w) <= 7)
    chosen = vocab[2000:2400]
    assert len(tokenizer(" ".join(chosen), add_special_tokens=False)["input_ids"]) == len(chosen)
    return chosen


def _windows(tokenizer, question: str, context: str, lead: int) -> list[list[int]]:
    """Per window, the word indices its context tokens hold (the engine's features)."""
    batch = {"question": [question], "context": [context], "answers": [{"text": [], "answer_start": []}],
             "example": [0]}
    rows = featurize(batch, tokenizer, MAX_LENGTH, QaOptions(doc_stride=DOC_STRIDE))
    starts, pos = {}, lead
    for i, w in enumerate(context[lead:].split()):
        pos = context.index(w, pos)
        starts[pos] = i
        pos += len(w)
    return [[starts[o[0]] for o in offsets if o is not None] for offsets in rows["offset_mapping"]]


def paragraph(tokenizer, words: list[str], rng: random.Random, tag: str, impossible: int = 0) -> dict:
    """One SQuAD paragraph: 4 answerable questions at window edges (+ `impossible` unanswerable ones)."""
    n = rng.randint(140, 180)
    chosen = rng.sample(words, n)
    lead = " " if rng.random() < 0.5 else ""
    context = lead + " ".join(chosen) + "\n"
    starts = [len(lead) + sum(len(w) + 1 for w in chosen[:i]) for i in range(n)]
    w = _windows(tokenizer, f"what comes after {chosen[0]} ?", context, len(lead))
    assert len(w) >= 4, "longer than several windows"
    spans = {"end of window 0": (w[0][-1], w[0][-1]), "start of window 1": (w[1][0], w[1][0] + 1),
             "across window 0's end": (w[0][-1] - 1, w[0][-1] + 2), "last word": (n - 1, n - 1)}
    qas = []
    for k, (first, last) in enumerate(spans.values()):
        text = context[starts[first] : starts[last] + len(chosen[last])]
        qas.append({"id": f"{tag}-{k}", "question": f"what comes after {chosen[first - 1]} ?",
                    "answers": [{"text": text, "answer_start": starts[first]}]})
    for k in range(impossible):
        qas.append({"id": f"{tag}-x{k}", "question": f"what comes after {rng.choice(words)} ?", "answers": [],
                    "is_impossible": True})
    return {"context": context, "qas": qas}


def squad_file(path: Path, paragraphs: list[dict], version: str = "1.1") -> Path:
    data = {"version": version, "data": [{"title": f"article {i}", "paragraphs": [p]}
                                         for i, p in enumerate(paragraphs)]}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def flat_rows(path: Path, paragraphs: list[dict]) -> Path:
    """The Hub's squad/squad_v2 rows as JSON lines."""
    with open(path, "w", encoding="utf-8") as f:
        for p in paragraphs:
            for qa in p["qas"]:
                f.write(json.dumps({"id": qa["id"], "title": "t", "context": p["context"], "question": qa["question"],
                                    "answers": {"text": [a["text"] for a in qa["answers"]],
                                                "answer_start": [a["answer_start"] for a in qa["answers"]]}}) + "\n")
    return path


def questions(paragraphs: list[dict]) -> list[tuple[str, list[str], str]]:
    """(id, reference answers, context) in file order."""
    return [(qa["id"], [a["text"] for a in qa["answers"]], p["context"]) for p in paragraphs for qa in p["qas"]]


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def eval_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_f1" in r]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def train_args(model: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [HVDFT, "train", "qa", "--model", str(model), "--max-length", str(MAX_LENGTH), "--doc-stride",
            str(DOC_STRIDE), "--batch-size", "4", "--max-steps", "6", "--eval-every", "2", "--log-every", "2",
            "--lr", "5e-3", "--output-dir", str(out), "--cache-dir", str(cache), *extra]


def test_train_qa_two_ranks_outputs_predict_and_eval(tmp_path: Path, tokenizer, words, model: Path) -> None:
    rng = random.Random(0)
    train = [paragraph(tokenizer, words, rng, f"t{i}") for i in range(10)]  # 40 questions on 10 paragraphs
    dev = [paragraph(tokenizer, words, rng, f"d{i}") for i in range(5)]
    test = [paragraph(tokenizer, words, rng, f"s{i}") for i in range(3)]
    files = {"train": squad_file(tmp_path / "train.json", train), "dev": squad_file(tmp_path / "dev.json", dev),
             "test": flat_rows(tmp_path / "test.jsonl", test)}
    out, cache = tmp_path / "run", tmp_path / "cache"
    result = run_ok([*horovodrun(2), *train_args(model, out, cache, "--train-file", str(files["train"]),
                                                  "--validation-file", str(files["dev"]), "--test-file",
                                                  str(files["test"]))], timeout=TIMEOUT)
    assert "hvdft train qa" in result.stdout and "2 rank(s)" in result.stdout and "8 global" in result.stdout
    assert "span head new (randomly initialised)" in result.stdout and "SQuAD v1.1" in result.stdout

    # the model folder: a QA head, the task recorded, the trained window length saved
    config = read_json(out / "config.json")
    assert config["hvdft_task"] == "qa" and config["architectures"] == ["BertForQuestionAnswering"]
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    saved = read_json(out / "hvdft_run.json")["config"]
    assert saved["max_length"] == MAX_LENGTH and saved["doc_stride"] == DOC_STRIDE
    assert (out / "checkpoints" / "best" / "config.json").exists()

    # results: HF names, questions counted, the best model by F1 restored at the end
    results = read_json(out / "all_results.json")
    for key in ("eval_exact_match", "eval_f1", "eval_loss", "test_exact_match", "test_f1", "train_loss",
                "train_tokens_per_second"):
        assert isinstance(results[key], float), key
    assert results["train_samples"] == 40 and results["eval_total"] == 20 and results["test_total"] == 12
    assert results["world_size"] == 2 and results["global_batch_size"] == 8 and results["train_steps"] == 6
    evals = eval_records(out)
    assert [r["step"] for r in evals] == [2, 4, 6]
    best = max(evals, key=lambda r: r["eval_f1"])  # the first of equals: only a better F1 replaces it
    assert results["best_eval_metric"] == best["eval_f1"] and results["best_step"] == best["step"]
    assert results["eval_f1"] == best["eval_f1"] and results["eval_exact_match"] == best["eval_exact_match"]
    assert read_json(out / "eval_results.json")["eval_f1"] == results["eval_f1"]
    assert read_json(out / "test_results.json")["test_f1"] == results["test_f1"]
    train_lines = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
                   and "eval_loss" not in r]
    assert [r["step"] for r in train_lines] == [2, 4, 6] and all(r["tokens_per_second"] > 0 for r in train_lines)

    # predictions: every question once, in input order, official {id: answer}; n-best lists
    for prefix, part, total in (("", dev, 20), ("test_", test, 12)):
        qs = questions(part)
        answers = read_json(out / f"{prefix}predictions.json")
        assert list(answers) == [q for q, _, _ in qs] and len(answers) == total
        assert all(a and a in ctx and a == a.strip() for a, (_, _, ctx) in zip(answers.values(), qs, strict=True))
        nbest = read_json(out / f"{prefix}nbest_predictions.json")
        assert list(nbest) == list(answers)
        for qid, cands in nbest.items():
            assert 1 <= len(cands) <= 20 and cands[0]["text"] == answers[qid]
            assert sum(c["probability"] for c in cands) == pytest.approx(1.0)
        # the gathered metrics are the official measure of the written predictions
        refs = {q: r for q, r, _ in qs}
        scores = squad_metric.squad_v1(refs, answers)
        name = "test" if prefix else "eval"
        assert results[f"{name}_exact_match"] == scores["exact_match"] and results[f"{name}_f1"] == scores["f1"]
        assert "SQuAD v1.1 measure" in (out / f"{name}_report.txt").read_text()
    assert not (out / "null_odds.json").exists() and not list(out.glob(".*tmp*"))

    # hvdft eval on 1 and on 2 ranks (small batches: a question's windows in several batches):
    # the run's predictions and metrics exactly
    for ranks, batch in ((1, 3), (2, 2)):
        report = tmp_path / f"eval{ranks}"
        launcher = horovodrun(2) if ranks == 2 else []
        run_ok([*launcher, HVDFT, "eval", "--model", str(out), "--data", str(files["dev"]), "--batch-size",
                str(batch), "--output-dir", str(report)], timeout=TIMEOUT)
        assert read_json(report / "predictions.json") == read_json(out / "predictions.json"), ranks
        scores = read_json(report / "eval_results.json")
        assert scores["f1"] == results["eval_f1"] and scores["exact_match"] == results["eval_exact_match"]
        assert scores["loss"] == pytest.approx(results["eval_loss"], rel=1e-5)
        assert [c["text"] for c in read_json(report / "nbest_predictions.json")["d0-0"]] == [
            c["text"] for c in read_json(out / "nbest_predictions.json")["d0-0"]]

    # hvdft predict: JSON lines of {question, context} on 2 ranks, SQuAD JSON on 1 rank
    plain = tmp_path / "questions.jsonl"
    plain.write_text("".join(json.dumps({"question": qa["question"], "context": p["context"]}) + "\n"
                             for p in test for qa in p["qas"]), encoding="utf-8")
    for ranks, source, expected in ((2, plain, read_json(out / "test_predictions.json")),
                                    (1, files["dev"], read_json(out / "predictions.json"))):
        target = tmp_path / f"predict{ranks}.jsonl"
        launcher = horovodrun(2) if ranks == 2 else []
        run_ok([*launcher, HVDFT, "predict", "--model", str(out), "--input", str(source), "--output", str(target)],
               timeout=TIMEOUT)
        lines = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
        assert [x["answer"] for x in lines] == list(expected.values()), ranks
        assert all(set(x) == {"id", "question", "answer", "answer_start", "probability"} for x in lines)
        ids = [x["id"] for x in lines]
        assert ids == ([str(i) for i in range(12)] if source == plain else list(expected)), ranks

    # an option the QA task lacks is a one-line error
    bad = run_job([HVDFT, "predict", "--model", str(out), "--input", str(plain), "--output", str(tmp_path / "x"),
                   "--text-column", "y"], timeout=TIMEOUT)
    assert bad.returncode == 2 and one_line_errors(bad.stderr) == [
        "hvdft: error: --text-column does not apply to a 'qa' model"], bad.describe()


def test_train_qa_v2_null_answers_through_the_engine(tmp_path: Path, tokenizer, words, model: Path) -> None:
    """SQuAD 2.0: unanswerable questions in training (Hub rows, empty answers) and evaluation
    (nested JSON, is_impossible); the null answer follows the threshold; the v2 fields."""
    rng = random.Random(1)
    train = [paragraph(tokenizer, words, rng, f"t{i}", impossible=2) for i in range(6)]
    dev = [paragraph(tokenizer, words, rng, f"d{i}", impossible=2) for i in range(4)]
    files = {"train": flat_rows(tmp_path / "train.jsonl", train),
             "dev": squad_file(tmp_path / "dev.json", dev, "v2.0")}
    out, cache = tmp_path / "run", tmp_path / "cache"
    result = run_ok([*horovodrun(2), *train_args(model, out, cache, "--train-file", str(files["train"]),
                                                  "--validation-file", str(files["dev"]),
                                                  "--version-2-with-negative")], timeout=TIMEOUT)
    assert "SQuAD v2.0" in result.stdout
    results = read_json(out / "all_results.json")
    for key in ("eval_exact_match", "eval_f1", "eval_HasAns_exact", "eval_HasAns_f1", "eval_NoAns_exact",
                "eval_NoAns_f1", "eval_best_exact", "eval_best_f1", "eval_best_f1_thresh"):
        assert isinstance(results[key], float), key
    assert results["eval_HasAns_total"] == 16 and results["eval_NoAns_total"] == 8 and results["eval_total"] == 24

    qs = questions(dev)
    answers, odds = read_json(out / "predictions.json"), read_json(out / "null_odds.json")
    nbest = read_json(out / "nbest_predictions.json")
    assert list(answers) == list(odds) == list(nbest) == [q for q, _, _ in qs]
    for qid, answer in answers.items():  # "" exactly where the null score wins by more than the threshold 0
        assert (answer == "") == (odds[qid] > 0.0), qid
        assert any(c["text"] == "" and c["answer_start"] == -1 for c in nbest[qid]), "the null answer is listed"
    refs = {q: r for q, r, _ in qs}
    scores = squad_metric.squad_v2(refs, answers)
    assert results["eval_exact_match"] == pytest.approx(scores["exact_match"], abs=1e-9)
    assert results["eval_f1"] == pytest.approx(scores["f1"], abs=1e-9)
    assert results["eval_NoAns_exact"] == pytest.approx(scores["NoAns_exact"], abs=1e-9)

    # the threshold at evaluation time (eval's --null-score-diff-threshold overrides the model's)
    for threshold, empty in (("1e9", False), ("-1e9", True)):
        report = tmp_path / f"eval{threshold}"
        run_ok([HVDFT, "eval", "--model", str(out), "--data", str(files["dev"]), "--output-dir", str(report),
                "--null-score-diff-threshold", threshold], timeout=TIMEOUT)
        got = read_json(report / "predictions.json")
        assert all((a == "") == empty for a in got.values()), threshold
        scores = read_json(report / "eval_results.json")
        assert scores["NoAns_exact"] == (100.0 if empty else 0.0)
        if empty:
            assert scores["HasAns_f1"] == 0.0 and scores["f1"] == 100.0 * 8 / 24


def test_bad_answer_is_one_error_on_two_ranks(tmp_path: Path, tokenizer, words, model: Path) -> None:
    """A question of rank 1's shard whose answer_start does not index its text: one line, exit 2."""
    rng = random.Random(2)
    train = [paragraph(tokenizer, words, rng, f"t{i}") for i in range(2)]
    train[1]["qas"][1]["answers"][0]["answer_start"] += 1  # question 5: rank 1's (strided by question)
    path = squad_file(tmp_path / "train.json", train)
    result = run_job([*horovodrun(2), *train_args(model, tmp_path / "run", tmp_path / "cache", "--train-file",
                                                   str(path))], timeout=TIMEOUT)
    assert result.returncode != 0, result.describe()
    for rank in (0, 1):
        assert f"Process {rank} exit with status code 2" in result.output, result.describe()
    errors = one_line_errors(result.output)
    assert len(errors) == 1, errors
    assert re.search(rf"{re.escape(str(path))}: question 't1-1': answer 1: answer_start \d+ does not index its "
                     r"text.*\(found on rank 1\)", errors[0]), errors
    assert not [ln for ln in result.output.splitlines() if re.match(r"\[\d\]<std(out|err)>:.*Traceback", ln)]


def short_paragraphs(words: list[str], rng: random.Random, count: int) -> list[dict]:
    """Paragraphs of 8 to 40 words with one question each: one window per question at
    MAX_LENGTH, of many lengths (so batches are padded differently on 1 and 2 ranks)."""
    out = []
    for i in range(count):
        chosen = rng.sample(words, rng.randint(8, 40))
        k = rng.randrange(1, len(chosen))
        start = sum(len(w) + 1 for w in chosen[:k])
        out.append({"context": " ".join(chosen) + "\n", "qas": [{
            "id": f"q{i}", "question": f"what comes after {chosen[k - 1]} ?",
            "answers": [{"text": chosen[k], "answer_start": start}]}]})
    return out


def test_two_ranks_train_as_one_rank_with_twice_the_batch(tmp_path: Path, tokenizer, words, model: Path) -> None:
    """QA's step is the big batch's step: 2 ranks x 4 windows, each rank's batch padded to
    its own longest window, give the loss, the pre-clip gradient norm and the weights of
    1 rank x 8 windows padded to the longest of the eight (dropout off, input order).

    What makes it hold: the loss is summed over windows with padded positions masked out of
    both softmaxes, and divided by the global window count. transformers' own head loss (a
    mean, pads inside the softmax) differs with the padding width and fails here (the
    gradient's scale across ranks in general: tests/test_equivalence.py).
    """
    from support import load_tensors, max_abs_diff, train_records

    rng = random.Random(5)
    train = short_paragraphs(words, rng, 48)
    path = squad_file(tmp_path / "train.json", train)
    batch = {"question": [p["qas"][0]["question"] for p in train], "context": [p["context"] for p in train],
             "answers": [{"text": [p["qas"][0]["answers"][0]["text"]],
                          "answer_start": [p["qas"][0]["answers"][0]["answer_start"]]} for p in train],
             "example": list(range(len(train)))}
    rows = featurize(batch, tokenizer, MAX_LENGTH, QaOptions(doc_stride=DOC_STRIDE))
    lengths = [len(r) for r in rows["input_ids"]]
    assert rows["example"] == list(range(48)), "one window per question: ranks hold every other window"
    # the steps' batches mix lengths, and a rank's half is padded narrower than the whole
    narrower = [min(max(lengths[s : s + 8 : 2]), max(lengths[s + 1 : s + 8 : 2])) < max(lengths[s : s + 8])
                for s in range(0, 32, 8)]
    assert sum(narrower) >= 2, (lengths[:32], narrower)
    lr, steps = 1e-3, 4
    common = ["--train-file", str(path), "--max-steps", str(steps), "--no-dropout", "--no-shuffle",
              "--no-group-by-length", "--log-every", "1", "--eval-every", "0", "--lr", str(lr)]
    outs = {"one": tmp_path / "one", "two": tmp_path / "two"}
    one = train_args(model, outs["one"], tmp_path / "cache1", *common)
    two = train_args(model, outs["two"], tmp_path / "cache2", *common)
    one[one.index("--batch-size") + 1] = "8"
    run_ok(one, timeout=TIMEOUT)
    run_ok([*horovodrun(2), *two], timeout=TIMEOUT)

    got = {k: {r["step"]: (r["loss"], r["grad_norm"]) for r in train_records(v)} for k, v in outs.items()}
    assert sorted(got["one"]) == sorted(got["two"]) == list(range(1, steps + 1))
    for step, (loss, norm) in got["one"].items():
        loss2, norm2 = got["two"][step]
        assert loss > 0 and norm > 0
        assert loss2 == pytest.approx(loss, rel=1e-5), f"step {step}: loss {loss2} vs {loss}"
        assert norm2 == pytest.approx(norm, rel=1e-5), f"step {step}: gradient norm {norm2} vs {norm}"
    for k, v in outs.items():
        results = read_json(v / "all_results.json")
        assert results["global_batch_size"] == 8 and results["train_steps"] == steps, k
    # AdamW turns rounding noise in a near-zero gradient into a step of about lr: half a step
    # is the bound for any weight (as in tests/test_equivalence.py)
    worst, where = max_abs_diff(load_tensors(outs["one"]), load_tensors(outs["two"]))
    assert 0 < worst <= lr / 2, f"{where} off by {worst:.3g}"
