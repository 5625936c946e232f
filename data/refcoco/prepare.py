"""RefCOCO / RefCOCO+ / RefCOCOg / RefGTA -> our grounding jsonl (grpo.py load_rows format), from either source:

  VLM-R1's rec_jsons_processed (the files ECVGPO trained on; https://huggingface.co/datasets/omlab/VLM-R1):
    python data/refcoco/prepare.py --vlmr1 <dir with refcoco_train.json ...> --images <dir holding train2014/>
  the original refer annotations (https://github.com/lichengunc/refer) + COCO train2014 images:
    python data/refcoco/prepare.py --refer <dir with refcoco/ refcoco+/ refcocog/> --images <dir holding train2014/>

Writes into --out (default data/refcoco): <dataset>_<split>.jsonl for every split found (dataset: refcoco,
refcocop, refcocog, refgta), train.jsonl (ECVGPO: 5.6k rows drawn from the three train splits; --train_n 0:
all of them) and val.jsonl (the three val splits, shuffled: grpo.py evaluates its first --val_n rows).
Images are not copied: <out>/images links to --images. One row per referring expression:
  {"task": "grounding", "image": "images/train2014/COCO_train2014_000000581857.jpg",
   "query": "the lady with the blue shirt", "box": [103.93, 299.99, 238.15, 477.41], "width": 427,
   "height": 640, "dataset": "refcoco", "split": "train", "ann_id": 1719310, ...}
box is [x1, y1, x2, y2] in pixels of the original image: COCO's [x, y, w, h] becomes [x, y, x + w, y + h],
which is exactly VLM-R1's "solution" (VLM-R1 issue #11), so the two sources give the same rows.
"""
import argparse
import glob
import os
import pickle
import random
import re
import sys

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for common.py
import common  # noqa: E402

# refer's folder and split-by for each dataset, and our name for it (VLM-R1's file prefix)
REFER = {"refcoco": ("refcoco", "unc"), "refcocop": ("refcoco+", "unc"), "refcocog": ("refcocog", "umd")}
VLMR1_PROMPT = re.compile(r"^Please provide the bounding box coordinates? of the region this sentence describes:\s*",
                          re.IGNORECASE)


def coco_to_corners(b):
    """COCO [x, y, w, h] -> [x1, y1, x2, y2]."""
    x, y, w, h = b
    return [x, y, x + w, y + h]


def grounding_row(out_dir, image, query, box, wh, where, **provenance):
    if not query or not str(query).strip():
        raise ValueError(f"{where}: empty referring expression")
    if not os.path.exists(os.path.join(out_dir, image)):
        raise FileNotFoundError(f"{where}: image '{os.path.join(out_dir, image)}' not found")
    wh = wh or common.image_size(out_dir, image, where)
    box = common.check_box([float(v) for v in box], wh, where)
    return dict(task="grounding", image=image, query=str(query).strip(), box=box, width=wh[0], height=wh[1],
                **provenance)


def from_vlmr1(path, out_dir, image_dir):
    """Rows of one VLM-R1 rec json: a list of {"image", "problem", "normal_caption", "solution": [x1, y1,
    x2, y2] pixels, "width", "height", "original_id" (the COCO annotation id), ...}."""
    name = os.path.basename(path)[:-len(".json")]
    dataset, _, split = name.partition("_")
    items = common.load_json(path)
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of items (VLM-R1 rec format)")
    rows = []
    for n, it in enumerate(tqdm(items, desc=name, leave=False)):
        where = f"{path}: item {n}"
        missing = [k for k in ("image", "solution") if k not in it]
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        query = it.get("normal_caption") or VLMR1_PROMPT.sub("", it.get("problem", "")).rstrip(".")
        wh = (it["width"], it["height"]) if "width" in it and "height" in it else None
        rows.append(grounding_row(out_dir, f"{image_dir}/{it['image']}", query, it["solution"], wh, where,
                                  dataset=dataset, split=split, ann_id=it.get("original_id"), source="vlm-r1"))
    return dataset, split, rows


