"""Seeing a run (issue 17 A): --report-to tensorboard/mlflow, `hvdft plot`, the model card,
--horovod-timeline.

Fast tests drive hvdft.tracking, hvdft.plots and hvdft.modelcard directly; the slow one
runs `hvdft train ner --report-to all --horovod-timeline` on 2 Horovod ranks and reads what it
left with independent readers: TensorBoard's own EventAccumulator, MLflow's client,
matplotlib's PNG decoder, huggingface_hub's ModelCard, and json for the timeline.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
from support import HVDFT, horovodrun, job_env, make_tiny_model, run, sentences, write_conll

from hvdft.errors import HvdftError


def event_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a TensorBoard log folder, read by TensorBoard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def png_check(path: Path, min_size: tuple[int, int] = (400, 250)) -> None:
    """A PNG that decodes, is at least min_size pixels, and holds a picture (not one flat
    colour: many distinct colours, and ink on a good part of the canvas)."""
    import matplotlib.image
    import numpy as np

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = matplotlib.image.imread(str(path))
    height, width = pixels.shape[:2]
    assert width >= min_size[0] and height >= min_size[1], (path, pixels.shape)
    rgb = (pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 20, f"{path}: hardly any colours"
    ink = (rgb.min(axis=1) < 200).mean()  # not white-ish
    assert 0.02 < ink < 0.9, f"{path}: {ink:.1%} of the pixels drawn"


# ----------------------------------------------------------------------------- tracking


def test_tracker_keys_are_the_hf_trainers() -> None:
    from hvdft.tracking import scalars

    record = {"step": 5, "epoch": 0.5, "loss": 0.7, "lr": 1e-4, "grad_norm": None, "tokens_per_second": 100.0}
    assert scalars(record) == {"train/epoch": 0.5, "train/loss": 0.7, "train/learning_rate": 1e-4,
                               "train/tokens_per_second": 100.0}
    assert scalars({"step": 5, "eval_f1": 0.5, "eval_loss": float("nan"), "test_accuracy": 1}) == {
        "eval/f1": 0.5, "test/accuracy": 1.0}


def test_missing_tracker_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from hvdft.config import TrainConfig

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
    with pytest.raises(HvdftError, match=r"^--report-to tensorboard needs the tensorboardX package: "
                                         r"pip install 'hvdft\[tensorboard\]'$"):
        TrainConfig(train_file="x", report_to="all").validate()
    TrainConfig(train_file="x", report_to="mlflow").validate()


def test_missing_extra_is_a_one_line_error_before_training(tmp_path: Path) -> None:
    stub = tmp_path / "stub" / "mlflow"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError(\"No module named 'mlflow'\")\n")
    proc = run([HVDFT, "train", "ner", "--train-file", str(tmp_path / "absent.txt"), "--report-to", "mlflow",
                "--output-dir", str(tmp_path / "out")], timeout=120, check=False,
               env=job_env(PYTHONPATH=str(tmp_path / "stub")))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("hvdft: error: --report-to mlflow needs the mlflow package: "
                                   "pip install 'hvdft[mlflow]'")
    assert not (tmp_path / "out").exists()


def test_resumed_tensorboard_log_has_each_step_once(tmp_path: Path) -> None:
    """A resumed run logs the steps after its checkpoint again: TensorBoard must show the
    new values, each step once (tensorboardX's purge_step)."""
    from hvdft.tracking import Trackers, _TensorBoard

    first = Trackers([_TensorBoard(tmp_path, {"lr": 1}, None)])
    for step in range(1, 6):
        first.log({"step": step, "loss": float(step)})
    first.writers[0].close()  # killed after step 5; the checkpoint was at step 3
    again = Trackers([_TensorBoard(tmp_path, {"lr": 1}, 3)])
    for step in range(4, 7):
        again.log({"step": step, "loss": 10.0 * step})
    again.finish({"test_f1": 0.5}, 6)
    series = event_scalars(tmp_path / "runs")
    assert series["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    assert series["test/f1"] == [(6, 0.5)]
    fresh = Trackers([_TensorBoard(tmp_path, {"lr": 2}, None)])  # --overwrite-output-dir: a new run
    fresh.log({"step": 1, "loss": 7.0})
    fresh.finish({}, 1)
    assert event_scalars(tmp_path / "runs")["train/loss"] == [(1, 7.0)]
    assert len(list((tmp_path / "runs").iterdir())) == 3  # one file per start: none overwritten


def test_resumed_mlflow_run_continues_the_same_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from hvdft.tracking import Trackers, _MLflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hvdft-test")
    first = Trackers([_MLflow(tmp_path, {"lr": 1e-4, "optimizer": "sgd"}, None)])
    first.log({"step": 1, "loss": 2.0})
    again = Trackers([_MLflow(tmp_path, {"lr": 1e-4, "optimizer": "sgd"}, 1)])
    again.log({"step": 2, "loss": 1.0})
    run_id = again.writers[0].run_id
    again.finish({"test_f1": 0.25, "train_loss": 1.5}, 2)
    assert first.writers[0].run_id == run_id
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    run_ = client.get_run(run_id)
    assert run_.info.status == "FINISHED" and run_.data.params["optimizer"] == "sgd"
    history = client.get_metric_history(run_.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]
    assert run_.data.metrics["test/f1"] == 0.25


def test_a_tracker_that_cannot_start_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hvdft.tracking import open_tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(HvdftError, match=r"^--report-to mlflow: cannot start: \w+"):
        open_tracker("mlflow", tmp_path, {"lr": 1}, None)


def test_a_failing_tracker_is_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from hvdft.tracking import Trackers

    class Broken:
        name = "mlflow"

        def log(self, values: dict, step: int) -> None:
            raise ConnectionError("tracking server gone")

    trackers = Trackers([Broken()])
    trackers.log({"step": 1, "loss": 1.0})
    trackers.log({"step": 2, "loss": 1.0})
    assert trackers.writers == []
    warnings = [r.getMessage() for r in caplog.records if "switched off" in r.getMessage()]
    assert warnings == ["--report-to mlflow failed (ConnectionError: tracking server gone); "
                        "it is switched off for the rest of this run"]


# ----------------------------------------------------------------------------- plots


def synthetic_metrics(folder: Path, steps: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(1, steps + 1):
        lines.append({"step": s, "epoch": s / 10, "loss": 2.0 * math.exp(-s / 10) + 0.1 * math.sin(s),
                      "lr": 1e-4 * min(1.0, s / 4) * (steps - s) / steps, "grad_norm": 1.0 + 0.5 * math.cos(s / 3),
                      "tokens_per_second": 1000 + 50 * math.sin(s / 2)})
        if s % 10 == 0:
            k = s // 10 - 1
            lines.append({"step": s, "eval_f1": [0.5, 0.8, 0.7, 0.75][k], "eval_loss": [1.0, 0.6, 0.5, 0.7][k],
                          "eval_sentences": 100.0})
    lines_text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 41, "lo'  # a line cut by a kill
    (folder / "metrics.jsonl").write_text(lines_text)
    return folder


def test_plots_are_pictures_with_the_best_point_marked(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from hvdft.plots import panels, read_metrics, smooth, write_plots

    run_dir = synthetic_metrics(tmp_path / "run")
    written = write_plots(run_dir)
    names = sorted(p.name for p in written)
    assert names == sorted(["loss.png", "learning_rate.png", "tokens_per_second.png", "grad_norm.png",
                            "eval_f1.png", "eval_loss.png", "overview.png"])  # no plot of a count
    for path in written:
        png_check(path)
    # the best point: highest f1 at step 20, lowest loss at step 30
    train, evals = read_metrics(run_dir / "metrics.jsonl")
    for panel in panels(train, evals):
        if panel.name in ("eval_f1", "eval_loss"):
            ax = Figure().add_subplot()
            panel.draw(ax)
            star = [line for line in ax.lines if line.get_marker() == "*"]
            assert len(star) == 1
            assert list(star[0].get_xdata()) == ([20] if panel.name == "eval_f1" else [30])
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # debiased: no pull towards 0
    assert smooth([4.0, 0.0], 0.5) == pytest.approx([4.0, 4.0 / 3.0])


def test_hvdft_plot_command(tmp_path: Path) -> None:
    run_dir = synthetic_metrics(tmp_path / "run")
    proc = run([HVDFT, "plot", str(run_dir), "--output-dir", str(tmp_path / "png")], timeout=120)
    printed = sorted(Path(line).name for line in proc.stdout.split())
    assert printed == sorted(p.name for p in (tmp_path / "png").iterdir())
    assert (tmp_path / "png" / "overview.png").exists()
    missing = run([HVDFT, "plot", str(tmp_path / "nothing")], timeout=120, check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip() == (f"hvdft: error: {tmp_path / 'nothing' / 'metrics.jsonl'}: cannot read the "
                                      "run's metrics: No such file or directory")


# ----------------------------------------------------------------------------- model card


def test_model_card_metadata_and_body(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from hvdft.evaluate import Evaluation
    from hvdft.modelcard import hub_model_id, write_model_card
    from hvdft.tasks import get_task

    run_info = {"config": {"model": "minilm", "dataset": "wnut17", "lr": 5e-5, "scale_lr": "none", "epochs": 3.0,
                           "batch_size": 16, "grad_accum": 2, "precision": "bf16", "optimizer": "nesterov",
                           "momentum": 0.9, "allreduce_op": "average", "seed": 1},
                "labels": ["O", "B-PER", "I-PER"], "world_size": 4, "model_path": "/x"}
    results = {"global_batch_size": 128, "train_steps": 100, "learning_rate": 5e-5, "test_f1": 0.5, "epoch": 3.0}
    reports = {"eval": Evaluation({"f1": 0.61, "precision": 0.7, "loss": 0.3, "sentences": 10.0}, "EVAL REPORT"),
               "test": Evaluation({"f1": 0.5, "precision": 0.6, "loss": 0.4, "sentences": 12.0}, "TEST REPORT")}
    path = write_model_card(tmp_path, get_task("ner"), results, reports, run_info, "my-ner")
    card = ModelCard.load(path)
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert card.data.datasets == ["leondz/wnut_17"]
    assert card.data.pipeline_tag == "token-classification" and "hvdft" in card.data.tags
    assert card.data.labels == ["O", "B-PER", "I-PER"]
    found = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert found == {("validation", "f1"): 0.61, ("validation", "precision"): 0.7, ("test", "f1"): 0.5,
                     ("test", "precision"): 0.6}
    assert card.data.model_name == "my-ner"
    chained = tmp_path / "v1"  # --init-from a model hvdft trained: its base model is named
    chained.mkdir()
    (chained / "hvdft_run.json").write_text(json.dumps({"config": {"model": "minilm"}}))
    assert hub_model_id(str(chained)) == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_model_id("bert-base-cased") == "bert-base-cased" and hub_model_id(str(tmp_path)) is None
    for text in ("| ranks (world size) | 4 |", "| global batch | 128 |", "| precision | bf16 |",
                 "| optimizer | nesterov (momentum 0.9) |", "EVAL REPORT", "TEST REPORT", "| Horovod |",
                 '"token-classification", model="PATH/TO/THIS/FOLDER", aggregation_strategy="simple"'):
        assert text in card.text, text


# ----------------------------------------------------------------------------- 2 ranks


@pytest.mark.slow
def test_two_rank_run_reports_everything(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "tiny")
    train = write_conll(tmp_path / "train.txt", sentences(48, seed=5))
    valid = write_conll(tmp_path / "valid.txt", sentences(16, seed=6))
    out, timeline = tmp_path / "out", tmp_path / "trace" / "timeline.json"
    env = job_env(MLFLOW_EXPERIMENT_NAME="hvdft-test")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = run([*horovodrun(), HVDFT, "train", "ner", "--model", str(model), "--train-file", str(train),
                "--validation-file", str(valid), "--test-file", str(valid), "--epochs", "2", "--batch-size", "4",
                "--max-length", "32", "--lr", "3e-3", "--log-every", "1", "--eval-every", "4", "--report-to", "all",
                "--horovod-timeline", str(timeline), "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out)],
               timeout=900, env=env)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    f1s = [(r["step"], r["eval_f1"]) for r in records if "eval_f1" in r]
    assert [s for s, _ in losses] == list(range(1, 13)) and [s for s, _ in f1s] == [4, 8, 12]
    results = json.loads((out / "all_results.json").read_text())

    # TensorBoard: one event file (rank 0 alone), the logged values
    assert len(list((out / "runs").glob("events.out.tfevents.*"))) == 1
    series = event_scalars(out / "runs")
    assert [s for s, _ in series["train/loss"]] == [s for s, _ in losses]
    assert [v for _, v in series["train/loss"]] == pytest.approx([v for _, v in losses], rel=1e-6)
    assert [v for _, v in series["eval/f1"]] == pytest.approx([v for _, v in f1s], rel=1e-6)
    assert series["test/f1"] == [(12, pytest.approx(results["test_f1"], rel=1e-6))]
    assert {"train/learning_rate", "train/grad_norm", "train/tokens_per_second"} <= set(series)

    # MLflow: the store inside the output folder
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    saved = json.loads((out / "mlflow_run.json").read_text())
    assert saved["tracking_uri"] == (out / "mlruns").resolve().as_uri()
    client = MlflowClient(saved["tracking_uri"])
    mlrun = client.get_run(saved["run_id"])
    assert mlrun.info.status == "FINISHED" and mlrun.data.params["world_size"] == "2"
    history = sorted((m.step, m.value) for m in client.get_metric_history(saved["run_id"], "train/loss"))
    assert [s for s, _ in history] == [s for s, _ in losses]
    assert [v for _, v in history] == pytest.approx([v for _, v in losses], rel=1e-9)

    # curves, written at the end of training
    for name in ("loss", "learning_rate", "tokens_per_second", "grad_norm", "eval_f1", "eval_loss", "overview"):
        png_check(out / "plots" / f"{name}.png")

    # the model card
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    test_f1 = [r.metric_value for r in card.data.eval_results if (r.dataset_split, r.metric_type) == ("test", "f1")]
    assert test_f1 == [round(results["test_f1"], 4)]
    id2label = json.loads((out / "config.json").read_text())["id2label"]
    assert card.data.labels == [id2label[str(i)] for i in range(len(id2label))]
    for text in ("| ranks (world size) | 2 |", "| global batch | 8 |", "Horovod controller gloo",
                 "hvdft train ner --model", "## Report (test)"):
        assert text in card.text, text

    # the timeline: rank 0's Chrome trace of every rank's allreduces
    text = timeline.read_text()
    events = json.loads(text.rstrip().rstrip(",") + ("" if text.rstrip().endswith("]") else "]"))
    names = {e.get("name") for e in events}
    assert "NEGOTIATE_ALLREDUCE" in names and "ALLREDUCE" in names, sorted(n for n in names if n)[:20]
    assert any("classifier.weight" in str(e.get("args", {}).get("name", "")) for e in events if e.get("ph") == "M")
    assert "model, reports and predictions written" in proc.stdout
