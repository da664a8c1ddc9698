"""Generate for a pair file sharded over the ranks (strided), each rank in its own length-sorted
batches of 3; rank 0 writes the gathered (source, hypothesis) list in input order as JSON.

    python seq2seq_gather.py MODEL_DIR PAIRS.txt OUT.json          # 1 process
    horovodrun -np 2 --gloo python seq2seq_gather.py ...            # 2 ranks
"""

import json
import sys

import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

from hvdft import dist
from hvdft.tasks.seq2seq import Seq2seqTask, Shard

model_dir, data, out = sys.argv[1:4]
dist.init()
task = Seq2seqTask()
split = task.read(data, "test", Shard(dist.rank(), dist.size()))
tokenizer = AutoTokenizer.from_pretrained(model_dir)
task.configure(AutoConfig.from_pretrained(model_dir), tokenizer, 64)
# float64: what is compared is the batching and the gather, not the last bits of fp32 sums
model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).double().eval()
columns = {"source": [e["source"] for e in split.examples], "target": [e["target"] for e in split.examples],
           "example": list(range(len(split.examples)))}
features = task.featurize(columns, tokenizer, {}, 64)
order = sorted(range(len(split.examples)), key=lambda r: -len(features["input_ids"][r]))
predictions = [None] * len(split.examples)
for start in range(0, len(order), 3):
    rows = order[start:start + 3]
    ids = [features["input_ids"][r] for r in rows]
    longest = max(map(len, ids))
    inputs = {"input_ids": torch.tensor([x + [tokenizer.pad_token_id] * (longest - len(x)) for x in ids]),
              "attention_mask": torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids])}
    batch = type("Batch", (), {"inputs": inputs})()
    for r, p in zip(rows, task.predictions([], None, batch, model), strict=True):
        predictions[r] = task.merge(split.examples[r], [p], {})
local = list(zip(split.ids, [e["source"] for e in split.examples], predictions, strict=True))
gathered = dist.allgather_object(local)
if dist.is_main():
    ordered = sorted((item for part in gathered for item in part), key=lambda item: item[0])
    json.dump({"world": dist.size(), "ids": [i for i, _, _ in ordered], "sources": [s for _, s, _ in ordered],
               "hypotheses": [p for _, _, p in ordered]}, open(out, "w"))
dist.shutdown()
