"""Extractive question answering (SQuAD v1.1 / v2.0): reading, doc-stride windows, n-best decoding.

The pieces, each a plain function the task class calls:
- reading: the official nested SQuAD JSON (v1.1, and v2.0 with `is_impossible` /
  `plausible_answers`), the Hub's flat `squad` / `squad_v2` rows as JSON lines (or a JSON
  array), and a loaded Hub `datasets.Dataset`. A rank parses and validates only its own
  questions (strided by question index, in file order); contexts are kept byte for byte
  (answer offsets index the raw text, and SQuADShifts contexts end in "\\n").
- features (`featurize`): question + context windows of `max_length` tokens overlapping by
  `doc_stride` context tokens (transformers' `stride`, as `run_qa.py`), the first
  reference answer located through the offset mapping, windows that do not hold all of it
  labelled at the CLS index. Tokenizers that pad on the left get context first (as
  `run_qa.py`); offsets index the raw context whatever the tokenizer family.
- decoding (`window_candidates`, `best_answer`): the n-best (start, end) pairs of each
  window, mapped back to context characters, best over all windows of a question; for
  v2.0 the null score (CLS start + end logits, the lowest over the windows) against the
  best span with `null_score_diff_threshold`.
- loss (`qa_loss`): (CE(start) + CE(end)) / 2 per window, SUMMED over the windows; padded
  positions are masked so the loss does not depend on how a batch is padded.
- scoring: `hvdft.tasks.squad_metric` (the official v1.1 / v2.0 measures).
- writers: `predictions.json` (`{id: answer}`, the official format), `nbest_predictions.json`,
  `null_odds.json` (v2.0; the official script's `--na-prob-file`), and JSON lines for
  `hvdft predict`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from hvdft.config import option
from hvdft.data.files import Shard, Split, iter_table_rows, read_lines
from hvdft.errors import HvdftError
from hvdft.tasks import squad_metric
from hvdft.tasks.base import Task


@dataclass
class QaOptions:
    """`hvdft train qa` options (the window length itself is the engine's --max-length)."""

    doc_stride: int = option(128, "Context tokens shared by consecutive windows of a long context "
                             "(transformers' `stride`, as run_qa.py's --doc_stride).", at_least=0, must_match=True)
    max_query_length: int = option(64, "Questions longer than this many tokens are cut (as BERT's run_squad.py).",
                                   at_least=1, must_match=True)
    n_best_size: int = option(20, "Start and end candidates per window, and answers kept per question.",
                              at_least=1)
    max_answer_length: int = option(30, "Longest answer, in tokens.", at_least=1)
    version_2_with_negative: bool = option(False, "SQuAD 2.0: questions may have no answer.", must_match=True)
    null_score_diff_threshold: float = option(0.0, "SQuAD 2.0: answer nothing when the null score exceeds the "
                                              "best span's score by more than this.")
    id_column: str = option("id", "Question id column of flat (JSON lines) files.")
    question_column: str = option("question", "Question column of flat files.")
    context_column: str = option("context", "Context column of flat files.")
    answers_column: str = option("answers", "Answers column of flat files ({text: [...], answer_start: [...]}).")


# ============================================================================ reading


def _clip(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def make_example(
    qid: str,
    question: Any,
    context: Any,
    texts: list[Any],
    starts: list[Any],
    *,
    title: str = "",
    is_impossible: bool | None = None,
    version_2: bool = False,
    labelled: bool = True,
    source: str | Path = "",
    line: int | None = None,
) -> dict[str, Any]:
    """One validated question: {id, title, question, context, answers{text, answer_start}, line}.

    Raises HvdftError (one line: source, line if any, question id, cause) for an empty or
    non-text context or question, an answer whose `answer_start` does not index its text
    in the context, `is_impossible` with answers, and, for labelled v1.1 data, a question
    without answers. Unlabelled questions keep no answers. The context is never stripped.
    """

    def fail(cause: str) -> HvdftError:
        return HvdftError(f"question '{qid}': {cause}", source, line)

    if not isinstance(context, str) or not context.strip():
        raise fail("empty context" if isinstance(context, str) or context is None
                   else f"the context is a {type(context).__name__}, expected text")
    if not isinstance(question, str) or not question.strip():
        raise fail("empty question" if isinstance(question, str) or question is None
                   else f"the question is a {type(question).__name__}, expected text")
    answers: dict[str, list] = {"text": [], "answer_start": []}
    if labelled:
        if len(texts) != len(starts):
            raise fail(f"{len(texts)} answer texts but {len(starts)} answer_start values")
        for n, (text, start) in enumerate(zip(texts, starts, strict=True), 1):
            if not isinstance(text, str) or not text:
                raise fail(f"answer {n} has no text")
            if isinstance(start, bool) or not isinstance(start, int):
                raise fail(f"answer {n}: answer_start {start!r} is not an integer")
            found = context[start : start + len(text)] if start >= 0 else ""
            if found != text:
                raise fail(
                    f"answer {n}: answer_start {start} does not index its text: the context there "
                    f"reads {_clip(found)}, the answer is {_clip(text)}"
                )
            answers["text"].append(text)
            answers["answer_start"].append(start)
        if is_impossible and answers["text"]:
            raise fail("is_impossible is true but the question has answers")
        if not answers["text"] and not version_2:
            hint = " (SQuAD 2.0 data: pass --version-2-with-negative)" if is_impossible else ""
            raise fail(f"no answer: SQuAD v1.1 needs one per question{hint}")
    return {"id": qid, "title": title, "question": question, "context": context,
            "answers": answers, "line": line}


def _answers_of(value: Any, qid: str, source: str | Path, line: int | None, column: str) -> tuple[list, list]:
    """(texts, starts) from {text: [...], answer_start: [...]} (the Hub's layout) or [{text, answer_start}]."""
    if isinstance(value, dict) and "text" in value and "answer_start" in value:
        texts, starts = value["text"], value["answer_start"]
        if isinstance(texts, list) and isinstance(starts, list):
            return texts, starts
    if isinstance(value, list) and all(isinstance(a, dict) and "text" in a and "answer_start" in a for a in value):
        return [a["text"] for a in value], [a["answer_start"] for a in value]
    raise HvdftError(
        f"question '{qid}': column '{column}' must be {{\"text\": [...], \"answer_start\": [...]}} "
        "or a list of {\"text\", \"answer_start\"} objects",
        source,
        line,
    )


def _load_nested(path: str | Path, encoding: str) -> dict[str, Any] | None:
    """The file as nested SQuAD JSON ({"data": [...]}), or None when it is flat rows."""
    text = "\n".join(read_lines(path, encoding))
    if not text.lstrip().startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        first = text.lstrip().split("\n", 1)[0]
        try:  # one JSON object per line: JSON lines, whose reader reports errors by line
            json.loads(first)
            return None
        except json.JSONDecodeError:
            raise HvdftError(f"invalid JSON: {exc.msg}", path, exc.lineno) from None
    if isinstance(obj, dict) and "data" in obj:
        if not isinstance(obj["data"], list):
            raise HvdftError("'data' must be a list of articles (SQuAD JSON)", path)
        return obj
    return None


def iter_squad_questions(data: dict[str, Any], path: str | Path):
    """(article title, paragraph context, qa dict) for every question of nested SQuAD JSON, in order.

    Checks the structure (articles hold a 'paragraphs' list, paragraphs a 'qas' list of
    objects with an 'id'); the content of each question is checked by `make_example`.
    """
    for a, article in enumerate(data["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise HvdftError(f"article {a} has no 'paragraphs' list (SQuAD JSON)", path)
        title = article.get("title") or ""
        for p, para in enumerate(article["paragraphs"]):
            if not isinstance(para, dict) or not isinstance(para.get("qas"), list):
                raise HvdftError(f"article {a} ('{title}'), paragraph {p} has no 'qas' list", path)
            for qa in para["qas"]:
                if not isinstance(qa, dict) or "id" not in qa:
                    raise HvdftError(f"article {a} ('{title}'), paragraph {p}: a question has no 'id'", path)
                yield title, para.get("context"), qa


def read_squad(
    path: str | Path,
    shard: Shard,
    options: QaOptions | None = None,
    encoding: str = "utf-8",
    split: str = "train",
    labelled: bool = True,
) -> Split:
    """This rank's questions of a SQuAD file: nested SQuAD JSON, or flat rows (JSON lines / JSON array).

    Question i (file order) belongs to the rank where `shard.owns(i)`; only those are
    validated and kept. Question ids must be unique in the file (checked on every rank:
    the ids are read anyway); a flat row without an id gets its index ("0", "1", ...).
    Unlabelled reading (`hvdft predict`) ignores answers. Errors: HvdftError naming the file,
    the line (flat rows) and the question id.
    """
    options = options or QaOptions()
    v2 = options.version_2_with_negative
    nested = _load_nested(path, encoding)
    total, ids, examples = 0, [], []
    seen: dict[str, int] = {}

    def check_id(qid: Any, line: int | None) -> str:
        qid = str(total) if qid is None or qid == "" else str(qid)  # flat rows may have no id column
        if qid in seen:
            raise HvdftError(f"question id '{qid}' repeats (first as question {seen[qid]})", path, line)
        seen[qid] = total
        return qid

    if nested is not None:
        for title, context, qa in iter_squad_questions(nested, path):
            qid = check_id(qa.get("id"), None)
            if shard.owns(total):
                texts, starts = _answers_of(qa.get("answers", []), qid, path, None, "answers") if labelled else ([], [])
                ids.append(total)
                examples.append(make_example(
                    qid, qa.get("question"), context, texts, starts, title=title,
                    is_impossible=qa.get("is_impossible"), version_2=v2, labelled=labelled, source=path,
                ))
            total += 1
    else:
        o = options
        for line, row in iter_table_rows(path, "jsonl", encoding):
            qid = check_id(row.get(o.id_column), line)
            if shard.owns(total):
                needed = [(o.question_column, "question"), (o.context_column, "context")]
                if labelled:
                    needed.append((o.answers_column, "answers"))
                for col, flag in needed:
                    if col not in row:
                        raise HvdftError(
                            f"no column '{col}' (columns: {', '.join(map(str, row))}); use --{flag}-column",
                            path,
                            line,
                        )
                texts, starts = (_answers_of(row[o.answers_column], qid, path, line, o.answers_column)
                                 if labelled else ([], []))
                ids.append(total)
                examples.append(make_example(
                    qid, row[o.question_column], row[o.context_column], texts, starts,
                    title=str(row.get("title") or ""), is_impossible=row.get("is_impossible"), version_2=v2,
                    labelled=labelled, source=path, line=line,
                ))
            total += 1
    if total == 0:
        raise HvdftError("no questions in file" if labelled else "nothing to predict: the file has no questions",
                         path)
    return Split(split, str(path), total, ids, examples)


def read_hub_squad(dataset: Any, split: str, shard: Shard, name: str, options: QaOptions | None = None) -> Split:
    """This rank's questions of one split of a loaded Hub dataset with the `squad` / `squad_v2` columns."""
    o = options or QaOptions()
    source = f"{name}[{split}]"
    columns = list(dataset.column_names)
    if len(dataset) == 0:
        raise HvdftError("no questions in split", source)
    for col, flag in ((o.question_column, "question"), (o.context_column, "context"),
                      (o.answers_column, "answers")):
        if col not in columns:
            raise HvdftError(f"no column '{col}' (columns: {', '.join(columns)}); use --{flag}-column", source)
    ids = [i for i in range(len(dataset)) if shard.owns(i)]
    examples = []
    for gid, row in zip(ids, dataset.select(ids), strict=True):
        qid = str(row[o.id_column]) if o.id_column in columns else str(gid)
        texts, starts = _answers_of(row[o.answers_column], qid, source, None, o.answers_column)
        examples.append(make_example(
            qid, row[o.question_column], row[o.context_column], texts, starts,
            title=str(row.get("title") or ""), version_2=o.version_2_with_negative, source=source,
        ))
    return Split(split, source, len(dataset), ids, examples)


def split_squad(
    data: dict[str, Any], dev_fraction: float, seed: int = 0, unit: str = "article"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train, dev) nested SQuAD JSON split by article or paragraph, never by question.

    Units are shuffled with `random.Random(seed)` and moved to dev until it holds at least
    `dev_fraction` of the questions; both parts keep the file order. Splitting by question
    would leak: the same question text repeats on a paragraph (SQuADShifts: 125-200 times
    per file). With unit="paragraph" each paragraph becomes its own article (title kept).
    """
    if unit not in ("article", "paragraph"):
        raise ValueError(f"unit must be 'article' or 'paragraph', got {unit!r}")
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    articles = data["data"]
    if unit == "article":
        units = [dict(a) for a in articles]
    else:
        units = [{**{k: v for k, v in a.items() if k != "paragraphs"}, "paragraphs": [p]}
                 for a in articles for p in a["paragraphs"]]
    sizes = [sum(len(p["qas"]) for p in u["paragraphs"]) for u in units]
    if len(units) < 2:
        raise ValueError(f"one {unit} only: nothing to split")
    order = list(range(len(units)))
    random.Random(seed).shuffle(order)
    target = dev_fraction * sum(sizes)
    dev: set[int] = set()
    held = 0
    for i in order:
        if held >= target or len(dev) == len(units) - 1:
            break
        dev.add(i)
        held += sizes[i]
    rest = {k: v for k, v in data.items() if k != "data"}
    train = {**rest, "data": [u for i, u in enumerate(units) if i not in dev]}
    dev_part = {**rest, "data": [u for i, u in enumerate(units) if i in dev]}
    return train, dev_part


# ============================================================================ features


def featurize(
    batch: dict[str, list], tokenizer: Any, max_length: int, options: QaOptions | None = None
) -> dict[str, list]:
    """Columnar questions -> columnar windows (one question may give several rows).

    batch: `question`, `context`, `answers` ({text, answer_start}), `example` (local index).
    Rows: `input_ids`, `token_type_ids` (when the tokenizer makes them), `start_positions`,
    `end_positions` (token indices in the unpadded row; both the CLS index when the window
    does not hold the whole first answer, or the question has none), `example`, `length`
    (tokens), `offset_mapping` (per token: (start, end) characters in the context, None for
    question and special tokens) and `cls_index`.
    Questions are left-stripped (leading whitespace only wastes tokens) and cut to
    `max_query_length` tokens, and further so that a window always has more than
    `doc_stride` context tokens. Raises HvdftError for a slow tokenizer (no offset mapping)
    or a window too short for the stride.
    """
    o = options or QaOptions()
    if not getattr(tokenizer, "is_fast", False):
        raise HvdftError("question answering needs a fast tokenizer (for the offset mapping)")
    question_first = tokenizer.padding_side == "right"
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    query_limit = min(o.max_query_length, max_length - specials - o.doc_stride - 1)
    if query_limit < 1:
        raise HvdftError(
            f"--max-length {max_length} leaves no room for a question: a window holds {specials} special "
            f"tokens and more than --doc-stride {o.doc_stride} context tokens (lower --doc-stride, e.g. to "
            f"{max(max_length // 4, 1)})"
        )
    questions = _cut_questions([q.lstrip() for q in batch["question"]], tokenizer, query_limit)
    contexts = list(batch["context"])
    first, second = (questions, contexts) if question_first else (contexts, questions)
    enc = tokenizer(
        first,
        second,
        truncation="only_second" if question_first else "only_first",
        max_length=max_length,
        stride=o.doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )
    context_seq = 1 if question_first else 0
    cls_id = tokenizer.cls_token_id
    out: dict[str, list] = {"input_ids": [], "start_positions": [], "end_positions": [], "example": [],
                            "length": [], "offset_mapping": [], "cls_index": []}
    has_types = "token_type_ids" in enc
    if has_types:
        out["token_type_ids"] = []
    for i, ids in enumerate(enc["input_ids"]):
        k = enc["overflow_to_sample_mapping"][i]
        seq = enc.sequence_ids(i)
        offsets = [tuple(off) if s == context_seq else None for s, off in zip(seq, enc["offset_mapping"][i],
                                                                               strict=True)]
        cls_index = ids.index(cls_id) if cls_id is not None and cls_id in ids else 0
        answers = batch["answers"][k]
        start = end = cls_index
        if answers and answers["text"]:
            start_char = answers["answer_start"][0]
            span = answer_token_span(offsets, start_char, start_char + len(answers["text"][0]))
            if span is not None:
                start, end = span
        out["input_ids"].append(ids)
        if has_types:
            out["token_type_ids"].append(enc["token_type_ids"][i])
        out["start_positions"].append(start)
        out["end_positions"].append(end)
        out["example"].append(batch["example"][k])
        out["length"].append(len(ids))
        out["offset_mapping"].append(offsets)
        out["cls_index"].append(cls_index)
    return out


def _cut_questions(questions: list[str], tokenizer: Any, limit: int) -> list[str]:
    """Questions cut at a token end so that each is at most `limit` tokens."""
    out = list(questions)
    enc = tokenizer(out, add_special_tokens=False, return_offsets_mapping=True)
    for i, ids in enumerate(enc["input_ids"]):
        keep = limit
        n = len(ids)
        while n > limit and keep > 0:  # a cut string can tokenize differently (BPE): cut again
            out[i] = questions[i][: enc["offset_mapping"][i][keep - 1][1]]
            n = len(tokenizer(out[i], add_special_tokens=False)["input_ids"])
            keep -= 1
    return out


def answer_token_span(
    offsets: list[tuple[int, int] | None], start_char: int, end_char: int
) -> tuple[int, int] | None:
    """(first, last) token of the characters [start_char, end_char) in a window, or None.

    offsets: per token, (start, end) characters in the context, None outside it. None when
    the window's context does not hold the whole answer (a window boundary cuts it, or it
    lies in another window). Empty tokens ((k, k): byte-level BPE's lone spaces) never
    start or end a span.
    """
    context = [(j, o) for j, o in enumerate(offsets) if o is not None and o[1] > o[0]]
    if not context or context[0][1][0] > start_char or context[-1][1][1] < end_char:
        return None
    first = next((j for j, o in context if o[1] > start_char), None)
    last = next((j for j, o in reversed(context) if o[0] < end_char), None)
    if first is None or last is None or last < first:
        return None
    return first, last


# ============================================================================ decoding


def window_candidates(
    start_logits: Any,
    end_logits: Any,
    offsets: list[tuple[int, int] | None],
    cls_index: int,
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> dict[str, Any]:
    """The n-best spans of one window: {"null_score": float, "spans": [(score, start_logit, end_logit,
    start_char, end_char), ...]}.

    start_logits / end_logits: this window's logits, shape [tokens] (padding cut off).
    Start and end candidates are the `n_best_size` best context tokens (so question and
    special tokens are never part of a span); a pair is kept when end >= start and it spans
    at most `max_answer_length` tokens. Spans are sorted by score (start + end logit), at
    most `n_best_size`. The null score is the CLS token's start + end logit.
    """
    start = np.asarray(start_logits, dtype=np.float64)
    end = np.asarray(end_logits, dtype=np.float64)
    n = min(len(offsets), len(start), len(end))
    context = np.array([j for j in range(n) if offsets[j] is not None and offsets[j][1] > offsets[j][0]], dtype=int)
    null = float(start[cls_index] + end[cls_index])
    spans: list[tuple[float, float, float, int, int]] = []
    if len(context):
        starts = context[np.argsort(-start[context], kind="stable")[:n_best_size]]
        ends = context[np.argsort(-end[context], kind="stable")[:n_best_size]]
        for s in starts:
            for e in ends:
                if e < s or e - s + 1 > max_answer_length:
                    continue
                spans.append((float(start[s] + end[e]), float(start[s]), float(end[e]),
                              int(offsets[s][0]), int(offsets[e][1])))
        spans.sort(key=lambda x: -x[0])
    return {"null_score": null, "spans": spans[:n_best_size]}


def best_answer(
    context: str,
    pieces: list[dict[str, Any]],
    n_best_size: int = 20,
    version_2: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, Any]:
    """One question's answer from the `window_candidates` of all its windows.

    Returns {"text", "answer_start" (-1 for no answer), "probability", "best_span" (the best
    non-null span's text), "null_score_diff" (v2.0: lowest null score over the windows minus
    the best span's score; None for v1.1), "nbest": [{"text", "answer_start", "score",
    "start_logit", "end_logit", "probability"}]}. Span texts are the exact context characters
    (whitespace at the ends removed: byte-level offsets may include a leading space); a span
    seen in two overlapping windows is kept once, with its best score. v2.0 answers "" when
    null_score_diff > null_score_diff_threshold, and the nbest list holds the null answer too
    (as run_qa.py: n_best_size spans plus the null answer); probabilities are a softmax over the nbest scores.
    """
    found: dict[tuple[int, int], tuple[float, float, float]] = {}
    for piece in pieces:
        for score, s_logit, e_logit, a, b in piece["spans"]:
            while a < b and context[a].isspace():
                a += 1
            while b > a and context[b - 1].isspace():
                b -= 1
            if a < b and ((a, b) not in found or found[(a, b)][0] < score):
                found[(a, b)] = (score, s_logit, e_logit)
    ranked = sorted(found.items(), key=lambda kv: -kv[1][0])[:n_best_size]
    nbest = [{"text": context[a:b], "answer_start": a, "score": sc, "start_logit": sl, "end_logit": el}
             for (a, b), (sc, sl, el) in ranked]
    best = nbest[0] if nbest else None
    diff = None
    text, start = (best["text"], best["answer_start"]) if best else ("", -1)
    if version_2:
        null = min(p["null_score"] for p in pieces) if pieces else 0.0
        diff = null - best["score"] if best else 0.0
        # Kept even when n_best_size spans beat it (run_qa.py adds it back the same way).
        nbest.append({"text": "", "answer_start": -1, "score": null, "start_logit": None, "end_logit": None})
        nbest.sort(key=lambda x: -x["score"])
        if best is None or diff > null_score_diff_threshold:
            text, start = "", -1
    if nbest:
        scores = np.array([x["score"] for x in nbest])
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        for x, p in zip(nbest, probs, strict=True):
            x["probability"] = float(p)
    probability = next((x["probability"] for x in nbest if x["answer_start"] == start and x["text"] == text), 0.0)
    return {"text": text, "answer_start": start, "probability": probability,
            "best_span": best["text"] if best else "", "null_score_diff": diff, "nbest": nbest}


# ============================================================================ loss


def qa_loss(start_logits: Any, end_logits: Any, start_positions: Any, end_positions: Any,
            attention_mask: Any = None) -> Any:
    """Sum over windows of (CE(start) + CE(end)) / 2, the model's QA loss before its mean.

    Logits: [windows, tokens]; positions: [windows]. Padded positions (attention_mask 0)
    are masked out of both softmaxes, so the loss of a window does not depend on the
    longest row of its batch (transformers' heads leave them in; with the engine's dynamic
    padding that would make N ranks x b differ from 1 rank x Nb).
    """
    import torch
    import torch.nn.functional as F

    start_logits, end_logits = start_logits.float(), end_logits.float()
    if attention_mask is not None:
        pad = attention_mask == 0
        low = torch.finfo(start_logits.dtype).min
        start_logits = start_logits.masked_fill(pad, low)
        end_logits = end_logits.masked_fill(pad, low)
    loss = F.cross_entropy(start_logits, start_positions, reduction="sum")
    loss = loss + F.cross_entropy(end_logits, end_positions, reduction="sum")
    return loss / 2


def answer_questions(
    model: Any,
    tokenizer: Any,
    questions: list[dict[str, Any]],
    options: QaOptions | None = None,
    max_length: int = 384,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Answers for [{question, context}, ...] in one process: featurize, forward, decode (`best_answer`'s dicts).

    What transformers' "question-answering" pipeline did; transformers 5 removed that
    pipeline, so this is how a saved QA model folder is used outside hvdft. Windows are
    right-padded per batch; the model runs in eval mode without gradients on its device.
    """
    import torch

    o = options or QaOptions()
    empty = {"text": [], "answer_start": []}
    batch = {"question": [q["question"] for q in questions], "context": [q["context"] for q in questions],
             "answers": [empty] * len(questions), "example": list(range(len(questions)))}
    rows = featurize(batch, tokenizer, max_length, o)
    device = next(model.parameters()).device
    pieces: list[list[dict[str, Any]]] = [[] for _ in questions]
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id or 0
    with torch.no_grad():
        for start in range(0, len(rows["input_ids"]), batch_size):
            index = range(start, min(start + batch_size, len(rows["input_ids"])))
            longest = max(rows["length"][i] for i in index)
            inputs = {"input_ids": torch.full((len(index), longest), pad, dtype=torch.long),
                      "attention_mask": torch.zeros((len(index), longest), dtype=torch.long)}
            if "token_type_ids" in rows:
                inputs["token_type_ids"] = torch.zeros((len(index), longest), dtype=torch.long)
            for k, i in enumerate(index):
                n = rows["length"][i]
                inputs["input_ids"][k, :n] = torch.tensor(rows["input_ids"][i])
                inputs["attention_mask"][k, :n] = 1
                if "token_type_ids" in rows:
                    inputs["token_type_ids"][k, :n] = torch.tensor(rows["token_type_ids"][i])
            out = model(**{k: v.to(device) for k, v in inputs.items()})
            starts, ends = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
            for k, i in enumerate(index):
                n = rows["length"][i]
                pieces[rows["example"][i]].append(window_candidates(
                    starts[k, :n], ends[k, :n], rows["offset_mapping"][i], rows["cls_index"][i],
                    o.n_best_size, o.max_answer_length))
    model.train(was_training)
    return [best_answer(q["context"], p, o.n_best_size, o.version_2_with_negative, o.null_score_diff_threshold)
            for q, p in zip(questions, pieces, strict=True)]


# ============================================================================ scoring and writing


def score_predictions(
    examples: list[dict[str, Any]], predictions: list[dict[str, Any]], options: QaOptions | None = None
) -> tuple[dict[str, float], str]:
    """Official SQuAD measure of merged predictions (in percent) and a printable report.

    v1.1: `exact_match`, `f1`, `total`. v2.0 adds `HasAns_*`, `NoAns_*` and the threshold
    sweep over `null_score_diff` (`best_f1_thresh` is the --null-score-diff-threshold that
    would have scored best).
    """
    o = options or QaOptions()
    refs = {ex["id"]: list(ex["answers"]["text"]) for ex in examples}
    if o.version_2_with_negative:
        # The best non-null spans with their null-score differences and our threshold give
        # the thresholded answers' scores (the official script's --na-prob-file and
        # --na-prob-thresh) and let the sweep try every other threshold.
        spans = {ex["id"]: p["best_span"] for ex, p in zip(examples, predictions, strict=True)}
        diffs = {ex["id"]: float(p["null_score_diff"]) for ex, p in zip(examples, predictions, strict=True)}
        metrics = squad_metric.squad_v2(refs, spans, na_probs=diffs, na_prob_threshold=o.null_score_diff_threshold)
        title = "SQuAD v2.0 measure (official evaluate-v2.0.py algorithm)"
    else:
        answers = {ex["id"]: p["text"] for ex, p in zip(examples, predictions, strict=True)}
        metrics = squad_metric.squad_v1(refs, answers)
        title = "SQuAD v1.1 measure (official evaluate-v1.1.py algorithm)"
    lines = [f"{title}, {int(metrics['total'])} questions", ""]
    for key, value in metrics.items():
        if key != "total":
            lines.append(f"{key:<20} {value:10.4f}" if not key.endswith("_total") else f"{key:<20} {int(value):10d}")
    if "best_f1_thresh" in metrics:
        lines += ["", f"best F1 at --null-score-diff-threshold {metrics['best_f1_thresh']:.4f}"]
    return metrics, "\n".join(lines) + "\n"


def prediction_file_names(prefix: str) -> tuple[str, str, str]:
    """(answers, nbest, null odds) file names: predictions.json ... for eval, test_predictions.json ... otherwise."""
    head = "" if prefix in ("", "eval") else f"{prefix}_"
    return f"{head}predictions.json", f"{head}nbest_predictions.json", f"{head}null_odds.json"


def _nbest_json(pred: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: x[k] for k in ("text", "answer_start", "probability", "score", "start_logit", "end_logit")}
            for x in pred["nbest"]]


def write_squad_predictions(
    folder: str | Path, prefix: str, examples: list[dict[str, Any]], predictions: list[dict[str, Any]],
    version_2: bool = False,
) -> list[Path]:
    """predictions.json ({id: answer}, official), nbest_predictions.json, and for v2.0 null_odds.json."""
    folder = Path(folder)
    answers_name, nbest_name, odds_name = prediction_file_names(prefix)
    written = []
    ids = [ex["id"] for ex in examples]
    outputs = [(answers_name, {q: p["text"] for q, p in zip(ids, predictions, strict=True)}),
               (nbest_name, {q: _nbest_json(p) for q, p in zip(ids, predictions, strict=True)})]
    if version_2:
        outputs.append((odds_name, {q: p["null_score_diff"] for q, p in zip(ids, predictions, strict=True)}))
    for name, obj in outputs:
        path = folder / name
        path.write_text(json.dumps(obj, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(path)
    return written


def write_answers_jsonl(path: str | Path, examples: list[dict[str, Any]], predictions: list[dict[str, Any]]) -> None:
    """`hvdft predict` output: one JSON object per question, in input order.

    {"id", "question", "answer", "answer_start" (-1: no answer), "probability"}.
    """
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for ex, p in zip(examples, predictions, strict=True):
            f.write(json.dumps({"id": ex["id"], "question": ex["question"], "answer": p["text"],
                                "answer_start": p["answer_start"], "probability": p["probability"]},
                               ensure_ascii=False) + "\n")


# ============================================================================ the task


class QaTask(Task):
    """Extractive question answering (SQuAD v1.1, and v2.0 with --version-2-with-negative).

    Reads nested SQuAD JSON, the Hub's flat squad/squad_v2 rows as JSON lines, or a Hub
    dataset. Question + context windows of --max-length tokens overlapping by --doc-stride;
    the n-best spans of every window, best over the windows of a question (v2.0: against
    the null score). Scored with the official SQuAD measure (exact match and F1, percent).
    Writes the best model by F1, eval/test reports, predictions.json ({id: answer}),
    nbest_predictions.json (v2.0: null_odds.json), test_* files and all_results.json.
    """

    name: ClassVar[str] = "qa"
    pipeline: ClassVar[str] = "question-answering"
    metric_names: ClassVar[tuple[str, ...]] = ("f1", "exact_match")
    default_metric: ClassVar[str] = "f1"
    Options: ClassVar[type] = QaOptions
    has_labels: ClassVar[bool] = False  # spans, not a label set: no id2label
    default_max_length: ClassVar[int] = 384  # run_qa.py's --max_seq_length
    targets: ClassVar[dict[str, int]] = {"start_positions": -100, "end_positions": -100}
    predictions_for: ClassVar[tuple[str, ...]] = ("eval", "test")

    def __init__(self, options: QaOptions | None = None, encoding: str = "utf-8") -> None:
        super().__init__(options, encoding)
        self.head_loaded: bool | None = None  # whether build_model found span-head weights

    # ------------------------------------------------------------------ reading
    def read(self, source: str, split: str, shard: Shard) -> Split:
        return read_squad(source, shard, self.options, self.encoding, split)

    def read_hub(self, dataset: Any, split: str, shard: Shard, name: str) -> Split | None:
        return read_hub_squad(dataset, split, shard, name, self.options)

    def read_unlabelled(self, source: str, shard: Shard) -> Split:
        return read_squad(source, shard, self.options, self.encoding, "predict", labelled=False)

    # ------------------------------------------------------------------ model
    def model_class(self) -> Any:
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering

    def prepare(self, model_config: Any, tokenizer: Any, max_length: int) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise HvdftError("question answering needs a fast tokenizer (for the offset mapping)")

    def build_model(self, path: str, config: Any, tokenizer: Any, **load_kwargs: Any) -> Any:
        """The encoder from `path` with a span head (start, end): 2 outputs whatever the
        checkpoint's num_labels was (a classifier's config would otherwise size the head)."""
        if getattr(config, "num_labels", 2) != 2:
            config.num_labels = 2
        model, info = self.model_class().from_pretrained(path, config=config, output_loading_info=True,
                                                         **load_kwargs)
        fresh = [k for k in info.get("missing_keys", ()) if "qa_outputs" in k]
        self.head_loaded = not fresh
        return model

    def describe(self, model: Any) -> list[str]:
        o = self.options
        head = {True: "from the checkpoint", False: "new (randomly initialised)", None: "?"}[self.head_loaded]
        squad = (f"SQuAD v2.0 (null answers, --null-score-diff-threshold {o.null_score_diff_threshold:g})"
                 if o.version_2_with_negative else "SQuAD v1.1 (every question has an answer)")
        return [f"qa: span head {head}; windows overlap by {o.doc_stride} tokens (--doc-stride), questions "
                f"cut at {o.max_query_length}; n-best {o.n_best_size}, answers up to {o.max_answer_length} tokens",
                f"qa: {squad}; examples are questions, training rows are windows"]

    # ------------------------------------------------------------------ features and step
    def featurize(self, batch: dict[str, list], tokenizer: Any, label2id: dict[str, int],
                  max_length: int) -> dict[str, list]:
        return featurize(batch, tokenizer, max_length, self.options)

    def target_count(self, batch: Any) -> int:
        return len(batch.rows)  # one (start, end) pair per window

    def loss(self, model: Any, batch: Any) -> tuple[Any, Any]:
        outputs = model(**batch.inputs)
        loss = qa_loss(outputs.start_logits, outputs.end_logits, batch.targets["start_positions"],
                       batch.targets["end_positions"], batch.inputs.get("attention_mask"))
        return loss, outputs

    # ------------------------------------------------------------------ evaluation
    def predictions(self, rows: list[dict[str, Any]], outputs: Any, batch: Any, model: Any) -> list[Any]:
        """Per window: its n-best spans and null score (rows must hold offset_mapping, cls_index, length)."""
        start = outputs.start_logits.float().cpu().numpy()
        end = outputs.end_logits.float().cpu().numpy()
        o = self.options
        return [window_candidates(start[i, : row["length"]], end[i, : row["length"]], row["offset_mapping"],
                                  row["cls_index"], o.n_best_size, o.max_answer_length)
                for i, row in enumerate(rows)]

    def merge(self, example: dict[str, Any], pieces: list[Any], id2label: dict[int, str]) -> Any:
        o = self.options
        return best_answer(example["context"], pieces, o.n_best_size, o.version_2_with_negative,
                           o.null_score_diff_threshold)

    def score(self, examples: list[dict[str, Any]], predictions: list[Any]) -> tuple[dict[str, float], str]:
        return score_predictions(examples, predictions, self.options)

    def write_predictions(self, folder: Path, prefix: str, examples: list[dict[str, Any]],
                          predictions: list[Any]) -> None:
        if prefix in self.predictions_for:
            write_squad_predictions(folder, prefix, examples, predictions, self.options.version_2_with_negative)

    def write_unlabelled_predictions(self, path: Path, examples: list[dict[str, Any]],
                                     predictions: list[Any]) -> None:
        write_answers_jsonl(path, examples, predictions)


def _main(argv: list[str] | None = None) -> int:
    """`python -m hvdft.tasks.qa split FILE OUT_DIR`: train.json / validation.json by article."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m hvdft.tasks.qa", description=split_squad.__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="Split a SQuAD JSON file into train.json and validation.json.")
    s.add_argument("file")
    s.add_argument("out_dir")
    s.add_argument("--dev-fraction", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--unit", choices=("article", "paragraph"), default="article")
    args = p.parse_args(argv)
    data = _load_nested(args.file, "utf-8")
    if data is None:
        raise SystemExit(f"{args.file}: not nested SQuAD JSON")
    train, dev = split_squad(data, args.dev_fraction, args.seed, args.unit)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.json", train), ("validation.json", dev)):
        (out / name).write_text(json.dumps(part, ensure_ascii=False), encoding="utf-8")
        n = sum(len(p["qas"]) for a in part["data"] for p in a["paragraphs"])
        print(f"{out / name}: {len(part['data'])} {args.unit}s, {n} questions")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
