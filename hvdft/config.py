"""The run configuration: every option of `hvdft train <task>`, in one dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from hvdft.errors import HvdftError


@dataclass
class TrainConfig:
    task: str = "ner"
    model: str = "minilm"
    dataset: str | None = None
    dataset_config: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    encoding: str = "utf-8"
    output_dir: str = "runs/hvdft"
    epochs: float = 3.0
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int | None = None
    seed: int = 42
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    precision: str = "fp32"
    grad_accum: int = 1
    fp16_allreduce: bool = False
    allreduce_op: str = "average"
    scale_lr: str = "none"  # none | linear | sqrt: --lr times 1, N or sqrt(N) ranks
    eval_every: int = 0  # steps; 0 = once per epoch
    early_stopping_patience: int = 0  # evaluations without improvement; 0 = off
    metric: str | None = None
    label_all_tokens: bool = False
    pad_to_multiple_of: int = 0
    group_by_length: bool = True
    shuffle: bool = True
    dropout: bool = True
    num_workers: int = 0
    log_every: int = 10
    save_every: int = 0  # steps; 0 = once per epoch
    save_total_limit: int = 2
    resume: str | None = None
    overwrite_output_dir: bool = False
    trust_remote_code: bool = False
    cache_dir: str | None = None
    max_steps: int = 0  # stop after this many optimizer steps (0 = no limit)

    def validate(self) -> None:
        positive = ("batch_size", "grad_accum", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise HvdftError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "epochs"):
            if getattr(self, name) <= 0:
                raise HvdftError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        nonneg = ("weight_decay", "warmup_ratio", "eval_every", "early_stopping_patience",
                  "save_every", "save_total_limit", "pad_to_multiple_of", "max_steps", "num_workers",
                  "max_grad_norm", "seed")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise HvdftError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.warmup_ratio >= 1:
            raise HvdftError(f"--warmup-ratio must be below 1, got {self.warmup_ratio}")
        if self.max_length is not None and self.max_length < 8:
            raise HvdftError(f"--max-length must be at least 8, got {self.max_length}")
        for name in ("max_train_samples", "max_eval_samples"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise HvdftError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise HvdftError(f"--precision must be fp32, bf16 or fp16, got {self.precision}")
        if self.allreduce_op not in ("average", "adasum"):
            raise HvdftError(f"--allreduce-op must be average or adasum, got {self.allreduce_op}")
        if self.scale_lr not in ("none", "linear", "sqrt"):
            raise HvdftError(f"--scale-lr must be none, linear or sqrt, got {self.scale_lr}")
        if self.scale_lr != "none" and self.allreduce_op == "adasum":
            raise HvdftError(f"--scale-lr {self.scale_lr} with --allreduce-op adasum: Adasum combines the "
                             "ranks' updates adaptively and takes the rate as given; drop --scale-lr")
        if not self.dataset and not self.train_file:
            raise HvdftError("give --train-file (and --validation-file) or --dataset")

    def effective_lr(self, world: int) -> float:
        """The peak learning rate on `world` ranks: --lr scaled as --scale-lr says."""
        return self.lr * {"none": 1.0, "linear": float(world), "sqrt": world**0.5}[self.scale_lr]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise HvdftError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        return cls(**values)


# Options that must match for `--resume` to continue a run rather than start another.
RESUME_MUST_MATCH = ("task", "model", "seed", "batch_size", "grad_accum", "max_length",
                     "label_all_tokens", "group_by_length", "shuffle", "precision")


def load_config_file(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Options from a YAML or TOML file, keys as on the command line (dashes or
    underscores), and the line each key is on (for error messages). The values are
    as the parser read them: the caller converts them like command-line text."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise HvdftError(f"cannot read config file: {exc.strerror}", p) from None
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # noqa: BLE001 - parser errors differ per format
        raise HvdftError(f"invalid config file: {exc}".splitlines()[0], p) from None
    if not isinstance(data, dict):
        raise HvdftError("config file must hold a mapping of option: value", p)
    options = {str(k).replace("-", "_"): v for k, v in data.items()}
    return options, _key_lines(text, list(data))


def _key_lines(text: str, keys: list[Any]) -> dict[str, int]:
    """option -> 1-based line of its key: the first line that starts with the key
    (optionally quoted) followed by ':' or '='. Neither parser reports positions in
    its plain API, and a top-level key starts its line in both formats."""
    import re

    lines: dict[str, int] = {}
    text_lines = text.splitlines()
    for key in keys:
        pattern = re.compile(r"""^\s*["']?""" + re.escape(str(key)) + r"""["']?\s*[:=]""")
        found = next((i for i, line in enumerate(text_lines, 1) if pattern.match(line)), None)
        if found is not None:
            lines[str(key).replace("-", "_")] = found
    return lines
