"""Engine pieces on their own (issue 11's reshape, issue 10's defaults, issue 12's logs):
progress lines fit for log files, generic batching, --resume auto, data sources, the
srun-without-MPI guard, and options from --config files converted like the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from support import HVDFT, Result, job_env, run_job, write

from hvdft import outputs
from hvdft.checkpoint import resolve_resume
from hvdft.data.prepare import collate
from hvdft.errors import HvdftError

# ----------------------------------------------------------------------------- progress display


def record(step: int, loss: float = 0.5) -> dict:
    return {"step": step, "epoch": step / 10, "loss": loss, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_second": 1234.0}


def test_plain_progress_lines_at_most_every_30_seconds(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    now = [1000.0]
    monkeypatch.setattr(outputs.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(outputs.dist, "is_main", lambda: True)
    display = outputs.Display(total=100, initial=0, interactive=False)
    for step in range(10, 101, 10):  # a logging step every 10 s of this fake clock
        now[0] += 10
        display.step()
        display.logged(record(step))
    display.note("step 100: eval f1 0.5000, loss 0.4000")
    display.close()
    err = capsys.readouterr()
    lines = err.err.splitlines()
    # the first logged step at once, then one every >= 30 s, and the last step always
    assert [line.split()[1] for line in lines] == ["10/100", "40/100", "70/100", "100/100"]
    assert "\r" not in err.err and "\r" not in err.out
    assert lines[1] == "step 40/100 epoch 4.00 loss 0.5000 1,234 tok/s elapsed 0:00:40 eta 0:01:00"
    assert err.out == "step 100: eval f1 0.5000, loss 0.4000\n"


def test_other_ranks_display_nothing(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(outputs.dist, "is_main", lambda: False)
    display = outputs.Display(total=10, initial=0, interactive=False)
    display.logged(record(10))
    display.note("x")
    assert capsys.readouterr() == ("", "")


# ----------------------------------------------------------------------------- batching


def test_collate_pads_inputs_token_labels_and_decoder_targets() -> None:
    features = {
        "input_ids": [[101, 5, 6, 102], [101, 7, 102]],
        "token_type_ids": [[0, 0, 0, 0], [0, 0, 0]],
        "labels": [[-100, 1, 2, -100], [-100, 3, -100]],  # token labels: as wide as the inputs
        "decoder_targets": [[9, 9, 9, 9, 9, 9], [8]],  # runs on its own length
        "start": [1, 2],  # scalars
        "example": [0, 1],
    }
    b = collate(features, [1, 0], pad_id=0, multiple=8,
                targets={"labels": -100, "decoder_targets": -100, "start": 0, "missing": 0})
    assert b.inputs["input_ids"].tolist() == [[101, 7, 102] + [0] * 5, [101, 5, 6, 102] + [0] * 4]
    assert b.inputs["attention_mask"].sum(1).tolist() == [3, 4] and b.real_tokens == 7
    assert b.inputs["token_type_ids"].shape == (2, 8)
    assert b.targets["labels"].tolist() == [[-100, 3, -100] + [-100] * 5, [-100, 1, 2, -100] + [-100] * 4]
    assert b.targets["decoder_targets"].tolist() == [[8] + [-100] * 7, [9] * 6 + [-100] * 2]
    assert b.targets["start"].tolist() == [2, 1] and "missing" not in b.targets
    assert b.rows == [1, 0] and b.labels is b.targets["labels"]


# ----------------------------------------------------------------------------- resume auto


def test_resume_auto_starts_afresh_without_a_checkpoint(tmp_path: Path) -> None:
    assert resolve_resume("auto", tmp_path) is None
    with pytest.raises(HvdftError, match="no checkpoint to resume from"):
        resolve_resume("latest", tmp_path)
    for step in (3, 12):
        ck = tmp_path / "checkpoints" / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        (ck / "trainer_state.pt").write_bytes(b"x")
    (tmp_path / "checkpoints" / ".tmp-checkpoint-20-1").mkdir()  # half written: never chosen
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoints" / "checkpoint-12"
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoints" / "checkpoint-12"


# ----------------------------------------------------------------------------- data sources


def test_a_file_option_replaces_one_split_of_a_hub_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--dataset HUB_ID --test-file F: train/validation from the Hub, test from F (the
    file used to switch the Hub dataset off altogether)."""
    import datasets

    from hvdft import dist
    from hvdft.config import TrainConfig
    from hvdft.data import prepare
    from hvdft.tasks import get_task

    hub = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["x", "y"]}),
        "validation": datasets.Dataset.from_dict({"text": ["c"], "label": ["x"]}),
        "test": datasets.Dataset.from_dict({"text": ["hub test"], "label": ["y"]}),
    })
    asked = []
    monkeypatch.setattr(prepare, "load_hub_dataset", lambda name, config: asked.append(name) or hub)
    for name, value in (("rank", 0), ("size", 1), ("is_main", True)):
        monkeypatch.setattr(dist, name, lambda value=value: value)
    monkeypatch.setattr(dist, "agree", lambda step: step())
    test_file = write(tmp_path, "test.csv", "text,label\nmy test,x\n")
    cfg = TrainConfig(task="classify", dataset="someone/data", test_file=str(test_file))
    splits = prepare.read_splits(get_task("classify"), cfg)
    assert asked == ["someone/data"]
    assert [e["text"] for e in splits["train"].examples] == ["a", "b"]
    assert [e["text"] for e in splits["validation"].examples] == ["c"]
    assert [e["text"] for e in splits["test"].examples] == ["my test"]
    # every split from files: the Hub is not asked at all
    asked.clear()
    both = TrainConfig(task="classify", dataset="someone/data", train_file=str(test_file),
                       validation_file=str(test_file), test_file=str(test_file))
    prepare.read_splits(get_task("classify"), both)
    assert asked == []


