"""The test suite's one helper module: how a test starts a job, and what it feeds it.

One policy for every subprocess a test starts:
- offline: HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE and HF_DATASETS_OFFLINE are 1 (nothing
  from the Hub; the model is the offline "minilm" or a tiny random BERT made here);
- one thread per process (OMP_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false): two ranks
  share the cores without oversubscribing them, and a run's floating-point results do
  not depend on how many threads split its reductions;
- the venv's bin first on PATH; HVDFT_* test hooks left set in the shell removed (only
  HVDFT_CACHE passes), a test sets the ones it means;
- mpirun: --oversubscribe -bind-to none (and --allow-run-as-root as root), horovodrun:
  --gloo;
- every job runs in its own session, and a timeout (or a job that leaves something
  behind) kills the whole process group: the launcher AND its ranks.

Models: "minilm" (22M parameters, offline) where the numbers matter, or a tiny random
BERT with minilm's tokenizer (`make_tiny_model`) where only the engine matters.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HVDFT = str(BIN / "hvdft")
# HVDFT_SHARED_DATA: for a checkout elsewhere than beside ../shared
SHARED_DATA = Path(os.environ.get("HVDFT_SHARED_DATA") or ROOT.parent / "shared" / "data")
AS_ROOT = ["--allow-run-as-root"] if os.geteuid() == 0 else []


def horovodrun(np: int = 2) -> list[str]:
    return [str(BIN / "horovodrun"), "-np", str(np), "--gloo"]


def mpirun(np: int = 2) -> list[str]:
    return ["mpirun", *AS_ROOT, "--oversubscribe", "-np", str(np), "-bind-to", "none"]


def job_env(**extra: str) -> dict[str, str]:
    """The environment of every job a test starts (see the module docstring)."""
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    for k in [k for k in e if k.startswith("HVDFT_") and k != "HVDFT_CACHE"]:
        del e[k]  # a test hook left set in the shell must not leak into a job
    e.update(extra)
    return e


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        return (f"exit {self.returncode} after {self.seconds:.0f}s\n--- stdout\n{self.stdout[-3000:]}"
                f"\n--- stderr\n{self.stderr[-5000:]}")


class Job:
    """A launcher (or a single process) started in its own session; the session holds the
    launcher and its ranks, and everything in it is killed on timeout and at the end."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | str | None = None):
        self.cmd = [str(c) for c in cmd]
        self.start = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env or job_env(), cwd=cwd, start_new_session=True)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> Result:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            out, err = self.proc.communicate()
            raise AssertionError(f"{self.cmd} did not finish within {timeout}s\n{out[-3000:]}\n{err[-5000:]}") from None
        self.kill_all()  # a rank the launcher left behind
        return Result(self.proc.returncode, out, err, time.monotonic() - self.start)

    def kill_all(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run_job(cmd: list, timeout: float = 300, env: dict[str, str] | None = None,
            cwd: Path | str | None = None) -> Result:
    return Job(cmd, env, cwd).wait(timeout)


def run_ok(cmd: list, timeout: float = 300, env: dict[str, str] | None = None,
           cwd: Path | str | None = None) -> Result:
    result = run_job(cmd, timeout, env, cwd)
    assert result.returncode == 0, f"{cmd}\n{result.describe()}"
    return result


def run(cmd: list, timeout: float = 300, check: bool = True, env: dict[str, str] | None = None,
        cwd: Path | str | None = None) -> Result:
    """run_ok, or run_job with check=False."""
    return (run_ok if check else run_job)(cmd, timeout, env, cwd)


# ------------------------------------------------------------------ data and models


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    """A test input file with exactly these bytes (str is written as UTF-8)."""
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return p


PEOPLE = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank"]
PLACES = ["Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Quito"]
FILLER = ["went", "to", "the", "market", "in", "with", "a", "friend", "from", "today", "and", "saw"]


def sentences(n: int, seed: int = 0) -> list[list[tuple[str, str]]]:
    """n short deterministic tagged sentences (3 to 9 words, PER and LOC entities)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sent = [(rng.choice(PEOPLE), "B-PER")]
        if rng.random() < 0.3:
            sent.append(("Smith", "I-PER"))
        sent += [(rng.choice(FILLER), "O") for _ in range(rng.randint(1, 4))]
        sent.append((rng.choice(PLACES), "B-LOC"))
        sent += [(rng.choice(FILLER), "O") for _ in range(rng.randint(0, 3))]
        out.append(sent)
    return out


WORDS = ["the", "film", "movie", "plot", "acting", "was", "is", "really", "quite", "and", "but", "a", "story"]
POSITIVE = ["great", "wonderful", "excellent", "lovely", "superb", "delightful", "brilliant", "moving"]
NEGATIVE = ["awful", "terrible", "horrible", "dreadful", "boring", "bad", "dull", "painful"]


def toy_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """A learnable toy sentiment set: the label is which word list the adjective comes from."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        label = (i + seed) % 2
        adj = r.choice(POSITIVE if label else NEGATIVE)
        rows.append((f"the {r.choice(['film', 'movie', 'plot', 'cast'])} was {r.choice(['', 'really ', 'quite '])}"
                     f"{adj} , {r.choice(WORDS)} {adj}", label))
    return rows


def fillers_as_entities(sents: list[list[tuple[str, str]]]) -> list[list[tuple[str, str]]]:
    """The same sentences with every filler word a PER entity and the names O: a model
    scores while its predictions are still near random, then less and less the better it
    learns `sentences()`. A dev set whose best evaluation is an early one, by far
    (measured with the tiny model, lr 1e-3: F1 0.44, 0.31, 0.05, then 0)."""
    return [[(w, "B-PER" if t == "O" else "O") for w, t in s] for s in sents]


def write_conll(path: Path, sents: list[list[tuple[str, str]]]) -> Path:
    path.write_text("".join("".join(f"{w}\t{t}\n" for w, t in s) + "\n" for s in sents), encoding="utf-8")
    return path


def make_tiny_model(folder: Path) -> Path:
    """A 2-layer, 32-wide random BERT with minilm's tokenizer: a 4 MB model, fast checkpoints."""
    import torch
    from transformers import BertConfig, BertModel

    from hvdft.models import resolve_model

    src = Path(resolve_model("minilm"))
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    return folder


# ------------------------------------------------------------------ reading what a run did


def load_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors: dict = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(f))
    assert tensors, f"no safetensors weights in {folder}"
    return tensors


