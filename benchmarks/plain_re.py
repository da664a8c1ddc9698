"""A plain single-process relation-extraction fine-tuning loop: the reference for `hvdft train re`.

Written the usual way, without hvdft's engine: SemEval-2010 Task 8 sentences are read from
the release files and tokenized as they are, their `<e1>..</e1>` / `<e2>..</e2>` markup
added to the tokenizer as special tokens (the entity markers of Baldini Soares et al.,
2019), the embeddings resized, and the [CLS] sequence-classification head trained with
AdamW (no weight decay on biases and LayerNorm weights), a linear warm-up/decay schedule,
gradient clipping at 1.0, random batches of the GLOBAL batch size (`--group-by-length`:
of similar lengths, as Hugging Face's Trainer and hvdft group them), dynamic padding.
The score is the official measure (macro-F1 over the 9 relations, direction counted,
Other excluded) through hvdft.tasks.relation.official_scores, which the tests show prints
exactly what the organisers' Perl scorer prints; `--scorer` also runs the Perl scorer on
the answer file this script writes.

    S=../shared/data/semeval2010_task8/SemEval2010_task8_all_data
    python benchmarks/plain_re.py --model DIR \\
        --train-file $S/SemEval2010_task8_training/TRAIN_FILE.TXT \\
        --test-file $S/SemEval2010_task8_testing_keys/TEST_FILE_FULL.TXT \\
        --batch-size 32 --epochs 3 --lr 5e-5 --output plain_re.json \\
        --answers answers.txt --scorer $S/SemEval2010_task8_scorer-v1.2/semeval2010_task8_scorer-v1.2.pl

To compare with a 2-rank hvdft run at the same global batch: `horovodrun -np 2 hvdft train re
--batch-size 16 ...` against `plain_re.py --batch-size 32` (same lr, epochs, max length).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import time
from pathlib import Path

import torch

MARKERS = ["<e1>", "</e1>", "<e2>", "</e2>"]
SENTENCE = re.compile(r"^\s*(\d+)\t\"(.*)\"\s*$")


def read_semeval(path: str) -> list[tuple[str, str, str]]:
    """(id, marked sentence, label) of each record of a labelled SemEval-2010 Task 8 file."""
    lines = Path(path).read_bytes().decode("ascii").replace("\r\n", "\n").split("\n")
    records = []
    for i, line in enumerate(lines):
        m = SENTENCE.match(line)
        if m:
            records.append((m.group(1), m.group(2), lines[i + 1].strip()))
    return records


def batches(lengths: list[int], size: int, generator: torch.Generator, group_by_length: bool) -> list[list[int]]:
    """One epoch's batches of row indices: a random order cut into batches of `size`; with
    `group_by_length`, Hugging Face's LengthGroupedSampler rule (mega-batches of 50 batches
    in random order, each sorted by length, longest first), which only saves padding."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        mega = 50 * size
        order = [i for m in range(0, len(order), mega)
                 for i in sorted(order[m:m + mega], key=lambda r: -lengths[r])]
    return [order[i:i + size] for i in range(0, len(order), size)]


