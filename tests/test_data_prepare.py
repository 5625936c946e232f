"""data/<name>/prepare.py on fixtures written here in each source's published layout (tiny images, a few rows):
row counts, a hand-checked row, image paths that resolve, idempotence (same bytes twice), the two RefCOCO
sources agreeing, and clear errors naming the file and row for bad input."""
import importlib.util
import io
import json
import os
import pickle
import sys

import pytest
from PIL import Image

import grpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", os.path.join(ROOT, "data", name, "prepare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def img(path, size, color=(200, 30, 30), fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def snapshot(out):
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out)) if f.endswith(".jsonl")}


def check_loadable(out):
    """Every written file goes through grpo.load_rows (or, for vqa rows, resolves its images)."""
    for f in os.listdir(out):
        if f.endswith(".jsonl"):
            for r in (json.loads(l) for l in open(os.path.join(out, f))):
                assert os.path.exists(os.path.join(out, r["image"])), (f, r["image"])
            if r["task"] != "vqa":
                grpo.load_rows(os.path.join(out, f))


# ---------------------------------------------------------------------------- RefCOCO
# COCO images (file names as in train2014), annotations with [x, y, w, h] boxes, and refs as refer stores them
COCO_IMAGES = {1: ("COCO_train2014_000000000001.jpg", (64, 48)), 2: ("COCO_train2014_000000000002.jpg", (40, 60))}
COCO_ANNS = {101: (1, [10.5, 5.25, 20.0, 30.0]), 102: (1, [0.0, 0.0, 64.0, 48.0]), 201: (2, [4.0, 8.0, 12.0, 16.0])}
# (ref_id, ann_id, image_id, split, sentences)
REFS = {
    "refcoco": [(0, 101, 1, "train", ["red thing left", "the left one"]), (1, 102, 1, "val", ["whole picture"]),
                (2, 201, 2, "testA", ["small box"]), (3, 201, 2, "testB", ["tiny box", "box at top"])],
    "refcocop": [(0, 101, 1, "train", ["red thing"]), (1, 201, 2, "val", ["the box"])],
    "refcocog": [(0, 102, 1, "train", ["the whole image of a red wall"]), (1, 201, 2, "val", ["a small square"]),
                 (2, 101, 1, "test", ["a red rectangle on the left"])],
}
REFER_DIR = {"refcoco": ("refcoco", "unc"), "refcocop": ("refcoco+", "unc"), "refcocog": ("refcocog", "umd")}


def make_coco(tmp):
    for i, (f, size) in COCO_IMAGES.items():
        img(str(tmp / "coco" / "train2014" / f), size)
    return str(tmp / "coco")


def make_refer(tmp, py2=True):
    """refer's data folder; the refcoco pickle mimics a Python 2 pickle (byte-string keys and values)."""
    inst = dict(images=[dict(id=i, file_name=f, width=s[0], height=s[1]) for i, (f, s) in COCO_IMAGES.items()],
                annotations=[dict(id=a, image_id=i, bbox=b, category_id=1, area=b[2] * b[3], iscrowd=0,
                                  segmentation=[]) for a, (i, b) in COCO_ANNS.items()],
                categories=[dict(id=1, name="thing", supercategory="thing")])
    for d, refs in REFS.items():
        folder, split_by = REFER_DIR[d]
        os.makedirs(tmp / "refer" / folder, exist_ok=True)
        json.dump(inst, open(tmp / "refer" / folder / "instances.json", "w"))
        out = []
        for ref_id, ann_id, image_id, split, sents in refs:
            r = dict(ref_id=ref_id, ann_id=ann_id, image_id=image_id, split=split, category_id=1,
                     file_name=COCO_IMAGES[image_id][0].replace(".jpg", f"_{ann_id}.jpg"),
                     sent_ids=list(range(len(sents))),
                     sentences=[dict(sent=s, raw=s.upper(), tokens=s.split(), sent_id=k) for k, s in enumerate(sents)])
            if py2 and d == "refcoco":
                r = {k.encode(): (v.encode() if isinstance(v, str) else v) for k, v in r.items()}
                r[b"sentences"] = [{k.encode(): (v.encode() if isinstance(v, str) else v) for k, v in s.items()}
                                   for s in r[b"sentences"]]
            out.append(r)
        pickle.dump(out, open(tmp / "refer" / folder / f"refs({split_by}).p", "wb"), protocol=2)
    return str(tmp / "refer")