def same_tensors(a: dict, b: dict) -> bool:
    import torch

    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def max_abs_diff(a: dict, b: dict) -> tuple[float, str]:
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    worst, where = 0.0, ""
    for k in a:
        assert a[k].shape == b[k].shape, k
        d = float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0
        if d > worst:
            worst, where = d, k
    return worst, where


def debug_events(folder: Path, rank: int) -> list[dict]:
    """The JSON lines HVDFT_DEBUG_DIR=folder made rank `rank` write."""
    path = Path(folder) / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def metrics_records(out: Path) -> list[dict]:
    """metrics.jsonl of an output folder, one dict per line."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def train_records(out: Path) -> list[dict]:
    """The training lines of metrics.jsonl (not the evaluations)."""
    return [r for r in metrics_records(out) if "loss" in r and not any(k.startswith("eval_") for k in r)]


def eval_records(out: Path) -> list[dict]:
    return [r for r in metrics_records(out) if any(k.startswith("eval_") for k in r)]


def finished_model_files(output_dir: Path) -> list[str]:
    """What would make --output-dir look like it holds a trained model."""
    if not output_dir.exists():
        return []
    names = {"config.json", "model.safetensors", "all_results.json", "test_predictions.conll"}
    return sorted(p.name for p in output_dir.iterdir() if p.name in names)


def one_line_errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if "hvdft: error:" in line]


def rank_lines(output: str, rank: int) -> list[str]:
    """horovodrun's output lines of one rank, without the `[rank]<stdxxx>:` prefix."""
    pattern = re.compile(rf"^\[{rank}\]<std(?:out|err)>:(.*)$")
    return [m.group(1) for m in map(pattern.match, output.splitlines()) if m]
