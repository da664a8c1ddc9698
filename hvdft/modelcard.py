"""OUTPUT_DIR/README.md: a Hugging Face Hub model card, so that the output folder is ready
to publish (`huggingface-cli upload NAME OUTPUT_DIR`).

The YAML metadata (base_model, datasets, pipeline_tag, tags, labels, and `model-index`
with the validation and test scores) is built and serialised by huggingface_hub's
`ModelCardData`/`EvalResult`, which install with transformers and work offline; the body
(results, labels, hyperparameters, world size, global batch, precision, versions, the
command line, the per-type reports, how to load the model) is plain Markdown written here.
"""

from __future__ import annotations

import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvdft import __version__, dist

if TYPE_CHECKING:
    from hvdft.evaluate import Evaluation
    from hvdft.tasks.base import Task

# Offline short names -> the Hub model they are a copy of.
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
# Bundled data sets -> their Hub id.
HUB_DATASETS = {"wnut17": "leondz/wnut_17"}
SPLIT_NAMES = {"eval": "validation", "test": "test"}
COUNTS = ("sentences", "examples", "samples", "words", "loss")  # not scores


def hub_model_id(model: str, depth: int = 0) -> str | None:
    """The Hub id a `--model`/`--init-from` value stands for: itself for a Hub id, the
    original of an offline short name, for a local folder that hvdft wrote the base model of
    its own run (hvdft_run.json); None when unknown."""
    if model in HUB_IDS:
        return HUB_IDS[model]
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        run = path / "hvdft_run.json"
        if depth < 8 and run.is_file():
            import json

            try:
                config = json.loads(run.read_text()).get("config", {})
            except (OSError, ValueError):
                return None
            return hub_model_id(config.get("init_from") or config.get("model") or "", depth + 1)
        return None
    return model or None


