"""Run several `hvdft train TASK` command lines, one after another, in ONE job.

    python train_many.py SPEC.json RESULT_DIR        (under horovodrun/mpirun, or alone)

SPEC.json: [{"name": ..., "args": [...words after `hvdft train TASK`...], "env": {...},
"task": "ner" (the default) or another task}].
Each case goes through the real option parsing (click) and `hvdft.cli._run_training`,
so it is what `hvdft train ner ARGS` does, minus the process start: a job pays for
importing torch, transformers and Horovod once instead of once per case. Errors are
caught as `hvdft.cli.guarded` catches them; every rank writes RESULT_DIR/rank<N>.json
with, per case: ok, the error line, whether all ranks agreed on it, and the seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    from hvdft import cli, dist
    from hvdft.errors import HvdftError

    dist.init()
    results = []
    for case in spec:
        saved = {k: os.environ.get(k) for k in case.get("env", {})}
        os.environ.update(case.get("env", {}))
        print(f"case {case['name']} starting", flush=True)
        start = time.monotonic()
        entry = {"name": case["name"], "ok": True, "error": None, "agreed": None, "crash": None}
        try:
            task = case.get("task", "ner")
            ctx = cli.train.commands[task].make_context(task, list(case["args"]))
            cli._run_training(ctx, task, ctx.params)
        except HvdftError as exc:
            entry.update(ok=False, error=str(exc), agreed=bool(getattr(exc, "agreed", False)))
        except Exception as exc:  # noqa: BLE001 - report, the test decides
            entry.update(ok=False, crash=f"{type(exc).__name__}: {exc}", error=traceback.format_exc())
        entry["seconds"] = time.monotonic() - start
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        results.append(entry)
        print(f"case {case['name']} done: {entry['error'] or 'ok'}", flush=True)
    (out / f"rank{dist.rank()}.json").write_text(json.dumps(results, indent=1))
    dist.shutdown()
    sys.stdout.flush()
    os._exit(0)  # as hvdft does: no wait for threads a failed case may have left


if __name__ == "__main__":
    sys.exit(main())
