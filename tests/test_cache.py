"""The tokenized-data cache is keyed on the code that made the features.

A copy of the hvdft package, placed first on PYTHONPATH, trains one step twice with one
--cache-dir: the second run reuses the features. Then the copy's task module is edited
(one comment line: the engine cannot tell a harmless edit from a changed `featurize`, so
any edit must count) and the third run must featurize again: features made by older
code are never used.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from support import ROOT, job_env, make_tiny_model, run_ok, sentences, write_conll

pytestmark = pytest.mark.slow


def test_an_edited_task_module_is_never_served_old_features(tmp_path: Path) -> None:
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "hvdft", copy / "hvdft", ignore=shutil.ignore_patterns("__pycache__"))
    env = job_env(PYTHONPATH=str(copy))
    where = run_ok([sys.executable, "-c", "import hvdft.tasks.ner as m; print(m.__file__)"], timeout=120, env=env,
                   cwd=tmp_path)  # not the repository: python puts the working directory first
    task_module = Path(where.stdout.strip())
    assert task_module.is_relative_to(copy), "the copy must be the hvdft that runs"

    model = make_tiny_model(tmp_path / "tiny")
    train = write_conll(tmp_path / "train.txt", sentences(8, seed=51))
    valid = write_conll(tmp_path / "valid.txt", sentences(4, seed=52))
    cache = tmp_path / "cache"

    def train_once(name: str) -> set[str]:
        run_ok([sys.executable, "-m", "hvdft", "train", "ner", "--model", str(model), "--train-file", str(train),
                "--validation-file", str(valid), "--max-steps", "1", "--max-length", "32",
                "--cache-dir", str(cache), "--output-dir", str(tmp_path / name)], timeout=300, env=env, cwd=tmp_path)
        return {p.name for p in cache.glob("*.arrow")}

    first = train_once("one")
    assert len(first) == 2, first  # train and validation
    assert train_once("two") == first, "an unchanged run must reuse its features"
    with open(task_module, "a", encoding="utf-8") as f:
        f.write("\n# edited: featurize may differ now\n")
    third = train_once("three")
    assert len(third - first) == 2, f"the edited task module got the old features: {sorted(third)}"