def data_description(config: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """(Hub dataset ids for the metadata, split -> where it came from)."""
    dataset = config.get("dataset")
    hub = []
    if dataset:
        if dataset in HUB_DATASETS:
            hub.append(HUB_DATASETS[dataset])
        elif not Path(dataset).exists():
            hub.append(dataset)
    sources = {}
    for split, key in (("train", "train_file"), ("validation", "validation_file"), ("test", "test_file")):
        given = config.get(key)
        if given:
            sources[split] = Path(given).name
        elif dataset:
            sources[split] = f"{dataset} ({split})"
    return hub, sources


def command_line() -> str:
    """This process's command, as typed (`hvdft train ...`)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("hvdft", "__main__.py"):
        return shlex.join(["hvdft", *argv[1:]])
    return shlex.join(argv)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def _scores(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k not in COUNTS and isinstance(v, (int, float))}


def card_data(name: str, task: Task, reports: dict[str, Evaluation], run: dict[str, Any]) -> Any:
    """The metadata block, as huggingface_hub's ModelCardData."""
    from huggingface_hub import EvalResult, ModelCardData

    config = run.get("config", {})
    hub_datasets, sources = data_description(config)
    results = []
    for prefix, ev in reports.items():
        split = SPLIT_NAMES[prefix]
        # model-index wants a Hub dataset id as the type: local files are typed "local"
        data_type, data_name = ((hub_datasets[0],) * 2 if hub_datasets else ("local", sources.get(split, split)))
        for metric, value in _scores(ev.metrics).items():
            results.append(EvalResult(task_type=task.pipeline, dataset_type=data_type, dataset_name=data_name,
                                      dataset_split=split, metric_type=metric, metric_value=round(float(value), 4)))
    base = hub_model_id(config.get("init_from") or config.get("model") or "")
    extra: dict[str, Any] = {"labels": list(run.get("labels", []))} if run.get("labels") else {}
    return ModelCardData(
        model_name=name, base_model=base, datasets=hub_datasets or None, library_name="transformers",
        pipeline_tag=task.pipeline, tags=["hvdft", "horovod", task.pipeline], eval_results=results or None,
        metrics=sorted({r.metric_type for r in results}) or None, **extra,
    )


def card_body(name: str, task: Task, results: dict[str, Any], reports: dict[str, Evaluation],
              run: dict[str, Any]) -> str:
    """The Markdown under the metadata."""
    config = run.get("config", {})
    world = run.get("world_size", results.get("world_size", 1))
    _, sources = data_description(config)
    base = config.get("init_from") or config.get("model")
    lines = [f"# {name}", "",
             f"`{base}` fine-tuned for {task.pipeline} with hvdft: data-parallel training on {world} Horovod "
             f"rank(s), global batch {results.get('global_batch_size')}.", ""]
    if config.get("init_from"):
        lines += [f"Continued from the fine-tuned model `{config['init_from']}` (`--init-from`): its labels kept "
                  "their ids and classifier rows.", ""]
    lines += _results_table(reports)
    if run.get("labels"):
        lines += ["## Labels", "", "| id | label |", "|---|---|"]
        lines += [f"| {i} | {label} |" for i, label in enumerate(run["labels"])] + [""]
    lines += ["## Training", "", "| | |", "|---|---|"]
    metric = config.get("metric") or task.default_metric
    lines += [f"| {k} | {v} |" for k, v in _hyperparameters(config, results, world, sources, metric)] + [""]
    lines += ["Command line (each rank):", "", "```bash", command_line(), "```", "",
              f"Launched on {world} rank(s); Horovod controller {_controller()}.", ""]
    lines += ["## Versions", "", "| hvdft | Horovod | torch | transformers | Python |", "|---|---|---|---|---|",
              f"| {__version__} | {_version('horovod')} | {_version('torch')} | {_version('transformers')} "
              f"| {platform.python_version()} |", ""]
    for prefix, ev in reports.items():
        lines += [f"## Report ({SPLIT_NAMES[prefix]})", "", "```", ev.report.rstrip(), "```", ""]
    grouping = ', aggregation_strategy="simple"' if task.pipeline == "token-classification" else ""
    usage = task.usage_code or ("from transformers import pipeline\n\n"
                                f'pipe = pipeline("{task.pipeline}", model="PATH/TO/THIS/FOLDER"{grouping})')
    lines += ["## Use", "", "```python", usage, "```", ""]
    return "\n".join(lines)


def _results_table(reports: dict[str, Evaluation]) -> list[str]:
    if not reports:
        return []
    names = sorted({k for ev in reports.values() for k in _scores(ev.metrics)})
    lines = ["## Results", "", "| split | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for prefix, ev in reports.items():
        cells = [f"{ev.metrics[k]:.4f}" if k in ev.metrics else "" for k in names]
        lines.append(f"| {SPLIT_NAMES[prefix]} | " + " | ".join(cells) + " |")
    return lines + [""]


def _hyperparameters(config: dict[str, Any], results: dict[str, Any], world: int, sources: dict[str, str],
                     metric: str) -> list[tuple[str, Any]]:
    optimizer = config.get("optimizer", "adamw")
    momentum = config.get("momentum")
    rows = [
        ("training data", ", ".join(f"{k}: `{v}`" for k, v in sources.items()) or "-"),
        ("training examples", results.get("train_samples")),
        ("optimizer", optimizer + (f" (momentum {momentum:g})" if momentum is not None else "")),
        ("learning rate (peak)", f"{results.get('learning_rate', config.get('lr')):g} (given {config.get('lr'):g}, "
                                 f"scaled: {config.get('scale_lr', 'none')})"),
        ("schedule", f"linear warm-up over {config.get('warmup_ratio', 0):g} of the steps, then linear decay"),
        ("weight decay", config.get("weight_decay")),
        ("epochs", f"{results.get('epoch')} of {config.get('epochs')}"),
        ("optimizer steps", results.get("train_steps")),
        ("batch per rank", config.get("batch_size")),
        ("ranks (world size)", world),
        ("gradient accumulation", config.get("grad_accum")),
        ("global batch", results.get("global_batch_size")),
        ("precision", config.get("precision")),
        ("allreduce", f"{config.get('allreduce_op')}{', fp16 compression' if config.get('fp16_allreduce') else ''}"),
        ("max length", config.get("max_length") or "the model's"),
        ("dropout", "on" if config.get("dropout", True) else "off"),
        ("max grad norm", config.get("max_grad_norm")),
        ("seed", config.get("seed")),
        ("best model", f"step {results.get('best_step')} by validation {metric}"
         if results.get("best_step") is not None else "the last step"),
        ("training time", f"{results.get('train_runtime', 0):.0f} s"),
    ]
    return [(k, v) for k, v in rows if v is not None]


def _controller() -> str:
    try:
        return dist.controller()
    except Exception:  # noqa: BLE001 - written outside a Horovod job (tests)
        return "-"


def write_model_card(folder: Path, task: Task, results: dict[str, Any], reports: dict[str, Evaluation],
                     run: dict[str, Any], name: str) -> Path:
    """Write folder/README.md (metadata + body); returns its path."""
    from huggingface_hub import ModelCard

    data = card_data(name, task, reports, run)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(name, task, results, reports, run)}")
    path = folder / "README.md"
    card.save(path)
    return path
