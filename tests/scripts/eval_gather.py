"""Evaluate a seeded model on the first sentences of WNUT-17 validation, sharded over the
ranks; rank 0 writes the gathered metrics and predictions as JSON (argv[1])."""

import json
import sys

import torch
from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

from hvdft import dist
from hvdft.data.files import Shard
from hvdft.data.prepare import BUNDLED_DATASETS, tokenize
from hvdft.evaluate import Evaluator
from hvdft.models import resolve_model
from hvdft.tasks.ner import NerTask

dist.init()
task = NerTask()
split = task.read(str(BUNDLED_DATASETS["wnut17"] / "valid.txt"), "validation", Shard(dist.rank(), dist.size()))
keep = [i for i, gid in enumerate(split.ids) if gid < 61]
split.ids, split.examples, split.total = [split.ids[i] for i in keep], [split.examples[i] for i in keep], 61
labels = task.sort_labels({t for ex in split.examples for t in ex["tags"]} | {"B-person", "I-person"})
labels = task.sort_labels(set().union(*dist.allgather_object(set(labels))))
path = resolve_model("minilm")
config = AutoConfig.from_pretrained(path, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                    label2id={k: i for i, k in enumerate(labels)})
torch.manual_seed(0)
model = AutoModelForTokenClassification.from_pretrained(path, config=config)
torch.nn.init.normal_(model.classifier.weight, std=2.0)  # a head that predicts many entities
dist.broadcast_parameters(model)
tok = AutoTokenizer.from_pretrained(path)
features = tokenize(task, split, tok, config.label2id, max_length=24)  # small windows: merging is exercised
result = Evaluator(task, model, dict(enumerate(labels)), 8, tok.pad_token_id)(split, features)
if dist.is_main():
    json.dump({"metrics": result.metrics, "gold": [e["tags"] for e in result.examples],
               "predictions": result.predictions, "report": result.report}, open(sys.argv[1], "w"))
dist.shutdown()
