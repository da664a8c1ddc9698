"""`hvdft train seq2seq` end to end on 2 real Horovod ranks (issue 16), on a tiny BERT that the
task warm-starts into an encoder-decoder: the outputs, the best model by the task metric, the
truncation counts printed once, the metrics against SacreBLEU's and rouge-score's own command
lines on the written predictions file, `hvdft predict` / `hvdft eval` on 1 and 2 ranks with the
trained generation settings (and overrides), a summarization smoke run on the BillSum sample and
a translation smoke run on Tatoeba (French -> English).

Evaluation batches of one example (--eval-batch-size 1, --batch-size 1) make every generation
the same computation in training, predict and eval, on any number of ranks: what differs is
only the sharding and the gather. (Batching with padding is compared in float64 by
test_seq2seq.py's gather test.)
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from support import HVDFT, horovodrun, job_env, make_tiny_model, run_job, run_ok

from hvdft.tasks.seq2seq import unescape

BIN = Path(sys.executable).parent
WORDS = {"chat": "cat", "chien": "dog", "maison": "house", "rouge": "red", "petit": "small", "grand": "big"}


def toy_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """French -> English word by word, 1 to 5 words (one wordpiece each): a task the 64-wide
    model below learns in ~120 steps (BLEU 60-70 on the test pairs)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        fr = [rng.choice(list(WORDS)) for _ in range(rng.randint(1, 5))]
        out.append((" ".join(fr), " ".join(WORDS[w] for w in fr)))
    return out


def make_model(folder: Path) -> Path:
    """A 1-layer, 64-wide random BERT with minilm's tokenizer, for the task to warm-start from:
    wide enough to learn the toy mapping in a minute on 2 CPU cores (the 32-wide 2-layer
    support.py model stays at the unigram loss for hundreds of steps)."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from hvdft.models import resolve_model

    src = Path(resolve_model("minilm"))
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    return folder


def write_pairs(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    return path


def read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0].split("\t"), [[unescape(c) for c in line.split("\t")] for line in lines[1:]]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_process_train_then_predict(tmp_path: Path) -> None:
    """The fast suite's pass through the engine (1 process, no Horovod launcher): train a few
    steps, the test predictions in input order scored as SacreBLEU scores them, then predict."""
    from sacrebleu.metrics import BLEU, CHRF

    train, test = write_pairs(tmp_path / "train.txt", toy_pairs(16, 1)), toy_pairs(5, 3)
    out = tmp_path / "out"
    run_ok([HVDFT, "train", "seq2seq", "--model", str(make_tiny_model(tmp_path / "tiny")), "--train-file", str(train),
            "--test-file", str(write_pairs(tmp_path / "test.txt", test)), "--output-dir", str(out), "--max-steps", "2",
            "--batch-size", "8", "--max-target-length", "16", "--num-beams", "1", "--max-new-tokens", "4",
            "--cache-dir", str(tmp_path / "cache")],
           timeout=300)
    header, rows = read_tsv(out / "test_predictions.tsv")
    assert header == ["source", "reference", "hypothesis"] and [r[:2] for r in rows] == [list(p) for p in test]
    results = json.loads((out / "all_results.json").read_text())
    hyps, refs = [r[2] for r in rows], [[r[1] for r in rows]]
    assert results["test_bleu"] == pytest.approx(BLEU(lowercase=True).corpus_score(hyps, refs).score, abs=1e-9)
    assert results["test_chrf"] == pytest.approx(CHRF(lowercase=True).corpus_score(hyps, refs).score, abs=1e-9)
    sources = tmp_path / "sources.txt"
    sources.write_text("".join(s + "\n" for s, _ in test), encoding="utf-8")
    run_ok([HVDFT, "predict", "--model", str(out), "--input", str(sources), "--output", str(tmp_path / "p.tsv")],
           timeout=300, env=job_env(HVDFT_CACHE=str(tmp_path / "cache")))
    assert read_tsv(tmp_path / "p.tsv")[1] == [[r[0], r[2]] for r in rows]
    card = (out / "README.md").read_text()  # transformers 5 has no text2text-generation pipeline to show
    assert "AutoModelForSeq2SeqLM.from_pretrained" in card and "pipeline(" not in card


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 2-rank training run shared by the tests below."""
    tmp = tmp_path_factory.mktemp("seq2seq_e2e")
    model = make_model(tmp / "tiny")
    train, valid, test = toy_pairs(160, 1), toy_pairs(10, 2), toy_pairs(13, 3)
    files = {name: write_pairs(tmp / f"{name}.txt", pairs) for name, pairs in
             (("train", train), ("valid", valid), ("test", test))}
    out = tmp / "out"
    cmd = [*horovodrun(2), HVDFT, "train", "seq2seq", "--model", str(model), "--train-file", str(files["train"]),
           "--validation-file", str(files["valid"]), "--test-file", str(files["test"]), "--output-dir", str(out),
           "--batch-size", "8", "--epochs", "12", "--lr", "3e-3", "--warmup-ratio", "0.1", "--eval-every", "40",
           "--eval-batch-size", "1", "--max-source-length", "6", "--max-target-length", "16", "--num-beams", "2",
           "--max-new-tokens", "12", "--log-every", "20", "--cache-dir", str(tmp / "cache")]
    result = run_ok(cmd, timeout=900)
    return {"tmp": tmp, "out": out, "files": files, "pairs": {"train": train, "valid": valid, "test": test},
            "result": result, "cache": str(tmp / "cache")}


