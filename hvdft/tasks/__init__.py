"""Tasks plug into the shared engine through the small `Task` interface in `base`.

A new task is one module here plus one line in TASKS: its CLI command (`hvdft train
NAME`), options and help are derived from the class.
"""

from __future__ import annotations

import importlib
from typing import Any

from hvdft.tasks.base import Task

# name -> "module:class"
TASKS = {
    "ner": "hvdft.tasks.ner:NerTask",
    "classify": "hvdft.tasks.classify:ClassifyTask",
    "qa": "hvdft.tasks.qa:QaTask",
    "re": "hvdft.tasks.relation:RelationTask",
    "seq2seq": "hvdft.tasks.seq2seq:Seq2seqTask",
}


def task_class(name: str) -> type[Task]:
    """The Task class registered under `name` (ValueError for an unknown one)."""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}' (known: {', '.join(TASKS)})")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_task(name: str, options: Any = None, encoding: str = "utf-8") -> Task:
    """An instance of the task `name` with these options (its defaults when None)."""
    return task_class(name)(options, encoding)


def task_of_model(config: object) -> str:
    """Which task a saved model folder was trained for (hvdft writes it in the config)."""
    task = getattr(config, "hvdft_task", None)
    if task:
        return str(task)
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "QuestionAnswering" in archs:
        return "qa"
    return "classify" if "SequenceClassification" in archs else "ner"
