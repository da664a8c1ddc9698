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

    User errors: one line; one that every rank raises alike (agreed on, or found before
    Horovod started) is printed by rank 0 alone, so a job prints it once. Signals: 130.
    Bugs: traceback and a one-line summary, 1. Call it from the `except` block that
    caught `exc` (it prints that traceback). tests/scripts/train_many.py prints with it.
    """
    if isinstance(exc, HvdftError):
        _hold_signals()
        if _before_init() or getattr(exc, "agreed", False):
            if _is_main():  # one error for the whole job: no rank label
                click.echo(f"hvdft: error: {exc}", err=True)
        else:
            click.echo(f"hvdft: error: {_rank_label()}{exc}", err=True)
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


def _before_init() -> bool:
    """True while Horovod has not started: the error came from checking the options, which
    every rank of the job does alike."""
    from hvdft import dist

    return dist._hvd is None


def _hold_signals() -> None:
    """This rank has decided how it exits: let that status stand. When one rank exits,
    horovodrun and mpirun SIGTERM the others, which are usually exiting too (an agreed
    error, an interrupt); dying of that signal would replace their status with 143."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _is_main() -> bool:
    """Rank 0 of the job; before Horovod starts, as the launcher numbered this process."""
    from hvdft import dist

    try:
        return dist.is_main()
    except Exception:  # noqa: BLE001 - before init, or after a failed init
        return dist.launch_rank() == 0


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
    if not dist.is_main() or not sys.stderr.isatty():  # no bar frames in log files
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


# ---- train -------------------------------------------------------------------------


def click_option(f: Any, types: dict[str, type], choices: tuple[str, ...] | None = None) -> click.Option:
    """The Click option of a configuration field made with hvdft.config.option()."""
    from hvdft.config import cli_name

    meta, name, kind = f.metadata, cli_name(f.name), types[f.name]
    help_text = meta["help"]
    if kind is bool:  # True or None (unset) by default: a --x/--no-x pair; False: a flag
        decl = f"{name}/--no-{name[2:]}" if f.default is None or f.default else name
        return click.Option([decl, f.name], default=f.default, is_flag=True, show_default=bool(f.default),
                            help=help_text)
    if meta.get("flag_value"):
        return click.Option([name, f.name], is_flag=False, flag_value=meta["flag_value"], default=None,
                            metavar=meta.get("metavar"), help=help_text)
    choices = choices or meta.get("choices")
    kind_type = click.Choice(choices) if choices else {int: click.INT, float: click.FLOAT}.get(kind, click.STRING)
    return click.Option([name, f.name], type=kind_type, default=f.default, show_default=f.default is not None,
                        metavar=meta.get("metavar"), help=help_text)


def _train_params(task_cls: Any) -> list[click.Parameter]:
    """--config, every TrainConfig option, then the task's own options."""
    from hvdft.config import TrainConfig, field_types, options_of

    params: list[click.Parameter] = [
        click.Option(["--config", "config_file"], type=click.Path(dir_okay=False),
                     help="YAML or TOML file with any of these options (the command line wins)."),
    ]
    types = field_types(TrainConfig)
    for f in options_of(TrainConfig):
        if f.name == "metric":
            option = click_option(f, types, task_cls.metric_names)
            option.help = "Validation metric for the best model and early stopping."
            option.show_default = task_cls.default_metric_text or task_cls.default_metric
            params.append(option)
        else:
            params.append(click_option(f, types))
    # Before --scale-lr took a rule, it was a flag: keep the old spelling working.
    params.append(click.Option(["--no-scale-lr", "no_scale_lr"], is_flag=True, hidden=True))
    task_types = field_types(task_cls.Options)
    params += [click_option(f, task_types) for f in options_of(task_cls.Options)]
    return params


def _config_from(ctx: click.Context, task: str, params: dict[str, Any]) -> Any:
    """A TrainConfig from the command line and an optional --config file.

    File values go through the same Click conversion as command-line text (YAML reads
    `5e-5` as a string) and the command line wins over the file.
    """
    from dataclasses import fields

    from hvdft.config import TrainConfig, load_config_file
    from hvdft.tasks import task_class

    values = dict(params)
    config_file = values.pop("config_file", None)
    if values.pop("no_scale_lr", False):
        values["scale_lr"] = "none"
    if config_file:
        by_name = {p.name: p for p in ctx.command.params}
        file_values, lines = load_config_file(config_file)
        for key, value in file_values.items():
            param = by_name.get(key)
            if param is None or key in ("config_file", "no_scale_lr"):
                raise HvdftError(f"unknown option '{key}'", config_file, lines.get(key))
            if ctx.get_parameter_source(key) != ParameterSource.DEFAULT:
                continue
            try:
                values[key] = param.type_cast_value(ctx, value)
            except click.BadParameter as exc:
                raise HvdftError(f"{key}: {exc.message}", config_file, lines.get(key)) from None
    cls = task_class(task)
    own = {f.name for f in fields(cls.Options)}
    options = cls.Options(**{k: v for k, v in values.items() if k in own})
    return TrainConfig(task=task, task_options=options, **{k: v for k, v in values.items() if k not in own})


def _run_training(ctx: click.Context, task: str, params: dict[str, Any]) -> int:
    from hvdft import dist
    from hvdft.train import train

    try:
        cfg = _config_from(ctx, task, params)
        cfg.validate()
    except HvdftError as exc:
        exc.agreed = True  # every rank checks the same options alike: the job says it once
        if dist.launch_size() > 1 and not dist.elastic():
            # Every rank found it: they exit together, each with status 2, rather than the
            # first one's exit making the launcher kill the others mid-import.
            dist.init()
            dist.barrier()
        raise
    dist.init(timeline=cfg.horovod_timeline)
    setup_logging()
    train(cfg)
    return 0