def _str(x):
    """refer's pickles are Python 2 pickles: decode their byte strings as UTF-8."""
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, dict):
        return {_str(k): _str(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_str(v) for v in x]
    return x


def from_refer(refer_dir, dataset, out_dir, image_dir):
    """Rows of one refer dataset: refs(<splitBy>).p is a list of refs {ref_id, ann_id, image_id, split,
    sentences: [{sent, raw, tokens, sent_id}], file_name, category_id}; instances.json is COCO-style
    {images: [{id, file_name, width, height}], annotations: [{id, image_id, bbox: [x, y, w, h]}]}.
    Returns {split: rows}, rows in ref_id then sentence order."""
    folder, split_by = REFER[dataset]
    refs_path = os.path.join(refer_dir, folder, f"refs({split_by}).p")
    inst_path = os.path.join(refer_dir, folder, "instances.json")
    if not os.path.exists(refs_path):
        raise FileNotFoundError(f"'{refs_path}' not found (refer layout: <dir>/{folder}/refs({split_by}).p)")
    with open(refs_path, "rb") as f:
        refs = _str(pickle.load(f, encoding="bytes"))
    inst = common.load_json(inst_path)
    images = {im["id"]: im for im in inst["images"]}
    anns = {a["id"]: a for a in inst["annotations"]}
    out = {}
    for n, ref in enumerate(tqdm(sorted(refs, key=lambda r: r["ref_id"]), desc=dataset, leave=False)):
        where = f"{refs_path}: ref_id {ref.get('ref_id')} (entry {n})"
        ann, im = anns.get(ref["ann_id"]), images.get(ref["image_id"])
        if ann is None or im is None:
            raise ValueError(f"{where}: ann_id {ref['ann_id']} / image_id {ref['image_id']} not in {inst_path}")
        for s in ref["sentences"]:
            out.setdefault(ref["split"], []).append(grounding_row(
                out_dir, f"{image_dir}/train2014/{im['file_name']}", s["sent"], coco_to_corners(ann["bbox"]),
                (im["width"], im["height"]), where, dataset=dataset, split=ref["split"], ann_id=ref["ann_id"],
                ref_id=ref["ref_id"], sent_id=s["sent_id"], source="refer"))
    return out


def prepare(out_dir, images, vlmr1=None, refer=None, gta_images=None, train_n=5600, seed=0):
    """Write every split; returns {file name: row count}."""
    if bool(vlmr1) == bool(refer):
        raise ValueError("give exactly one source: --vlmr1 <dir> or --refer <dir>")
    common.link_images(out_dir, "images", images)
    splits = {}
    if vlmr1:
        files = sorted(glob.glob(os.path.join(vlmr1, "*.json")))
        if not files:
            raise FileNotFoundError(f"no *.json in '{vlmr1}' (VLM-R1's rec_jsons_processed)")
        for path in files:
            refgta = os.path.basename(path).startswith("refgta")
            if refgta and not gta_images:
                print(f"{path}: skipped (RefGTA: pass --gta_images <its image root>)")
                continue
            if refgta:
                common.link_images(out_dir, "images_refgta", gta_images)
            dataset, split, rows = from_vlmr1(path, out_dir, "images_refgta" if refgta else "images")
            splits[f"{dataset}_{split}"] = rows
    else:
        for dataset in REFER:
            for split, rows in from_refer(refer, dataset, out_dir, "images").items():
                splits[f"{dataset}_{split}"] = rows
    counts = {f"{k}.jsonl": common.write_jsonl(os.path.join(out_dir, f"{k}.jsonl"), v) for k, v in sorted(splits.items())}
    rng = random.Random(seed)
    train = [r for d in REFER for r in splits.get(f"{d}_train", [])]
    if train:
        train = rng.sample(train, min(train_n, len(train))) if train_n else rng.sample(train, len(train))
        counts["train.jsonl"] = common.write_jsonl(os.path.join(out_dir, "train.jsonl"), train)
    val = [r for d in REFER for r in splits.get(f"{d}_val", [])]
    if val:
        counts["val.jsonl"] = common.write_jsonl(os.path.join(out_dir, "val.jsonl"), rng.sample(val, len(val)))
    return counts


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vlmr1", help="folder of VLM-R1's rec_jsons_processed *.json")
    p.add_argument("--refer", help="refer's data folder: refcoco/, refcoco+/, refcocog/ with refs(*).p, instances.json")
    p.add_argument("--images", required=True, help="COCO image root: the folder that holds train2014/")
    p.add_argument("--gta_images", help="RefGTA image root (VLM-R1's refgta json paths are relative to it)")
    p.add_argument("--out", default="data/refcoco")
    p.add_argument("--train_n", type=int, default=5600, help="train.jsonl rows (ECVGPO: 5.6k); 0: all")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    prepare(a.out, a.images, a.vlmr1, a.refer, a.gta_images, a.train_n, a.seed)
