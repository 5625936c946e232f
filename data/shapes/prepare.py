"""Synthetic CLEVR-like "shapes" data, drawn with PIL, deterministic from a seed.

Three tasks, each with train/val/test splits:
  grounding  referring expression ("the red circle") -> box, with distractors
  reasoning  counting / attribute questions with a short answer ("3", "red")
  detail     one small shape among large clutter (for egg_ground.py), with its box

Every item i of (task, split) is drawn from its own RNG,
random.Random(f"{seed}-{task}-{split}-{i}"), so the same seed gives the same
bytes, any split or subset can be regenerated alone, and adding items never
changes earlier ones.

    python data/shapes/prepare.py                 # default sizes, into data/shapes
    python data/shapes/prepare.py --tasks grounding --splits val --n_val 50
"""
import argparse
import functools
import json
import os
import random

from PIL import Image, ImageDraw
from tqdm import tqdm

COLOURS = {  # fixed, pairwise distinct RGB values
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 190),
}
SHAPES = ["circle", "square", "triangle"]
BACKGROUND = (230, 230, 230)
GAP = 4  # minimum gap in pixels between any two objects' boxes
TASKS = ["grounding", "reasoning", "detail"]
SPLITS = ["train", "val", "test"]
CANVAS = {"grounding": 112, "reasoning": 112, "detail": 224}