@pytest.mark.slow
def test_outputs_and_best_model(trained: dict) -> None:
    out, output = trained["out"], trained["result"].output
    assert "model: encoder-decoder warm-started from the encoder-only checkpoint" in output
    assert "data: translation, default metric bleu" in output
    assert "generation: num_beams=2 max_new_tokens=12 length_penalty=1.0 no_repeat_ngram_size=0" in output
    assert "LOAD REPORT" not in output and "Using default tokenizer" not in output
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["hvdft_task"]) == ("encoder-decoder", "seq2seq")
    assert config["hvdft_seq2seq"]["max_source_length"] == 6
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["num_beams"], generation["max_length"], generation["decoder_start_token_id"]) == (2, 13, 101)
    for name in ("model.safetensors", "tokenizer.json", "hvdft_run.json", "train_results.json", "eval_results.json",
                 "test_results.json", "eval_report.txt", "test_report.txt"):
        assert (out / name).is_file(), name
    results = json.loads((out / "all_results.json").read_text())
    assert results["world_size"] == 2 and results["global_batch_size"] == 16
    assert {f"test_{k}" for k in ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "loss")} <= set(results)
    # the best model by BLEU: its step and score are the best evaluation's, and evaluating the
    # restored model again on the validation set gives the same figures
    records = jsonl(out / "metrics.jsonl")
    evals = [r for r in records if "eval_bleu" in r]
    assert [r["step"] for r in evals] == [40, 80, 120] and results["train_steps"] == 120
    best = max(evals, key=lambda r: r["eval_bleu"])  # the first of equals: a later tie is not better
    assert (results["best_step"], results["best_eval_metric"]) == (best["step"], best["eval_bleu"])
    for key in ("eval_bleu", "eval_chrf", "eval_rougeL"):
        assert results[key] == pytest.approx(best[key], abs=1e-9), key
    assert any("loss" in r and "lr" in r for r in records)
    assert results["test_bleu"] > 20, "the tiny model learnt the word mapping"


@pytest.mark.slow
def test_predictions_file_is_in_input_order(trained: dict) -> None:
    header, rows = read_tsv(trained["out"] / "test_predictions.tsv")
    assert header == ["source", "reference", "hypothesis"]
    assert [r[:2] for r in rows] == [list(p) for p in trained["pairs"]["test"]]
    assert len({r[2] for r in rows}) > 1, "outputs depend on the input"
    assert not (trained["out"] / "eval_predictions.tsv").exists()  # Task.predictions_for: the test set


