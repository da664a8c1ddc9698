"""A plain single-process PyTorch + transformers extractive-QA fine-tuning loop, written the usual way.

The reference a 2-rank `hvdft train qa` run is measured against (issue 14): same split,
same global batch, F1 within 1 point. Written independently of hvdft's QA task, after
transformers' `run_qa.py` (`prepare_train_features`, `prepare_validation_features`,
`postprocess_qa_predictions`), so a windowing or offset slip in either shows up as a gap.
Only the official SQuAD measure is shared (`hvdft.tasks.squad_metric`).

    python benchmarks/plain_qa.py --model DIR --train-file train.json --validation-file validation.json \\
        --batch-size 32 --epochs 2 --output plain_qa.json

Recipe: question + context windows (`--max-length` 384, `--doc-stride` 128 tokens shared by
consecutive windows, as run_qa.py), the first answer located through the offset mapping
(run_qa.py's walk, with one fix: an answer ending a window no longer gets [SEP] as its
start), windows without it labelled at the CLS token; random batches, dynamic padding; the model's
own QA loss ((CE(start) + CE(end)) / 2, mean over windows); AdamW (weight decay 0), linear decay to 0, no
warm-up; gradient clipping at 1.0. Evaluation: n-best start/end logits per window (20,
answers of at most 30 tokens), best over the windows of a question; with
`--version-2-with-negative`, the lowest null score over the windows against the best span
with `--null-score-diff-threshold`. Prints and writes a JSON report (scores in percent, the
training time and real (non-padding) tokens per second).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time

import numpy as np
import torch


def read_questions(path: str) -> list[dict]:
    """Nested SQuAD JSON or the Hub's flat rows (JSON lines): id, question, context, answers{text, answer_start}."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and "data" in obj:
        return [{"id": qa["id"], "question": qa["question"], "context": p["context"],
                 "answers": {"text": [a["text"] for a in qa["answers"]],
                             "answer_start": [a["answer_start"] for a in qa["answers"]]}}
                for article in obj["data"] for p in article["paragraphs"] for qa in p["qas"]]
    rows = obj if isinstance(obj, list) else [json.loads(line) for line in text.splitlines() if line.strip()]
    return [{k: r[k] for k in ("id", "question", "context", "answers")} for r in rows]


