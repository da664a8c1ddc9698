"""Continual fine-tuning (`--init-from DIR`): train a model already fine-tuned for this task
again, on new data, without losing what it knows.

- The labels the model knows keep their ids and their classifier rows, bit for bit.
- Labels found only in the new training data are appended after them: new classifier
  rows, initialised as a fresh head is (normal, std = the config's initializer_range;
  bias 0), and reported by name.
- A label the model knows but the new data lacks stays in the label set, so the model can
  still predict it (and validation/test files that hold it are scored against it).
- Nothing is silently re-initialised: every weight the model needs must be in DIR.
  (transformers' `ignore_mismatched_sizes=True` would instead drop the whole head when the
  label count changes, and a plain `from_pretrained` of a folder without a head quietly
  draws a random one.)

The model is loaded with its own label count, checked, then its output layer grown.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hvdft import dist
from hvdft.errors import HvdftError
from hvdft.tasks import task_of_model
from hvdft.tasks.base import Task

log = logging.getLogger("hvdft")


@dataclass
class Prior:
    """The model `--init-from` names: its folder, task and labels (id order)."""

    path: str
    task: Task
    labels: list[str]  # the model's id2label, in id order
    new: list[str] = field(default_factory=list)  # set by `extend`: labels only the new data has
    absent: list[str] = field(default_factory=list)  # set by `extend`: labels the new data lacks

    @classmethod
    def read(cls, folder: str, task: Task) -> Prior:
        """Read DIR's config. Raises HvdftError when DIR holds no model, a model of
        another task, or (for tasks with labels) no label names."""
        from transformers import AutoConfig

        path = Path(folder).expanduser()
        if not (path / "config.json").is_file():
            raise HvdftError("--init-from: holds no model (no config.json)", path)
        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise HvdftError(f"--init-from: cannot read the model's config: {exc}".splitlines()[0], path) from None
        known = getattr(config, "hvdft_task", None) or (task_of_model(config) if config.architectures else None)
        if known is not None and known != task.name:
            raise HvdftError(f"--init-from: holds a '{known}' model, this is 'hvdft train {task.name}'", path)
        labels: list[str] = []
        if task.has_labels:
            id2label = {int(k): v for k, v in (config.id2label or {}).items()}
            if sorted(id2label) != list(range(len(id2label))) or not id2label:
                raise HvdftError("--init-from: the model's config has no label names (id2label)", path)
            labels = [id2label[i] for i in range(len(id2label))]
        return cls(str(path), task, labels)

    def extend(self, data_labels: list[str]) -> list[str]:
        """The run's label set: the model's labels in their ids, then the training data's
        new ones in the task's order. Raises HvdftError when the two share no label
        (another label scheme or task)."""
        if not self.task.has_labels:
            return data_labels
        known = set(self.labels)
        if data_labels and not known & set(data_labels):
            raise HvdftError(f"--init-from: none of the model's labels ({_names(self.labels)}) occur in the "
                             f"training data ({_names(data_labels)}): was it fine-tuned on these labels?", self.path)
        self.new = [label for label in data_labels if label not in known]
        self.absent = [label for label in self.labels if label not in set(data_labels)]
        return self.labels + self.new

    def report(self) -> None:
        """Rank 0 names the new labels (fresh rows) and the known ones the data lacks."""
        if not dist.is_main() or not self.task.has_labels:
            return
        first = len(self.labels)
        grown = (f"new, with fresh classifier rows {first}-{first + len(self.new) - 1}: {', '.join(self.new)}"
                 if self.new else "no new label")
        log.info("--init-from %s: its %d labels keep their ids and classifier rows; %s", self.path, first, grown)
        if self.absent:
            log.info("--init-from: labels the model knows that this training data lacks stay predictable: %s",
                     ", ".join(self.absent))

    def build(self, path: str, config: Any, tokenizer: Any, **load_kwargs: Any) -> Any:
        """`Task.build_model` for DIR: loaded with its own labels, checked complete, the
        output layer grown to `config`'s labels; the model's config becomes `config`."""
        own = copy.deepcopy(config)
        if self.task.has_labels:
            own.num_labels = len(self.labels)
            own.id2label = dict(enumerate(self.labels))
            own.label2id = {label: i for i, label in enumerate(self.labels)}
        model = self.task.build_model(path, own, tokenizer, **load_kwargs)
        missing = missing_weights(model, Path(path))
        if missing:
            raise HvdftError(f"--init-from: the folder lacks {len(missing)} of the model's weights "
                             f"({', '.join(missing[:3])}): it would be initialised at random. Give a fine-tuned "
                             "model folder (a pretrained base model goes in --model)", path)
        if self.task.has_labels and config.num_labels > len(self.labels):
            std = getattr(config, "initializer_range", 0.02)
            extend_classifier(model, len(self.labels), config.num_labels, std)
            model.config.num_labels = config.num_labels
            model.config.id2label, model.config.label2id = dict(config.id2label), dict(config.label2id)
            if hasattr(model, "num_labels"):
                model.num_labels = config.num_labels
        self.report()
        return model


def _names(labels: list[str], at_most: int = 6) -> str:
    return ", ".join(labels[:at_most]) + (f", ... ({len(labels)} in all)" if len(labels) > at_most else "")


def stored_weight_names(folder: Path) -> set[str]:
    """The tensor names in a model folder's safetensors (or pytorch_model*.bin) files."""
    names: set[str] = set()
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as st:
                names.update(st.keys())
        return names
    for f in sorted(folder.glob("pytorch_model*.bin")):
        names.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
    return names


