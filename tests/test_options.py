"""Training options that change what a run does, each checked on what it writes.

--scale-lr, --config (YAML and TOML, values as the parser reads them), --precision bf16
and fp16, --allreduce-op adasum, --eval-every, --early-stopping-patience, best-model
selection, --pad-to-multiple-of and the weight-decay groups. All cases run in ONE real
2-rank mpirun job (tests/scripts/train_many.py: each case is `hvdft train ner ARGS`
minus the process start), with the tiny random BERT: only the engine is under test.
mpirun, not horovodrun: Horovod's Adasum on the CPU needs the MPI controller.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from support import (
    debug_events,
    eval_records,
    fillers_as_entities,
    job_env,
    load_tensors,
    make_tiny_model,
    mpirun,
    run_job,
    same_tensors,
    sentences,
    train_records,
    write_conll,
)

pytestmark = pytest.mark.slow

LR = 1e-3
STEPS_PER_EPOCH = 3  # 24 sentences / 2 ranks / batch 4


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("options")
    f = {"tmp": tmp, "model": make_tiny_model(tmp / "tiny"), "cache": tmp / "cache"}
    f["train"] = write_conll(tmp / "train.txt", sentences(24, seed=21))
    f["valid"] = write_conll(tmp / "valid.txt", sentences(8, seed=22))
    f["declining"] = write_conll(tmp / "declining.txt", fillers_as_entities(sentences(16, seed=6)))
    # YAML 1.1 (PyYAML) reads 5e-5 as a STRING (a float needs a dot); booleans and
    # quoted numbers as written; keys with dashes or underscores.
    f["yaml"] = tmp / "run.yaml"
    f["yaml"].write_text("lr: 5e-5\nbatch-size: '2'\nmax_steps: 2\nshuffle: false\nlog-every: 1\nprecision: fp32\n")
    f["toml"] = tmp / "run.toml"
    f["toml"].write_text('lr = "2e-5"\nbatch_size = 2\nmax-steps = 1\nwarmup_ratio = 0.5\n')
    return f


def out(f: dict[str, Path], name: str) -> Path:
    return f["tmp"] / name


def args(f: dict[str, Path], name: str, *extra: str, valid: str | None = None) -> list[str]:
    a = ["--model", str(f["model"]), "--train-file", str(f["train"]), "--epochs", "1", "--batch-size", "4",
         "--max-length", "32", "--lr", str(LR), "--log-every", "1", "--cache-dir", str(f["cache"]),
         "--output-dir", str(out(f, name))]
    if valid:
        a += ["--validation-file", str(f[valid])]
    return [*a, *extra]


def debug(f: dict[str, Path], name: str) -> dict[str, str]:
    return {"HVDFT_DEBUG_DIR": str(f["tmp"] / f"{name}_debug")}


def without_lr(argv: list[str]) -> list[str]:
    """The command line without --lr and --batch-size, so that the config file's apply."""
    for option in ("--lr", "--batch-size"):
        i = argv.index(option)
        argv = argv[:i] + argv[i + 2:]
    return argv