def test_script_based_hub_dataset_is_one_line_saying_what_to_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from hvdft import dist
    from hvdft.data.files import load_hub_dataset

    def refuse(name, config=None):
        raise RuntimeError("Dataset scripts are no longer supported, but found conll2003.py\nmore")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(dist, "main_first", lambda load: load())
    with pytest.raises(HvdftError) as err:
        load_hub_dataset("conll2003", None)
    message = str(err.value)
    assert "\n" not in message and "script-based" in message and "--dataset tomaarsen/conll2003" in message


# ----------------------------------------------------------------------------- whole commands


def run_cli(args: list[str], cwd: Path, **extra: str) -> Result:
    return run_job([HVDFT, *args], timeout=300, env=job_env(**extra), cwd=cwd)


def test_srun_without_mpi_is_refused_once(tmp_path: Path) -> None:
    """`srun -n 2 hvdft train` without --mpi: two one-rank jobs into one folder. Each task
    refuses; only task 0 prints the cause."""
    train = write(tmp_path, "t.txt", "Ann B-PER\nruns O\n\nBob B-PER\n")
    args = ["train", "ner", "--train-file", str(train), "--output-dir", str(tmp_path / "out")]
    outs = [run_cli(args, tmp_path, SLURM_STEP_NUM_TASKS="2", SLURM_PROCID=str(task)) for task in (0, 1)]
    assert [p.returncode for p in outs] == [2, 2], [p.stderr[-2000:] for p in outs]
    assert "srun ran 2 separate one-rank jobs" in outs[0].stderr and "--mpi=pmix" in outs[0].stderr
    assert "hvdft: error" not in outs[1].stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_config_file_values_are_converted_like_the_command_line(tmp_path: Path) -> None:
    """YAML reads `lr: 5e-5` as a string: it is converted as command-line text would be;
    a bad value is one line naming the file and the option; the command line wins."""
    from hvdft import cli

    def config(*args: str):
        ctx = cli.train_ner.make_context("ner", list(args))
        cfg = cli._config_from(ctx, "ner", ctx.params)
        cfg.validate()
        return cfg

    yaml_file = write(tmp_path, "c.yaml", "lr: 5e-5\nbatch-size: '16'\nshuffle: no\nscale_lr: linear\n"
                                          "train_file: t.txt\nlabel_all_tokens: true\n")
    cfg = config("--config", str(yaml_file), "--batch-size", "4")
    assert (cfg.lr, cfg.batch_size, cfg.shuffle, cfg.scale_lr) == (5e-5, 4, False, "linear")
    assert cfg.task_options.label_all_tokens is True and isinstance(cfg.lr, float)
    toml_file = write(tmp_path, "c.toml", 'lr = "2e-5"\nepochs = 2\ntrain_file = "t.txt"\n')
    cfg = config("--config", str(toml_file))
    assert (cfg.lr, cfg.epochs, cfg.train_file) == (2e-5, 2.0, "t.txt")
    bad = write(tmp_path, "bad.yaml", "batch_size: many\n")
    with pytest.raises(HvdftError, match=rf"^{bad}:1: batch_size: 'many' is not a valid integer"):
        config("--config", str(bad))
    unknown = write(tmp_path, "u.yaml", "# tuned\nlr: 1e-4\n\nlearning-rate: 1\n")
    with pytest.raises(HvdftError, match=rf"^{unknown}:4: unknown option 'learning_rate'$"):
        config("--config", str(unknown))
    negative = write(tmp_path, "n.yaml", "lr: -1e-3\ntrain_file: t.txt\n")
    with pytest.raises(HvdftError, match=r"^--lr must be positive, got -0.001$"):
        config("--config", str(negative))


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("bad.toml", 'epochs = 2\nbatch-size = "many"\n', r":2: batch_size: 'many' is not a valid integer"),
    ("u.toml", '# tuned\n"lr" = "1e-4"\nwarmup = 3\n', r":3: unknown option 'warmup'$"),
    ("syntax.yaml", "lr: 1e-4\nepochs: [1\nseed: 3\n", r":3: invalid config file: "),
    ("syntax.toml", "lr = 1e-4\nepochs = = 2\n", r":2: invalid config file: "),
    ("list.yaml", "- lr\n- 1e-4\n", r": config file must hold a mapping of option: value$"),
])
def test_config_file_errors_name_the_file_and_line(tmp_path: Path, name: str, text: str, expected: str) -> None:
    from hvdft import cli

    path = write(tmp_path, name, text)
    ctx = cli.train_ner.make_context("ner", ["--config", str(path)])
    with pytest.raises(HvdftError, match=re.escape(str(path)) + expected) as err:
        cli._config_from(ctx, "ner", ctx.params)
    assert "\n" not in str(err.value)


