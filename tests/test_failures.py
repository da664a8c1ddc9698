"""Failure behaviour on real Horovod on the CPU (issue 4): bad input and dead ranks.

Bad input must end every rank within 60 s with exit status 2 and ONE line for the whole
job, `hvdft: error: ` and the cause (file and line where there is one), no Python
traceback, no hang, and nothing in --output-dir that looks like a finished model.

The many cases run as one real 2-rank horovodrun job (tests/scripts/train_many.py): each
command line goes through hvdft's own option parsing and `_run_training`, and whatever
ended it is printed by `hvdft.cli.report`, the function the CLI prints with; each rank
records what it printed per case. So every input is proven to give one line per job
(rank 0's, or, for an error only one rank can see, that rank's), for the price of one job
start instead of ~25 (about 15 s each here). A few real `hvdft train` processes under
horovodrun and mpirun then prove that the CLI prints through that function: exit 2 on
every rank, one line, no traceback.

Dead ranks (a rank raising mid-epoch, a rank SIGKILLed) under both launchers: the job
exits non-zero within 60 s of the failure and says which rank failed. The other two
combinations are in test_checkpoint.py, where those runs are then resumed.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
from support import (
    HVDFT,
    debug_events,
    finished_model_files,
    horovodrun,
    job_env,
    make_tiny_model,
    mpirun,
    one_line_errors,
    run_job,
    sentences,
    write_conll,
)

pytestmark = pytest.mark.slow

DEADLINE_S = 60


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("failures")
    good = sentences(24, seed=11)
    f = {"tmp": tmp, "model": make_tiny_model(tmp / "tiny"), "cache": tmp / "cache"}
    f["train"] = write_conll(tmp / "train.txt", good)
    # sentence 3 is rank 1's (odd index under 2 ranks): its second line has no tag column
    no_tag = [list(s) for s in good]
    no_tag[3][1] = ("NOTAGHERE", "O")
    f["no_tag"] = write_conll(tmp / "no_tag.txt", no_tag)
    f["no_tag"].write_text(f["no_tag"].read_text().replace("NOTAGHERE\tO\n", "NOTAGHERE\n"))
    bad_tag = [list(s) for s in good]
    bad_tag[5][0] = (bad_tag[5][0][0], "X-PER")
    f["bad_tag"] = write_conll(tmp / "bad_tag.txt", bad_tag)
    f["empty"] = tmp / "empty.txt"
    f["empty"].write_text("")
    f["one"] = write_conll(tmp / "one.txt", good[:1])
    valid = sentences(8, seed=12)
    valid[0].append(("Acme", "B-ORG"))
    valid[3].append(("Initech", "B-ORG"))
    f["unseen"] = write_conll(tmp / "valid_unseen.txt", valid)
    f["orgs"] = write_conll(tmp / "train_orgs.txt", good[:-1] + [[("Acme", "B-ORG"), ("rocks", "O")]])
    f["no_model"] = tmp / "empty_model_dir"
    f["no_model"].mkdir()
    f["a_file"] = tmp / "a_file"
    f["a_file"].write_text("not a folder")
    f["yaml_bad_value"] = tmp / "bad_value.yaml"
    f["yaml_bad_value"].write_text("# learning rate\nepochs: 1\nlr: fast\n")
    f["yaml_unknown"] = tmp / "unknown.yaml"
    f["yaml_unknown"].write_text("epochs: 1\nlearning-rate: 1e-4\n")
    f["yaml_warmup"] = tmp / "warmup.yaml"  # an option the command line does not give: the file's applies
    f["yaml_warmup"].write_text("warmup-ratio: 1.5\n")
    f["yaml_choice"] = tmp / "choice.yaml"
    f["yaml_choice"].write_text("precision: fp8\n")
    f["toml_broken"] = tmp / "broken.toml"
    f["toml_broken"].write_text("lr = \n")
    return f


def base(f: dict[str, Path], out: str, train: str = "train") -> list[str]:
    return ["--model", str(f["model"]), "--train-file", str(f[train]), "--epochs", "1", "--batch-size", "4",
            "--max-length", "32", "--cache-dir", str(f["cache"]), "--output-dir", str(f["tmp"] / out)]


def cases(f: dict[str, Path]) -> list[tuple[str, list[str], str | None]]:
    """(name, command line, the error it must give: a regex; None = must succeed)."""
    ck = f["tmp"] / "made_checkpoint" / "checkpoints" / "checkpoint-3"
    no_tag_line = line_of(f["no_tag"], "NOTAGHERE")
    bad_tag_line = line_of(f["bad_tag"], "X-PER")
    return [
        ("make_checkpoint", base(f, "made_checkpoint"), None),
        ("unseen_label", base(f, "unseen") + ["--validation-file", str(f["unseen"])], None),
        ("one_validation_sentence", base(f, "one_valid") + ["--validation-file", str(f["one"])], None),
        ("missing_file", base(f, "o1") + ["--train-file", str(f["tmp"] / "nope.txt")],
         re.escape(f"{f['tmp'] / 'nope.txt'}: file not found")),
        ("empty_file", base(f, "o2", "empty"), re.escape(f"{f['empty']}: no sentences in file")),
        ("no_tag_column_rank1", base(f, "o3", "no_tag"),
         re.escape(f"{f['no_tag']}:{no_tag_line}: expected 'word ... tag'") + ".*found on rank 1"),
        ("bad_tag_rank1", base(f, "o4", "bad_tag"),
         re.escape(f"{f['bad_tag']}:{bad_tag_line}: tag 'X-PER' fits no tag scheme: hvdft reads")
         + ".*found on rank 1"),
        ("fewer_sentences_than_ranks", base(f, "o5", "one"), r"1 training sentence\(s\) for 2 ranks"),
        ("max_train_samples_1", base(f, "o5b") + ["--max-train-samples", "1"], r"1 training sentence\(s\) for 2 ranks"),
        ("batch_size_0", base(f, "o6") + ["--batch-size", "0"], r"--batch-size must be at least 1, got 0"),
        ("batch_size_negative", base(f, "o7") + ["--batch-size", "-3"], r"--batch-size must be at least 1, got -3"),
        ("epochs_negative", base(f, "o8") + ["--epochs", "-1"], r"--epochs must be positive, got -1"),
        ("lr_negative", base(f, "o8b") + ["--lr", "-0.1"], r"--lr must be positive"),
        ("save_every_negative", base(f, "o9") + ["--save-every", "-2"], r"--save-every must not be negative"),
        ("max_grad_norm_negative", base(f, "o9b") + ["--max-grad-norm", "-1"], r"--max-grad-norm must not be negative"),
        ("max_length_over_limit", base(f, "o10") + ["--max-length", "1000"],
         r"--max-length 1000 is over the model's limit of 128 tokens"),
        ("max_length_tiny", base(f, "o11") + ["--max-length", "4"], r"--max-length must be at least 8"),
        ("model_missing", base(f, "o12") + ["--model", str(f["tmp"] / "no_such_model")],
         re.escape(f"{f['tmp'] / 'no_such_model'}: model folder not found")),
        ("model_folder_empty", base(f, "o13") + ["--model", str(f["no_model"])],
         re.escape(f"{f['no_model']}: holds no model (no config.json)")),
        ("output_not_writable", base(f, "o14") + ["--output-dir", str(f["a_file"] / "sub")],
         re.escape(f"{f['a_file'] / 'sub'}: output directory is not writable: Not a directory")),
        ("resume_nothing", base(f, "o15") + ["--resume"], r"--resume: no checkpoint to resume from"),
        ("fresh_run_over_checkpoints", base(f, "made_checkpoint"),
         re.escape(f"{f['tmp'] / 'made_checkpoint'}: holds checkpoints of an earlier run: continue it with --resume")),
        ("resume_other_model", base(f, "o16") + ["--model", "minilm", "--resume", str(ck)],
         re.escape(f"{ck}: --resume: checkpoint was made with model=") + ".*this run has 'minilm'"),
        ("resume_other_labels", base(f, "o17", "orgs") + ["--resume", str(ck)],
         re.escape(f"{ck}: --resume: checkpoint's labels") + ".*differ from this data's"),
        ("scale_lr_with_adasum", base(f, "o18") + ["--scale-lr", "linear", "--allreduce-op", "adasum"],
         r"--scale-lr linear with --allreduce-op adasum"),
        ("config_bad_value", base(f, "o19") + ["--config", str(f["yaml_bad_value"])],
         re.escape(f"{f['yaml_bad_value']}:3: lr: 'fast' is not a valid float")),
        ("config_unknown_key", base(f, "o20") + ["--config", str(f["yaml_unknown"])],
         re.escape(f"{f['yaml_unknown']}:2: unknown option 'learning_rate'")),
        ("config_invalid_number", base(f, "o21") + ["--config", str(f["yaml_warmup"])],
         r"--warmup-ratio must be below 1, got 1.5"),
        ("config_bad_choice", base(f, "o22") + ["--config", str(f["yaml_choice"])],
         re.escape(f"{f['yaml_choice']}:1: precision: 'fp8' is not one of")),
        ("config_broken_toml", base(f, "o23") + ["--config", str(f["toml_broken"])],
         re.escape(f"{f['toml_broken']}:1: invalid config file:")),
        ("config_missing", base(f, "o24") + ["--config", str(f["tmp"] / "nope.yaml")],
         re.escape(f"{f['tmp'] / 'nope.yaml'}: cannot read config file: No such file or directory")),
    ]


@pytest.fixture(scope="module")
def batch(files: dict[str, Path]) -> dict:
    """All cases in one 2-rank horovodrun job; per rank, per case: what it raised."""
    spec = [{"name": name, "args": argv} for name, argv, _ in cases(files)]
    (files["tmp"] / "spec.json").write_text(json.dumps(spec))
    script = str(Path(__file__).parent / "scripts" / "train_many.py")
    result = run_job([*horovodrun(2), sys.executable, script, str(files["tmp"] / "spec.json"),
                      str(files["tmp"] / "results")], timeout=900)
    assert result.returncode == 0, result.describe()
    ranks = [json.loads((files["tmp"] / "results" / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"output": result.output, "ranks": [{c["name"]: c for c in r} for r in ranks]}


CASE_NAMES = [
    "missing_file", "empty_file", "no_tag_column_rank1", "bad_tag_rank1", "fewer_sentences_than_ranks",
    "max_train_samples_1", "batch_size_0", "batch_size_negative", "epochs_negative", "lr_negative",
    "save_every_negative", "max_grad_norm_negative", "max_length_over_limit", "max_length_tiny", "model_missing",
    "model_folder_empty", "output_not_writable", "resume_nothing", "fresh_run_over_checkpoints",
    "resume_other_model", "resume_other_labels", "scale_lr_with_adasum", "config_bad_value", "config_unknown_key",
    "config_invalid_number", "config_bad_choice", "config_broken_toml", "config_missing",
]


def test_every_bad_input_is_checked_and_the_job_printed_one_line_each(files: dict[str, Path], batch: dict) -> None:
    assert CASE_NAMES == [name for name, _, expected in cases(files) if expected is not None]
    for name in (name for name, _, expected in cases(files) if expected is None):
        assert [batch["ranks"][r][name]["code"] for r in (0, 1)] == [0, 0], batch["ranks"][0][name]["stderr"][-3000:]
    # the launcher's own output: exactly one error line per bad input, none for the others
    assert len(one_line_errors(batch["output"])) == len(CASE_NAMES), one_line_errors(batch["output"])


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_stops_every_rank_with_one_line(name: str, files: dict[str, Path], batch: dict) -> None:
    _, argv, expected = next(c for c in cases(files) if c[0] == name)
    assert expected is not None
    printed = []
    for rank in (0, 1):
        case = batch["ranks"][rank][name]
        assert case["code"] == 2, f"rank {rank} exited {case['code']}:\n{case['stderr'][-3000:]}"
        assert not case["traceback"], f"rank {rank}:\n{case['stderr'][-3000:]}"
        assert case["seconds"] < DEADLINE_S, case["seconds"]
        printed += case["errors"]
    assert len(printed) == 1, f"the job printed {len(printed)} error lines: {printed}"
    assert re.search(expected, printed[0]), printed[0]
    out = Path(argv[len(argv) - 1 - argv[::-1].index("--output-dir") + 1])  # the last one given wins
    if name == "fresh_run_over_checkpoints":  # the earlier run's folder: left as it was
        assert json.loads((out / "all_results.json").read_text())["train_steps"] == 3
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    else:
        assert finished_model_files(out) == []


def test_unseen_validation_label_is_warned_about_and_scored(files: dict[str, Path], batch: dict) -> None:
    assert [batch["ranks"][r]["unseen_label"]["code"] for r in (0, 1)] == [0, 0]
    warnings = [line for line in batch["output"].splitlines() if "labels never seen in training" in line]
    assert len(warnings) == 1, warnings  # rank 0 only
    assert f"{files['unseen']}: labels never seen in training: B-ORG (2x)" in warnings[0]
    report = (files["tmp"] / "unseen" / "eval_report.txt").read_text()
    org = next(line.split() for line in report.splitlines() if line.split()[:1] == ["ORG"])
    assert org[1:] == ["0.0000", "0.0000", "0.0000", "2"]  # in the gold standard: support 2, recall 0
    results = json.loads((files["tmp"] / "unseen" / "all_results.json").read_text())
    assert results["eval_recall"] < 1.0


def test_validation_smaller_than_the_world_is_fine(files: dict[str, Path], batch: dict) -> None:
    """Rank 1 holds no validation sentence: it still joins every evaluation collective."""
    assert [batch["ranks"][r]["one_validation_sentence"]["code"] for r in (0, 1)] == [0, 0]
    results = json.loads((files["tmp"] / "one_valid" / "all_results.json").read_text())
    assert results["eval_sentences"] == 1.0


def test_bad_line_on_rank_1_horovodrun_every_rank_exits_2(files: dict[str, Path]) -> None:
    out = files["tmp"] / "cli_no_tag"
    result = run_job([*horovodrun(2), HVDFT, "train", "ner", *base(files, "cli_no_tag", "no_tag")], timeout=300)
    assert result.returncode != 0 and result.seconds < DEADLINE_S, result.describe()
    for rank in (0, 1):
        assert f"Process {rank} exit with status code 2" in result.output, result.describe()
    errors = one_line_errors(result.output)
    assert len(errors) == 1, errors  # agreed: rank 0 says it for all
    line = line_of(files["no_tag"], "NOTAGHERE")
    assert f"{files['no_tag']}:{line}: expected 'word ... tag'" in errors[0] and "(found on rank 1)" in errors[0]
    # the ranks print no traceback; horovodrun then prints its own RuntimeError one
    assert not [ln for ln in result.output.splitlines() if re.match(r"\[\d\]<std(out|err)>:.*Traceback", ln)]
    assert finished_model_files(out) == []


def test_missing_file_mpirun_exits_2_without_traceback(files: dict[str, Path]) -> None:
    out = files["tmp"] / "cli_missing"
    argv = base(files, "cli_missing") + ["--train-file", str(files["tmp"] / "nope.txt")]
    result = run_job([*mpirun(2), HVDFT, "train", "ner", *argv], timeout=300)
    assert result.returncode == 2 and result.seconds < DEADLINE_S, result.describe()
    errors = one_line_errors(result.output)
    assert errors == [f"hvdft: error: {files['tmp'] / 'nope.txt'}: file not found"], errors  # once, for all
    assert "Traceback" not in result.output
    assert finished_model_files(out) == []


def test_invalid_option_horovodrun_one_line_for_the_job(files: dict[str, Path]) -> None:
    """An option error is the same on every rank: rank 0 alone prints it (it used to be
    found before Horovod started, when no rank knew it was not rank 0)."""
    out = files["tmp"] / "cli_bs0_two"
    result = run_job([*horovodrun(2), HVDFT, "train", "ner", *base(files, "cli_bs0_two"), "--batch-size", "0"],
                     timeout=300)
    assert result.returncode != 0 and result.seconds < DEADLINE_S, result.describe()
    for rank in (0, 1):
        assert f"Process {rank} exit with status code 2" in result.output, result.describe()
    assert one_line_errors(result.output) == ["[0]<stderr>:hvdft: error: --batch-size must be at least 1, got 0"]
    assert not [ln for ln in result.output.splitlines() if re.match(r"\[\d\]<std(out|err)>:.*Traceback", ln)]
    assert finished_model_files(out) == []


def test_invalid_option_single_process(files: dict[str, Path]) -> None:
    result = run_job([HVDFT, "train", "ner", *base(files, "cli_bs0"), "--batch-size", "0"], timeout=300)
    assert result.returncode == 2 and result.seconds < DEADLINE_S, result.describe()
    assert one_line_errors(result.stderr) == ["hvdft: error: --batch-size must be at least 1, got 0"]
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- dead ranks


def dead_rank_job(files: dict[str, Path], launcher: list[str], kind: str, name: str):
    debug = files["tmp"] / f"{name}_debug"
    argv = base(files, name) + ["--epochs", "3", "--log-every", "1"]
    result = run_job([*launcher, HVDFT, "train", "ner", *argv], timeout=300,
                     env=job_env(HVDFT_DEBUG_DIR=str(debug), HVDFT_FAULT=f"rank=1,step=3,kind={kind}"))
    ended = time.time()
    assert result.returncode != 0, result.describe()
    last = max(e["time"] for r in (0, 1) for e in debug_events(debug, r))
    assert ended - last < DEADLINE_S, f"the job took {ended - last:.0f}s to end after the fault"
    assert max(e.get("step", 0) for e in debug_events(debug, 1)) == 2
    assert finished_model_files(files["tmp"] / name) == []
    return result


def test_rank_raising_under_horovodrun(files: dict[str, Path]) -> None:
    result = dead_rank_job(files, horovodrun(2), "raise", "dead_raise_gloo")
    assert "Process 1 exit with status code 1" in result.output, result.describe()
    assert "hvdft: error: [rank 1] crashed: RuntimeError: HVDFT_FAULT: injected failure at step 3" in result.output
    # the survivor says why it stops, in one line, without a traceback of its wait
    assert "hvdft: error: [rank 0] stopped because another rank failed or was killed" in result.output
    assert not [ln for ln in result.output.splitlines() if ln.startswith("[0]<stderr>:[rank 0] Traceback")]


def test_rank_killed_under_mpirun(files: dict[str, Path]) -> None:
    result = dead_rank_job(files, mpirun(2), "kill", "dead_kill_mpi")
    assert re.search(r"process rank 1 with PID \d+ on node \S+ exited on signal 9 \(Killed\)", result.output), \
        result.describe()