def missing_weights(model: torch.nn.Module, folder: Path) -> list[str]:
    """The model's parameters and persistent buffers that `folder` does not store, apart
    from weights tied to a stored one (an output embedding tied to the input's). A folder
    saved from the bare encoder stores its names without the encoder's prefix ("bert.")."""
    stored = stored_weight_names(folder)
    prefix = (getattr(model, "base_model_prefix", "") or "\0") + "."
    state = model.state_dict(keep_vars=True)
    present = {name for name in state if name in stored or name.removeprefix(prefix) in stored}
    tied = {id(state[name]) for name in present}
    return sorted(name for name, tensor in state.items() if name not in present and id(tensor) not in tied)


def classifier_layer(model: torch.nn.Module, rows: int) -> tuple[str, torch.nn.Linear]:
    """The output layer of a task head: the one Linear outside the encoder with `rows`
    outputs (BERT's `classifier`, RoBERTa's `classifier.out_proj`, ...). Raises HvdftError
    when there is none or more than one."""
    encoder = getattr(model, "base_model_prefix", "") or "\0"
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m.out_features == rows and not name.startswith(encoder + ".")]
    if len(found) != 1:
        raise HvdftError(f"--init-from: cannot tell the classifier layer with {rows} outputs "
                         f"({len(found)} candidates: {', '.join(n for n, _ in found) or 'none'})")
    return found[0]


def extend_classifier(model: torch.nn.Module, old: int, new: int, std: float) -> str:
    """Grow the output layer from `old` to `new` rows (classes): rows [0, old) are copied
    exactly, rows [old, new) are drawn from N(0, std) with bias 0, as transformers
    initialises a fresh BERT-style head. Returns the layer's name.

    Shapes: weight [old, hidden] -> [new, hidden], bias [old] -> [new].
    """
    name, layer = classifier_layer(model, old)
    grown = torch.nn.Linear(layer.in_features, new, bias=layer.bias is not None,
                            device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        grown.weight.normal_(0.0, std)
        grown.weight[:old] = layer.weight
        if layer.bias is not None:
            grown.bias.zero_()
            grown.bias[:old] = layer.bias
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, grown)
    return name
