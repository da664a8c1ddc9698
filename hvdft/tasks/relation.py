"""Relation extraction (`hvdft train re`): classify the relation between two marked entities.

Reads SemEval-2010 Task 8 files, JSON lines with character spans or inline `<e1>` markers,
TACRED-style JSON and Hub datasets. Each example becomes one sequence with entity markers
around its two arguments (Baldini Soares et al., 2019: "entity markers"; with entity types,
the typed form of Zhou & Chen, 2022), classified by the standard sequence-classification
head, so `transformers.pipeline("text-classification", model=OUTPUT_DIR)` classifies
marked-up text such as "The <e1>company</e1> fabricates plastic <e2>chairs</e2>.".

Scoring follows the official SemEval-2010 Task 8 scorer (v1.2): macro-averaged F1 over
the relations, direction taken into account, the negative label (`Other`) excluded.

An example is a dict:
    id        str          the record's id (SemEval's sentence number; TACRED's `id`), or its
                           1-based position in the file
    text      str          the sentence without markers
    e1, e2    [start, end] character spans of the two arguments in `text` (end exclusive);
                           e1 is the first argument of a directed label: in
                           `Cause-Effect(e1,e2)`, e1 is the cause (TACRED: e1 = subject)
    e1_type, e2_type       entity types (TACRED's subj_type / obj_type) or None
    label     str | None   the relation (None: unlabelled)
    line      int | None   1-based line of the record in its file (None: Hub rows)
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hvdft.config import option
from hvdft.data.files import Shard, Split, file_format, hub_rows, iter_table_rows, read_lines
from hvdft.errors import HvdftError
from hvdft.tasks.base import Task
from hvdft.tasks.classify import classification_scores, escape, format_report, label_string

# ----------------------------------------------------------------------------- constants

MARKERS = ("<e1>", "</e1>", "<e2>", "</e2>")  # SemEval-2010 Task 8's own markup
MARKER = re.compile(r"</?e[12]>")
# The nine SemEval-2010 Task 8 relations; each directed label is NAME(e1,e2) or NAME(e2,e1).
SEMEVAL_RELATIONS = (
    "Cause-Effect", "Component-Whole", "Content-Container", "Entity-Destination", "Entity-Origin",
    "Instrument-Agency", "Member-Collection", "Message-Topic", "Product-Producer",
)
SEMEVAL_LABELS = frozenset(
    [f"{r}({d})" for r in SEMEVAL_RELATIONS for d in ("e1,e2", "e2,e1")] + ["Other"]
)
NEGATIVE_LABELS = ("Other", "no_relation")  # SemEval, TACRED: the "no relation" label, outside the F1
DIRECTED = re.compile(r"^(?P<relation>.+)\((?P<direction>e1,e2|e2,e1)\)$")
SENTENCE_LINE = re.compile(r"^\s*(\d+)\t(.*)$")
KEY_LINE = re.compile(r"^\s*\d+\t[A-Za-z_][\w.:-]*(\((e1,e2|e2,e1)\))?\s*$")  # an answer-key line
TEXT_COLUMNS = ("text", "sentence")
LABEL_COLUMNS = ("label", "relation")
# TACRED keeps the Penn Treebank escapes of brackets; the model should see the brackets.
PTB_ESCAPES = {"-LRB-": "(", "-RRB-": ")", "-LSB-": "[", "-RSB-": "]", "-LCB-": "{", "-RCB-": "}"}
MARKER_STYLES = ("tokens", "punct")


@dataclass
class RelationOptions:
    """`hvdft train re` options of its own (the engine turns each field into a CLI option)."""

    markers: str = option(
        "tokens",
        "Entity markers: 'tokens' puts <e1> </e1> <e2> </e2> around the arguments and adds them to the "
        "vocabulary (Baldini Soares et al., 2019; SemEval's own markup, so the pipeline reads SemEval "
        "sentences as they are); 'punct' uses '@ .. @' and '# .. #', no new tokens (Zhou & Chen, 2022).",
        choices=MARKER_STYLES, must_match=True,
    )
    typed_markers: bool = option(
        True,
        "Put the entity types inside the markers when the data gives them (TACRED's subj_type/obj_type): "
        "'<e1> * person * Bill </e1>' / '@ * person * Bill @'.",
        must_match=True,
    )
    negative_label: str | None = option(
        None, "The no-relation label, left out of the F1 averages [default: Other or no_relation, "
        "whichever the labels hold]."
    )
    text_column: str | None = option(
        None, "JSON lines / Hub: column with the sentence [default: the first of text, sentence]; it holds "
        "<e1>..</e1> <e2>..</e2> markers unless --e1-column/--e2-column spans are present."
    )
    label_column: str | None = option(None, "Column with the relation [default: the first of label, relation].")
    e1_column: str = option("e1", "JSON lines: column with the first argument's span: [start, end] "
                                  "(characters, end exclusive) or {start, end, type}.")
    e2_column: str = option("e2", "JSON lines: column with the second argument's span.")


# ----------------------------------------------------------------------------- reading


def parse_marked(text: str) -> tuple[str, list[int], list[int]]:
    """Sentence with `<e1>..</e1>` and `<e2>..</e2>` -> (plain text, e1 span, e2 span).

    Spans are [start, end) character offsets into the plain text. Raises ValueError with
    the cause when a marker is missing, repeated, unclosed, nested or encloses nothing.
    """
    found: dict[str, int] = {}
    plain: list[str] = []
    spans: dict[str, list[int]] = {}
    position = 0  # in the plain text
    last = 0
    open_entity: str | None = None
    for m in MARKER.finditer(text):
        plain.append(text[last:m.start()])
        position += m.start() - last
        last = m.end()
        tag = m.group()
        entity = tag.strip("</>")
        if tag in found:
            raise ValueError(f"two {tag} markers")
        found[tag] = position
        if not tag.startswith("</"):
            if open_entity is not None:
                raise ValueError(f"entity markers are nested: {tag} opens inside <{open_entity}>")
            open_entity = entity
        else:
            if open_entity != entity:
                raise ValueError(f"{tag} without <{entity}> before it" if f"<{entity}>" not in found
                                 else f"{tag} closes <{entity}> inside <{open_entity}>: markers are nested")
            open_entity = None
            start = found[f"<{entity}>"]
            if start == position:
                raise ValueError(f"<{entity}></{entity}> encloses no text")
            spans[entity] = [start, position]
    plain.append(text[last:])
    if open_entity is not None:
        raise ValueError(f"<{open_entity}> is not closed (no </{open_entity}>)")
    for entity in ("e1", "e2"):
        if entity not in spans:
            raise ValueError(f"no <{entity}>..</{entity}> marker (a sentence needs both arguments marked)")
    plain_text = "".join(plain)
    for entity in ("e1", "e2"):
        s, e = spans[entity]
        if not plain_text[s:e].strip():
            raise ValueError(f"<{entity}> encloses only white space")
    return plain_text, spans["e1"], spans["e2"]


def check_label(label: str) -> str | None:
    """Why a label cannot be scored with direction, or None when it can.

    An official relation name without (e1,e2)/(e2,e1) is what TEST_FILE_KEY.TXT holds:
    scoring against it would ignore direction, which the official measure counts.
    """
    if label in SEMEVAL_RELATIONS:
        return (f"relation '{label}' has no direction: labels must read {label}(e1,e2) or {label}(e2,e1) "
                "(TEST_FILE_KEY.TXT has undirected labels; score against TEST_FILE_FULL.TXT)")
    return None


def read_semeval(
    path: str | Path, shard: Shard, encoding: str = "utf-8", labelled: bool = True
) -> tuple[int, list[int], list[dict[str, Any]]]:
    """(total sentences, owned global indices, owned examples) of a SemEval-2010 Task 8 file.

    The file holds records of `ID<TAB>"sentence"`, then (labelled files) the relation line,
    an optional `Comment:` line and blank lines; CRLF or LF. TEST_FILE.txt (sentences only)
    is read with `labelled=False`. Every rank checks the structure of the whole file (so
    that structural errors stop every rank alike) but parses the sentences and labels of
    its own records only. Raises HvdftError at the line of the first problem.
    """
    lines = read_lines(path, encoding)
    total, ids, examples = 0, [], []
    record: dict[str, Any] | None = None  # the current record: its sentence line, label line

    def finish() -> None:
        nonlocal total
        if record is None:
            return
        if labelled and record["label_line"] is None:
            raise HvdftError(
                "no relation line after this sentence (TEST_FILE.txt has no labels: to score, use "
                "TEST_FILE_FULL.TXT, which has the sentences and the directed labels)", path, record["line"]
            )
        if shard.owns(total):
            ids.append(total)
            examples.append(_semeval_example(lines, record, path, labelled))
        total += 1

    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if SENTENCE_LINE.match(line):
            if KEY_LINE.match(line) and "<e1>" not in line:
                raise HvdftError(
                    "this is an answer-key line (ID<TAB>relation), not a sentence: pass the file with the "
                    "sentences (TEST_FILE_FULL.TXT holds the test sentences with their directed labels)",
                    path, number,
                )
            finish()
            record = {"line": number, "label_line": None, "comment": False}
        elif line.lstrip().startswith("Comment"):
            if record is None:
                raise HvdftError("comment line before the first sentence", path, number)
            record["comment"] = True
        elif record is not None and record["label_line"] is None and not record["comment"]:
            record["label_line"] = number
        else:
            raise HvdftError(
                f"expected 'ID<TAB>\"sentence\"' (SemEval-2010 Task 8 format), found {line.strip()[:60]!r}",
                path, number,
            )
    finish()
    if total == 0:
        raise HvdftError("no sentences (expected SemEval-2010 Task 8 records: ID<TAB>\"sentence\")", path)
    return total, ids, examples


def _semeval_example(lines: list[str], record: dict[str, Any], path: str | Path, labelled: bool) -> dict[str, Any]:
    number = record["line"]
    m = SENTENCE_LINE.match(lines[number - 1])
    assert m is not None  # the record starts at a sentence line
    sid, sentence = m.group(1), m.group(2).strip()
    # The whole sentence is quoted; quotes inside it are kept as they are (no escaping in the format).
    if len(sentence) >= 2 and sentence[0] == '"' and sentence[-1] == '"':
        sentence = sentence[1:-1]
    try:
        text, e1, e2 = parse_marked(sentence)
    except ValueError as exc:
        raise HvdftError(str(exc), path, number) from None
    label = None
    if labelled and record["label_line"] is not None:
        label = lines[record["label_line"] - 1].strip()
        problem = check_label(label)
        if problem:
            raise HvdftError(problem, path, record["label_line"])
    return {"id": sid, "text": text, "e1": e1, "e2": e2, "e1_type": None, "e2_type": None,
            "label": label, "line": number}


def looks_like_semeval(path: str | Path, encoding: str = "utf-8") -> bool:
    """The first non-blank line is `ID<TAB>...` (SemEval-2010 Task 8 format)."""
    for line in read_lines(path, encoding):
        if line.strip():
            return bool(SENTENCE_LINE.match(line))
    return False


def _span(value: Any, text: str, what: str) -> tuple[list[int], str | None]:
    """A [start, end) span and optional type from [start, end] or {start, end[, type][, text]}."""
    kind = None
    given_text = None
    if isinstance(value, dict):
        missing = [k for k in ("start", "end") if k not in value]
        if missing:
            raise ValueError(f"{what} has no '{missing[0]}' (expected {{start, end[, type]}})")
        start, end, kind = value["start"], value["end"], value.get("type")
        given_text = value.get("text", value.get("name"))
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        start, end = value
    else:
        raise ValueError(f"{what} must be [start, end] or {{start, end[, type]}}, got {json.dumps(value)[:60]}")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (start, end)):
        raise ValueError(f"{what} offsets must be integers, got [{start!r}, {end!r}]")
    if not 0 <= start < end <= len(text):
        raise ValueError(f"{what} span [{start}, {end}) is out of range for a text of {len(text)} characters "
                         "(offsets are characters, end exclusive)")
    if given_text is not None and text[start:end] != given_text:
        raise ValueError(f"{what} span [{start}, {end}) is {text[start:end]!r} but the record says {given_text!r} "
                         "(offsets are characters, end exclusive)")
    if kind is not None and not isinstance(kind, str):
        raise ValueError(f"{what} type must be a string")
    return [start, end], kind


def _tacred(row: dict[str, Any]) -> tuple[str, list[int], list[int], Any, Any]:
    """TACRED's tokens and inclusive token spans -> text, character spans, types."""
    tokens = row["token"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError("'token' must be a non-empty list of strings")
    bounds = {}
    for key in ("subj_start", "subj_end", "obj_start", "obj_end"):
        if key not in row:
            raise ValueError(f"no '{key}' (TACRED records need subj_start/subj_end/obj_start/obj_end)")
        v = row[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(tokens):
            raise ValueError(f"'{key}' = {v!r} is out of range for {len(tokens)} tokens (inclusive token indices)")
        bounds[key] = v
    for arg in ("subj", "obj"):
        if bounds[f"{arg}_start"] > bounds[f"{arg}_end"]:
            raise ValueError(f"{arg}_start {bounds[f'{arg}_start']} is after {arg}_end {bounds[f'{arg}_end']}")
    s1, e1, s2, e2 = bounds["subj_start"], bounds["subj_end"], bounds["obj_start"], bounds["obj_end"]
    if s1 <= e2 and s2 <= e1:
        raise ValueError(f"subject tokens {s1}..{e1} and object tokens {s2}..{e2} overlap")
    words = [PTB_ESCAPES.get(t, t) for t in tokens]
    starts, position = [], 0
    for w in words:
        starts.append(position)
        position += len(w) + 1
    text = " ".join(words)
    subj = [starts[s1], starts[e1] + len(words[e1])]
    obj = [starts[s2], starts[e2] + len(words[e2])]
    return text, subj, obj, row.get("subj_type"), row.get("obj_type")


def example_from_record(
    row: dict[str, Any], options: RelationOptions, index: int, line: int | None, labelled: bool,
    label_names: list[str] | None = None,
) -> dict[str, Any]:
    """One example from a JSON record or Hub row; raises ValueError with the cause.

    Three shapes: TACRED (`token`, `subj_start/subj_end/obj_start/obj_end` inclusive token
    indices, optional `subj_type/obj_type`, `relation`); text plus spans (`text`, `e1`, `e2`:
    [start, end) characters or {start, end[, type][, text]}); text with inline markers.
    `label_names` maps integer labels (a Hub ClassLabel) to names.
    """
    e1_type = e2_type = None
    if "token" in row and options.text_column is None:
        text, e1, e2, e1_type, e2_type = _tacred(row)
    else:
        text_col = options.text_column or next((c for c in TEXT_COLUMNS if c in row), None)
        if text_col is None or text_col not in row:
            raise ValueError(f"no text column: none of {', '.join(TEXT_COLUMNS)} (or TACRED's 'token') among "
                             f"the columns ({', '.join(map(str, row))}); use --text-column")
        raw = row[text_col]
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError(f"column '{text_col}' must hold the sentence (a non-empty string)")
        has_spans = options.e1_column in row or options.e2_column in row
        if has_spans:
            if MARKER.search(raw):
                raise ValueError(f"the text has <e1>/<e2> markers and the record has '{options.e1_column}'/"
                                 f"'{options.e2_column}' spans: give one or the other")
            for col in (options.e1_column, options.e2_column):
                if col not in row:
                    raise ValueError(f"no column '{col}' (both argument spans are needed)")
            text = raw
            e1, e1_type = _span(row[options.e1_column], text, options.e1_column)
            e2, e2_type = _span(row[options.e2_column], text, options.e2_column)
            if e1[0] < e2[1] and e2[0] < e1[1]:
                raise ValueError(f"the argument spans {e1} and {e2} overlap")
        else:
            text, e1, e2 = parse_marked(raw)
        e1_type = row.get("e1_type", e1_type)
        e2_type = row.get("e2_type", e2_type)
    label = None
    if labelled:
        label_col = options.label_column or next((c for c in LABEL_COLUMNS if c in row), None)
        if label_col is None or label_col not in row:
            raise ValueError(f"no label column: none of {', '.join(LABEL_COLUMNS)} among the columns "
                             f"({', '.join(map(str, row))}); use --label-column")
        value = row[label_col]
        if label_names is not None and isinstance(value, int) and not isinstance(value, bool):
            value = label_names[value] if 0 <= value < len(label_names) else None
        try:
            label = label_string(value)
        except ValueError as exc:
            raise ValueError(f"column '{label_col}' holds a {exc}: a relation must be a string") from None
        if label is None:
            raise ValueError(f"no relation in column '{label_col}'")
        problem = check_label(label)
        if problem:
            raise ValueError(problem)
    sid = row.get("id")
    for kind, what in ((e1_type, "e1 type"), (e2_type, "e2 type")):
        if kind is not None and not isinstance(kind, str):
            raise ValueError(f"the {what} must be a string, got {kind!r}")
    return {"id": str(sid) if sid is not None else str(index + 1), "text": text, "e1": list(e1), "e2": list(e2),
            "e1_type": e1_type or None, "e2_type": e2_type or None, "label": label, "line": line}


def read_records(
    path: str | Path, shard: Shard, options: RelationOptions, encoding: str = "utf-8", labelled: bool = True
) -> tuple[int, list[int], list[dict[str, Any]]]:
    """(total, owned global indices, owned examples) of a JSON-lines file (or a JSON array:
    TACRED's own files). Only this rank's records are turned into examples."""
    total, ids, examples = 0, [], []
    for line, row in iter_table_rows(path, "jsonl", encoding):
        if shard.owns(total):
            try:
                examples.append(example_from_record(row, options, total, line, labelled))
            except ValueError as exc:
                raise HvdftError(f"record {total + 1}: {exc}", path, line) from None
            ids.append(total)
        total += 1
    if total == 0:
        raise HvdftError("no records in file", path)
    return total, ids, examples


def read_relation_file(
    path: str | Path, shard: Shard, options: RelationOptions, encoding: str = "utf-8", labelled: bool = True
) -> tuple[int, list[int], list[dict[str, Any]]]:
    """Any supported local file: .jsonl/.json records, else the SemEval-2010 Task 8 format
    (unlabelled, a plain text file with one marked-up sentence per line is accepted too)."""
    if file_format(path) == "jsonl":
        return read_records(path, shard, options, encoding, labelled)
    if file_format(path) in ("csv", "tsv"):
        raise HvdftError("relation extraction reads SemEval-2010 Task 8 files, .jsonl or .json (TACRED)", path)
    if labelled or looks_like_semeval(path, encoding):
        return read_semeval(path, shard, encoding, labelled)
    total, ids, examples = 0, [], []
    for number, line in enumerate(read_lines(path, encoding), 1):
        if not line.strip():
            continue
        if shard.owns(total):
            try:
                text, e1, e2 = parse_marked(line.strip())
            except ValueError as exc:
                raise HvdftError(str(exc), path, number) from None
            ids.append(total)
            examples.append({"id": str(total + 1), "text": text, "e1": e1, "e2": e2, "e1_type": None,
                             "e2_type": None, "label": None, "line": number})
        total += 1
    if total == 0:
        raise HvdftError("nothing to predict: the file has no sentences", path)
    return total, ids, examples


# ----------------------------------------------------------------------------- markers and features


def type_words(kind: str) -> str:
    """An entity type as words: TACRED's STATE_OR_PROVINCE -> 'state or province'."""
    return kind.replace("_", " ").lower()


def markup(example: dict[str, Any]) -> str:
    """The sentence in SemEval markup (`<e1>..</e1>`, `<e2>..</e2>`): the readable form
    written to the predictions file, whatever the marker style the model uses."""
    return mark(example, "tokens", typed=False)[0]


def mark(example: dict[str, Any], style: str, typed: bool) -> tuple[str, dict[str, tuple[int, int]]]:
    """The sentence with entity markers, and each argument's block in it: (start, end)
    characters from the first character of its opening marker to the last of its closing one.

    style 'tokens': `<e1>Bill</e1>` (typed: `<e1> * person * Bill</e1>`, `<e2> ^ city ^ Seattle</e2>`);
    style 'punct': `@ Bill @` for e1 and `# Seattle #` for e2 (typed: `@ * person * Bill @`,
    `# ^ city ^ Seattle #`; Zhou & Chen, 2022).
    """
    text = example["text"]
    pieces: list[str] = []
    blocks: dict[str, tuple[int, int]] = {}
    last, length = 0, 0
    entities = sorted(("e1", "e2"), key=lambda e: example[e][0])
    for entity in entities:
        start, end = example[entity]
        kind = example.get(f"{entity}_type") if typed else None
        sign, wrap = ("@", "*") if entity == "e1" else ("#", "^")
        if style == "tokens":
            opening, closing = f"<{entity}>", f"</{entity}>"
            if kind:
                opening += f" {wrap} {type_words(kind)} {wrap} "
        elif style == "punct":
            opening, closing = sign + " ", " " + sign
            if kind:
                opening += f"{wrap} {type_words(kind)} {wrap} "
        else:
            raise ValueError(f"unknown marker style '{style}' (one of {', '.join(MARKER_STYLES)})")
        pieces.append(text[last:start])
        length += start - last
        block = opening + text[start:end] + closing
        blocks[entity] = (length, length + len(block))
        pieces.append(block)
        length += len(block)
        last = end
    pieces.append(text[last:])
    return "".join(pieces), blocks


def window(length: int, lo: int, hi: int, budget: int) -> tuple[int, int] | None:
    """The [start, end) token window of at most `budget` tokens holding tokens lo..hi
    (inclusive), centred on them; None when they are more than `budget` tokens apart."""
    if length <= budget:
        return 0, length
    if hi - lo + 1 > budget:
        return None
    start = max(0, min(lo - (budget - (hi - lo + 1)) // 2, length - budget))
    return start, start + budget


def featurize_examples(
    batch: dict[str, list], tokenizer: Any, label2id: dict[str, int], max_length: int,
    style: str = "tokens", typed: bool = True,
) -> dict[str, list]:
    """Columnar examples (with `example`, the local index) -> one row per example.

    Each row: `input_ids` (and `token_type_ids` when the tokenizer makes them) of the marked
    sentence, `labels` (label id; -100 when unlabelled or unseen), `example`, `length`
    (tokens), `e1_index`/`e2_index` (positions of the opening markers in `input_ids`, for
    entity-start pooling and checks). A sentence longer than `max_length` is cut to a window
    centred on the two arguments. An example whose two arguments (markers included) are
    more than `max_length` tokens apart gets NO row: the engine counts them over the ranks and
    warns once (`describe_missing`).
    Needs a fast tokenizer (character offsets).
    """
    texts, blocks = [], []
    n = len(batch["text"])
    for i in range(n):
        example = {k: batch[k][i] for k in ("text", "e1", "e2", "e1_type", "e2_type") if k in batch}
        text, block = mark(example, style, typed)
        texts.append(text)
        blocks.append(block)
    if not getattr(tokenizer, "is_fast", False):
        raise HvdftError("relation extraction needs a fast tokenizer (character offsets)")
    enc = tokenizer(texts, add_special_tokens=True)
    has_types = "token_type_ids" in enc
    out: dict[str, list] = {"input_ids": [], "labels": [], "example": [], "length": [], "e1_index": [],
                            "e2_index": []}
    if has_types:
        out["token_type_ids"] = []
    for i in range(n):
        ids = enc["input_ids"][i]
        sequence = enc.sequence_ids(i)
        content = [p for p, s in enumerate(sequence) if s is not None]
        first, last = content[0], content[-1]
        budget = max_length - (len(ids) - len(content))
        spans = {}
        for entity, (start, end) in blocks[i].items():
            a, b = enc.char_to_token(i, start), enc.char_to_token(i, end - 1)
            if a is None or b is None:  # a marker that tokenizes to nothing: cannot happen with these markers
                raise HvdftError(f"the tokenizer drops the entity marker of {entity} in {texts[i][:80]!r}")
            spans[entity] = (a - first, b - first)
        lo = min(a for a, _ in spans.values())
        hi = max(b for _, b in spans.values())
        cut = window(len(content), lo, hi, budget)
        if cut is None:
            continue
        a, b = cut
        keep = list(range(first)) + list(range(first + a, first + b)) + list(range(last + 1, len(ids)))
        out["input_ids"].append([ids[p] for p in keep])
        if has_types:
            out["token_type_ids"].append([enc["token_type_ids"][i][p] for p in keep])
        label = batch["label"][i] if "label" in batch else None
        out["labels"].append(label2id.get(label, -100) if label is not None else -100)
        out["example"].append(batch["example"][i])
        out["length"].append(len(keep))
        out["e1_index"].append(first + spans["e1"][0] - a)
        out["e2_index"].append(first + spans["e2"][0] - a)
    return out


def describe_missing(split: Split, count: int, example: dict[str, Any], max_length: int) -> str:
    """The warning for `count` of a split's examples whose two arguments (markers included)
    are further apart than `max_length` tokens, naming the first of them (`example`) by id and
    file:line. Training leaves them out; evaluation predicts the negative label for them
    (`RelationTask.merge`), as the official scorer treats a skipped example."""
    where = f"id {example['id']}" + (f", {split.source}:{example['line']}" if example.get("line")
                                     else f" of {split.source}")
    action = ("left out of training" if split.name == "train"
              else "predicted as the negative label without the model (the official scorer's treatment of a "
                   "skipped example) and scored")
    return (f"{count} of {split.total} {split.name} examples have their two arguments further apart than "
            f"{max_length} tokens (--max-length): {action} (e.g. {where})")


# ----------------------------------------------------------------------------- scoring


def undirected(label: str) -> str:
    """`Cause-Effect(e2,e1)` -> `Cause-Effect`; a label without a direction is unchanged."""
    m = DIRECTED.match(label)
    return m.group("relation") if m else label


def negative_label_of(labels: set[str] | list[str], given: str | None = None) -> str | None:
    """The no-relation label: `given`, else the first of NEGATIVE_LABELS among `labels`."""
    if given:
        return given
    return next((n for n in NEGATIVE_LABELS if n in labels), None)


@dataclass
class RelationScore:
    """One relation's counts in the official (9+1)-way evaluation with direction."""

    correct: int  # relation and direction right
    predicted: int  # predictions of this relation, either direction (the scorer's "n + xDIRx")
    wrong_direction: int  # gold of this relation predicted with the other direction (xDIRx)
    gold: int
    precision: float  # percent, as the scorer computes it
    recall: float
    f1: float


@dataclass
class OfficialScores:
    """The SemEval-2010 Task 8 scorer's (iii) evaluation; values in percent, computed with
    the scorer's own arithmetic so that they print identically."""

    relations: dict[str, RelationScore] = field(default_factory=dict)  # undirected relation -> counts
    macro_precision: float = 0.0
    macro_recall: float = 0.0
    macro_f1: float = 0.0  # THE official score
    micro_precision: float = 0.0
    micro_recall: float = 0.0
    micro_f1: float = 0.0
    skipped: int = 0  # examples without a prediction (counted as Other, as the scorer does)


def official_scores(gold: list[str], pred: list[str | None], negative: str | None = "Other") -> OfficialScores:
    """The official measure of SemEval-2010 Task 8, as semeval2010_task8_scorer-v1.2.pl computes it.

    (9+1)-way with direction: each directed label is reduced to its relation; a prediction
    counts as correct only when relation AND direction match; a prediction with the right
    relation and the wrong direction is wrong (it counts in that relation's predictions,
    the scorer's xDIRx column, lowering precision, and misses recall). For each relation
    in the GOLD labels other than `negative`: P = correct / predicted, R = correct / gold,
    F1 = 2PR / (P + R), in percent (0 when undefined). Macro: the plain mean over those
    relations; relations only predicted never enter the mean (nor the micro sums), exactly
    as in the scorer. Micro: pooled counts over the same relations. A None prediction is a
    skipped example: the scorer treats it as Other. Python's floats are the scorer's Perl
    doubles, and the operations and their order (relations in sorted order) are the scorer's,
    so `f"{x:.2f}"` prints what it prints.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    result = OfficialScores(skipped=sum(p is None for p in pred))
    gold_counts = Counter(undirected(g) for g in gold)
    relations = sorted(r for r in gold_counts if r != negative)
    correct: Counter[str] = Counter()
    predicted: Counter[str] = Counter()
    wrong_direction: Counter[str] = Counter()
    for g, p in zip(gold, pred, strict=True):
        if p is None:
            continue
        rel = undirected(p)
        predicted[rel] += 1
        if p == g:
            correct[rel] += 1
        elif rel == undirected(g):
            wrong_direction[rel] += 1
    macro_p = macro_r = macro_f1 = 0.0
    micro_correct = micro_predicted = micro_gold = 0
    for rel in relations:
        c, n, a = correct[rel], predicted[rel], gold_counts[rel]
        p = 0.0 if n == 0 else 100.0 * c / n
        r = 0.0 if a == 0 else 100.0 * c / a
        f1 = 0.0 if p + r == 0 else 2 * p * r / (p + r)
        result.relations[rel] = RelationScore(c, n, wrong_direction[rel], a, p, r, f1)
        macro_p += p
        macro_r += r
        macro_f1 += f1
        micro_correct += c
        micro_predicted += n
        micro_gold += a
    if relations:
        result.macro_precision = macro_p / len(relations)
        result.macro_recall = macro_r / len(relations)
        result.macro_f1 = macro_f1 / len(relations)
    result.micro_precision = 0.0 if micro_predicted == 0 else 100.0 * micro_correct / micro_predicted
    result.micro_recall = 0.0 if micro_gold == 0 else 100.0 * micro_correct / micro_gold
    mp, mr = result.micro_precision, result.micro_recall
    result.micro_f1 = 0.0 if mp + mr == 0 else 2.0 * mp * mr / (mp + mr)
    return result


def short_label(label: str) -> str:
    """The scorer's short names for the confusion matrix: Cause-Effect(e1,e2) -> C-E1, Other -> _O_;
    other labels unchanged."""
    if label == "Other":
        return "_O_"
    m = DIRECTED.match(label)
    if m and label in SEMEVAL_LABELS:
        rel = m.group("relation")
        head, tail = rel.split("-", 1)
        return f"{head[0]}-{tail[0]}{m.group('direction')[1]}"
    return label


SKIPPED = "(skipped)"  # a prediction the model could not make (no negative label to fall back on)


def score_relations(
    gold: list[str], pred: list[str | None], negative: str | None
) -> tuple[dict[str, float], str]:
    """Metrics (fractions: macro_f1 = the official score / 100, ...) and the report text.

    Report: the official (9+1)-way evaluation with direction (per relation P/R/F1 with the
    wrong-direction counts, micro and macro), then the (2*9+1)-way classification (accuracy,
    per-label P/R/F1, confusion matrix; classify's scoring and layout).
    """
    official = official_scores(gold, pred, negative)
    shown = [p if p is not None else SKIPPED for p in pred]
    metrics19, per_class, classes, matrix = classification_scores(gold, shown)
    short = [short_label(c) for c in classes]
    if len(set(short)) != len(short):
        short = classes
    lines = [
        f"official score (SemEval-2010 Task 8 scorer v1.2): macro-averaged F1 = {official.macro_f1:0.2f}%",
        f"  (9+1)-way, direction taken into account, '{negative}' excluded; {len(official.relations)} relations",
        "",
        f"{'relation':>25}  {'P':>27}  {'R':>19}  {'F1':>7}",
    ]
    for rel, s in official.relations.items():
        lines.append(
            f"{rel:>25}  {s.correct:4d}/({s.predicted - s.wrong_direction:4d} +{s.wrong_direction:4d}) = "
            f"{s.precision:6.2f}%  {s.correct:4d}/{s.gold:4d} = {s.recall:6.2f}%  {s.f1:6.2f}%"
        )
    lines += [
        "",
        f"{'micro (excluding ' + str(negative) + ')':>25}  P = {official.micro_precision:6.2f}%  "
        f"R = {official.micro_recall:6.2f}%  F1 = {official.micro_f1:6.2f}%",
        f"{'MACRO (excluding ' + str(negative) + ')':>25}  P = {official.macro_precision:6.2f}%  "
        f"R = {official.macro_recall:6.2f}%  F1 = {official.macro_f1:6.2f}%",
        "",
    ]
    if official.skipped:
        lines += [f"{official.skipped} examples had no prediction (arguments further apart than --max-length "
                  "and no negative label to predict): counted as wrong", ""]
    lines += [f"({len(classes)}-way) classification, direction counted: accuracy "
              f"{metrics19['accuracy'] * 100:0.2f}%", ""]
    renamed = {s: per_class[c] for s, c in zip(short, classes, strict=True)}
    lines.append(format_report(metrics19, renamed, short, matrix, len(gold)).rstrip("\n"))
    if short != classes:
        legend = ", ".join(f"{s} = {c}" for s, c in zip(short, classes, strict=True))
        lines += [""] + textwrap.wrap("labels: " + legend, 110, subsequent_indent="  ", break_on_hyphens=False)
    metrics = {
        "macro_f1": official.macro_f1 / 100,
        "macro_precision": official.macro_precision / 100,
        "macro_recall": official.macro_recall / 100,
        "micro_f1": official.micro_f1 / 100,
        "micro_precision": official.micro_precision / 100,
        "micro_recall": official.micro_recall / 100,
        "accuracy": metrics19["accuracy"],
    }
    return metrics, "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- writing


def write_predictions_tsv(path: Path, examples: list[dict[str, Any]], predictions: list[Any],
                          with_gold: bool = True) -> None:
    """id, sentence (SemEval markup), [gold], predicted, probability; input order; header row.

    The probability is the softmax probability of the predicted label; `nan` when the model
    made no prediction (arguments too far apart: the negative label was filled in).
    """
    columns = ["id", "sentence"] + ["gold"] * with_gold + ["predicted", "probability"]
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(columns) + "\n")
        for ex, (label, prob) in zip(examples, predictions, strict=True):
            cells = [escape(ex["id"]), escape(markup(ex))]
            if with_gold:
                cells.append(escape(ex["label"] or ""))
            cells += [escape(label if label is not None else SKIPPED), "nan" if math.isnan(prob) else f"{prob:.6f}"]
            f.write("\t".join(cells) + "\n")


def answer_ids(examples: list[dict[str, Any]]) -> list[str]:
    """IDs for the official answer format: the examples' ids when all are distinct numbers
    (SemEval's), else 1-based positions."""
    ids = [str(ex["id"]) for ex in examples]
    if all(i.isdigit() for i in ids) and len(set(ids)) == len(ids):
        return ids
    return [str(i + 1) for i in range(len(examples))]


def write_answer_file(path: Path, ids: list[str], labels: list[str | None]) -> None:
    """`ID<TAB>Label` lines, the format semeval2010_task8_scorer-v1.2.pl reads (LF endings).
    A None label (no prediction) is left out: the scorer counts the example as skipped."""
    with open(path, "w", encoding="ascii", newline="\n") as f:
        for i, label in zip(ids, labels, strict=True):
            if label is not None:
                f.write(f"{i}\t{label}\n")


def scorer_compatible(labels: list[str | None]) -> bool:
    """Every label is one of the 19 official SemEval-2010 Task 8 labels (the scorer rejects others)."""
    return all(label is None or label in SEMEVAL_LABELS for label in labels)


# ----------------------------------------------------------------------------- the task


class RelationTask(Task):
    """Relation extraction: classify the relation between two marked entities.

    Reads SemEval-2010 Task 8 files, JSON lines (text with character spans or <e1>/<e2>
    markup), TACRED JSON, or a Hub dataset. Entity markers go around the two arguments;
    the windows always hold both (examples whose arguments are further apart than
    --max-length are counted and named). Scores with the official SemEval-2010 Task 8
    measure (macro-F1 over the relations, direction counted, Other excluded). Writes the
    best model (pipeline "text-classification"), eval/test reports (per-relation P/R/F1,
    confusion matrix), test_predictions.tsv, all_results.json and, for SemEval labels,
    test_answers.txt and test_answer_key.txt for the official Perl scorer.
    """

    name = "re"
    pipeline = "text-classification"
    metric_names = ("macro_f1", "micro_f1", "accuracy")
    default_metric = "macro_f1"
    Options = RelationOptions
    has_labels = True
    model_inputs = ("input_ids", "attention_mask", "token_type_ids")
    targets = {"labels": -100}
    predictions_for = ("test",)

    def __init__(self, options: RelationOptions | None = None, encoding: str = "utf-8") -> None:
        super().__init__(options, encoding)
        if self.options.markers not in MARKER_STYLES:
            raise HvdftError(f"--markers must be one of {', '.join(MARKER_STYLES)}, got {self.options.markers!r}")

    # ------------------------------------------------------------------ reading
    def read(self, source: str, split: str, shard: Shard) -> Split:
        """This rank's shard of a SemEval-2010 Task 8 file or a JSON-lines / TACRED JSON file."""
        return Split(split, source, *read_relation_file(source, shard, self.options, self.encoding, True))

    def read_unlabelled(self, source: str, shard: Shard) -> Split:
        """SemEval sentences (TEST_FILE.txt), JSON records, or plain text with `<e1>`/`<e2>`
        markup, one sentence per line; labels, if present, are ignored."""
        return Split("predict", source, *read_relation_file(source, shard, self.options, self.encoding, False))

    def read_hub(self, dataset: Any, split: str, shard: Shard, name: str) -> Split | None:
        """Rows of a Hub dataset (e.g. `sem_eval_2010_task_8`: `sentence` with markers and a
        ClassLabel `relation`); None when the split's labels are withheld (all -1)."""
        columns = list(dataset.column_names)
        source = f"{name}[{split}]"
        label_col = self.options.label_column or next((c for c in LABEL_COLUMNS if c in columns), None)
        names = None
        if label_col is not None and label_col in columns:
            names = getattr(dataset.features[label_col], "names", None)
            if names is not None and len(dataset) and all(v is None or v < 0 for v in dataset[label_col]):
                return None
        ids, examples = [], []
        for gid, row in hub_rows(dataset, shard):
            try:
                examples.append(example_from_record(row, self.options, gid, None, True, names))
            except ValueError as exc:
                raise HvdftError(f"row {gid}: {exc}", source) from None
            ids.append(gid)
        return Split(split, source, len(dataset), ids, examples)

    # ------------------------------------------------------------------ labels
    def labels_of_examples(self, examples: list[dict[str, Any]]) -> list[str]:
        return [ex["label"] for ex in examples if ex["label"] is not None]

    def sort_labels(self, labels: set[str]) -> list[str]:
        """Alphabetical: for SemEval, Cause-Effect(e1,e2) ... Product-Producer(e2,e1), Other
        sorts in among them (ids are arbitrary, only fixed)."""
        return sorted(labels)

    # ------------------------------------------------------------------ model
    def model_class(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def marker_tokens(self) -> list[str]:
        """The tokens added to the vocabulary: the four SemEval markers ('tokens' style), else none."""
        return list(MARKERS) if self.options.markers == "tokens" else []

    def prepare(self, model_config: Any, tokenizer: Any, max_length: int) -> None:
        """Add the entity markers as special tokens (never split, never lower-cased); a
        tokenizer that has them already (a trained hvdft model) is unchanged."""
        from tokenizers import AddedToken

        tokens = [AddedToken(t, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)
                  for t in self.marker_tokens()]
        if tokens:
            tokenizer.add_tokens(tokens, special_tokens=True)

    def build_model(self, path: str, config: Any, tokenizer: Any, **load_kwargs: Any) -> Any:
        """The sequence-classification model with its embeddings resized to the tokenizer
        (the new marker rows: transformers' mean initialisation); saved resized, so the output
        folder loads as it is."""
        model = self.model_class().from_pretrained(path, config=config, **load_kwargs)
        if len(tokenizer) != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        return model

    def describe(self, model: Any) -> list[str]:
        style = ("entity markers <e1> </e1> <e2> </e2> (added tokens)" if self.options.markers == "tokens"
                 else "entity markers @ .. @ / # .. # (punctuation)")
        return [f"re: {style}{', typed when the data gives types' if self.options.typed_markers else ''}; "
                "[CLS] sequence-classification head"]

    # ------------------------------------------------------------------ features
    def featurize(self, batch: dict[str, list], tokenizer: Any, label2id: dict[str, int],
                  max_length: int) -> dict[str, list]:
        """One row per example: the marked sentence, windowed around its arguments; an example
        whose arguments cannot both fit gets no row (see `featurize_examples`)."""
        return featurize_examples(batch, tokenizer, label2id, max_length, self.options.markers,
                                  self.options.typed_markers)

    def describe_missing(self, split: Split, count: int, example: dict[str, Any], max_length: int) -> str:
        """Examples whose arguments cannot both fit in a window: count and the first one."""
        return describe_missing(split, count, example, max_length)

    # ------------------------------------------------------------------ evaluation
    def predictions(self, rows: list[dict[str, Any]], outputs: Any, batch: Any = None,
                    model: Any = None) -> list[Any]:
        """(label id, probability) per row, from the softmax of the logits."""
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
        probs = torch.softmax(logits.float(), dim=-1)
        best, ids = probs.max(dim=-1)
        return list(zip(ids.cpu().tolist(), best.cpu().tolist(), strict=True))

    def merge(self, example: dict[str, Any], pieces: list[Any], id2label: dict[int, str]) -> Any:
        """(label, probability). No piece: the arguments are too far apart for the model's
        window; the prediction is the negative label (probability nan), the official scorer's
        treatment of a skipped example, or None when the labels have no negative label."""
        if not pieces:
            return (negative_label_of(set(id2label.values()), self.options.negative_label), math.nan)
        ((pred, prob),) = pieces  # one row per example
        return (id2label[pred], float(prob))

    def negative_label(self, examples: list[dict[str, Any]], predictions: list[Any]) -> str | None:
        labels = {ex["label"] for ex in examples} | {p[0] for p in predictions if p[0] is not None}
        return negative_label_of(labels, self.options.negative_label)

    def score(self, examples: list[dict[str, Any]], predictions: list[Any]) -> tuple[dict[str, float], str]:
        gold = [ex["label"] for ex in examples]
        pred = [p[0] for p in predictions]
        metrics, report = score_relations(gold, pred, self.negative_label(examples, predictions))
        unpredicted = sum(math.isnan(p[1]) and p[0] is not None for p in predictions)
        if unpredicted:
            report = (f"{unpredicted} of {len(examples)} examples have their arguments further apart than "
                      "--max-length: predicted as the negative label without the model (the official scorer's "
                      "treatment of a skipped example)\n\n") + report
        return metrics, report

    def write_predictions(self, folder: Path, prefix: str, examples: list[dict[str, Any]],
                          predictions: list[Any]) -> None:
        """`{prefix}_predictions.tsv`; with SemEval labels also `{prefix}_answers.txt` (the
        predictions) and `{prefix}_answer_key.txt` (the gold) in the official scorer's format."""
        if prefix not in self.predictions_for:
            return
        folder = Path(folder)
        write_predictions_tsv(folder / f"{prefix}_predictions.tsv", examples, predictions, with_gold=True)
        gold = [ex["label"] for ex in examples]
        pred = [p[0] for p in predictions]
        if scorer_compatible(gold) and scorer_compatible(pred):
            ids = answer_ids(examples)
            write_answer_file(folder / f"{prefix}_answers.txt", ids, pred)
            write_answer_file(folder / f"{prefix}_answer_key.txt", ids, gold)

    def write_unlabelled_predictions(self, path: Path, examples: list[dict[str, Any]], predictions: list[Any]) -> None:
        write_predictions_tsv(Path(path), examples, predictions, with_gold=False)
