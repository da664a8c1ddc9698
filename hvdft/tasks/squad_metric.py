"""The official SQuAD v1.1 and v2.0 measures (exact match and token F1), written once.

Why hand-written: no maintained PyPI package scores SQuAD offline. Hugging Face `evaluate`
loads its `squad` / `squad_v2` metric scripts from the Hub at run time (checked:
`evaluate.load("squad")` fails offline with "Module 'squad' doesn't exist on the Hugging Face
Hub"), and `torchmetrics.text.SQuAD` covers v1.1 only, with v2.0's F1 rule for empty
answers (it gives F1 = 1 where v1.1 gives 0 when both the prediction and a reference
normalise to nothing).

The two functions follow the official scripts line by line:
- v1.1: `evaluate-v1.1.py` (Rajpurkar et al., 2016; https://rajpurkar.github.io/SQuAD-explorer/,
  "Evaluation Script v1.1"): EM and F1 per question, each the max over the references,
  averaged over questions, in percent.
- v2.0: `evaluate-v2.0.py` (Rajpurkar, Jia & Liang, 2018; same site, "Evaluation Script v2.0"):
  references that normalise to nothing are dropped, a question with none has the single
  reference "" (only the empty prediction is right), F1 is 1/0 when either side is empty;
  `HasAns_*` / `NoAns_*` break-downs; with no-answer probabilities (`na_probs`, any score
  where higher means "no answer" is likelier) it also sweeps the threshold: `best_exact`,
  `best_f1` and the thresholds reaching them.

Answer normalisation (both): lower-case, ASCII punctuation removed, the articles a/an/the
removed, whitespace collapsed.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop articles, collapse whitespace (official order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


# ----------------------------------------------------------------------------- v1.1


def f1_v1(prediction: str, reference: str) -> float:
    """Token F1 of `evaluate-v1.1.py`: 0 when no normalised token is shared (also both empty)."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal (both scripts)."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def squad_v1(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict[str, float]:
    """`exact_match` and `f1` in percent over every question of `references` (id -> answers).

    A question without a prediction scores 0, as in the official script (which prints
    "Unanswered question ... will receive score 0"). Raises ValueError on a question with no
    reference answer (the v1.1 measure has no rule for it) or when `references` is empty.
    """
    if not references:
        raise ValueError("no questions to score")
    em = f1 = 0.0
    for qid, answers in references.items():
        if not answers:
            raise ValueError(f"question {qid!r} has no reference answer (SQuAD v1.1 needs one)")
        if qid not in predictions:
            continue
        pred = predictions[qid]
        em += max(exact_match(pred, a) for a in answers)
        f1 += max(f1_v1(pred, a) for a in answers)
    n = len(references)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n, "total": float(n)}


# ----------------------------------------------------------------------------- v2.0


def _tokens_v2(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def f1_v2(prediction: str, reference: str) -> float:
    """Token F1 of `evaluate-v2.0.py`: when either side is empty, 1 if both are, else 0."""
    pred_tokens = _tokens_v2(prediction)
    ref_tokens = _tokens_v2(reference)
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def raw_scores_v2(
    references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-question EM and F1 (0/1 and 0..1) of the predictions that exist (`get_raw_scores`)."""
    exact: dict[str, float] = {}
    f1: dict[str, float] = {}
    for qid, answers in references.items():
        gold = [a for a in answers if normalize_answer(a)] or [""]
        if qid not in predictions:
            continue  # the official script skips it ("Missing prediction for ...")
        pred = predictions[qid]
        exact[qid] = max(exact_match(pred, a) for a in gold)
        f1[qid] = max(f1_v2(pred, a) for a in gold)
    return exact, f1


def _apply_threshold(
    scores: dict[str, float], na_probs: Mapping[str, float], has_answer: Mapping[str, bool], threshold: float
) -> dict[str, float]:
    return {
        qid: (float(not has_answer[qid]) if na_probs.get(qid, 0.0) > threshold else s) for qid, s in scores.items()
    }


def best_threshold(
    predictions: Mapping[str, str],
    scores: Mapping[str, float],
    na_probs: Mapping[str, float],
    has_answer: Mapping[str, bool],
) -> tuple[float, float]:
    """(best score in percent, threshold): `find_best_thresh` of `evaluate-v2.0.py`.

    Start from "every question answered with no answer", then, in increasing `na_probs`
    order, let each question keep its predicted answer; the best running total wins. The
    prediction used for a question is `predictions[qid]` (pass the best non-null spans to
    find the threshold a decoder should use).
    """
    score = best = float(sum(1 for v in has_answer.values() if not v))
    thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_answer[qid]:
            diff = scores[qid]
        else:
            diff = -1.0 if predictions[qid] else 0.0
        score += diff
        if score > best:
            best, thresh = score, na_probs[qid]
    return 100.0 * best / len(scores), thresh


def squad_v2(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_threshold: float = 1.0,
    sweep_predictions: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """The v2.0 measure, in percent: `exact_match`, `f1`, `total`, `HasAns_*`, `NoAns_*`.

    references: id -> reference answers ([] for an unanswerable question).
    predictions: id -> answer ("" predicts no answer).
    na_probs: id -> no-answer score (default 0.0 for all: as the script without
        `--na-prob-file`). A question whose score is above `na_prob_threshold` counts as
        answered with no answer (the script's `--na-prob-thresh`, default 1.0).
    With `na_probs` given, also `best_exact`, `best_exact_thresh`, `best_f1`,
    `best_f1_thresh`, swept over `sweep_predictions` (default: `predictions`).
    The official keys `exact`/`f1` are named `exact_match`/`f1` here, as in v1.1.
    A question without a prediction is left out of `total` (official) and counts 0 in its
    HasAns/NoAns subset (where the official script stops with a KeyError).
    Raises ValueError when `references` is empty.
    """
    if not references:
        raise ValueError("no questions to score")
    has_answer = {qid: bool(answers) for qid, answers in references.items()}
    probs = dict(na_probs) if na_probs is not None else {qid: 0.0 for qid in predictions}
    exact_raw, f1_raw = raw_scores_v2(references, predictions)
    exact = _apply_threshold(exact_raw, probs, has_answer, na_prob_threshold)
    f1 = _apply_threshold(f1_raw, probs, has_answer, na_prob_threshold)

    def block(qids: list[str]) -> tuple[float, float, float]:
        # make_eval_dict: the denominator is the number of questions listed (the whole set:
        # every scored question), so a missing prediction lowers only the subset sums.
        n = len(qids)
        return (100.0 * sum(exact.get(q, 0.0) for q in qids) / n,
                100.0 * sum(f1.get(q, 0.0) for q in qids) / n, float(n))

    out: dict[str, float] = {}
    scored = list(exact)
    n = len(scored)
    out["exact_match"] = 100.0 * sum(exact.values()) / n if n else 0.0
    out["f1"] = 100.0 * sum(f1.values()) / n if n else 0.0
    out["total"] = float(n)
    for name, wanted in (("HasAns", True), ("NoAns", False)):
        qids = [q for q, v in has_answer.items() if v is wanted]
        if qids:
            out[f"{name}_exact"], out[f"{name}_f1"], out[f"{name}_total"] = block(qids)
    if na_probs is not None and n:
        swept = sweep_predictions if sweep_predictions is not None else predictions
        if sweep_predictions is not None:
            exact_raw, f1_raw = raw_scores_v2(references, swept)
        out["best_exact"], out["best_exact_thresh"] = best_threshold(swept, exact_raw, probs, has_answer)
        out["best_f1"], out["best_f1_thresh"] = best_threshold(swept, f1_raw, probs, has_answer)
    return out
