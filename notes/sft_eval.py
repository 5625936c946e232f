"""
The shipped checkpoint's figures (notes/sft.md, README): greedy Acc@0.5 and format on all 200 grounding val
rows (also by number of objects), reasoning accuracy on all 200 val rows by question type, detail accuracy
on the 100 val rows:

    python notes/sft_eval.py checkpoints/tiny-shapes
"""
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vlm  # noqa: E402
from grpo import evaluate, load_rows  # noqa: E402


def by(rows, key):
    groups = collections.defaultdict(list)
    for r in rows:
        groups[r[key]].append(r)
    return dict(sorted(groups.items()))


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    model, processor, fam = vlm.load(sys.argv[1])
    out = dict(checkpoint=sys.argv[1], family=fam["model_type"])
    for task, key in (("grounding", "n_objects"), ("reasoning", "qtype"), ("detail", "qtype")):
        rows = load_rows(f"data/shapes/{task}_val.jsonl")
        groups = {k: (len(g), evaluate(model, processor, fam, g)) for k, g in by(rows, key).items()}
        out[task] = dict(n=len(rows), acc=round(sum(n * m["acc"] for n, m in groups.values()) / len(rows), 3),
                         format=round(sum(n * m["format"] for n, m in groups.values()) / len(rows), 3),
                         by={str(k): round(m["acc"], 3) for k, (n, m) in groups.items()})
        print(json.dumps({task: out[task]}), flush=True)
    print(json.dumps(out))
