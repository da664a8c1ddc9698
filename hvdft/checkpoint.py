"""Checkpoints that are either complete or absent, and loading that never runs code.

A checkpoint is written into a temporary folder, every file flushed to disk, then the
folder renamed into place: a kill at any moment leaves the previous checkpoint intact.
Weights are safetensors; everything else is loaded with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hvdft.errors import HvdftError

STATE_FILE = "trainer_state.pt"
RUN_FILE = "hvdft_run.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it to read
    it back would briefly affect files other threads create)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def _umask_modes(folder: Path) -> None:
    """Give every file under `folder` the mode a new file gets (0o666 less the umask).

    safetensors >= 0.8.1 writes through a temporary file created 0o600 and renames it
    (safetensors#782, open): model.safetensors came out readable by its owner alone while
    config.json and the tokenizer were 0o644, so a colleague, a service account or a
    container running as another user could not load the model.
    """
    mode = 0o666 & ~_current_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def write_atomically(final: Path, write: Any) -> Path:
    """Run write(tmp_folder), flush it, and rename it to `final` (replacing it)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    _umask_modes(tmp)
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(
    folder: Path,
    model: Any,
    tokenizer: Any,
    state: dict[str, Any],
    run: dict[str, Any],
) -> Path:
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)
        (tmp / RUN_FILE).write_text(json.dumps(run, indent=2, sort_keys=True))

    return write_atomically(folder, write)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest step first (temporary folders ignored)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).exists()]


def prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_resume(spec: str, output_dir: Path) -> Path | None:
    """The checkpoint `--resume SPEC` names: 'latest' (the newest in output_dir, which must
    exist), 'auto' (the newest if any, else None: start afresh; what `hvdft launch
    --max-restarts` passes) or a checkpoint folder."""
    if spec in ("latest", "auto"):
        found = list_checkpoints(output_dir / "checkpoints")
        if not found and spec == "auto":
            return None
        if not found:
            raise HvdftError("--resume: no checkpoint to resume from", output_dir / "checkpoints")
        return found[-1]
    path = Path(spec)
    if not (path / STATE_FILE).exists():
        raise HvdftError(f"--resume: not an hvdft checkpoint (no {STATE_FILE})", path)
    return path


def load_state(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer state, run description) of a checkpoint. No pickled code is executed."""
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        run = json.loads((folder / RUN_FILE).read_text())
    except Exception as exc:  # noqa: BLE001 - a damaged file of any kind
        raise HvdftError(f"--resume: cannot read checkpoint: {exc}".splitlines()[0], folder) from None
    return state, run


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise HvdftError("--resume: checkpoint holds no safetensors weights", folder)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ: another model size or label count
        detail = " ".join(str(exc).split())  # torch's message spans lines: keep it on one
        raise HvdftError(f"--resume: weights do not fit this model: {detail[:300]}", folder) from None
    # Tied weights are stored once; anything else missing means another architecture.
    tied = {k for k in missing if "decoder" in k or "lm_head" in k}
    if set(missing) - tied or unexpected:
        raise HvdftError(
            f"--resume: weights do not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})",
            folder,
        )


def rng_state() -> dict[str, Any]:
    """This process's random number generator states (torch, CUDA, numpy, Python), as
    tensors and plain values that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    random.setstate((3, tuple(state["python"]), None))


def plain(obj: Any) -> Any:
    """numpy scalars -> Python numbers, through dicts and lists: metrics arrive as numpy
    scalars, which torch.load(weights_only=True) refuses, so --resume would fail."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj
