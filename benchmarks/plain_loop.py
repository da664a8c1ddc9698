"""A plain single-process PyTorch + transformers NER fine-tuning loop, written the usual way.

Self-contained (no hvdft import): the baseline hvdft is measured against.

    python benchmarks/plain_loop.py --model DIR --train-file train.txt --batch-size 32 --steps 60
    python benchmarks/plain_loop.py ... --naive --batch-size 16      # the naive recipe

Default ("plain"): fast tokenizer, first sub-word of each word labelled through
`word_ids()`, truncation at the model's limit; length-grouped batches (random mega-batches
of 50 batches, each sorted by length, then the batch order shuffled with the longest batch
first, as in transformers' LengthGroupedSampler plus a shuffle); dynamic padding to the
longest row of each batch; AdamW (fused kernel where torch has one); linear decay schedule;
gradient clipping at 1.0; optional bf16/fp16 autocast (the weights and AdamW's state stay
fp32); optional `--compile`: `model.compile(dynamic=True)`, as `hvdft train --compile` does
(length-grouped batches change shape every step).

`--naive`: every row padded to 128 (`padding="max_length", truncation=True,
max_length=128`), random batches with no length grouping. Pass `--precision fp32` and
`--batch-size 16` for the usual naive recipe.

`--profile FILE` writes per-step records (end time, real tokens, padded slots, rows) and
the process's peak RSS / CUDA peak allocation, in the format of hvdft_profiled.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import time

import numpy as np
import torch


def read_conll(path: str) -> list[tuple[list[str], list[str]]]:
    sentences, words, tags = [], [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip() or line.lstrip().startswith("-DOCSTART-"):
                if words:
                    sentences.append((words, tags))
                words, tags = [], []
                continue
            cols = line.split()
            words.append(cols[0])
            tags.append(cols[-1])
    if words:
        sentences.append((words, tags))
    return sentences


def encode(sentences, tokenizer, label2id, max_length, pad_to_max):
    enc = tokenizer(
        [w for w, _ in sentences], is_split_into_words=True, truncation=True, max_length=max_length,
        padding="max_length" if pad_to_max else False,
    )
    rows = []
    for i, (_, tags) in enumerate(sentences):
        labels, previous = [], None
        for w in enc.word_ids(i):
            labels.append(-100 if w is None or w == previous else label2id[tags[w]])
            previous = w
        row = {k: enc[k][i] for k in enc.keys()}
        row["labels"] = labels
        rows.append(row)
    return rows


def batch_order(lengths: np.ndarray, batch_size: int, group: bool, rng: np.random.Generator) -> list[list[int]]:
    order = rng.permutation(len(lengths))
    if group:
        mega = batch_size * 50
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")]
                                for c in (order[i:i + mega] for i in range(0, len(order), mega))])
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if group:
        longest = int(np.argmax([lengths[b].max() for b in batches]))
        rest = [b for i, b in enumerate(batches) if i != longest]
        batches = [batches[longest]] + [rest[i] for i in rng.permutation(len(rest))]
    return batches


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0), ("labels", -100)):
        if key in rows[0]:
            out[key] = torch.tensor([r[key] + [fill] * (longest - len(r[key])) for r in rows], dtype=torch.long)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Local model folder (config, weights, tokenizer).")
    p.add_argument("--train-file", required=True, help="CoNLL file: word ... tag, blank line between sentences.")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--compile", action="store_true", help="model.compile(dynamic=True), as hvdft --compile.")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--naive", action="store_true", help="Pad every row to 128, no length grouping.")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default).")
    p.add_argument("--warmup", type=int, default=0, help="Steps before the measured window (CUDA sync there).")
    p.add_argument("--no-cudnn-sdpa", action="store_true", help="torch.backends.cuda.enable_cudnn_sdp(False).")
    p.add_argument("--profile", help="Write per-step records here (JSON).")
    args = p.parse_args()

    from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer, get_linear_schedule_with_warmup

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_cudnn_sdpa and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    sentences = read_conll(args.train_file)
    labels = sorted({t for _, tags in sentences for t in tags})
    label2id = {t: i for i, t in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(args.model, use_fast=True)
    config = AutoConfig.from_pretrained(args.model, num_labels=len(labels),
                                        id2label=dict(enumerate(labels)), label2id=label2id)
    limit = min(config.max_position_embeddings, tokenizer.model_max_length or 10**6)
    max_length = 128 if args.naive else limit
    rows = encode(sentences, tokenizer, label2id, max_length, pad_to_max=args.naive)
    lengths = np.array([sum(r["attention_mask"]) for r in rows])

    model = AutoModelForTokenClassification.from_pretrained(args.model, config=config).to(device)
    model.train()
    if args.compile:
        model.compile(dynamic=True)
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, args.steps)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float16)
           if args.precision != "fp32" else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    rng = np.random.default_rng(args.seed)
    steps: list[dict] = []
    clock = time.perf_counter
    t_start = clock()
    epoch_batches: list[list[int]] = []
    while len(steps) < args.steps:
        if not epoch_batches:
            epoch_batches = batch_order(lengths, args.batch_size, not args.naive, rng)
        t = clock()
        batch = collate([rows[i] for i in epoch_batches.pop(0)], tokenizer.pad_token_id or 0)
        record = {"tokens": int(batch["attention_mask"].sum()), "slots": int(batch["input_ids"].numel()),
                  "rows": len(batch["input_ids"]), "collate_s": clock() - t}
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with amp:
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad()
        if device.type == "cuda" and len(steps) + 1 in (args.warmup, args.steps):
            torch.cuda.synchronize()
        record["t_end"], record["cpu_end"] = clock(), time.process_time()
        steps.append(record)
        if len(steps) % 10 == 0:
            print(f"step {len(steps)} loss {loss.item():.4f}", flush=True)

    runtime = steps[-1]["t_end"] - t_start
    tokens = sum(s["tokens"] for s in steps)
    result = {
        "rank": 0, "world": 1, "threads": torch.get_num_threads(), "t_start": t_start, "steps": steps,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "device": str(device),
        "results": {"train_runtime": runtime, "train_tokens": tokens, "train_tokens_per_second": tokens / runtime,
                    "train_steps": len(steps), "precision": args.precision, "per_rank_batch_size": args.batch_size,
                    "max_length": max_length, "naive": args.naive, "compile": args.compile, "final_loss": float(loss)},
    }
    if args.profile:
        with open(args.profile, "w") as f:
            json.dump(result, f)
    print(f"{len(steps)} steps, {tokens} real tokens in {runtime:.1f}s: {tokens / runtime:,.0f} tokens/s", flush=True)
    return 0 if math.isfinite(float(loss)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
