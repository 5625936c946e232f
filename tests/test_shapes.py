"""Tests for data/shapes/prepare.py: determinism, geometry, and answers that are
recomputed independently (from the scene description and from the PNG pixels)."""
import importlib.util
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("shapes_prepare", os.path.join(ROOT, "data", "shapes", "prepare.py"))
prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare)

# Written out here on purpose, not imported, so a change in prepare.py shows up.
COLOURS = {"red", "green", "blue", "yellow", "purple"}
SHAPES = {"circle", "square", "triangle"}
BACKGROUND = (230, 230, 230)
N = 30  # items per split in these tests


def build(out_dir, seed=0, splits=("train", "val")):
    return {(t, s): prepare.make_split(t, s, N, seed, str(out_dir), progress=False)
            for t in ("grounding", "reasoning", "detail") for s in splits}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return out, build(out)


def all_files(d):
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(d) for f in fs}


def pixels(out, row):
    return np.asarray(Image.open(os.path.join(out, row["image"])).convert("RGB"))


# ---------------------------------------------------------------- determinism
def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    build(tmp_path / "a", seed=3)
    build(tmp_path / "b", seed=3)
    build(tmp_path / "c", seed=4)
    a, b, c = (all_files(tmp_path / k) for k in "abc")
    assert len(a) == 6 * (N + 1) and a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".jsonl"))
    assert sum(a[k] != c[k] for k in a if k.endswith(".png")) > 0.9 * 6 * N


def test_items_independent_of_split_size(tmp_path):
    small = prepare.make_split("reasoning", "train", 5, 0, str(tmp_path / "s"), progress=False)
    big = prepare.make_split("reasoning", "train", 12, 0, str(tmp_path / "b"), progress=False)
    assert small == big[:5]
    for i in range(5):
        p = f"images/reasoning_train/{i:05d}.png"
        assert open(tmp_path / "s" / p, "rb").read() == open(tmp_path / "b" / p, "rb").read()


def test_jsonl_matches_returned_rows(data):
    out, rows = data
    for (t, s), rs in rows.items():
        with open(out / f"{t}_{s}.jsonl") as f:
            lines = [json.loads(line) for line in f]
        assert lines == rs
        for i, r in enumerate(rs):
            assert list(r)[:6] == ["id", "task", "image", "width", "height", "objects"]
            assert r["id"] == f"{t}-{s}-{i:05d}" and r["task"] == t
            assert r["image"] == f"images/{t}_{s}/{i:05d}.png"


# ---------------------------------------------------------------- geometry
def test_boxes_inside_disjoint_and_tight(data):
    out, rows = data
    for rs in rows.values():
        for r in rs:
            px = pixels(out, r)
            H, W, _ = px.shape
            assert (W, H) == (r["width"], r["height"])
            objs = r["objects"]
            covered = np.zeros((H, W), bool)
            for j, o in enumerate(objs):
                assert o["colour"] in COLOURS and o["shape"] in SHAPES
                x1, y1, x2, y2 = o["box"]
                assert all(isinstance(v, int) for v in o["box"])
                assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H, (r["id"], o)
                for p in objs[j + 1:]:
                    a, b = o["box"], p["box"]
                    g = 4  # at least 4 px between any two objects' boxes (so no overlap)
                    assert a[2] + g <= b[0] or b[2] + g <= a[0] or a[3] + g <= b[1] or b[3] + g <= a[1], (r["id"], a, b)
                # colour mask in the box grown by 2 px must lie inside the box, touching all four sides
                rgb = prepare.COLOURS[o["colour"]]
                X1, Y1, X2, Y2 = max(x1 - 2, 0), max(y1 - 2, 0), min(x2 + 2, W), min(y2 + 2, H)
                m = np.all(px[Y1:Y2, X1:X2] == rgb, axis=-1)
                ys, xs = np.nonzero(m)
                assert len(xs), (r["id"], o)
                assert (xs.min() + X1, ys.min() + Y1, xs.max() + X1 + 1, ys.max() + Y1 + 1) == (x1, y1, x2, y2), (r["id"], o)
                inside = px[y1:y2, x1:x2]
                ok = np.all(inside == rgb, -1) | np.all(inside == BACKGROUND, -1)
                assert ok.all(), (r["id"], o)  # only its colour and background in its box
                covered[y1:y2, x1:x2] = True
            bg = np.all(px == BACKGROUND, axis=-1)
            assert (bg | covered).all(), r["id"]  # nothing drawn outside the boxes