def cases(f: dict[str, Path]) -> list[dict]:
    return [
        {"name": "scale_none", "args": args(f, "scale_none", "--max-steps", "1")},
        {"name": "scale_linear", "args": args(f, "scale_linear", "--max-steps", "1", "--scale-lr", "linear")},
        {"name": "scale_sqrt", "args": args(f, "scale_sqrt", "--max-steps", "1", "--scale-lr", "sqrt")},
        # the file's values apply where the command line gives none: --max-steps 1 wins over its 2
        {"name": "config_yaml", "args": without_lr(args(f, "config_yaml", "--config", str(f["yaml"]),
                                                        "--max-steps", "1"))},
        {"name": "config_toml", "args": without_lr(args(f, "config_toml", "--config", str(f["toml"])))},
        {"name": "fp32", "args": args(f, "fp32", "--save-every", "3")},
        {"name": "bf16", "args": args(f, "bf16", "--precision", "bf16", "--save-every", "3")},
        {"name": "fp16", "args": args(f, "fp16", "--precision", "fp16", "--save-every", "3")},
        {"name": "adasum", "args": args(f, "adasum", "--allreduce-op", "adasum"), "env": debug(f, "adasum")},
        {"name": "pad8", "args": args(f, "pad8", "--pad-to-multiple-of", "8", "--no-group-by-length"),
         "env": debug(f, "pad8")},
        {"name": "pad0", "args": args(f, "pad0", "--no-group-by-length"), "env": debug(f, "pad0")},
        {"name": "eval_every", "args": args(f, "eval_every", "--epochs", "2", "--eval-every", "2", valid="valid")},
        {"name": "eval_per_epoch", "args": args(f, "eval_per_epoch", "--epochs", "2", valid="valid")},
        # a dev set the early model scores best on: evaluated and saved after every step
        {"name": "best", "args": args(f, "best", "--epochs", "2", "--eval-every", "1", "--save-every", "1",
                                      "--save-total-limit", "0", valid="declining")},
        {"name": "early_stop", "args": args(f, "early_stop", "--epochs", "3", "--eval-every", "1",
                                            "--early-stopping-patience", "2", valid="declining")},
        # one optimizer step, the same but for weight decay; a rate that makes decay visible
        {"name": "decay_0", "args": args(f, "decay_0", "--max-steps", "1", "--lr", "1e-2", "--weight-decay", "0")},
        {"name": "decay_half", "args": args(f, "decay_half", "--max-steps", "1", "--lr", "1e-2",
                                            "--weight-decay", "0.5")},
    ]


@pytest.fixture(scope="module")
def batch(files: dict[str, Path]) -> dict[str, list[dict]]:
    """Every case in one 2-rank mpirun job; name -> [rank 0's record, rank 1's] (exit
    status, stdout, stderr). A case that fails fails only the tests that read it."""
    spec = cases(files)
    (files["tmp"] / "spec.json").write_text(json.dumps(spec))
    script = str(Path(__file__).parent / "scripts" / "train_many.py")
    result = run_job([*mpirun(2), sys.executable, script, str(files["tmp"] / "spec.json"),
                      str(files["tmp"] / "results")], timeout=1200, env=job_env())
    assert result.returncode == 0, result.describe()
    ranks = [{c["name"]: c for c in json.loads((files["tmp"] / "results" / f"rank{r}.json").read_text())}
             for r in (0, 1)]
    return {name: [ranks[0][name], ranks[1][name]] for name in ranks[0]}


def done(batch: dict, name: str) -> dict:
    """Rank 0's record of a case that every rank finished with exit status 0."""
    for r, record in enumerate(batch[name]):
        assert record["code"] == 0, f"{name} on rank {r}:\n{record['stderr'][-4000:]}"
    return batch[name][0]


def results(f: dict[str, Path], name: str) -> dict:
    return json.loads((out(f, name) / "all_results.json").read_text())


def header(batch: dict, name: str) -> str:
    return done(batch, name)["stdout"]


# ----------------------------------------------------------------------------- learning rate


@pytest.mark.parametrize(("name", "factor", "said"), [("scale_none", 1.0, "as given"),
                                                       ("scale_linear", 2.0, f"{LR:g} scaled linear for 2 ranks"),
                                                       ("scale_sqrt", math.sqrt(2), f"{LR:g} scaled sqrt for 2 ranks")])
def test_learning_rate_as_given_unless_scaled(files: dict[str, Path], batch: dict, name: str, factor: float,
                                              said: str) -> None:
    effective = LR * factor
    done(batch, name)
    assert results(files, name)["learning_rate"] == pytest.approx(effective, rel=1e-12)
    assert results(files, name)["global_batch_size"] == 8
    text = header(batch, name)
    assert "= 8 global" in text, text
    assert f"lr {effective:g} ({said})" in text, text


