"""Evaluate a seq2seq model folder on a pair file through the engine: hvdft.inference.load_model
(Task.prepare, AutoModelForSeq2SeqLM), the engine's tokenize and Evaluator (each rank generates
its strided shard in its own length-sorted batches, rank 0 gathers in input order). Rank 0 writes
the gathered ids, sources and (hypothesis, cut) pairs, and the metrics, as JSON.

    python seq2seq_gather.py MODEL_DIR PAIRS.txt OUT.json BATCH                 # 1 process
    horovodrun -np 2 --gloo python seq2seq_gather.py MODEL_DIR PAIRS.txt OUT.json BATCH
"""

import json
import sys

from hvdft import dist
from hvdft.data.files import Shard
from hvdft.data.prepare import tokenize
from hvdft.inference import load_model

model_dir, data, out, batch_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
dist.init()
run = load_model(model_dir, {}, "utf-8", batch_size, "fp32")
# float64: what is compared is the batching and the gather, not the last bits of fp32 sums
run.model.double()
split = run.task.read(data, "test", Shard(dist.rank(), dist.size()))
features = tokenize(run.task, split, run.tokenizer, {}, run.max_length)
result = run.evaluator(split, features)
if dist.is_main():
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"world": dist.size(), "sources": [e["source"] for e in result.examples],
                   "hypotheses": result.predictions, "metrics": result.metrics}, f)
dist.shutdown()
