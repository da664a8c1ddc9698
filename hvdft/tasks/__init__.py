"""Tasks plug into the shared loop through the small `Task` interface in `base`."""

from __future__ import annotations

from hvdft.tasks.base import Task


def get_task(name: str) -> Task:
    if name == "ner":
        from hvdft.tasks.ner import NerTask

        return NerTask()
    if name == "classify":
        from hvdft.tasks.classify import ClassifyTask

        return ClassifyTask()
    raise ValueError(f"unknown task '{name}'")


def task_of_model(config: object) -> str:
    """Which task a saved model folder was trained for (hvdft writes it in the config)."""
    task = getattr(config, "hvdft_task", None)
    if task:
        return str(task)
    archs = " ".join(getattr(config, "architectures", None) or [])
    return "classify" if "SequenceClassification" in archs else "ner"