def test_the_rate_reaches_the_optimizer(files: dict[str, Path], batch: dict) -> None:
    """Adam's first step moves a weight by lr x g / (|g| + eps): by the rate itself,
    for any weight with a gradient well above eps. The linear run's moves by twice it."""
    done(batch, "scale_none"), done(batch, "scale_linear")
    start = load_tensors(files["model"])
    none, linear = load_tensors(out(files, "scale_none")), load_tensors(out(files, "scale_linear"))
    key = "bert.encoder.layer.0.attention.self.query.weight"
    moved_none = float((none[key] - start[key.removeprefix("bert.")]).abs().max())
    moved_linear = float((linear[key] - start[key.removeprefix("bert.")]).abs().max())
    assert moved_none == pytest.approx(LR, rel=0.01) and moved_linear == pytest.approx(2 * LR, rel=0.01)


# ----------------------------------------------------------------------------- --config


def test_yaml_config_values_are_converted_and_the_command_line_wins(files: dict[str, Path], batch: dict) -> None:
    done(batch, "config_yaml")
    r = results(files, "config_yaml")
    assert r["learning_rate"] == 5e-5 and isinstance(r["learning_rate"], float)  # "5e-5", a string to YAML
    assert r["per_rank_batch_size"] == 2 and r["global_batch_size"] == 4  # '2', quoted
    assert r["train_steps"] == 1  # --max-steps 1 on the command line, 2 in the file
    assert "lr 5e-05 (as given)" in header(batch, "config_yaml")
    run = json.loads((out(files, "config_yaml") / "hvdft_run.json").read_text())["config"]
    assert run["shuffle"] is False and run["log_every"] == 1 and run["lr"] == 5e-5


def test_toml_config_values_are_converted(files: dict[str, Path], batch: dict) -> None:
    done(batch, "config_toml")
    r = results(files, "config_toml")
    assert r["learning_rate"] == 2e-5 and r["per_rank_batch_size"] == 2 and r["train_steps"] == 1
    run = json.loads((out(files, "config_toml") / "hvdft_run.json").read_text())["config"]
    assert run["warmup_ratio"] == 0.5 and run["max_steps"] == 1


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_says_so(files: dict[str, Path], batch: dict, precision: str) -> None:
    done(batch, precision), done(batch, "fp32")
    r = results(files, precision)
    assert r["precision"] == precision and r["train_steps"] == STEPS_PER_EPOCH
    assert f"precision {precision}" in header(batch, precision)
    lines = train_records(out(files, precision))
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(math.isfinite(x["loss"]) and 0 < x["loss"] < 10 for x in lines), lines
    # the same first batch from the same weights as the fp32 run: the loss is computed in
    # lower precision (so not bit-identical: autocast is on), and close to fp32's
    fp32 = train_records(out(files, "fp32"))[0]["loss"]
    assert lines[0]["loss"] != fp32 and lines[0]["loss"] == pytest.approx(fp32, rel=0.05)
    state = torch.load(out(files, precision) / "checkpoints" / "checkpoint-3" / "trainer_state.pt",
                       map_location="cpu", weights_only=True)
    if precision == "fp16":  # a GradScaler: its scale is saved (and resumed)
        assert state["scaler"]["scale"] > 0
        assert any(x["grad_norm"] is not None and math.isfinite(x["grad_norm"]) for x in lines)
    else:  # bf16 has fp32's range: no scaler
        assert not state["scaler"]
        assert all(math.isfinite(x["grad_norm"]) for x in lines)
    moved = load_tensors(out(files, precision))
    start = load_tensors(files["model"])
    assert not torch.equal(moved["bert.embeddings.word_embeddings.weight"], start["embeddings.word_embeddings.weight"])


# ----------------------------------------------------------------------------- Adasum


def test_adasum_trains_and_the_ranks_agree(files: dict[str, Path], batch: dict) -> None:
    done(batch, "adasum")
    r = results(files, "adasum")
    assert r["train_steps"] == STEPS_PER_EPOCH and r["learning_rate"] == LR
    assert "allreduce adasum" in header(batch, "adasum")
    assert all(math.isfinite(x["loss"]) for x in train_records(out(files, "adasum")))
    folder = files["tmp"] / "adasum_debug"
    ends = [[e for e in debug_events(folder, r) if e["event"] == "end"][-1] for r in (0, 1)]
    after = [e for e in debug_events(folder, 0) if e["event"] == "after_broadcast"][-1]
    assert ends[0]["params"] == ends[1]["params"], "the ranks' weights diverged"
    assert ends[0]["params"] != after["params"], "nothing was trained"