@pytest.mark.slow
def test_truncation_is_counted_once_over_all_ranks(trained: dict) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained["out"])
    output = trained["result"].output
    for name in ("train", "valid", "test"):
        pairs = trained["pairs"][name]
        sources = sum(len(tok(s)["input_ids"]) > 6 for s, _ in pairs)
        targets = sum(len(tok(t)["input_ids"]) - 1 > 16 for _, t in pairs)  # [CLS] is not a target token
        assert sources > 0, "the fixture has sources over --max-source-length 6"
        line = (f"{trained['files'][name]}: {sources} of {len(pairs)} sources cut to --max-source-length 6, "
                f"{targets} targets cut to --max-target-length 16")
        assert output.count(line) == 1, (line, output[-3000:])


@pytest.mark.slow
def test_metrics_equal_the_scorers_command_lines(trained: dict) -> None:
    """SacreBLEU's and rouge-score's own command lines, on the references and hypotheses read
    back from test_predictions.tsv, give all_results.json's test figures."""
    tmp, results = trained["tmp"], json.loads((trained["out"] / "all_results.json").read_text())
    _, rows = read_tsv(trained["out"] / "test_predictions.tsv")
    refs, hyps = tmp / "refs.txt", tmp / "hyps.txt"
    refs.write_text("".join(r[1] + "\n" for r in rows), encoding="utf-8")
    hyps.write_text("".join(r[2] + "\n" for r in rows), encoding="utf-8")
    # MiniLM's tokenizer lowercases: hvdft scores case-insensitively (the report says case:lc)
    cmd = [str(BIN / "sacrebleu"), str(refs), "-i", str(hyps), "-m", "bleu", "chrf", "-b", "-w", "4", "-lc",
           "--chrf-lowercase"]
    bleu, chrf = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout)
    assert (round(results["test_bleu"], 4), round(results["test_chrf"], 4)) == (bleu, chrf)
    assert "case:lc" in (trained["out"] / "test_report.txt").read_text()
    scores = tmp / "rouge.csv"
    subprocess.run([sys.executable, "-m", "rouge_score.rouge", f"--target_filepattern={refs}",
                    f"--prediction_filepattern={hyps}", f"--output_filename={scores}",
                    "--rouge_types=rouge1,rouge2,rougeL,rougeLsum", "--use_stemmer=true", "--noaggregate"],
                   capture_output=True, text=True, timeout=120, check=True)
    lines = scores.read_text().splitlines()
    header, per_example = lines[0].split(","), [list(map(float, ln.split(",")[1:])) for ln in lines[1:]]
    assert len(per_example) == len(rows)
    for kind in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        column = header.index(f"{kind}-F") - 1
        mean = 100 * sum(r[column] for r in per_example) / len(per_example)
        # the command line writes each example's F to 6 decimals: the mean of 13 x 100 is within 5e-5
        assert results[f"test_{kind}"] == pytest.approx(mean, abs=1e-4), kind


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_predict_and_eval_use_the_trained_settings(trained: dict, ranks: int) -> None:
    tmp, out = trained["tmp"], trained["out"]
    launcher = horovodrun(2) if ranks == 2 else []
    env = job_env(HVDFT_CACHE=trained["cache"])
    sources = tmp / "sources.txt"
    sources.write_text("".join(s + "\n" for s, _ in trained["pairs"]["test"]), encoding="utf-8")
    predicted = tmp / f"predicted{ranks}.tsv"
    run_ok([*launcher, HVDFT, "predict", "--model", str(out), "--input", str(sources), "--output", str(predicted),
            "--batch-size", "1"], timeout=600, env=env)
    header, rows = read_tsv(predicted)
    _, tested = read_tsv(out / "test_predictions.tsv")
    assert header == ["source", "hypothesis"]
    assert rows == [[r[0], r[2]] for r in tested], "the test set's generations, in input order"

    ev = tmp / f"eval{ranks}"
    result = run_ok([*launcher, HVDFT, "eval", "--model", str(out), "--data", str(trained["files"]["test"]),
                     "--output-dir", str(ev), "--batch-size", "1"], timeout=600, env=env)
    got = json.loads((ev / "eval_results.json").read_text())
    results = json.loads((out / "all_results.json").read_text())
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "cut_generations"):
        assert got[key] == results[f"test_{key}"], key
    assert got["loss"] == pytest.approx(results["test_loss"], rel=1e-5)
    assert sum("sources cut to" in ln for ln in result.output.splitlines()) == 1, "rank 0 only"


