"""EGG's evaluation sets -> our vqa jsonl, read by evaluate.py (question, image, every accepted answer, metric).

    python data/vqa/prepare.py --textvqa <TextVQA dir> --vstar <vstar_bench dir> \\
        --pope <POPE output/coco dir> --pope_images <COCO val2014 dir> --docvqa <DocVQA dir> --gqa <GQA dir>

Any subset of the sets may be given. Layouts read (see data/vqa/README.md for where they come from):
  TextVQA  <dir>/TextVQA_0.5.1_<split>.json {"data": [{question_id, question, image_id, answers: [10]}]},
           images <dir>/train_images/<image_id>.jpg (val images are in train_images)      -> metric vqa
  V*       <dir>/test_questions.jsonl {question_id, image: "direct_attributes/sa_4690.jpg", text (question
           + options), category, label}, images under <dir>                               -> metric choice
  POPE     <dir>/coco_pope_<random|popular|adversarial>.json, one JSON object a line {question_id,
           image: "COCO_val2014_...jpg", text, label: yes|no}, images in --pope_images  -> metric yesno
  DocVQA   <dir>/<split>/<split>_v1.0.json {"data": [{questionId, question, image: "documents/x.png",
           answers: [...]}]}, images relative to <dir>/<split>/                          -> metric anls
  GQA      <dir>/questions/testdev_balanced_questions.json (or <dir>/testdev_balanced_questions.json)
           {qid: {imageId, question, answer, fullAnswer}}, images <dir>/images/<imageId>.jpg -> metric exact
Writes <out>/<set>_<split>.jsonl, rows {"task": "vqa", "image", "question", "answers", "metric", "source",
"split", "question_id"}; images are linked (<out>/<set> -> the image folder), not copied. Splits without
answers (TextVQA / DocVQA test) are skipped.
"""
import argparse
import glob
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for common.py
import common  # noqa: E402


def vqa_row(out_dir, image, question, answers, metric, where, **prov):
    if not os.path.exists(os.path.join(out_dir, image)):
        raise FileNotFoundError(f"{where}: image '{os.path.join(out_dir, image)}' not found")
    if not str(question).strip():
        raise ValueError(f"{where}: empty question")
    return dict(task="vqa", image=image, question=str(question).strip(), answers=common.check_answers(answers, where),
                metric=metric, **prov)


def textvqa(src, out_dir):
    link = common.link_images(out_dir, "textvqa", src)
    out = {}
    for path in sorted(glob.glob(os.path.join(src, "TextVQA_0.5.1_*.json"))):
        split = re.match(r"TextVQA_0\.5\.1_(\w+)\.json", os.path.basename(path)).group(1)
        data = common.load_json(path)["data"]
        if not data or "answers" not in data[0]:
            print(f"{path}: no answers (test split): skipped")
            continue
        out[f"textvqa_{split}"] = [
            vqa_row(out_dir, f"{link}/train_images/{d['image_id']}.jpg", d["question"], d["answers"], "vqa",
                    f"{path}: data[{n}]", source="textvqa", split=split, question_id=d["question_id"])
            for n, d in enumerate(data)]
    if not out:
        raise FileNotFoundError(f"no TextVQA_0.5.1_<split>.json with answers in '{src}'")
    return out


def vstar(src, out_dir):
    link = common.link_images(out_dir, "vstar", src)
    path = os.path.join(src, "test_questions.jsonl")
    rows = [vqa_row(out_dir, f"{link}/{d['image']}", d["text"], [d.get("label", "")], "choice", f"{path}:{n}",
                    source="vstar", split="test", question_id=d["question_id"], category=d.get("category"))
            for n, d in enumerate(common.load_jsonl(path), 1)]
    return {"vstar_test": rows}


def pope(src, images, out_dir):
    if not images:
        raise ValueError("--pope needs --pope_images <COCO val2014 folder>")
    link = common.link_images(out_dir, "pope", images)
    out = {}
    for path in sorted(glob.glob(os.path.join(src, "coco_pope_*.json"))):
        split = os.path.basename(path)[len("coco_pope_"):-len(".json")]
        out[f"pope_{split}"] = [
            vqa_row(out_dir, f"{link}/{d['image']}", d["text"], [d.get("label", "")], "yesno", f"{path}:{n}",
                    source="pope", split=split, question_id=d["question_id"])
            for n, d in enumerate(common.load_jsonl(path), 1)]
    if not out:
        raise FileNotFoundError(f"no coco_pope_<split>.json in '{src}'")
    return out


def docvqa(src, out_dir):
    link = common.link_images(out_dir, "docvqa", src)
    out = {}
    for split in ("train", "val", "test"):
        path = os.path.join(src, split, f"{split}_v1.0.json")
        if not os.path.exists(path):
            continue
        data = common.load_json(path)["data"]
        if not data or "answers" not in data[0]:
            print(f"{path}: no answers (test split): skipped")
            continue
        out[f"docvqa_{split}"] = [
            vqa_row(out_dir, f"{link}/{split}/{d['image']}", d["question"], d["answers"], "anls", f"{path}: data[{n}]",
                    source="docvqa", split=split, question_id=d["questionId"])
            for n, d in enumerate(data)]
    if not out:
        raise FileNotFoundError(f"no <split>/<split>_v1.0.json with answers in '{src}'")
    return out


def gqa(src, images, out_dir):
    link = common.link_images(out_dir, "gqa", images or os.path.join(src, "images"))
    paths = [p for q in ("questions/", "") for p in sorted(glob.glob(os.path.join(src, f"{q}*_balanced_questions.json")))]
    paths = [p for p in paths if "train" not in os.path.basename(p)]  # train_balanced is for training
    if not paths:
        raise FileNotFoundError(f"no <split>_balanced_questions.json in '{src}' or '{src}/questions'")
    out = {}
    for path in paths:
        split = os.path.basename(path)[:-len("_balanced_questions.json")]
        out[f"gqa_{split}"] = [
            vqa_row(out_dir, f"{link}/{d['imageId']}.jpg", d["question"], [d.get("answer", "")], "exact",
                    f"{path}: question {qid}", source="gqa", split=split, question_id=qid)
            for qid, d in common.load_json(path).items()]
    return out


def prepare(out_dir, textvqa_dir=None, vstar_dir=None, pope_dir=None, pope_images=None, docvqa_dir=None,
            gqa_dir=None, gqa_images=None):
    splits = {}
    if textvqa_dir:
        splits.update(textvqa(textvqa_dir, out_dir))
    if vstar_dir:
        splits.update(vstar(vstar_dir, out_dir))
    if pope_dir:
        splits.update(pope(pope_dir, pope_images, out_dir))
    if docvqa_dir:
        splits.update(docvqa(docvqa_dir, out_dir))
    if gqa_dir:
        splits.update(gqa(gqa_dir, gqa_images, out_dir))
    if not splits:
        raise ValueError("nothing to do: give at least one of --textvqa --vstar --pope --docvqa --gqa")
    return {f"{k}.jsonl": common.write_jsonl(os.path.join(out_dir, f"{k}.jsonl"), v) for k, v in sorted(splits.items())}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--textvqa"), p.add_argument("--vstar"), p.add_argument("--pope")
    p.add_argument("--pope_images", help="COCO val2014 image folder (POPE's questions are on it)")
    p.add_argument("--docvqa"), p.add_argument("--gqa")
    p.add_argument("--gqa_images", help="default: <gqa>/images")
    p.add_argument("--out", default="data/vqa")
    a = p.parse_args()
    prepare(a.out, a.textvqa, a.vstar, a.pope, a.pope_images, a.docvqa, a.gqa, a.gqa_images)
