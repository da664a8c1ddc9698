"""hvdft's QA training step against a plain transformers step, on the same batches (issue 14).

Two checks, one process (Horovod with one rank), hvdft's own setup, sampler and batches:

  steps  dropout off, same start weights: each batch goes once through hvdft's
         `train_step` (fused AdamW inside Horovod's DistributedOptimizer) and once through
         a plain step on a copy of the model (`model(**inputs)`, hvdft's loss written out,
         `clip_grad_norm_`, torch AdamW, LambdaLR). Prints the loss and the pre-clip
         gradient norm of both per step, and the largest weight difference.
  ab     dropout on, same batches and start weights: the plain loop trained with
         transformers' own QA loss (padded positions inside both softmaxes) and with
         hvdft's (padded positions masked out), each then scored on the validation split
         with hvdft's evaluator (official SQuAD v1.1 measure).

    python benchmarks/qa_step_check.py --mode steps --steps 8
    python benchmarks/qa_step_check.py --mode ab --steps 120 --max-length 256

Data: a SQuAD split made by `python -m hvdft.tasks.qa split` (default runs/new_wiki).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["steps", "ab"], required=True)
    p.add_argument("--data", default="runs/new_wiki", help="Folder with train.json and validation.json.")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-train-samples", type=int, default=3000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/qa_step_check")
    return p.parse_args()


def main() -> int:
    a = parse()
    torch.set_num_threads(a.threads)
    from hvdft.config import TrainConfig
    from hvdft.progress import Progress
    from hvdft.resume import enter
    from hvdft.setup import setup, start
    from hvdft.tasks.qa import qa_loss
    from hvdft.train import step_batches, train_step

    cfg = TrainConfig(task="qa", model="minilm", train_file=f"{a.data}/train.json",
                      validation_file=f"{a.data}/validation.json" if a.mode == "ab" else None,
                      max_train_samples=a.max_train_samples, batch_size=a.batch_size, lr=a.lr,
                      max_length=a.max_length, seed=a.seed, dropout=a.mode == "ab", group_by_length=False,
                      output_dir=f"{a.workdir}/out", overwrite_output_dir=True, cache_dir=f"{a.workdir}/cache")
    start(cfg)
    run = setup(cfg)
    progress = Progress()
    window = enter(run, progress)
    batches = []
    for micro in step_batches(run, progress):
        batches.append(micro)
        progress.step += 1
        if len(batches) >= a.steps:
            break

    def plain_step(model, opt, sched, batch, mask: bool) -> tuple[float, float]:
        out = model(**batch.inputs)
        t = batch.targets
        loss = qa_loss(out.start_logits, out.end_logits, t["start_positions"], t["end_positions"],
                       batch.inputs["attention_mask"] if mask else None) / len(batch.rows)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        return loss.item(), norm.item()

    def plain_optimizer(model, total: int):
        """torch AdamW and a linear decay to 0 at step `total`."""
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (total - s) / total))

    if a.mode == "steps":
        plain = copy.deepcopy(run.model)
        # hvdft's schedule is planned for the whole epoch: the plain one gets the same length
        opt, sched = plain_optimizer(plain, run.total_steps)

        class NoRequests:  # no stop signal, no timed checkpoint
            raised = False
            checkpoint = False

            def checkpoint_due(self) -> bool:
                return False

        print("step  plain loss  hvdft loss  plain norm  hvdft norm  max |w_plain - w_hvdft|")
        for k, micro in enumerate(batches, 1):
            loss, norm = plain_step(plain, opt, sched, micro[0], mask=True)
            before = float(window.loss)
            train_step(run, micro, window, NoRequests())
            h_loss = (float(window.loss) - before) / len(micro[0].rows)
            diff = max(float((p - q).abs().max()) for p, q in zip(run.model.parameters(), plain.parameters(),
                                                                  strict=True))
            print(f"{k:4d}  {loss:10.4f}  {h_loss:10.4f}  {norm:10.4f}  {float(window.grad_norm):10.4f}  {diff:.2e}")
        return 0

    init = copy.deepcopy(run.model.state_dict())
    for mask in (True, False):
        model = run.model
        model.load_state_dict(init)
        model.train()
        opt, sched = plain_optimizer(model, a.steps)
        torch.manual_seed(a.seed)  # the same dropout masks for both losses
        t0, losses = time.perf_counter(), []
        for micro in batches:
            losses.append(plain_step(model, opt, sched, micro[0], mask)[0])
        model.eval()
        ev = run.evaluator(run.splits["validation"], run.features["validation"])
        name = "padding masked (hvdft)" if mask else "transformers' own"
        print(f"{name}: loss first {losses[0]:.3f}, last 10 steps {sum(losses[-10:]) / len(losses[-10:]):.3f}; "
              f"dev exact match {ev.metrics['exact_match']:.2f}, F1 {ev.metrics['f1']:.2f} "
              f"({ev.metrics['total']:.0f} questions), {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