def test_config_file_error_is_one_line_once_under_a_launcher(tmp_path: Path) -> None:
    """Found before Horovod starts, on every rank alike: printed by rank 0 only."""
    bad = write(tmp_path, "bad.yaml", "lr: fast\n")
    outs = [run_cli(["train", "ner", "--config", str(bad)], tmp_path, HOROVOD_RANK=str(r)) for r in (0, 1)]
    assert [p.returncode for p in outs] == [2, 2]
    assert outs[0].stderr.strip() == f"hvdft: error: {bad}:1: lr: 'fast' is not a valid float."
    assert outs[1].stderr == ""


def test_metric_must_be_one_of_the_tasks(tmp_path: Path) -> None:
    train = write(tmp_path, "t.csv", "text,label\na,x\nb,y\n")
    proc = run_cli(["train", "classify", "--train-file", str(train), "--metric", "f1"], tmp_path)
    assert proc.returncode == 2 and "Invalid value for '--metric'" in proc.stderr


def test_every_task_command_exists_with_its_own_options() -> None:
    from hvdft import cli
    from hvdft.tasks import TASKS

    assert sorted(cli.train.commands) == sorted(TASKS)
    ner = {p.name for p in cli.train.commands["ner"].params}
    classify = {p.name for p in cli.train.commands["classify"].params}
    assert "label_all_tokens" in ner and "label_all_tokens" not in classify
    assert "text_pair_column" in classify and "text_pair_column" not in ner
    assert {"lr", "batch_size", "scale_lr", "config_file"} <= ner & classify
    defaults = {p.name: p.default for p in cli.train.commands["ner"].params}
    assert defaults["scale_lr"] == "none" and defaults["text_column"] == "tokens"


def test_results_files_carry_hugging_face_names(tmp_path: Path) -> None:
    """all_results.json plus train_/eval_/test_results.json, with train_loss and epoch."""
    from hvdft.evaluate import Evaluation
    from hvdft.tasks import get_task

    class Tiny(torch.nn.Module):
        def save_pretrained(self, folder, safe_serialization=True):
            (Path(folder) / "config.json").write_text("{}")

    class Tok:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{}")

    results = {"train_loss": 0.5, "train_steps": 3, "epoch": 1.0, "eval_f1": 0.7, "test_f1": 0.6}
    reports = {"eval": Evaluation({"f1": 0.7}, "r"), "test": Evaluation({"f1": 0.6}, "r")}
    outputs.write_outputs(tmp_path, get_task("ner"), Tiny(), Tok(), results, reports, {"labels": []})
    files = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*_results.json")}
    assert files["all_results.json"] == results
    assert files["train_results.json"] == {"train_loss": 0.5, "train_steps": 3, "epoch": 1.0}
    assert files["eval_results.json"] == {"eval_f1": 0.7, "epoch": 1.0}
    assert files["test_results.json"] == {"test_f1": 0.6, "epoch": 1.0}
    assert (tmp_path / "config.json").exists() and not (tmp_path / "checkpoints" / "final").exists()