def make_vlmr1(tmp, datasets=("refcoco", "refcocop", "refcocog")):
    """VLM-R1's rec_jsons_processed: one json list per <dataset>_<split>, items as in VLM-R1 issue #11."""
    os.makedirs(tmp / "rec", exist_ok=True)
    files = {}
    for d in datasets:
        for ref_id, ann_id, image_id, split, sents in REFS[d]:
            x, y, w, h = COCO_ANNS[ann_id][1]
            f, (W, H) = COCO_IMAGES[image_id]
            for s in sents:
                files.setdefault(f"{d}_{split}", []).append(dict(
                    height=H, width=W, id=len(files.get(f"{d}_{split}", [])), original_id=ann_id, dataset_name=d,
                    image_id=0, category_id=1, bbox_list=[[x, y, x + w - 1, y + h - 1]], text_type="caption",
                    image=f"train2014/{f}", normal_caption=s, solution=[x, y, x + w, y + h],
                    problem=f"Please provide the bounding box coordinate of the region this sentence describes: {s}.",
                    normalized_solution=[int(1000 * x / W), int(1000 * y / H), int(1000 * (x + w) / W),
                                         int(1000 * (y + h) / H)]))
    for k, items in files.items():
        json.dump(items, open(tmp / "rec" / f"{k}.json", "w"), indent=4)
    return str(tmp / "rec")


def test_coco_box_conversion():
    m = load("refcoco")
    assert m.coco_to_corners([10.5, 5.25, 20.0, 30.0]) == [10.5, 5.25, 30.5, 35.25]
    assert m.coco_to_corners([0, 0, 64, 48]) == [0, 0, 64, 48]


def test_refcoco_refer_source(tmp_path):
    m = load("refcoco")
    out = str(tmp_path / "out")
    counts = m.prepare(out, make_coco(tmp_path), refer=make_refer(tmp_path), train_n=0)
    assert counts == {"refcoco_train.jsonl": 2, "refcoco_val.jsonl": 1, "refcoco_testA.jsonl": 1,
                      "refcoco_testB.jsonl": 2, "refcocop_train.jsonl": 1, "refcocop_val.jsonl": 1,
                      "refcocog_train.jsonl": 1, "refcocog_val.jsonl": 1, "refcocog_test.jsonl": 1,
                      "train.jsonl": 4, "val.jsonl": 3}
    rows = grpo.load_rows(os.path.join(out, "refcoco_train.jsonl"))
    r = rows[1]  # hand-checked: ref 0's second sentence, COCO bbox [10.5, 5.25, 20, 30] in a 64x48 image
    assert (r["query"], r["box"], r["width"], r["height"]) == ("the left one", [10.5, 5.25, 30.5, 35.25], 64, 48)
    assert r["image"].endswith("images/train2014/COCO_train2014_000000000001.jpg") and os.path.exists(r["image"])
    assert Image.open(r["image"]).size == (64, 48)
    assert (r["ann_id"], r["ref_id"], r["split"], r["dataset"]) == (101, 0, "train", "refcoco")
    check_loadable(out)
    first = snapshot(out)
    m.prepare(out, str(tmp_path / "coco"), refer=str(tmp_path / "refer"), train_n=0)
    assert snapshot(out) == first  # idempotent: same bytes
    m.prepare(out, str(tmp_path / "coco"), refer=str(tmp_path / "refer"), train_n=2)
    assert len(open(os.path.join(out, "train.jsonl")).readlines()) == 2


def test_refcoco_sources_agree(tmp_path):
    m = load("refcoco")
    coco = make_coco(tmp_path)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ca = m.prepare(a, coco, refer=make_refer(tmp_path), train_n=0)
    cb = m.prepare(b, coco, vlmr1=make_vlmr1(tmp_path), train_n=0)
    assert ca == cb
    keys = ("task", "image", "query", "box", "width", "height", "dataset", "split", "ann_id")
    for f in ca:
        ra = [{k: r[k] for k in keys} for r in map(json.loads, open(os.path.join(a, f)))]
        rb = [{k: r[k] for k in keys} for r in map(json.loads, open(os.path.join(b, f)))]
        assert ra == rb, f


def test_refcoco_vlmr1_refgta_and_errors(tmp_path):
    m = load("refcoco")
    coco, rec = make_coco(tmp_path), make_vlmr1(tmp_path, ("refcoco",))
    img(str(tmp_path / "gta" / "0001.png"), (30, 20))
    json.dump([dict(image="0001.png", normal_caption="a car", solution=[1, 2, 10, 12], problem="x")],
              open(os.path.join(rec, "refgta_subsample.json"), "w"))
    out = str(tmp_path / "out")
    counts = m.prepare(out, coco, vlmr1=rec, train_n=0)
    assert "refgta_subsample.jsonl" not in counts  # no --gta_images: skipped, said so
    counts = m.prepare(out, coco, vlmr1=rec, gta_images=str(tmp_path / "gta"), train_n=0)
    r = json.loads(open(os.path.join(out, "refgta_subsample.jsonl")).readline())
    assert (r["image"], r["box"], r["width"], r["height"]) == ("images_refgta/0001.png", [1, 2, 10, 12], 30, 20)
    # a box outside its image: the error names the file and the item
    items = json.load(open(os.path.join(rec, "refcoco_val.json")))
    items[0]["solution"] = [0, 0, 100, 48]
    json.dump(items, open(os.path.join(rec, "refcoco_val.json"), "w"))
    with pytest.raises(ValueError, match=r"refcoco_val.json: item 0: box .* outside its 64x48 image"):
        m.prepare(out, coco, vlmr1=rec)
    # a missing image
    items[0]["solution"], items[0]["image"] = [0, 0, 10, 10], "train2014/nope.jpg"
    json.dump(items, open(os.path.join(rec, "refcoco_val.json"), "w"))
    with pytest.raises(FileNotFoundError, match=r"refcoco_val.json: item 0: image .*nope.jpg' not found"):
        m.prepare(out, coco, vlmr1=rec)