@functools.lru_cache(maxsize=None)
def glyph(shape, size):
    """1-bit-ish 'L' mask of `shape` drawn in a size x size square, cropped tight
    to its drawn pixels (so a box built from the mask's size is tight)."""
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    s = size - 1
    if shape == "circle":
        d.ellipse([0, 0, s, s], fill=255)
    elif shape == "square":
        d.rectangle([0, 0, s, s], fill=255)
    elif shape == "triangle":
        d.polygon([(0, s), (s, s), (s // 2, 0)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m.crop(m.getbbox())


def separated(a, b, gap=GAP):
    """True when boxes a and b ([x1,y1,x2,y2], exclusive ends) are >= gap apart."""
    return (a[2] + gap <= b[0] or b[2] + gap <= a[0]
            or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def place(rng, attrs, sizes, canvas, tries=200):
    """Place objects (colour, shape) with the given sizes without overlap.
    Returns a list of {"shape","colour","box"} or None if it did not fit."""
    objs = []
    for (colour, shape), size in zip(attrs, sizes):
        w, h = glyph(shape, size).size
        for _ in range(tries):
            x, y = rng.randint(0, canvas - w), rng.randint(0, canvas - h)
            box = [x, y, x + w, y + h]
            if all(separated(box, o["box"]) for o in objs):
                objs.append({"shape": shape, "colour": colour, "box": box, "_size": size})
                break
        else:
            return None
    return objs


def scene(rng, attrs, lo, hi, canvas, fixed_sizes=None):
    """Place attrs with sizes drawn from [lo, hi] (or fixed_sizes), retrying until it fits."""
    while True:
        sizes = fixed_sizes or [rng.randint(lo, hi) for _ in attrs]
        objs = place(rng, attrs, sizes, canvas)
        if objs is not None:
            return objs


def render(objs, canvas):
    img = Image.new("RGB", (canvas, canvas), BACKGROUND)
    for o in objs:
        img.paste(COLOURS[o["colour"]], tuple(o["box"][:2]), glyph(o["shape"], o["_size"]))
    return img


def public(objs):
    """Objects in reading order (by y1, x1), without private drawing fields."""
    objs = sorted(objs, key=lambda o: (o["box"][1], o["box"][0]))
    return [{"shape": o["shape"], "colour": o["colour"], "box": list(o["box"])} for o in objs]


def make_grounding(rng, split):
    n = rng.randint(1, 4) if split == "train" else rng.randint(2, 4)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    target = rng.choice(pairs)
    attrs = [target]
    if n >= 2:  # one distractor shares the target's colour or shape
        if rng.random() < 0.5:
            attrs.append((target[0], rng.choice([s for s in SHAPES if s != target[1]])))
        else:
            attrs.append((rng.choice([c for c in COLOURS if c != target[0]]), target[1]))
    rest = [p for p in pairs if p not in attrs]
    attrs += rng.sample(rest, n - len(attrs))
    objs = scene(rng, attrs, 18, 34, CANVAS["grounding"])
    colour, shape = target
    colour_unique = sum(a[0] == colour for a in attrs) == 1
    shape_unique = sum(a[1] == shape for a in attrs) == 1
    if colour_unique and rng.random() < 0.5:
        query = f"the {colour} shape"
    elif shape_unique and rng.random() < 0.5:
        query = f"the {shape}"
    else:
        query = f"the {colour} {shape}"
    box = list(objs[0]["box"])  # target was placed first
    return objs, {"n_objects": n, "query": query, "box": box}


def make_reasoning(rng, split):
    qtype = rng.choice(["count_colour", "count_shape", "colour_of_shape", "shape_of_colour"])
    n = rng.randint(2, 5)
    while True:
        attrs = [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(n)]
        cc = {c: sum(a[0] == c for a in attrs) for c in COLOURS}
        sc = {s: sum(a[1] == s for a in attrs) for s in SHAPES}
        if qtype == "count_colour":
            absent = [c for c in COLOURS if cc[c] == 0]
            colour = rng.choice(absent) if absent and rng.random() < 0.2 else \
                rng.choice(sorted({a[0] for a in attrs}, key=list(COLOURS).index))
            question, answer = f"How many {colour} shapes are there?", str(cc[colour])
        elif qtype == "count_shape":
            absent = [s for s in SHAPES if sc[s] == 0]
            shape = rng.choice(absent) if absent and rng.random() < 0.2 else \
                rng.choice(sorted({a[1] for a in attrs}, key=SHAPES.index))
            question, answer = f"How many {shape}s are there?", str(sc[shape])
        elif qtype == "colour_of_shape":
            cands = [s for s in SHAPES if sc[s] == 1]
            if not cands:
                continue
            shape = rng.choice(cands)
            question = f"What colour is the {shape}?"
            answer = next(a[0] for a in attrs if a[1] == shape)
        else:
            cands = [c for c in COLOURS if cc[c] == 1]
            if not cands:
                continue
            colour = rng.choice(cands)
            question = f"What shape is the {colour} object?"
            answer = next(a[1] for a in attrs if a[0] == colour)
        break
    objs = scene(rng, attrs, 18, 34, CANVAS["reasoning"])
    return objs, {"n_objects": n, "question": question, "answer": answer, "qtype": qtype}


def make_detail(rng, split):
    k = rng.randint(2, 3)
    clutter = [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(k)]
    free = [c for c in COLOURS if c not in {a[0] for a in clutter}]
    target = (rng.choice(free), rng.choice(SHAPES))
    attrs = clutter + [target]
    while True:
        sizes = [rng.randint(40, 60) for _ in clutter] + [rng.randint(10, 16)]
        objs = place(rng, attrs, sizes, CANVAS["detail"])
        if objs is not None:
            break
    if rng.random() < 0.5:
        qtype, question, answer = "colour_of_small", "What colour is the small shape?", target[0]
    else:
        qtype, question, answer = "shape_of_small", "What shape is the small object?", target[1]
    box = list(objs[-1]["box"])
    return objs, {"n_objects": k + 1, "question": question, "answer": answer,
                  "qtype": qtype, "box": box}


MAKERS = {"grounding": make_grounding, "reasoning": make_reasoning, "detail": make_detail}


def make_item(task, split, i, seed=0):
    """Return (row without image path, PIL image) for item i; pure function of its args."""
    rng = random.Random(f"{seed}-{task}-{split}-{i}")
    objs, extra = MAKERS[task](rng, split)
    canvas = CANVAS[task]
    img = render(objs, canvas)
    row = {"id": f"{task}-{split}-{i:05d}", "task": task, "image": None,
           "width": canvas, "height": canvas, "objects": public(objs)}
    row.update(extra)
    return row, img


def make_split(task, split, n, seed=0, out_dir="data/shapes", progress=True):
    """Write {out_dir}/{task}_{split}.jsonl and its PNGs; return the rows."""
    rel_dir = f"images/{task}_{split}"
    os.makedirs(os.path.join(out_dir, rel_dir), exist_ok=True)
    rows = []
    for i in tqdm(range(n), desc=f"{task}_{split}", disable=not progress):
        row, img = make_item(task, split, i, seed)
        row["image"] = f"{rel_dir}/{i:05d}.png"
        img.save(os.path.join(out_dir, row["image"]), format="PNG")  # no metadata chunks
        rows.append(row)
    with open(os.path.join(out_dir, f"{task}_{split}.jsonl"), "w", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/shapes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_train", type=int, default=12000)
    p.add_argument("--n_val", type=int, default=200)
    p.add_argument("--n_test", type=int, default=200)
    p.add_argument("--n_detail_train", type=int, default=1500)
    p.add_argument("--n_detail_eval", type=int, default=100)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--splits", default=",".join(SPLITS))
    args = p.parse_args()
    for task in args.tasks.split(","):
        for split in args.splits.split(","):
            assert task in TASKS and split in SPLITS, (task, split)
            if task == "detail":
                n = args.n_detail_train if split == "train" else args.n_detail_eval
            else:
                n = {"train": args.n_train, "val": args.n_val, "test": args.n_test}[split]
            make_split(task, split, n, args.seed, args.out)
            print(f"wrote {n} items to {os.path.join(args.out, f'{task}_{split}.jsonl')}")
