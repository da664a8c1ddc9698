"""The official SQuAD v1.1 / v2.0 measures against values computed by hand."""

from __future__ import annotations

import pytest

from hvdft.tasks.squad_metric import (
    best_threshold,
    exact_match,
    f1_v1,
    f1_v2,
    normalize_answer,
    squad_v1,
    squad_v2,
)


def test_normalisation_lowercases_drops_punctuation_articles_and_extra_spaces():
    assert normalize_answer("The  Quick,\tbrown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    # articles only as whole words; punctuation goes before articles ("the-end" -> "theend")
    assert normalize_answer("theatre the-end") == "theatre theend"
    assert normalize_answer("«Paris»") == "«paris»"  # only ASCII punctuation is removed (official)
    assert normalize_answer(" the ") == ""


def test_f1_by_hand():
    # pred tokens [cat, sat], reference [cat, sat, down]: P = 1, R = 2/3, F1 = 0.8
    assert f1_v1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # repeated tokens are counted with multiplicity: [a?] -> [big, big, dog] vs [big, dog]:
    # common = {big: 1, dog: 1} = 2, P = 2/3, R = 1, F1 = 0.8
    assert f1_v1("big big dog", "big dog") == pytest.approx(0.8)
    assert f1_v1("red", "blue") == 0.0
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0


def test_v1_and_v2_differ_only_on_answers_that_normalise_to_nothing():
    # v1.1: no shared token -> F1 0 even when both sides are empty; EM compares "" == "".
    assert f1_v1("the", "a") == 0.0
    assert exact_match("the", "a") == 1.0
    # v2.0: either side empty -> 1 if both are.
    assert f1_v2("the", "a") == 1.0
    assert f1_v2("", "Paris") == 0.0
    assert f1_v2("the cat sat", "a cat sat down") == pytest.approx(0.8)


def test_squad_v1_max_over_references_and_mean_in_percent():
    refs = {"q1": ["Paris", "the city of Paris"], "q2": ["1990s"], "q3": ["blue"]}
    preds = {"q1": "Paris", "q2": "in the 1990s"}  # q3 unanswered: scores 0 (official)
    # q1: EM 1, F1 1. q2: "in 1990s" vs "1990s": EM 0, P = 1/2, R = 1, F1 = 2/3. q3: 0, 0.
    out = squad_v1(refs, preds)
    assert out["exact_match"] == pytest.approx(100 / 3)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert out["total"] == 3
    with pytest.raises(ValueError, match="no reference answer"):
        squad_v1({"q": []}, {"q": ""})


V2_REFS = {"a": ["Paris"], "b": ["blue whale"], "c": [], "d": []}
V2_PREDS = {"a": "Paris", "b": "whale", "c": "", "d": "something"}
V2_NA = {"a": 0.1, "b": 0.5, "c": 0.9, "d": 0.2}


def test_squad_v2_by_hand_without_threshold():
    out = squad_v2(V2_REFS, V2_PREDS)
    # a: 1/1. b: EM 0, F1 2/3 (P 1, R 1/2). c: "" for no answer: 1/1. d: answered: 0/0.
    assert out["exact_match"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0) / 4)
    assert out["HasAns_exact"] == pytest.approx(50.0)
    assert out["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert out["NoAns_exact"] == out["NoAns_f1"] == pytest.approx(50.0)
    assert out["HasAns_total"] == out["NoAns_total"] == 2
    assert "best_f1" not in out  # no no-answer scores: no sweep (the script without --na-prob-file)


def test_squad_v2_threshold_and_sweep_by_hand():
    # threshold 0.3: b (0.5) and c (0.9) count as "no answer": a 1, b 0, c 1, d ("something") 0.
    out = squad_v2(V2_REFS, V2_PREDS, na_probs=V2_NA, na_prob_threshold=0.3)
    assert out["exact_match"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx(50.0)
    # sweep (F1): start with all "no answer" = 2 (c, d); by na: a +1 -> 3 (best, 0.1),
    # d -1 -> 2, b +2/3 -> 2.67, c 0 -> 2.67. best 3/4.
    assert out["best_f1"] == pytest.approx(75.0)
    assert out["best_f1_thresh"] == pytest.approx(0.1)
    assert out["best_exact"] == pytest.approx(75.0)
    assert out["best_exact_thresh"] == pytest.approx(0.1)


def test_best_threshold_keeps_answers_when_they_help():
    refs = {"a": ["x"], "b": ["y"], "c": []}
    preds = {"a": "x", "b": "y", "c": ""}
    scores = {"a": 1.0, "b": 1.0, "c": 1.0}
    has = {k: bool(v) for k, v in refs.items()}
    # start 1 (c); a +1 -> 2; b +1 -> 3 at thresh 5.0; c: pred "" -> +0
    best, thresh = best_threshold(preds, scores, {"a": -2.0, "b": 5.0, "c": 7.0}, has)
    assert best == pytest.approx(100.0)
    assert thresh == 5.0
