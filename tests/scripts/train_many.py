"""Run several `hvdft train TASK` command lines, one after another, in ONE job.

    python train_many.py SPEC.json RESULT_DIR        (under horovodrun/mpirun, or alone)

SPEC.json: [{"name": ..., "task": "ner" (the default) or another registered task, "args":
[...words after `hvdft train TASK`...], "env": {...}}].

Each case is what `hvdft train TASK ARGS` does, minus the process start and exit: the
real option parsing (click), `hvdft.cli._run_training`, and what ended it printed by
`hvdft.cli.report`, the function the CLI's `guarded` wrapper prints with. So a job pays
for importing torch, transformers and Horovod once instead of once per case, and what
each rank would have printed for each case is known exactly.

Every rank writes RESULT_DIR/rank<N>.json with, per case: its exit status, the
`hvdft: error:` lines it printed, whether it printed a traceback, its whole stdout and
stderr for the case, and the seconds it took. Everything a case prints is also passed
through to this process's own stdout/stderr, so the launcher's output holds it too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    from hvdft import cli, dist

    dist.init()
    results = []
    for case in spec:
        saved = {k: os.environ.get(k) for k in case.get("env", {})}
        os.environ.update(case.get("env", {}))
        print(f"case {case['name']} starting", flush=True)
        start = time.monotonic()
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                task = case.get("task", "ner")
                ctx = cli.train.commands[task].make_context(task, list(case["args"]))
                cli._run_training(ctx, task, ctx.params)
                code = 0
            except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - as the CLI would
                code = cli.report(exc)
        seconds = time.monotonic() - start
        sys.stdout.write(stdout.getvalue())
        sys.stderr.write(stderr.getvalue())
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        errors = [line for line in stderr.getvalue().splitlines() if line.startswith("hvdft: error:")]
        results.append({"name": case["name"], "code": code, "errors": errors,
                        "traceback": "Traceback (most recent call last)" in stderr.getvalue(),
                        "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "seconds": seconds})
        print(f"case {case['name']} done: exit {code}", flush=True)
    (out / f"rank{dist.rank()}.json").write_text(json.dumps(results, indent=1))
    dist.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as hvdft does: no wait for threads a failed case may have left


if __name__ == "__main__":
    sys.exit(main())
