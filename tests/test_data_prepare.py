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


# ---------------------------------------------------------------------------- VQA sets (EGG table 1)
def make_vqa_sources(tmp):
    """TextVQA, V*, POPE, DocVQA and GQA, each in its published layout (data/vqa/README.md)."""
    t = tmp / "TextVQA"
    for i in ("abc1", "abc2"):
        img(str(t / "train_images" / f"{i}.jpg"), (16, 12))
    answers = ["stop"] * 7 + ["stop sign", "stop", "halt"]
    json.dump(dict(dataset_name="textvqa", dataset_type="val", dataset_version="0.5.1", data=[
        dict(question="what does the sign say?", image_id="abc1", image_classes=["sign"], flickr_original_url="",
             flickr_300k_url="", image_width=16, image_height=12, answers=answers, question_tokens=[],
             question_id=34602, set_name="val"),
        dict(question="what brand?", image_id="abc2", answers=["nokia"] * 10, question_id=34603, set_name="val")]),
        open(t / "TextVQA_0.5.1_val.json", "w"))
    json.dump(dict(dataset_type="test", data=[dict(question="q", image_id="abc1", question_id=1)]),
              open(t / "TextVQA_0.5.1_test.json", "w"))  # no answers: skipped
    v = tmp / "vstar_bench"
    img(str(v / "direct_attributes" / "sa_4690.jpg"), (20, 15))
    img(str(v / "relative_position" / "sa_1.jpg"), (20, 15))
    with open(v / "test_questions.jsonl", "w") as f:
        f.write(json.dumps(dict(image="direct_attributes/sa_4690.jpg", text="What is the material of the glove?\n"
                                "(A) rubber\n(B) cotton\n(C) kevlar\n(D) leather\nAnswer with the option's letter "
                                "from the given choices directly.", category="direct_attributes", question_id=0,
                                label="A")) + "\n")
        f.write(json.dumps(dict(image="relative_position/sa_1.jpg", text="Is the cup on the left or right of the "
                                "dog?\n(A) left\n(B) right", category="relative_position", question_id=1,
                                label="B")) + "\n")
    p = tmp / "POPE" / "output" / "coco"
    img(str(tmp / "val2014" / "COCO_val2014_000000310196.jpg"), (10, 10))
    os.makedirs(p)
    for split in ("random", "popular", "adversarial"):
        with open(p / f"coco_pope_{split}.json", "w") as f:
            for k, label in enumerate(("yes", "no", "no")):
                f.write(json.dumps(dict(question_id=k + 1, image="COCO_val2014_000000310196.jpg",
                                        text=f"Is there a thing{k} in the image?", label=label)) + "\n")
    d = tmp / "DocVQA"
    img(str(d / "val" / "documents" / "xnbl0037_1.png"), (30, 40))
    json.dump(dict(dataset_name="docvqa", dataset_split="val", dataset_version="1.0", data=[
        dict(questionId=49153, question="What is the ‘actual’ value per 1000, during the year 1975?",
             question_types=["figure/diagram"], image="documents/xnbl0037_1.png", docId=14465,
             ucsf_document_id="xnbl0037", ucsf_document_page_no="1", answers=["0.28"], data_split="val")]),
        open(d / "val" / "val_v1.0.json", "w"))
    g = tmp / "GQA"
    img(str(g / "images" / "n161313.jpg"), (12, 9))
    os.makedirs(g / "questions")
    json.dump({"20968379": dict(semantic=[], entailed=[], equivalent=["20968379"], question="Is the sky dark?",
                                imageId="n161313", isBalanced=True, groups=dict(), answer="yes", semanticStr="",
                                annotations={}, types={}, fullAnswer="Yes, the sky is dark."),
               "20968380": dict(question="What color is the car?", imageId="n161313", answer="white",
                                fullAnswer="The car is white.")},
              open(g / "questions" / "testdev_balanced_questions.json", "w"))
    return dict(textvqa_dir=str(t), vstar_dir=str(v), pope_dir=str(p), pope_images=str(tmp / "val2014"),
                docvqa_dir=str(d), gqa_dir=str(g))


def test_vqa_sets(tmp_path):
    m = load("vqa")
    out = str(tmp_path / "out")
    src = make_vqa_sources(tmp_path)
    counts = m.prepare(out, **src)
    assert counts == {"textvqa_val.jsonl": 2, "vstar_test.jsonl": 2, "pope_random.jsonl": 3,
                      "pope_popular.jsonl": 3, "pope_adversarial.jsonl": 3, "docvqa_val.jsonl": 1,
                      "gqa_testdev.jsonl": 2}
    rows = {f: [json.loads(l) for l in open(os.path.join(out, f))] for f in counts}
    r = rows["textvqa_val.jsonl"][0]
    assert (r["image"], r["metric"], r["question_id"]) == ("textvqa/train_images/abc1.jpg", "vqa", 34602)
    assert r["answers"] == ["stop"] * 7 + ["stop sign", "stop", "halt"]  # every answer, duplicates kept
    r = rows["vstar_test.jsonl"][0]
    assert (r["image"], r["answers"], r["metric"]) == ("vstar/direct_attributes/sa_4690.jpg", ["A"], "choice")
    assert r["question"].startswith("What is the material") and "(D) leather" in r["question"]
    r = rows["pope_adversarial.jsonl"][1]
    assert (r["image"], r["answers"], r["metric"]) == ("pope/COCO_val2014_000000310196.jpg", ["no"], "yesno")
    r = rows["docvqa_val.jsonl"][0]
    assert (r["image"], r["answers"], r["metric"]) == ("docvqa/val/documents/xnbl0037_1.png", ["0.28"], "anls")
    assert "‘actual’" in r["question"]  # UTF-8 kept
    r = rows["gqa_testdev.jsonl"][1]
    assert (r["image"], r["answers"], r["question_id"]) == ("gqa/n161313.jpg", ["white"], "20968380")
    import evaluate
    for f in counts:
        for row in evaluate.load_split(os.path.join(out, f)):
            assert Image.open(row["image"]).size[0] > 0
    first = snapshot(out)
    m.prepare(out, **src)
    assert snapshot(out) == first


