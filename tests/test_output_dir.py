"""An --output-dir holding an earlier run: refused, resumed, or (on request) started afresh."""

from __future__ import annotations

import sys
from pathlib import Path

from support import run

CHECK = """
import sys
from pathlib import Path
from hvdft import dist
from hvdft.errors import HvdftError
from hvdft.setup import _check_output_dir
dist.init()
out, resuming, overwrite = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
try:
    _check_output_dir(out, resuming, overwrite)
    print("OK")
except HvdftError as exc:
    print("ERROR", exc)
dist.shutdown()
"""


def _earlier_run(out: Path) -> None:
    ckpt = out / "checkpoints" / "checkpoint-7"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.pt").write_bytes(b"x")
    (out / "metrics.jsonl").write_text('{"step": 7}\n')


def _check(out: Path, resuming: bool, overwrite: bool) -> str:
    args = [sys.executable, "-c", CHECK, str(out), str(int(resuming)), str(int(overwrite))]
    return run(args, timeout=120).stdout.strip().splitlines()[-1]


def test_earlier_run_is_refused_resumed_or_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _earlier_run(out)
    assert _check(out, False, False).startswith(f"ERROR {out}: holds checkpoints of an earlier run")
    assert _check(out, True, False) == "OK"
    assert (out / "checkpoints" / "checkpoint-7").exists(), "resuming keeps the checkpoints"
    assert _check(out, True, True) == "OK" and (out / "metrics.jsonl").exists(), "--resume wins over overwrite"
    assert _check(out, False, True) == "OK"
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