@pytest.mark.slow
def test_predict_generation_overrides(trained: dict) -> None:
    """--num-beams / --max-new-tokens given to predict replace the trained settings for that run only."""
    from transformers import AutoTokenizer

    tmp, out = trained["tmp"], trained["out"]
    sources = tmp / "sources.jsonl"
    sources.write_text("".join(json.dumps({"text": s}) + "\n" for s, _ in trained["pairs"]["test"]))
    predicted = tmp / "short.tsv"
    run_ok([HVDFT, "predict", "--model", str(out), "--input", str(sources), "--output", str(predicted),
            "--num-beams", "1", "--max-new-tokens", "2"], timeout=600, env=job_env(HVDFT_CACHE=trained["cache"]))
    tok = AutoTokenizer.from_pretrained(out)
    _, rows = read_tsv(predicted)
    assert [r[0] for r in rows] == [s for s, _ in trained["pairs"]["test"]]
    assert all(len(tok(r[1], add_special_tokens=False)["input_ids"]) <= 2 for r in rows)
    assert json.loads((out / "generation_config.json").read_text())["num_beams"] == 2, "the folder is unchanged"
    bad = run_job([HVDFT, "predict", "--model", str(out), "--input", str(sources), "--output", str(predicted),
                   "--num-beams", "0"], timeout=300)
    assert bad.returncode == 2 and "--num-beams" in bad.stderr


@pytest.mark.slow
def test_summarization_smoke_on_billsum(shared_data: Path, tmp_path: Path) -> None:
    """2 ranks on the 100-bill BillSum sample (text -> summary): best model by ROUGE-L."""
    data = shared_data / "billsum" / "us_train_sample_100.jsonl"
    model = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "out"
    result = run_ok([*horovodrun(2), HVDFT, "train", "seq2seq", "--model", str(model), "--train-file", str(data),
                     "--validation-file", str(data), "--test-file", str(data), "--max-eval-samples", "6",
                     "--max-test-samples", "6",
                     "--max-steps", "4", "--eval-every", "4", "--batch-size", "4", "--max-source-length", "96",
                     "--max-target-length", "24", "--num-beams", "1", "--max-new-tokens", "16", "--lr", "1e-3",
                     "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out)], timeout=900)
    assert "data: summarization, default metric rougeL" in result.output
    assert f"{data}: 100 of 100 sources cut to --max-source-length 96" in result.output
    results = json.loads((out / "all_results.json").read_text())
    # --max-eval-samples 6: the evaluations during training (the best is kept) saw 6 bills;
    # the best model's final eval_rougeL covers all 100
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_rougeL" in r]
    assert evals and results["best_eval_metric"] == max(r["eval_rougeL"] for r in evals)
    assert "evaluation during training: the first 6 of 100 validation examples" in result.output
    header, rows = read_tsv(out / "test_predictions.tsv")
    bills = jsonl(data)[:6]
    assert [r[1] for r in rows] == [b["summary"] for b in bills], "references as read (CRLF file), in input order"


@pytest.mark.slow
def test_translation_smoke_on_tatoeba(shared_data: Path, tmp_path: Path) -> None:
    """2 ranks on eng-fra.txt, French -> English named by the file's languages."""
    data = shared_data / "tatoeba_en_fr" / "eng-fra.txt"
    model = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "out"
    result = run_ok([*horovodrun(2), HVDFT, "train", "seq2seq", "--model", str(model), "--train-file", str(data),
                     "--test-file", str(data), "--source-lang", "fra", "--target-lang", "eng",
                     "--max-train-samples", "64", "--max-test-samples", "7", "--max-steps", "3", "--batch-size", "8",
                     "--max-target-length", "24", "--num-beams", "1", "--max-new-tokens", "8",
                     "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out)], timeout=900)
    assert "data: train 64, test 7" in result.output
    lines = data.read_text(encoding="utf-8").splitlines()[:7]
    _, rows = read_tsv(out / "test_predictions.tsv")
    assert [r[:2] for r in rows] == [line.split("\t")[::-1][:2] for line in lines]