@main.group()
def train() -> None:
    """Fine-tune a model (run it on N ranks with horovodrun/mpirun/srun or hvdft launch)."""


def _train_command(name: str) -> click.Command:
    from hvdft.tasks import task_class

    cls = task_class(name)

    @guarded
    def run(**params: Any) -> int:
        return _run_training(click.get_current_context(), name, params)

    doc = (cls.__doc__ or name).strip()
    return click.Command(name, callback=run, params=_train_params(cls), help=doc,
                         short_help=doc.splitlines()[0])


def _register_tasks() -> None:
    from hvdft.tasks import TASKS

    for name in TASKS:
        train.add_command(_train_command(name))


_register_tasks()
train_ner = train.commands["ner"]  # scripts drive these through make_context()
train_classify = train.commands["classify"]


# ---- predict / eval ----------------------------------------------------------------


def _qa_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """QA models: the columns of JSON lines input and the null-answer threshold, over the model's own."""
    for decl, kind, text in reversed([
        ("--question-column", str, "QA: question column of JSON lines [default: the model's]."),
        ("--context-column", str, "QA: context column of JSON lines [default: the model's]."),
        ("--id-column", str, "QA: question id column of JSON lines [default: the model's]."),
        ("--null-score-diff-threshold", float, "QA, SQuAD 2.0 models: answer nothing above this null-score "
                                               "margin [default: the model's]."),
    ]):
        fn = click.option(decl, type=kind, help=text)(fn)
    return fn


def _seq2seq_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """seq2seq models: the source column and the generation settings, over those saved with the model."""
    for decl, kind, text in reversed([
        ("--source-column", str, "seq2seq: source column (JSON/CSV data) [default: the model's]."),
        ("--num-beams", click.IntRange(min=1), "seq2seq: beam size [default: the model's generation_config]."),
        ("--max-new-tokens", click.IntRange(min=1), "seq2seq: most tokens generated per output "
                                                    "[default: the model's]."),
        ("--length-penalty", float, "seq2seq: beam-search length penalty [default: the model's]."),
        ("--no-repeat-ngram-size", click.IntRange(min=0), "seq2seq: never repeat an n-gram of this size "
                                                          "[default: the model's]."),
    ]):
        fn = click.option(decl, type=kind, help=text)(fn)
    return fn


@main.command()
@click.option("--model", "model_dir", required=True, help="A model folder written by hvdft train.")
@click.option("--input", "input_file", required=True,
              help="NER: CoNLL file or plain text (one sentence per line); classify: CSV/TSV/JSONL or text lines; "
                   "QA: JSON lines of {question, context} or SQuAD JSON; "
                   "re: SemEval-2010 Task 8 file, JSON lines, or text lines marked up with <e1>..</e1> <e2>..</e2>; "
                   "seq2seq: CSV/TSV/JSONL, a pair file or text lines (one source per line).")
@click.option("--output", "output_file", required=True, help="Where rank 0 writes the predictions.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Per rank.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--text-column", help="Text column (JSON/CSV data) [default: the one the model was trained with].")
@click.option("--text-pair-column", help="Second text column (classify sentence pairs).")
@_qa_options
@_seq2seq_options
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
@click.option("--output-dir", help="Also write <output-dir>/eval_report.txt, eval_results.json and the task's "
              "predictions files for eval (QA: predictions.json, nbest_predictions.json).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Per rank.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--text-column", help="Text/tokens column (JSON/CSV data) [default: the model's].")
@click.option("--text-pair-column", help="Second text column (classify sentence pairs).")
@click.option("--label-column", help="Label column (JSON/CSV data) [default: the model's].")
@_qa_options
@click.option("--answers-column", help="QA: answers column of JSON lines [default: the model's].")
@_seq2seq_options
@click.option("--target-column", help="seq2seq: target column (JSON/CSV data) [default: the model's].")
@click.option("--encoding", default="utf-8", show_default=True)
@guarded
def evaluate_cmd(**params: Any) -> int:
    """Score a trained model on labelled data (entity-level for NER, SQuAD EM/F1 for QA); sharded over the ranks."""
    from hvdft import dist
    from hvdft.inference import evaluate_file

    dist.init()
    setup_logging()
    evaluate_file(**params)
    return 0


# ---- plot --------------------------------------------------------------------------


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--output-dir", help="Where the PNG files go [default: RUN_DIR/plots].")
@click.option("--smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.6, show_default=True,
              help="Weight of the moving average drawn over the training loss (TensorBoard's; 0 = none).")
@guarded
def plot(run_dir: str, output_dir: str | None, smoothing: float) -> int:
    """Training curves as PNG pictures, from RUN_DIR/metrics.jsonl.

    loss.png (each logged step and smoothed, with the validation loss), learning_rate.png,
    tokens_per_second.png, grad_norm.png, eval_<metric>.png for every validation metric
    with its best point marked, and overview.png with all of them. `hvdft train` writes
    them at its end when matplotlib is installed (pip install 'hvdft[plot]').
    """
    from pathlib import Path

    from hvdft.plots import write_plots

    for path in write_plots(Path(run_dir), Path(output_dir) if output_dir else None, smoothing):
        click.echo(str(path))
    return 0


from hvdft.launch import launch  # noqa: E402 - its own module, registered here

main.add_command(launch)