def test_vqa_errors(tmp_path):
    m = load("vqa")
    src = make_vqa_sources(tmp_path)
    path = os.path.join(src["textvqa_dir"], "TextVQA_0.5.1_val.json")
    data = json.load(open(path))
    data["data"][1]["answers"] = []
    json.dump(data, open(path, "w"))
    with pytest.raises(ValueError, match=r"TextVQA_0.5.1_val.json: data\[1\]: empty answer list"):
        m.prepare(str(tmp_path / "o"), textvqa_dir=src["textvqa_dir"])
    os.remove(os.path.join(src["gqa_dir"], "images", "n161313.jpg"))
    with pytest.raises(FileNotFoundError, match=r"testdev_balanced_questions.json: question 20968379: image"):
        m.prepare(str(tmp_path / "o"), gqa_dir=src["gqa_dir"])
    with pytest.raises(ValueError, match="--pope_images"):
        m.prepare(str(tmp_path / "o"), pope_dir=src["pope_dir"])


# ---------------------------------------------------------------------------- LISA ReasonSeg
def make_reasonseg(tmp):
    r = tmp / "ReasonSeg"
    shapes = [dict(label="target", points=[[3.5, 4.0], [10.0, 2.0], [12.25, 9.0]], shape_type="polygon"),
              dict(label="target", points=[[20.0, 15.0], [22.0, 18.5], [21.0, 16.0]], shape_type="polygon"),
              dict(label="ignore", points=[[0.0, 0.0], [31.0, 23.0], [0.0, 23.0]], shape_type="polygon"),
              dict(label="flag", points=[[0.0, 0.0], [1.0, 1.0], [0.0, 1.0]], shape_type="polygon")]
    for split, n in (("train", 2), ("val", 1)):
        for k in range(n):
            img(str(r / split / f"img{k}.jpg"), (32, 24))
            json.dump(dict(text=[f"what can hold water {k}?", f"the cup {k}"], is_sentence=k == 0, shapes=shapes),
                      open(r / split / f"img{k}.json", "w"))
    return str(r)


def test_lisa_reasonseg(tmp_path):
    m = load("lisa")
    out = str(tmp_path / "out")
    src = make_reasonseg(tmp_path)
    assert m.prepare(out, src) == {"reasonseg_train.jsonl": 4, "reasonseg_val.jsonl": 2}
    r = grpo.load_rows(os.path.join(out, "reasonseg_train.jsonl"))[1]
    # the extent of the two target polygons; ignore and flag polygons do not count
    assert (r["query"], r["box"], r["width"], r["height"]) == ("the cup 0", [3.5, 2.0, 22.0, 18.5], 32, 24)
    assert r["image"].endswith("reasonseg/train/img0.jpg") and os.path.exists(r["image"]) and r["is_sentence"]
    first = snapshot(out)
    m.prepare(out, src)
    assert snapshot(out) == first
    json.dump(dict(text=["x"], shapes=[dict(label="target", points=[[1, 1], [40, 5], [2, 6]])]),
              open(os.path.join(src, "val", "img0.json"), "w"))
    with pytest.raises(ValueError, match=r"val/img0.json: box .* outside its 32x24 image"):
        m.prepare(out, src)


def test_lisa_vlmr1(tmp_path):
    m = load("lisa")
    img(str(tmp_path / "lisa_imgs" / "test" / "a.jpg"), (50, 40))
    items = [dict(image="test/a.jpg", problem="Please provide the bounding box coordinate of the region this "
                  "sentence describes: what can hold water.", normal_caption="what can hold water",
                  solution=[5, 6, 30, 35], width=50, height=40)]
    json.dump(items, open(tmp_path / "lisa_test.json", "w"))
    out = str(tmp_path / "out")
    assert m.from_vlmr1(str(tmp_path / "lisa_test.json"), out, str(tmp_path / "lisa_imgs")) == {"lisa_test.jsonl": 1}
    r = grpo.load_rows(os.path.join(out, "lisa_test.jsonl"))[0]
    assert (r["query"], r["box"], r["dataset"], r["split"]) == ("what can hold water", [5, 6, 30, 35], "lisa", "test")
    assert os.path.exists(r["image"])