def test_palette_distinct():
    vals = [prepare.COLOURS[c] for c in COLOURS]
    assert set(prepare.COLOURS) == COLOURS and set(prepare.SHAPES) == SHAPES
    assert len(set(vals)) == 5 and tuple(prepare.BACKGROUND) not in vals


# ---------------------------------------------------------------- grounding
def parse_query(q):
    words = q.split()
    assert words[0] == "the" and len(words) in (2, 3), q
    if len(words) == 3 and words[2] == "shape":
        return words[1], None
    if len(words) == 3:
        return words[1], words[2]
    return None, words[1]


def test_grounding_query_names_exactly_one(data):
    _, rows = data
    kinds = set()
    for s in ("train", "val"):
        ns = set()
        for r in rows[("grounding", s)]:
            colour, shape = parse_query(r["query"])
            assert colour in COLOURS | {None} and shape in SHAPES | {None}, r["query"]
            kinds.add((colour is None, shape is None))
            hits = [o for o in r["objects"]
                    if (colour is None or o["colour"] == colour) and (shape is None or o["shape"] == shape)]
            assert len(hits) == 1, r
            assert hits[0]["box"] == r["box"], r
            n = len(r["objects"])
            assert r["n_objects"] == n
            ns.add(n)
            pairs = [(o["colour"], o["shape"]) for o in r["objects"]]
            assert len(set(pairs)) == n
            if n >= 2:  # a distractor shares the target's colour or shape
                t = hits[0]
                assert any(o is not t and (o["colour"] == t["colour"] or o["shape"] == t["shape"])
                           for o in r["objects"]), r
            for o in r["objects"]:
                assert 18 <= max(o["box"][2] - o["box"][0], o["box"][3] - o["box"][1]) <= 34
        if s == "train":
            assert ns <= {1, 2, 3, 4} and 1 in ns
        else:
            assert ns <= {2, 3, 4}
    assert len(kinds) == 3  # full, colour-only and shape-only queries all occur


# ---------------------------------------------------------------- reasoning
def answer_from_objects(question, objs):
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(sum(o["colour"] == m[1] for o in objs))
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(sum(o["shape"] == m[1] for o in objs))
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        hits = [o for o in objs if o["shape"] == m[1]]
        assert len(hits) == 1, question
        return hits[0]["colour"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        hits = [o for o in objs if o["colour"] == m[1]]
        assert len(hits) == 1, question
        return hits[0]["shape"]
    raise AssertionError(f"unparsed question {question!r}")


def test_reasoning_answers_recomputed(data):
    out, rows = data
    qtypes, counts = set(), set()
    for s in ("train", "val"):
        for r in rows[("reasoning", s)]:
            assert 2 <= len(r["objects"]) <= 5
            assert isinstance(r["answer"], str)
            assert answer_from_objects(r["question"], r["objects"]) == r["answer"], r
            qtypes.add(r["qtype"])
            if r["qtype"] == "count_colour":
                colour = re.fullmatch(r"How many (\w+) shapes are there\?", r["question"])[1]
                px = pixels(out, r)
                rgb = prepare.COLOURS[colour]
                n = sum(np.all(px[y1:y2, x1:x2] == rgb, -1).any() for x1, y1, x2, y2 in (o["box"] for o in r["objects"]))
                assert str(n) == r["answer"], r
                assert np.all(px == rgb, -1).any() == (n > 0)
                counts.add(n)
    assert qtypes == {"count_colour", "count_shape", "colour_of_shape", "shape_of_colour"}
    assert len(counts) >= 2


# ---------------------------------------------------------------- detail
def test_detail_small_target(data):
    _, rows = data
    for s in ("train", "val"):
        for r in rows[("detail", s)]:
            assert (r["width"], r["height"]) == (224, 224)
            hits = [o for o in r["objects"] if o["box"] == r["box"]]
            assert len(hits) == 1
            t = hits[0]
            x1, y1, x2, y2 = t["box"]
            assert max(x2 - x1, y2 - y1) <= 16
            clutter = [o for o in r["objects"] if o is not t]
            assert 2 <= len(clutter) <= 3
            for o in clutter:
                assert 40 <= max(o["box"][2] - o["box"][0], o["box"][3] - o["box"][1]) <= 60
                assert o["colour"] != t["colour"], r
            if r["qtype"] == "colour_of_small":
                assert r["question"] == "What colour is the small shape?" and r["answer"] == t["colour"]
            else:
                assert r["qtype"] == "shape_of_small"
                assert r["question"] == "What shape is the small object?" and r["answer"] == t["shape"]