def train_features(questions, tokenizer, max_length, doc_stride):
    pad_right = tokenizer.padding_side == "right"
    qs = [q["question"].lstrip() for q in questions]
    cs = [q["context"] for q in questions]
    enc = tokenizer(qs if pad_right else cs, cs if pad_right else qs,
                    truncation="only_second" if pad_right else "only_first", max_length=max_length,
                    stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)
    rows = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        ids = enc["input_ids"][i]
        cls_index = ids.index(tokenizer.cls_token_id)
        seq = enc.sequence_ids(i)
        answers = questions[enc["overflow_to_sample_mapping"][i]]["answers"]
        start_pos = end_pos = cls_index
        if answers["answer_start"]:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            ctx = 1 if pad_right else 0
            token_start = 0
            while seq[token_start] != ctx:
                token_start += 1
            token_end = len(ids) - 1
            while seq[token_end] != ctx:
                token_end -= 1
            if offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char:
                # run_qa.py bounds this walk by len(offsets): when the answer is the window's last
                # context token it steps onto [SEP] (offset (0, 0)) and labels start > end.
                last = token_end
                while token_start <= last and offsets[token_start][0] <= start_char:
                    token_start += 1
                start_pos = token_start - 1
                while offsets[token_end][1] >= end_char:
                    token_end -= 1
                end_pos = token_end + 1
        row = {k: enc[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        row["start_positions"], row["end_positions"] = start_pos, end_pos
        rows.append(row)
    return rows


def eval_features(questions, tokenizer, max_length, doc_stride):
    pad_right = tokenizer.padding_side == "right"
    qs = [q["question"].lstrip() for q in questions]
    cs = [q["context"] for q in questions]
    enc = tokenizer(qs if pad_right else cs, cs if pad_right else qs,
                    truncation="only_second" if pad_right else "only_first", max_length=max_length,
                    stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)
    rows = []
    ctx = 1 if pad_right else 0
    for i, offsets in enumerate(enc["offset_mapping"]):
        seq = enc.sequence_ids(i)
        row = {k: enc[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        row["question"] = enc["overflow_to_sample_mapping"][i]
        row["offset_mapping"] = [o if seq[k] == ctx else None for k, o in enumerate(offsets)]
        rows.append(row)
    return rows


def collate(rows, pad_id):
    longest = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
        if key in rows[0]:
            out[key] = torch.tensor([r[key] + [fill] * (longest - len(r[key])) for r in rows], dtype=torch.long)
    for key in ("start_positions", "end_positions"):
        if key in rows[0]:
            out[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
    return out


def postprocess(questions, rows, start_logits, end_logits, n_best_size, max_answer_length, version_2, threshold):
    """run_qa.py's postprocess_qa_predictions: {id: answer}, {id: null score diff}."""
    by_question: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_question.setdefault(row["question"], []).append(i)
    answers, diffs = {}, {}
    for q, example in enumerate(questions):
        context = example["context"]
        min_null = None
        candidates = []
        for i in by_question.get(q, []):
            s, e, offsets = start_logits[i], end_logits[i], rows[i]["offset_mapping"]
            null = s[0] + e[0]
            if min_null is None or null < min_null:
                min_null = null
            starts = np.argsort(s)[-1 : -n_best_size - 1 : -1]
            ends = np.argsort(e)[-1 : -n_best_size - 1 : -1]
            for a in starts:
                for b in ends:
                    if a >= len(offsets) or b >= len(offsets) or offsets[a] is None or offsets[b] is None:
                        continue
                    if b < a or b - a + 1 > max_answer_length:
                        continue
                    candidates.append((s[a] + e[b], offsets[a][0], offsets[b][1]))
        candidates.sort(key=lambda x: -x[0])
        best = candidates[0] if candidates else (0.0, 0, 0)
        text = context[best[1] : best[2]]
        if version_2:
            diff = float(min_null - best[0])
            diffs[example["id"]] = diff
            if diff > threshold:
                text = ""
        answers[example["id"]] = text
    return answers, diffs


def masked_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(CE(start) + CE(end)) / 2, mean over windows, with the padded positions (attention
    mask 0) left out of both softmaxes: the objective hvdft trains on, whose value does not
    depend on how wide the batch is padded. The model's own loss keeps them in."""
    inputs = {k: v for k, v in batch.items() if k not in ("start_positions", "end_positions")}
    out = model(**inputs)
    pad = batch["attention_mask"] == 0
    start = out.start_logits.float().masked_fill(pad, torch.finfo(torch.float32).min)
    end = out.end_logits.float().masked_fill(pad, torch.finfo(torch.float32).min)
    ce = torch.nn.functional.cross_entropy
    return (ce(start, batch["start_positions"]) + ce(end, batch["end_positions"])) / 2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Local model folder (config, weights, tokenizer).")
    p.add_argument("--train-file", required=True, help="SQuAD JSON, or the Hub's flat rows as JSON lines.")
    p.add_argument("--validation-file", required=True)
    p.add_argument("--batch-size", type=int, default=32, help="Windows per step (the global batch).")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=0, help="Stop after this many steps (0: --epochs).")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--n-best-size", type=int, default=20)
    p.add_argument("--max-answer-length", type=int, default=30)
    p.add_argument("--version-2-with-negative", action="store_true")
    p.add_argument("--null-score-diff-threshold", type=float, default=0.0)
    p.add_argument("--max-train-samples", type=int, default=0, help="First N training questions (0: all).")
    p.add_argument("--max-eval-samples", type=int, default=0, help="First N evaluation questions (0: all).")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default).")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--mask-padding", action="store_true",
                   help="Leave padded positions out of both softmaxes (hvdft's QA loss) instead of the "
                        "model's own loss, which keeps them in.")
    p.add_argument("--output", help="Write the JSON report here too.")
    args = p.parse_args()

    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, get_linear_schedule_with_warmup

    from hvdft.tasks.squad_metric import squad_v1, squad_v2

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model, use_fast=True)
    train_q = read_questions(args.train_file)
    eval_q = read_questions(args.validation_file)
    if args.max_train_samples:
        train_q = train_q[: args.max_train_samples]
    if args.max_eval_samples:
        eval_q = eval_q[: args.max_eval_samples]
    rows = train_features(train_q, tokenizer, args.max_length, args.doc_stride)
    steps_per_epoch = math.ceil(len(rows) / args.batch_size)
    total_steps = args.steps or math.ceil(args.epochs * steps_per_epoch)

    model = AutoModelForQuestionAnswering.from_pretrained(args.model).to(device)
    # weight decay as hvdft's and run_qa.py's default (0), not torch's AdamW default (0.01)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, total_steps)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float16)
           if args.precision != "fp32" else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    rng = np.random.default_rng(args.seed)
    pad_id = tokenizer.pad_token_id or 0

    model.train()
    step, tokens, losses = 0, 0, []
    t0 = time.perf_counter()
    while step < total_steps:
        order = rng.permutation(len(rows))
        for start in range(0, len(order), args.batch_size):
            if step >= total_steps:
                break
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in order[start : start + args.batch_size]],
                                                         pad_id).items()}
            tokens += int(batch["attention_mask"].sum())
            with amp:
                loss = (masked_loss(model, batch) if args.mask_padding else model(**batch).loss)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - t0

    model.eval()
    ev = eval_features(eval_q, tokenizer, args.max_length, args.doc_stride)
    starts, ends = [], []
    with torch.no_grad():
        for start in range(0, len(ev), args.eval_batch_size):
            chunk = ev[start : start + args.eval_batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            with amp:
                out = model(**batch)
            for k, r in enumerate(chunk):
                n = len(r["input_ids"])
                starts.append(out.start_logits[k, :n].float().cpu().numpy())
                ends.append(out.end_logits[k, :n].float().cpu().numpy())
    answers, diffs = postprocess(eval_q, ev, starts, ends, args.n_best_size, args.max_answer_length,
                                 args.version_2_with_negative, args.null_score_diff_threshold)
    refs = {q["id"]: q["answers"]["text"] for q in eval_q}
    metrics = squad_v2(refs, answers) if args.version_2_with_negative else squad_v1(refs, answers)
    report = {
        "recipe": "plain",
        "model": args.model,
        "train_questions": len(train_q),
        "train_windows": len(rows),
        "eval_questions": len(eval_q),
        "eval_windows": len(ev),
        "batch_size": args.batch_size,
        "steps": step,
        "lr": args.lr,
        "loss": "padding masked (hvdft's)" if args.mask_padding else "the model's own",
        "max_length": args.max_length,
        "doc_stride": args.doc_stride,
        "device": str(device),
        "precision": args.precision,
        "train_seconds": round(train_seconds, 3),
        "real_tokens": tokens,
        "real_tokens_per_second": round(tokens / train_seconds, 1) if train_seconds else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_loss": sum(losses) / len(losses) if losses else None,  # mean over the steps, as hvdft's
        "last_10_steps_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        **{f"eval_{k}": v for k, v in metrics.items()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