# ----------------------------------------------------------------------------- evaluation


def test_eval_every_n_steps_and_per_epoch(files: dict[str, Path], batch: dict) -> None:
    done(batch, "eval_every"), done(batch, "eval_per_epoch")
    assert [r["step"] for r in eval_records(out(files, "eval_every"))] == [2, 4, 6]
    assert [r["step"] for r in eval_records(out(files, "eval_per_epoch"))] == [3, 6]


def test_best_model_is_the_best_evaluation_and_equals_its_checkpoint(files: dict[str, Path], batch: dict) -> None:
    done(batch, "best")
    folder = out(files, "best")
    f1 = {r["step"]: r["eval_f1"] for r in eval_records(folder)}
    assert sorted(f1) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    best = max(f1, key=lambda s: (f1[s], -s))
    last = max(f1)
    assert best != last and f1[best] > f1[last], f"this dev set must favour an early model: {f1}"
    r = results(files, "best")
    assert r["best_eval_metric"] == f1[best] and r["eval_f1"] == f1[best] and not r["stopped_early"]
    final = load_tensors(folder)
    assert same_tensors(final, load_tensors(folder / "checkpoints" / f"checkpoint-{best}"))
    assert not same_tensors(final, load_tensors(folder / "checkpoints" / f"checkpoint-{last}"))


def test_early_stopping_after_patience_evaluations_without_gain(files: dict[str, Path], batch: dict) -> None:
    folder = out(files, "early_stop")
    stopped = done(batch, "early_stop")
    f1 = {r["step"]: r["eval_f1"] for r in eval_records(folder)}
    best = max(f1, key=lambda s: (f1[s], -s))
    assert sorted(f1) == list(range(1, best + 3)), f"patience 2: stops 2 evaluations after the best: {f1}"
    r = results(files, "early_stop")
    assert r["stopped_early"] is True and r["train_steps"] == best + 2 < 3 * STEPS_PER_EPOCH
    assert r["best_eval_metric"] == f1[best] and r["eval_f1"] == f1[best]
    assert re.search(r"early stopping: no f1 gain in 2 evaluations", stopped["stdout"] + stopped["stderr"])


# ----------------------------------------------------------------------------- batches, decay


def test_pad_to_multiple_of(files: dict[str, Path], batch: dict) -> None:
    def widths(name: str) -> list[int]:
        done(batch, name)
        steps = [e for e in debug_events(files["tmp"] / f"{name}_debug", 0) if e["event"] == "step"]
        return [shape[1] for e in steps for shape in e["shapes"]]

    padded, plain = widths("pad8"), widths("pad0")
    assert len(padded) == len(plain) == STEPS_PER_EPOCH
    assert all(w % 8 == 0 for w in padded), padded
    assert any(w % 8 for w in plain), plain  # else this data could not show it
    assert all(p == -(-w // 8) * 8 for p, w in zip(padded, plain, strict=True))  # the longest row, rounded up


def test_weight_decay_skips_biases_and_layer_norm(files: dict[str, Path], batch: dict) -> None:
    """After one step from the same weights with the same gradients, decoupled decay is
    all that differs: p(decay) = p(no decay) - lr x wd x p0 for decayed tensors, and
    nothing for biases and LayerNorm weights."""
    done(batch, "decay_0"), done(batch, "decay_half")
    start = load_tensors(files["model"])
    plain, decayed = load_tensors(out(files, "decay_0")), load_tensors(out(files, "decay_half"))
    lr_wd = 1e-2 * 0.5
    checked = {"decay": 0, "no_decay": 0}
    for name, p in plain.items():
        if name.endswith("bias") or "LayerNorm" in name:
            assert torch.equal(p, decayed[name]), f"{name} was decayed"
            checked["no_decay"] += 1
        elif name.removeprefix("bert.") in start:
            p0 = start[name.removeprefix("bert.")]
            assert torch.allclose(p - decayed[name], lr_wd * p0, rtol=1e-3, atol=1e-7), f"{name} was not decayed"
            checked["decay"] += 1
    assert checked["decay"] >= 10 and checked["no_decay"] >= 10, checked
