"""--init-from (issue 17 B): continual fine-tuning keeps what the model knows.

Unit tests call hvdft.continual directly on tiny models; the slow test runs hvdft train
ner and classify on 2 ranks (one train_many job): a 4-label model extended to 6 labels,
whose weights at the first step (HVDFT_DEBUG_TENSORS=after_broadcast, every rank) hold
the 4 old classifier rows and the whole encoder bit for bit.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from support import horovodrun, job_env, load_tensors, make_tiny_model, run_ok, write_conll

from hvdft.continual import Prior, classifier_layer, extend_classifier, missing_weights
from hvdft.errors import HvdftError
from hvdft.tasks import get_task

SCRIPT = str(Path(__file__).parent / "scripts" / "train_many.py")


def tiny_config(num_labels: int, **extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, num_labels=num_labels, **extra)


def fine_tuned_model(folder: Path, task: str, labels: list[str], seed: int = 0) -> Path:
    """A model folder as someone's fine-tuning leaves it: tiny BERT with a trained-looking
    head (random, non-zero bias), minilm's tokenizer, id2label; hvdft's task marker."""
    import shutil

    from transformers import BertForSequenceClassification, BertForTokenClassification

    from hvdft.models import resolve_model

    torch.manual_seed(seed)
    cls = BertForTokenClassification if task == "ner" else BertForSequenceClassification
    model = cls(tiny_config(len(labels), id2label=dict(enumerate(labels)),
                            label2id={label: i for i, label in enumerate(labels)}))
    with torch.no_grad():
        model.classifier.bias.normal_()
    model.config.hvdft_task = task
    model.save_pretrained(folder)
    src = Path(resolve_model("minilm"))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    return folder


# ----------------------------------------------------------------------------- units


def test_extend_classifier_copies_old_rows_and_draws_new_ones() -> None:
    from transformers import BertForTokenClassification

    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_config(4))
    with torch.no_grad():
        model.classifier.bias.normal_()
    old_w, old_b = model.classifier.weight.clone(), model.classifier.bias.clone()
    assert extend_classifier(model, 4, 6, std=0.02) == "classifier"
    w, b = model.classifier.weight, model.classifier.bias
    assert w.shape == (6, 32) and b.shape == (6,)
    assert torch.equal(w[:4], old_w) and torch.equal(b[:4], old_b)
    assert torch.equal(b[4:], torch.zeros(2))
    assert 0.005 < float(w[4:].detach().std()) < 0.05 and not torch.equal(w[4], w[5])
    logits = model(input_ids=torch.tensor([[101, 2000, 102]])).logits
    assert logits.shape == (1, 3, 6)
    assert w.requires_grad and any(p is w for p in model.parameters())  # the optimizer will train it


def test_classifier_layer_finds_heads_beyond_bert() -> None:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=3)
    model = RobertaForSequenceClassification(cfg)
    name, layer = classifier_layer(model, 3)
    assert name == "classifier.out_proj" and layer.out_features == 3
    extend_classifier(model, 3, 5, 0.02)
    assert model.classifier.out_proj.out_features == 5
    with pytest.raises(HvdftError, match="cannot tell the classifier layer"):
        classifier_layer(model, 7)


def test_a_base_model_is_refused_not_given_a_random_head(tmp_path: Path) -> None:
    base = make_tiny_model(tmp_path / "base")  # an encoder without any head
    (base / "config.json").write_text(json.dumps({**json.loads((base / "config.json").read_text()),
                                                  "id2label": {"0": "O", "1": "B-PER"}}))
    prior = Prior.read(str(base), get_task("ner"))
    config = __import__("transformers").AutoConfig.from_pretrained(base)
    config.num_labels, config.id2label = 2, {0: "O", 1: "B-PER"}
    with pytest.raises(HvdftError, match=r"lacks 2 of the model's weights \(classifier.bias, classifier.weight"):
        prior.build(str(base), config, None)


def test_missing_weights_of_a_complete_folder_is_empty(tmp_path: Path) -> None:
    from transformers import AutoModelForTokenClassification

    folder = fine_tuned_model(tmp_path / "m", "ner", ["O", "B-X"])
    assert missing_weights(AutoModelForTokenClassification.from_pretrained(folder), folder) == []


def test_label_order_kept_new_appended_absent_kept(tmp_path: Path) -> None:
    folder = fine_tuned_model(tmp_path / "m", "ner", ["O", "B-PER", "I-PER", "B-LOC"])
    prior = Prior.read(str(folder), get_task("ner"))
    assert prior.labels == ["O", "B-PER", "I-PER", "B-LOC"]
    merged = prior.extend(["O", "B-LOC", "B-ORG", "I-ORG", "B-PER"])  # the data's order (sorted by the task)
    assert merged == ["O", "B-PER", "I-PER", "B-LOC", "B-ORG", "I-ORG"]
    assert prior.new == ["B-ORG", "I-ORG"] and prior.absent == ["I-PER"]


def test_wrong_task_and_unrelated_labels_are_errors(tmp_path: Path) -> None:
    folder = fine_tuned_model(tmp_path / "m", "ner", ["O", "B-PER"])
    with pytest.raises(HvdftError, match="holds a 'ner' model, this is 'hvdft train classify'"):
        Prior.read(str(folder), get_task("classify"))
    with pytest.raises(HvdftError, match="none of the model's labels"):
        Prior.read(str(folder), get_task("ner")).extend(["O2", "B-X"])
    with pytest.raises(HvdftError, match="holds no model"):
        Prior.read(str(tmp_path / "nothing"), get_task("ner"))


def test_init_from_and_model_together_is_an_error() -> None:
    from hvdft.config import TrainConfig

    with pytest.raises(HvdftError, match="--init-from DIR replaces --model"):
        TrainConfig(train_file="x", model="bert-base-cased", init_from="runs/a").validate()


# ----------------------------------------------------------------------------- 2 ranks

PEOPLE, PLACES, ORGS = ["Alice", "Bob", "Carol"], ["Paris", "Oslo", "Lima"], [["Acme", "Corp"], ["Globex", "Inc"]]


def new_ner_data(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """New data: PER (B- only: the model's I-PER is absent), LOC, and ORG, which is new."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        org = rng.choice(ORGS)
        out.append([(rng.choice(PEOPLE), "B-PER"), ("works", "O"), ("for", "O"), (org[0], "B-ORG"), (org[1], "I-ORG"),
                    ("in", "O"), (rng.choice(PLACES), "B-LOC")])
    return out


def new_classify_data(path: Path, n: int, seed: int) -> Path:
    """New data: the model's 'sports' and 'politics', and the new 'science' and 'arts'
    ('music' and 'food' absent)."""
    rng = random.Random(seed)
    words = {"sports": "match goal team", "politics": "vote party law", "science": "atom cell lab",
             "arts": "paint stage poem"}
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(words))
        rows.append({"text": " ".join(rng.sample(words[label].split(), 3)), "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_two_ranks_extend_a_4_label_model_to_6_labels(tmp_path: Path) -> None:
    ner_old = ["O", "B-PER", "I-PER", "B-LOC"]
    cls_old = ["sports", "politics", "music", "food"]
    models = {"ner": fine_tuned_model(tmp_path / "ner_old", "ner", ner_old, seed=1),
              "classify": fine_tuned_model(tmp_path / "cls_old", "classify", cls_old, seed=2)}
    data = {"ner": write_conll(tmp_path / "ner.txt", new_ner_data(24, 3)),
            "classify": new_classify_data(tmp_path / "cls.jsonl", 24, 4)}
    spec = [{"name": task, "task": task, "env": {"HVDFT_DEBUG_DIR": str(tmp_path / f"debug_{task}"),
                                                   "HVDFT_DEBUG_TENSORS": "after_broadcast"},
             "args": ["--init-from", str(models[task]), "--train-file", str(data[task]), "--max-length", "32",
                      "--batch-size", "4", "--max-steps", "2", "--lr", "1e-3", "--cache-dir", str(tmp_path / "cache"),
                      "--output-dir", str(tmp_path / f"out_{task}")]}
            for task in ("ner", "classify")]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = run_ok([*horovodrun(2), sys.executable, SCRIPT, str(tmp_path / "spec.json"), str(tmp_path / "results")],
                    timeout=900, env=job_env())
    for rank in (0, 1):
        outcome = json.loads((tmp_path / "results" / f"rank{rank}.json").read_text())
        assert all(r["code"] == 0 for r in outcome), [r["stderr"][-3000:] for r in outcome if r["code"]]
    expected = {"ner": ner_old + ["B-ORG", "I-ORG"], "classify": cls_old + ["arts", "science"]}
    for task in ("ner", "classify"):
        old = load_tensors(models[task])
        first = [load_tensors_file(tmp_path / f"debug_{task}" / f"rank{r}-after_broadcast.safetensors") for r in (0, 1)]
        for start in first:
            w, b = start["classifier.weight"], start["classifier.bias"]
            assert w.shape[0] == b.shape[0] == 6, task
            assert torch.equal(w[:4], old["classifier.weight"]) and torch.equal(b[:4], old["classifier.bias"]), task
            assert float(w[4:].abs().sum()) > 0 and torch.equal(b[4:], torch.zeros(2)), task
            for k in old:  # the encoder too: nothing re-initialised
                if not k.startswith("classifier"):
                    assert torch.equal(start[k], old[k]), (task, k)
        assert all(torch.equal(first[0][k], first[1][k]) for k in first[0])  # broadcast: one model
        config = json.loads((tmp_path / f"out_{task}" / "config.json").read_text())
        assert [config["id2label"][str(i)] for i in range(6)] == expected[task]
        trained = load_tensors(tmp_path / f"out_{task}")
        assert trained["classifier.weight"].shape[0] == 6
        assert not torch.equal(trained["classifier.weight"], first[0]["classifier.weight"])  # and it trained
    assert "new, with fresh classifier rows 4-5: B-ORG, I-ORG" in result.output
    assert "new, with fresh classifier rows 4-5: arts, science" in result.output
    assert "lacks stay predictable: I-PER" in result.output
    assert "lacks stay predictable: music, food" in result.output


def load_tensors_file(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))