# ---------------------------------------------------------------------------- ViRL39K, Geometry3K
def png_bytes(size, color, fmt="PNG"):
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, format=fmt)
    return b.getvalue()


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def make_virl(tmp):
    """TIGER-Lab/ViRL39K: 39Krelease.parquet (question with an <image> placeholder, \\boxed{} answer, a list
    of image paths relative to the parquet's folder) + images/ from images.zip."""
    d = tmp / "ViRL39K"
    for k in range(5):
        img(str(d / "images" / f"q{k}-0.jpg"), (20 + k, 10), (10 * k, 0, 0))
    img(str(d / "images" / "q3-1.jpg"), (8, 8))
    rows = [dict(question=f"<image>\nWhat is {k} + {k}?", answer=f"\\boxed{{{2 * k}}}", image=[f"images/q{k}-0.jpg"],
                 qid=f"q{k}", category="(GradeSchool) Arithmetic", source="test", PassRate_32BTrained=0.5)
            for k in range(5)]
    rows[3]["image"].append("images/q3-1.jpg")  # two images: skipped
    rows[4]["answer"] = "\\boxed{\\frac{1}{2}}"
    write_parquet(str(d / "39Krelease.parquet"), rows)
    return str(d / "39Krelease.parquet")


def test_virl39k(tmp_path):
    m = load("virl39k")
    out = str(tmp_path / "out")
    counts = m.prepare(out, make_virl(tmp_path), val_n=1)
    assert counts == {"train.jsonl": 3, "val.jsonl": 1}
    rows = grpo.load_rows(os.path.join(out, "train.jsonl")) + grpo.load_rows(os.path.join(out, "val.jsonl"))
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == ["q0", "q1", "q2", "q4"]  # q3 has two images
    r = by_id["q2"]
    assert (r["question"], r["answer"], r["category"]) == ("What is 2 + 2?", "4", "(GradeSchool) Arithmetic")
    assert r["image"].endswith("src/images/q2-0.jpg") and Image.open(r["image"]).size == (22, 10)
    assert by_id["q4"]["answer"] == "\\frac{1}{2}"
    first = snapshot(out)
    m.prepare(out, os.path.join(str(tmp_path), "ViRL39K", "39Krelease.parquet"), val_n=1)
    assert snapshot(out) == first


def test_geometry3k_embedded_images(tmp_path):
    """hiyouga/geometry3k: data/<split>-00000-of-00001.parquet, `images` a list of {bytes, path}."""
    m = load("virl39k")
    src = tmp_path / "geometry3k" / "data"
    for split, n in (("train", 3), ("validation", 1), ("test", 2)):
        write_parquet(str(src / f"{split}-00000-of-00001.parquet"),
                      [dict(images=[dict(bytes=png_bytes((12 + k, 9), (0, 99, 0)), path=None)],
                            problem=f"<image>Find x. Choices: A:{k} B:{k + 1}", answer="A", id=k,
                            choices=[str(k), str(k + 1)], ground_truth="A") for k in range(n)])
    out = str(tmp_path / "out")
    assert m.prepare(out, str(src), name="geometry3k") == {"train.jsonl": 3, "validation.jsonl": 1, "test.jsonl": 2}
    r = grpo.load_rows(os.path.join(out, "train.jsonl"))[2]
    assert (r["question"], r["answer"], r["id"]) == ("Find x. Choices: A:2 B:3", "A", "2")
    assert r["image"].endswith("images/train/2.png") and Image.open(r["image"]).size == (14, 9)
    first = snapshot(out)
    m.prepare(out, str(src), name="geometry3k")
    assert snapshot(out) == first


def test_virl39k_errors(tmp_path, monkeypatch):
    m = load("virl39k")
    d = tmp_path / "v"
    img(str(d / "images" / "a.jpg"), (8, 8))
    write_parquet(str(d / "x.parquet"), [dict(question="q", answer="1", image=["images/a.jpg"]),
                                         dict(question="q", answer="  ", image=["images/a.jpg"])])
    with pytest.raises(ValueError, match=r"x.parquet: row 1: empty answer"):
        m.prepare(str(tmp_path / "o"), str(d / "x.parquet"))
    write_parquet(str(d / "x.parquet"), [dict(question="q", answer="1", image=["images/missing.jpg"])])
    with pytest.raises(FileNotFoundError, match=r"x.parquet: row 0: image .*missing.jpg' not found"):
        m.prepare(str(tmp_path / "o"), str(d / "x.parquet"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: a clear error, not a traceback
    with pytest.raises(ImportError, match="datasets"):
        m.prepare(str(tmp_path / "o"), hf="TIGER-Lab/ViRL39K")
