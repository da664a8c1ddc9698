"""Experiment trackers (`--report-to none|tensorboard|mlflow|all`): rank 0 sends every
metrics.jsonl record, and the final test figures, to TensorBoard and/or MLflow.

Keys are named as the Hugging Face Trainer names them: `train/loss`,
`train/learning_rate`, `train/grad_norm`, `train/tokens_per_second`, `train/epoch`,
`eval/<metric>`, `test/<metric>`; the step is the optimizer step.

- TensorBoard: event files under OUTPUT_DIR/runs/, written by tensorboardX (numpy,
  protobuf and packaging: no TensorFlow, and lighter than torch.utils.tensorboard, which
  needs the whole `tensorboard` package with its web server). A resumed run hides the
  events past its checkpoint, and a fresh run those of an earlier run in the folder, as
  metrics.jsonl is cut or rewritten. `tensorboard --logdir OUTPUT_DIR/runs` shows them.
- MLflow: MLFLOW_TRACKING_URI when set (a tracking server, a database); by default a store
  inside the output folder, OUTPUT_DIR/mlruns. That is MLflow's file store: the
  `mlflow-skinny` client writes it with no database dependencies, but MLflow 3 accepts it
  only with MLFLOW_ALLOW_FILE_STORE=true (its SQLite store needs the full `mlflow`
  package: SQLAlchemy, Alembic, Flask, pyarrow...), which hvdft sets for that folder
  alone. Experiment MLFLOW_EXPERIMENT_NAME (default "hvdft"), run name = the output
  folder's name; a resumed run continues the same MLflow run (OUTPUT_DIR/mlflow_run.json).

A tracker that fails while training (a tracking server gone) is reported once and
dropped: a long run is not lost to its dashboard.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from hvdft import dist
from hvdft.errors import HvdftError

log = logging.getLogger("hvdft")

REPORT_TO = ("none", "tensorboard", "mlflow", "all")
# backend -> (module it imports, the extra that installs it)
EXTRAS = {"tensorboard": ("tensorboardX", "hvdft[tensorboard]"), "mlflow": ("mlflow", "hvdft[mlflow]")}
MLFLOW_RUN_FILE = "mlflow_run.json"


def backends(report_to: str) -> list[str]:
    """The trackers `--report-to` names ("all": every one)."""
    return list(EXTRAS) if report_to == "all" else [] if report_to == "none" else [report_to]


def require(report_to: str) -> None:
    """Raise HvdftError naming the extra to install when a tracker's package is missing.
    Checked on every rank alike, before Horovod starts."""
    for name in backends(report_to):
        module, extra = EXTRAS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise HvdftError(f"--report-to {name} needs the {module} package: pip install '{extra}'") from None


def tracker_key(key: str) -> str:
    """A metrics.jsonl/all_results.json key as the HF Trainer's trackers name it
    ("eval_f1" -> "eval/f1", "loss" -> "train/loss", "lr" -> "train/learning_rate")."""
    for prefix in ("eval", "test"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return "train/" + {"lr": "learning_rate"}.get(key, key)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers under tracker keys ("step" and None values left out)."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[tracker_key(key)] = float(value)
    return out


class Trackers:
    """Rank 0's trackers (none elsewhere). `start` opens them, `log` sends a record,
    `finish` sends the final test/train figures and closes them."""

    def __init__(self, writers: list[Any]) -> None:
        self.writers = writers

    @classmethod
    def start(cls, report_to: str, output_dir: Path, info: dict[str, Any], resumed_at: int | None) -> Trackers:
        """Collective: rank 0 opens the trackers (an error there stops every rank).
        `info`: the run description (hvdft_run.json: its options become the parameters);
        `resumed_at`: the checkpoint step of a resumed run (None for a fresh one)."""
        writers: list[Any] = []
        params = {**info.get("config", {}), **{k: v for k, v in info.items() if k != "config"}}

        dist.main_only(lambda: writers.extend(open_tracker(n, output_dir, params, resumed_at)
                                              for n in backends(report_to)))
        return cls(writers)

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record (a training log line or an evaluation) at its step."""
        values = scalars(record)
        if values:
            self._each("log", values, int(record["step"]))

    def finish(self, results: dict[str, Any], step: int) -> None:
        """The run's summary (test/*, train/train_loss, ...) at the last step; close."""
        final = {k: v for k, v in results.items() if k.startswith(("test_", "train_"))}
        values = scalars(final)
        if values:
            self._each("log", values, step)
        self.close()

    def close(self) -> None:
        """Close every tracker; later records go nowhere."""
        self._each("close")
        self.writers = []

    def _each(self, method: str, *args: Any) -> None:
        for writer in list(self.writers):
            try:
                getattr(writer, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a dashboard must not end a training run
                log.warning("--report-to %s failed (%s: %s); it is switched off for the rest of this run",
                            writer.name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                self.writers.remove(writer)


def open_tracker(name: str, output_dir: Path, params: dict[str, Any], resumed_at: int | None) -> Any:
    """One tracker, opened. Raises HvdftError (one line) when it cannot start: a tracking
    server away, a store that cannot be written."""
    try:
        return _BACKENDS[name](output_dir, params, resumed_at)
    except Exception as exc:  # noqa: BLE001 - whatever the backend raises
        detail = (str(exc).splitlines() or [""])[0][:300]
        raise HvdftError(f"--report-to {name}: cannot start: {type(exc).__name__}: {detail}") from None


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, output_dir: Path, params: dict[str, Any], resumed_at: int | None) -> None:
        from tensorboardX import SummaryWriter

        # purge_step: events at or past it in earlier files of this folder are hidden: the
        # steps a resumed run trains again, or all of an earlier run that a fresh one
        # replaces (--overwrite-output-dir), as metrics.jsonl is cut or rewritten.
        purge = resumed_at + 1 if resumed_at is not None else 0
        # The file name has the time in whole seconds: a run resumed within the same second
        # would overwrite the last one's file without a finer suffix.
        self.writer = SummaryWriter(logdir=str(output_dir / "runs"), purge_step=purge, flush_secs=30,
                                    filename_suffix=f".{time.time_ns()}")
        if resumed_at is None:
            self.writer.add_text("config", "```\n" + json.dumps(params, indent=2, default=str) + "\n```", 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps every logged point

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, output_dir: Path, params: dict[str, Any], resumed_at: int | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (output_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") and "MLFLOW_TRACKING_URI" not in os.environ:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # the default store; see the module docstring
        self.client = MlflowClient(uri)
        saved = output_dir / MLFLOW_RUN_FILE
        self.run_id = _previous_run(self.client, saved, uri) if resumed_at is not None else None
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "hvdft")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run = self.client.create_run(experiment_id, run_name=output_dir.resolve().name,
                                         tags={"hvdft.output_dir": str(output_dir.resolve())})
            self.run_id = run.info.run_id
            # MLflow keeps a parameter's first value: log them once, when the run is created.
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
            saved.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}))
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


def _previous_run(client: Any, saved: Path, uri: str) -> str | None:
    """The MLflow run a resumed training logged to, if it is in this tracking store."""
    try:
        previous = json.loads(saved.read_text())
        if previous.get("tracking_uri") == uri:
            return client.get_run(previous["run_id"]).info.run_id
    except Exception:  # noqa: BLE001 - no file, another store, a deleted run: start a new one
        pass
    return None


_BACKENDS = {"tensorboard": _TensorBoard, "mlflow": _MLflow}
