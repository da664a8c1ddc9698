"""`hvdft predict` and `hvdft eval`: the training code's reading, batching and gathering,
applied to a finished model folder. Sharded over the ranks like training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hvdft import dist
from hvdft.data.prepare import tokenize
from hvdft.errors import HvdftError
from hvdft.evaluate import evaluate, predict_shard
from hvdft.models import resolve_model
from hvdft.tasks import get_task, task_of_model


def _load_model(model_dir: str) -> tuple[Any, Any, Any, dict[int, str], int]:
    from transformers import AutoConfig, AutoTokenizer

    def load() -> tuple[Any, Any, Any]:
        path = resolve_model(model_dir)
        try:
            config = AutoConfig.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
        except (OSError, ValueError) as exc:
            raise HvdftError(f"cannot load model: {exc}".splitlines()[0], model_dir) from None
        heads = ("TokenClassification", "SequenceClassification")
        has_head = getattr(config, "hvdft_task", None) or any(a.endswith(heads) for a in config.architectures or [])
        if not has_head:
            raise HvdftError("not a fine-tuned classification model (no task head in config.json)", model_dir)
        task = get_task(task_of_model(config))
        model = task.model_class().from_pretrained(path, config=config)
        return task, model, tokenizer

    task, model, tokenizer = dist.agree(load)
    model.to(dist.device())
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    limit = min(getattr(model.config, "max_position_embeddings", 512) or 512, tokenizer.model_max_length or 512)
    return task, model, tokenizer, id2label, limit


def predict_file(model_dir: str, input_file: str, output_file: str, batch_size: int, precision: str,
                 text_column: str | None, text_pair_column: str | None, encoding: str) -> None:
    task, model, tokenizer, id2label, max_length = _load_model(model_dir)
    opts = {"text_column": text_column, "text_pair_column": text_pair_column, "encoding": encoding}
    split = dist.agree(lambda: task.read_unlabelled(input_file, dist.rank(), dist.size(), opts))
    label2id = {v: k for k, v in id2label.items()}
    features = tokenize(task, split, tokenizer, label2id, max_length)
    pad_id = tokenizer.pad_token_id or 0
    merged, _ = predict_shard(task, model, split, features, id2label, batch_size, pad_id, precision)
    gathered = dist.allgather_object(list(zip(split.ids, split.examples, merged, strict=True)))
    if dist.is_main():
        ordered = sorted((item for part in gathered for item in part), key=lambda item: item[0])
        task.write_unlabelled_predictions(Path(output_file), [e for _, e, _ in ordered], [p for _, _, p in ordered])
        print(f"{len(ordered)} predictions written to {output_file}", flush=True)


def evaluate_file(model_dir: str, data_file: str, output_dir: str | None, batch_size: int, precision: str,
                  text_column: str | None, text_pair_column: str | None, label_column: str | None,
                  encoding: str) -> None:
    task, model, tokenizer, id2label, max_length = _load_model(model_dir)
    opts = {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column,
            "encoding": encoding}
    split = dist.agree(lambda: task.read(data_file, "eval", dist.rank(), dist.size(), opts))
    label2id = {v: k for k, v in id2label.items()}
    features = tokenize(task, split, tokenizer, label2id, max_length)
    result = evaluate(task, model, split, features, id2label, batch_size, tokenizer.pad_token_id or 0, precision)
    if dist.is_main():
        text = "\n".join(f"{k}: {v:.4f}" for k, v in result.metrics.items()) + "\n\n" + result.report
        print(text, flush=True)
        if output_dir:
            out = Path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval_report.txt").write_text(text)
            (out / "eval_results.json").write_text(json.dumps(result.metrics, indent=2, sort_keys=True))
