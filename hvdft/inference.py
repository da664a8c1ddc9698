"""`hvdft predict` and `hvdft eval`: the training code's reading, batching and gathering,
applied to a finished model folder. Sharded over the ranks like training."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hvdft import dist
from hvdft.checkpoint import RUN_FILE
from hvdft.data.files import Shard
from hvdft.data.prepare import tokenize
from hvdft.errors import HvdftError
from hvdft.evaluate import Evaluator
from hvdft.models import resolve_model
from hvdft.setup import report_counts
from hvdft.tasks import task_class, task_of_model
from hvdft.tasks.base import Task


@dataclass
class Loaded:
    task: Task
    model: Any
    tokenizer: Any
    evaluator: Evaluator
    max_length: int


def load_model(model_dir: str, overrides: dict[str, Any], encoding: str, batch_size: int, precision: str) -> Loaded:
    """A model folder written by `hvdft train`, with its task built from the options it was
    trained with (hvdft_run.json) and `overrides` (the command line's, where given).

    Raises HvdftError on every rank for a folder that is not a fine-tuned model, or an
    option the task does not have.
    """
    from transformers import AutoConfig, AutoTokenizer

    def load() -> tuple[Task, Any, Any, int | None]:
        path = resolve_model(model_dir)
        try:
            config = AutoConfig.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
        except (OSError, ValueError) as exc:
            raise HvdftError(f"cannot load model: {exc}".splitlines()[0], model_dir) from None
        heads = ("TokenClassification", "SequenceClassification", "QuestionAnswering")
        has_head = getattr(config, "hvdft_task", None) or any(a.endswith(heads) for a in config.architectures or [])
        if not has_head:
            raise HvdftError("not a fine-tuned model (no task head in config.json)", model_dir)
        cls = task_class(task_of_model(config))
        task = cls(_task_options(cls, Path(path), overrides), encoding)
        model = task.model_class().from_pretrained(path, config=config)
        return task, model, tokenizer, _saved_config(Path(path)).get("max_length")

    task, model, tokenizer, trained = dist.agree(load)
    model.to(dist.device())
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    limit = min(getattr(model.config, "max_position_embeddings", 512) or 512, tokenizer.model_max_length or 512)
    trained = trained or task.default_max_length
    max_length = min(limit, int(trained)) if trained else limit  # the windows the model was evaluated on in training
    dist.agree(lambda: task.prepare(model.config, tokenizer, max_length))
    evaluator = Evaluator(task, model, id2label, batch_size, tokenizer.pad_token_id or 0, precision)
    return Loaded(task, model, tokenizer, evaluator, max_length)


def _saved_config(folder: Path) -> dict[str, Any]:
    """The options the model was trained with (hvdft_run.json), or {} for a folder without it."""
    if not (folder / RUN_FILE).exists():
        return {}
    return json.loads((folder / RUN_FILE).read_text()).get("config", {})


def _task_options(cls: type[Task], folder: Path, overrides: dict[str, Any]) -> Any:
    """The task options saved with the model, then the given overrides."""
    names = {f.name for f in fields(cls.Options)}
    saved = {k: v for k, v in _saved_config(folder).items() if k in names}
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in names:
            raise HvdftError(f"--{key.replace('_', '-')} does not apply to a '{cls.name}' model")
        saved[key] = value
    return cls.Options(**saved)


def predict_file(model_dir: str, input_file: str, output_file: str, batch_size: int, precision: str,
                 encoding: str, **overrides: Any) -> None:
    """Predict every example of `input_file`; rank 0 writes them in input order."""
    run = load_model(model_dir, overrides, encoding, batch_size, precision)
    shard = Shard(dist.rank(), dist.size())
    split = dist.agree(lambda: run.task.read_unlabelled(input_file, shard))
    label2id = {v: k for k, v in run.evaluator.id2label.items()}
    features = tokenize(run.task, split, run.tokenizer, label2id, run.max_length)
    report_counts(run.task, split, features, run.max_length)
    merged, _ = run.evaluator.predict_shard(split, features, with_loss=False)
    ordered = dist.gather_in_order(split.ids, list(zip(split.examples, merged, strict=True)))
    if ordered is not None:
        run.task.write_unlabelled_predictions(Path(output_file), [e for e, _ in ordered], [p for _, p in ordered])
        print(f"{len(ordered)} predictions written to {output_file}", flush=True)


def evaluate_file(model_dir: str, data_file: str, output_dir: str | None, batch_size: int, precision: str,
                  encoding: str, **overrides: Any) -> None:
    """Score the model on labelled data; rank 0 prints the report and, with `output_dir`, writes it,
    the metrics and the task's predictions files for 'eval' (QA: predictions.json, nbest_predictions.json)."""
    run = load_model(model_dir, overrides, encoding, batch_size, precision)
    shard = Shard(dist.rank(), dist.size())
    split = dist.agree(lambda: run.task.read(data_file, "eval", shard))
    label2id = {v: k for k, v in run.evaluator.id2label.items()}
    features = tokenize(run.task, split, run.tokenizer, label2id, run.max_length)
    report_counts(run.task, split, features, run.max_length)
    result = run.evaluator(split, features)
    if dist.is_main():
        text = "\n".join(f"{k}: {v:.4f}" for k, v in result.metrics.items()) + "\n\n" + result.report
        print(text, flush=True)
        if output_dir:
            out = Path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval_report.txt").write_text(text)
            (out / "eval_results.json").write_text(json.dumps(result.metrics, indent=2, sort_keys=True))
            run.task.write_predictions(out, "eval", result.examples or [], result.predictions or [])
