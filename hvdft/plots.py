"""Training curves as PNG pictures, from a run's metrics.jsonl (`hvdft plot RUN_DIR`, and
the end of `hvdft train` when matplotlib is installed: `pip install 'hvdft[plot]'`).

One picture per curve in RUN_DIR/plots/, and overview.png with all of them:

- loss.png: the training loss of every logged step (thin) and its smoothed curve
  (TensorBoard's debiased exponential moving average), with the validation loss as dots;
- learning_rate.png, tokens_per_second.png (real tokens, all ranks), grad_norm.png (of the
  averaged gradient, before clipping);
- eval_<metric>.png for every validation metric, its best point marked (highest; lowest
  for the loss).

matplotlib is driven through its object API with the Agg canvas (no pyplot): no display,
no global state, nothing changed for a caller that uses pyplot itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvdft.errors import HvdftError

SMOOTHING = 0.6  # TensorBoard's default
# Evaluation keys that count things rather than score them: not plotted.
COUNTS = ("sentences", "examples", "samples", "words", "runtime")
PANEL_INCHES, DPI = (6.4, 3.6), 100


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training records, evaluation records) of a metrics.jsonl, in file order. A line cut
    by a kill is skipped. Raises HvdftError when the file is missing or holds no record."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise HvdftError(f"cannot read the run's metrics: {exc.strerror}", path) from None
    train, evals = [], []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or "step" not in record:
            continue
        if "loss" in record:
            train.append(record)
        elif any(k.startswith("eval_") for k in record):
            evals.append(record)
    if not train and not evals:
        raise HvdftError("holds no training or evaluation record to plot", path)
    return train, evals


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average with the zero start debiased
    (so the first points are not dragged towards 0). `weight` 0 returns the values."""
    out, last = [], 0.0
    for n, value in enumerate(values, 1):
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight**n))
    return out


@dataclass
class Panel:
    name: str  # the PNG's file name without .png
    title: str
    ylabel: str
    draw: Callable[[Any], None]  # draws on a matplotlib Axes


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [float(v) for _, v in pairs]


def panels(train: list[dict[str, Any]], evals: list[dict[str, Any]], smoothing: float = SMOOTHING) -> list[Panel]:
    """The curves these records can show, in a fixed order."""
    out = []
    steps, loss = _series(train, "loss")
    eval_steps, eval_loss = _series(evals, "eval_loss")
    if loss:
        def draw_loss(ax: Any) -> None:
            ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=1, label="training (each log line)")
            ax.plot(steps, smooth(loss, smoothing), color="tab:blue", linewidth=2,
                    label=f"training (smoothed {smoothing:g})")
            if eval_loss:
                ax.plot(eval_steps, eval_loss, "o-", color="tab:orange", markersize=4, label="validation")
            ax.legend(loc="upper right", fontsize=8)

        out.append(Panel("loss", "loss", "loss per target", draw_loss))
    for key, title, ylabel in (("lr", "learning rate", "learning rate"),
                               ("tokens_per_second", "throughput", "tokens / s (all ranks)"),
                               ("grad_norm", "gradient norm", "L2 norm before clipping")):
        xs, ys = _series(train, key)
        if ys:
            out.append(Panel("learning_rate" if key == "lr" else key, title, ylabel, _line(xs, ys)))
    keys = sorted({k for r in evals for k in r if k.startswith("eval_") and k[5:] not in COUNTS})
    for key in keys:
        xs, ys = _series(evals, key)
        if ys:
            out.append(Panel(key, f"validation {key[5:]}", key[5:], _best_marked(xs, ys, lowest=key == "eval_loss")))
    return out


def _line(xs: list[int], ys: list[float]) -> Callable[[Any], None]:
    def draw(ax: Any) -> None:
        ax.plot(xs, ys, color="tab:blue", linewidth=1.5)

    return draw


def _best_marked(xs: list[int], ys: list[float], lowest: bool) -> Callable[[Any], None]:
    def draw(ax: Any) -> None:
        ax.plot(xs, ys, "o-", color="tab:green", markersize=4, linewidth=1.5)
        i = min(range(len(ys)), key=lambda j: ys[j]) if lowest else max(range(len(ys)), key=lambda j: ys[j])
        ax.plot([xs[i]], [ys[i]], marker="*", markersize=16, color="tab:red", linestyle="none",
                label=f"best {ys[i]:.4g} at step {xs[i]}")
        ax.legend(loc="upper right" if lowest else "lower right", fontsize=8)

    return draw


def _figure(items: list[Panel], columns: int) -> Any:
    from matplotlib.figure import Figure

    rows = -(-len(items) // columns)
    fig = Figure(figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows), dpi=DPI, layout="constrained")
    for n, panel in enumerate(items):
        ax = fig.add_subplot(rows, columns, n + 1)
        panel.draw(ax)
        ax.set_title(panel.title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
    return fig


def write_plots(run_dir: Path, out_dir: Path | None = None, smoothing: float = SMOOTHING) -> list[Path]:
    """Write RUN_DIR/plots/<curve>.png and overview.png from RUN_DIR/metrics.jsonl; returns
    the files written. Raises HvdftError when matplotlib is missing or there is nothing to plot."""
    if not matplotlib_available():
        raise HvdftError("plots need matplotlib: pip install 'hvdft[plot]'")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    train, evals = read_metrics(Path(run_dir) / "metrics.jsonl")
    items = panels(train, evals, smoothing)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in [(p.name, _figure([p], 1)) for p in items] + [("overview", _figure(items, 2))]:
        path = out_dir / f"{name}.png"
        FigureCanvasAgg(fig).print_png(str(path))
        written.append(path)
    return written
