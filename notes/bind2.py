"""
The smallest binding task we could make, kept runnable (notes/sft.md, "Fifth attempt"):

    python notes/bind2.py data        # writes data/shapes/bind2_{train,eval}.jsonl + PNGs (~15 s)
    python sft.py --data data/shapes/bind2_train.jsonl --val data/shapes/bind2_eval.jsonl --mix 1 \\
        --eval_n 60 --steps 3000 --rope_theta 10000 --out runs/bind2
    python notes/bind2.py score runs/bind2

Two-object scenes from the reasoning generator, only the two attribute questions ("What colour is the
{shape}?", "What shape is the {colour} object?"); the question names exactly one of the two objects.
Train rows are reasoning-train items from index 100000 on (disjoint from reasoning_train.jsonl's 0..11999),
eval rows reasoning-val items from index 10000 on. `score` splits the greedy answers into: the asked
object's attribute (correct), the other object's, or neither. A model that reads the image but does not
bind answers with either object's attribute: correct ~ 0.5 + 0.5 P(both objects share it) (the
"pick-either" figure printed), other-object's ~ the rest.
"""
import collections
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data", "shapes"))
import prepare  # noqa: E402
import vlm  # noqa: E402
from grpo import last_boxed, load_image, load_rows, normalise, rollout  # noqa: E402

QTYPES = ("colour_of_shape", "shape_of_colour")


def write(split, start, n, out_dir=os.path.join(ROOT, "data", "shapes")):
    """n 2-object attribute questions from the reasoning generator's `split`, item index `start` on."""
    name = {"train": "bind2_train", "val": "bind2_eval"}[split]
    os.makedirs(os.path.join(out_dir, "images", name), exist_ok=True)
    rows, i = [], start
    while len(rows) < n:
        row, img = prepare.make_item("reasoning", split, i)
        if row["n_objects"] == 2 and row["qtype"] in QTYPES:
            row["image"] = f"images/{name}/{i:06d}.png"
            img.save(os.path.join(out_dir, row["image"]), format="PNG")
            rows.append(row)
        i += 1
    with open(os.path.join(out_dir, f"{name}.jsonl"), "w", newline="\n") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {n} rows to {out_dir}/{name}.jsonl")


def target_and_other(row):
    """(asked-for object, other object, attribute asked) of a 2-object attribute question."""
    if row["qtype"] == "colour_of_shape":  # "What colour is the {shape}?"
        key, by, word = "colour", "shape", row["question"].rstrip("?").split()[-1]
    else:  # "What shape is the {colour} object?"
        key, by, word = "shape", "colour", row["question"].split()[4]
    (t,), (o,) = [x for x in row["objects"] if x[by] == word], [x for x in row["objects"] if x[by] != word]
    return t, o, key


def score(ckpt, path=os.path.join(ROOT, "data", "shapes", "bind2_eval.jsonl")):
    """{qtype: {n, correct, other, in_image, pick_either}} (fractions of n), also printed."""
    model, processor, fam = vlm.load(ckpt, "cpu", torch.float32)
    model.eval()
    rows, c = load_rows(path), collections.Counter()
    for i in range(0, len(rows), 32):
        chunk = rows[i:i + 32]
        _, _, _, texts = rollout(model, processor, chunk, [load_image(r) for r in chunk], 1, 64, temperature=0)
        for r, text in zip(chunk, texts):
            answer = last_boxed(text)  # parsed as the reasoning reward parses it
            answer = normalise(answer) if answer is not None else None
            t, o, key = target_and_other(r)
            q = r["qtype"]
            c[q, "n"] += 1
            c[q, "correct"] += answer == t[key]
            c[q, "other"] += answer == o[key] != t[key]
            c[q, "same"] += t[key] == o[key]
    out = {}
    for q in QTYPES:
        n = c[q, "n"]
        out[q] = dict(n=n, correct=c[q, "correct"] / n, other=c[q, "other"] / n,
                      in_image=(c[q, "correct"] + c[q, "other"]) / n, pick_either=0.5 + 0.5 * c[q, "same"] / n)
        print(f"{q}: n={n} correct {out[q]['correct']:.2f}  other object's {out[q]['other']:.2f}  "
              f"in the image {out[q]['in_image']:.2f}  (pick-either: correct {out[q]['pick_either']:.2f})")
    return out


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "data":
        write("train", 100000, 12000)
        write("val", 10000, 200)
    elif len(sys.argv) == 3 and sys.argv[1] == "score":
        torch.set_num_threads(int(os.environ.get("THREADS", "2")))
        score(sys.argv[2])
    else:
        sys.exit(__doc__)
