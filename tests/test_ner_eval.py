"""Sharded evaluation: what rank 0 gathers from 2 ranks equals a 1-process evaluation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from support import ROOT, horovodrun, run

SCRIPT = str(ROOT / "tests" / "scripts" / "eval_gather.py")


@pytest.mark.slow
def test_gathered_seqeval_equals_single_process(tmp_path: Path) -> None:
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run([sys.executable, SCRIPT, str(one)], timeout=300)
    run([*horovodrun(), sys.executable, SCRIPT, str(two)], timeout=300)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert len(b["gold"]) == 61, "every sentence of every rank reaches rank 0, in input order"
    assert b["gold"] == a["gold"]
    assert b["predictions"] == a["predictions"]
    gold, pred = b["gold"], b["predictions"]
    assert [len(g) for g in gold] == [len(p) for p in pred], "a prediction for every word"
    assert b["metrics"]["f1"] > 0, "the seeded head predicts some entities right"
    for m in ("precision", "recall", "f1", "f1_macro", "accuracy"):
        assert b["metrics"][m] == a["metrics"][m]
    # fp32 logits of a sentence padded within other batches differ in the last bits
    assert b["metrics"]["loss"] == pytest.approx(a["metrics"]["loss"], rel=1e-6)
    assert b["metrics"]["f1"] == pytest.approx(f1_score(gold, pred), abs=1e-12)
    assert b["metrics"]["precision"] == pytest.approx(precision_score(gold, pred), abs=1e-12)
    assert b["metrics"]["recall"] == pytest.approx(recall_score(gold, pred), abs=1e-12)
    assert b["report"] == classification_report(gold, pred, digits=4, zero_division=0)
