"""LISA's ReasonSeg (reasoning segmentation) -> our grounding jsonl: the box is the extent of the target mask.

    python data/lisa/prepare.py --vlmr1 <lisa_test.json> --images <its image root>   # VLM-R1's LISA-Grounding
    python data/lisa/prepare.py --reasonseg <ReasonSeg folder holding train/ val/ test/>  # LISA's own release

ReasonSeg layout (dvlab-research/LISA, utils/reason_seg_dataset.py and utils/data_processing.py): per split
folder, an image <name>.jpg next to <name>.json = {"text": [query, ...], "is_sentence": bool, "shapes":
[{"label": "target" | "ignore" | "flag", "points": [[x, y], ...], "shape_type": "polygon", ...}]}.
LISA rasterises the "target" polygons into the mask (ignore: not scored, flag: deprecated); the box of that
mask is [min x, min y, max x, max y] over the target polygons' points, which is what we write. One row per
query, with `is_sentence` (LISA reports short-query and sentence-query results separately).
ECVGPO's LISA column is VLM-R1's LISA-Grounding test split (ECVGPO sec. 5.1: "the same subset used in
VLM-R1"): lisa_test.json in VLM-R1's rec format, read by data/refcoco/prepare.py's from_vlmr1 (the
box is VLM-R1's "solution").
Writes <out>/reasonseg_<split>.jsonl or <out>/lisa_test.jsonl; images are linked (<out>/reasonseg or
<out>/images -> the image folder).
"""
import argparse
import glob
import json
import os
import sys

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for common.py
import common  # noqa: E402


def from_vlmr1(path, out_dir, images):
    """VLM-R1's lisa_test.json: RefCOCO's VLM-R1 reader (data/refcoco/prepare.py), imported, not copied."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "refcoco_prepare", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "refcoco", "prepare.py"))
    refcoco = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refcoco)
    _, split, rows = refcoco.from_vlmr1(path, out_dir, common.link_images(out_dir, "images", images))
    return {f"lisa_{split}.jsonl": common.write_jsonl(os.path.join(out_dir, f"lisa_{split}.jsonl"), rows)}


def polygon_box(shapes, where):
    """[x1, y1, x2, y2]: the extent of every 'target' polygon."""
    pts = [p for s in shapes if s.get("label", "").lower() == "target" for p in s["points"]]
    if not pts:
        raise ValueError(f"{where}: no 'target' polygon")
    xs, ys = [float(p[0]) for p in pts], [float(p[1]) for p in pts]
    return [min(xs), min(ys), max(xs), max(ys)]


def read_annotation(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError:  # LISA reads some of its files as cp1252 (data_processing.get_mask_from_json)
        with open(path, encoding="cp1252") as f:
            return json.load(f)


def prepare(out_dir, reasonseg):
    link = common.link_images(out_dir, "reasonseg", reasonseg)
    counts = {}
    for split in ("train", "val", "test"):
        paths = sorted(glob.glob(os.path.join(reasonseg, split, "*.json")))
        if not paths:
            continue
        rows = []
        for path in tqdm(paths, desc=split, leave=False):
            anno = read_annotation(path)
            name = os.path.basename(path)[:-len(".json")]
            image = f"{link}/{split}/{name}.jpg"
            if not os.path.exists(os.path.join(out_dir, image)):
                raise FileNotFoundError(f"{path}: image '{os.path.join(out_dir, image)}' not found")
            wh = common.image_size(out_dir, image, path)
            box = common.check_box(polygon_box(anno.get("shapes", []), path), wh, path)
            texts = [t for t in anno.get("text", []) if str(t).strip()]
            if not texts:
                raise ValueError(f"{path}: empty query list ('text')")
            for k, t in enumerate(texts):
                rows.append(dict(task="grounding", image=image, query=str(t).strip(), box=box, width=wh[0],
                                 height=wh[1], dataset="reasonseg", split=split, name=name, text_id=k,
                                 is_sentence=bool(anno.get("is_sentence", False))))
        counts[f"reasonseg_{split}.jsonl"] = common.write_jsonl(os.path.join(out_dir, f"reasonseg_{split}.jsonl"), rows)
    if not counts:
        raise FileNotFoundError(f"no <split>/*.json under '{reasonseg}' (ReasonSeg: train/ val/ test/)")
    return counts


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vlmr1", help="VLM-R1's lisa_test.json")
    p.add_argument("--images", help="with --vlmr1: the folder its `image` paths are relative to")
    p.add_argument("--reasonseg", help="ReasonSeg folder holding train/ val/ test/")
    p.add_argument("--out", default="data/lisa")
    a = p.parse_args()
    if bool(a.vlmr1) == bool(a.reasonseg) or (a.vlmr1 and not a.images):
        p.error("give --vlmr1 <lisa_test.json> --images <dir>, or --reasonseg <dir>")
    from_vlmr1(a.vlmr1, a.out, a.images) if a.vlmr1 else prepare(a.out, a.reasonseg)