def collate(rows: list[dict], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    longest = max(len(r["input_ids"]) for r in rows)
    out = {
        "input_ids": [r["input_ids"] + [pad_id] * (longest - len(r["input_ids"])) for r in rows],
        "attention_mask": [[1] * len(r["input_ids"]) + [0] * (longest - len(r["input_ids"])) for r in rows],
    }
    if "token_type_ids" in rows[0]:
        out["token_type_ids"] = [r["token_type_ids"] + [0] * (longest - len(r["input_ids"])) for r in rows]
    tensors = {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in out.items()}
    if "label" in rows[0]:
        tensors["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long, device=device)
    return tensors


def encode(records, tokenizer, label2id, max_length) -> tuple[list[dict], int]:
    """Tokenized rows; records whose markers do not all fit in max_length are dropped from
    training (the same rule as hvdft; SemEval needs ~130 tokens at most) and counted."""
    enc = tokenizer([s for _, s, _ in records], truncation=True, max_length=max_length)
    marker_ids = set(tokenizer.convert_tokens_to_ids(MARKERS))
    rows, dropped = [], 0
    for i, (_, _, label) in enumerate(records):
        ids = enc["input_ids"][i]
        if len(marker_ids & set(ids)) < 4:
            dropped += 1
            rows.append(None)
            continue
        row = {"input_ids": ids, "label": label2id.get(label, -100)}
        if "token_type_ids" in enc:
            row["token_type_ids"] = enc["token_type_ids"][i]
        rows.append(row)
    return rows, dropped


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Local model folder (config, weights, tokenizer).")
    p.add_argument("--train-file", required=True, help="SemEval-2010 Task 8 TRAIN_FILE.TXT")
    p.add_argument("--test-file", required=True, help="TEST_FILE_FULL.TXT (directed gold labels)")
    p.add_argument("--batch-size", type=int, default=32, help="The GLOBAL batch size.")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-train-samples", type=int, help="Use the first N training sentences.")
    p.add_argument("--max-eval-samples", type=int, help="Use the first N test sentences.")
    p.add_argument("--group-by-length", action="store_true",
                   help="Batches of similar length (HF's LengthGroupedSampler; hvdft's default): less padding.")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default).")
    p.add_argument("--log-every", type=int, default=50, help="Print the mean loss every N steps.")
    p.add_argument("--output", help="Write the results here (JSON).")
    p.add_argument("--answers", help="Write the predictions in the official answer format here.")
    p.add_argument("--scorer", help="semeval2010_task8_scorer-v1.2.pl: run it on the answers (needs --answers).")
    args = p.parse_args()

    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

    from hvdft.tasks.relation import official_scores

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    train = read_semeval(args.train_file)[: args.max_train_samples]
    test = read_semeval(args.test_file)[: args.max_eval_samples]
    labels = sorted({label for _, _, label in train})
    label2id = {label: i for i, label in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(args.model, use_fast=True)
    tokenizer.add_special_tokens({"additional_special_tokens": MARKERS})
    config = AutoConfig.from_pretrained(args.model, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                        label2id=label2id)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, config=config)
    model.resize_token_embeddings(len(tokenizer))
    model.to(device).train()

    train_rows, dropped = encode(train, tokenizer, label2id, args.max_length)
    train_rows = [r for r in train_rows if r is not None]
    if dropped:
        print(f"{dropped} training sentences have a marker beyond {args.max_length} tokens: left out")
    test_rows, cut = encode(test, tokenizer, label2id, args.max_length)

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    steps_per_epoch = math.ceil(len(train_rows) / args.batch_size)
    total = math.ceil(steps_per_epoch * args.epochs)
    scheduler = get_scheduler("linear", optimizer, int(args.warmup_ratio * total), total)
    generator = torch.Generator().manual_seed(args.seed)
    lengths = [len(r["input_ids"]) for r in train_rows]
    pad = tokenizer.pad_token_id or 0

    load_at_start = os.getloadavg()
    start, step, losses, tokens = time.perf_counter(), 0, [], 0
    while step < total:
        for batch in batches(lengths, args.batch_size, generator, args.group_by_length):
            if step >= total:
                break
            inputs = collate([train_rows[i] for i in batch], pad, device)
            tokens += int(inputs["attention_mask"].sum())  # real (non-padding) tokens, as hvdft counts them
            loss = model(**inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if step % args.log_every == 0 or step == total:
                recent = losses[-args.log_every:]
                print(f"step {step}/{total} loss {sum(recent) / len(recent):.4f} "
                      f"({time.perf_counter() - start:.0f}s)", flush=True)
    train_seconds = time.perf_counter() - start

    model.eval()
    pred: list[str | None] = []
    with torch.no_grad():
        for i in range(0, len(test_rows), 64):
            chunk = test_rows[i:i + 64]
            real = [r for r in chunk if r is not None]
            ids = model(**{k: v for k, v in collate(real, pad, device).items() if k != "labels"}).logits.argmax(-1) \
                if real else torch.empty(0)
            it = iter(ids.tolist())
            # a sentence whose markers do not fit: Other, as the official scorer counts a skipped example
            pred += [labels[next(it)] if r is not None else "Other" for r in chunk]
    gold = [label for _, _, label in test]
    scores = official_scores(gold, pred, "Other")
    accuracy = sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)
    result = {
        "macro_f1": round(scores.macro_f1, 2), "micro_f1": round(scores.micro_f1, 2),
        "accuracy": round(100 * accuracy, 2), "train_sentences": len(train_rows), "test_sentences": len(test),
        "test_sentences_not_fitting": cut, "steps": total, "global_batch": args.batch_size, "lr": args.lr,
        "warmup_ratio": args.warmup_ratio, "group_by_length": args.group_by_length,
        "epochs": args.epochs, "max_length": args.max_length, "train_seconds": round(train_seconds, 1),
        "train_tokens": tokens, "train_tokens_per_second": round(tokens / max(train_seconds, 1e-9), 1),
        "threads": torch.get_num_threads(), "load_average_start": [round(x, 2) for x in load_at_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()], "device": str(device),
    }
    print(f"official macro-F1 {scores.macro_f1:.2f}  micro-F1 {scores.micro_f1:.2f}  accuracy {100 * accuracy:.2f}")
    if args.answers:
        with open(args.answers, "w", encoding="ascii", newline="\n") as f:
            f.writelines(f"{sid}\t{label}\n" for (sid, _, _), label in zip(test, pred, strict=True))
        if args.scorer:
            key = Path(args.answers).with_suffix(".key.txt")
            with open(key, "w", encoding="ascii", newline="\n") as f:
                f.writelines(f"{sid}\t{label}\n" for sid, _, label in test)
            out = subprocess.run(["perl", args.scorer, args.answers, str(key)], capture_output=True, text=True,
                                 timeout=120, check=True).stdout
            result["perl_official"] = out.strip().splitlines()[-1]
            print(result["perl_official"])
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
