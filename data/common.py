"""Shared by the data/<name>/prepare.py scripts: rows in grpo.load_rows' format, written byte-identically
on every run, with bad input reported by file and row. (The shapes data writes its own; it has no sources.)

Row formats (grpo.py load_rows; `image` is relative to the jsonl's folder):
  grounding  {"task": "grounding", "image", "query", "box": [x1, y1, x2, y2] pixels of the original image,
              "width", "height", + provenance}
  reasoning  {"task": "reasoning", "image", "question", "answer", + provenance}
  vqa        {"task": "vqa", "image", "question", "answers": [every accepted answer], "metric":
              "vqa" | "exact" | "yesno" | "anls", + provenance}   (read by evaluate.py, not by grpo.py)
"""
import json
import os

from PIL import Image


def link_images(out_dir, name, target):
    """out_dir/name -> target (absolute), so rows say `name/<path under target>` and no image is copied.
    Re-running with the same target is a no-op; a different target replaces the link."""
    link, target = os.path.join(out_dir, name), os.path.abspath(target)
    if not os.path.isdir(target):
        raise FileNotFoundError(f"image folder '{target}' not found")
    if os.path.islink(link):
        if os.readlink(link) == target:
            return name
        os.remove(link)
    elif os.path.exists(link):
        raise FileExistsError(f"'{link}' exists and is not a link: move it away or pass another --out")
    os.makedirs(out_dir, exist_ok=True)
    os.symlink(target, link)
    return name


def image_size(out_dir, rel, where):
    """(width, height) of out_dir/rel, read from the header only; a clear error naming the source row."""
    path = os.path.join(out_dir, rel)
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{where}: image '{path}' cannot be read ({e})") from None


def check_box(box, wh, where, tol=1.0):
    """A box [x1, y1, x2, y2] must be non-empty and inside its image (tol pixels of slack: COCO's float
    boxes overshoot the border by rounding). Returns the box clipped to the image."""
    w, h = wh
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"{where}: empty box {box}")
    if x1 < -tol or y1 < -tol or x2 > w + tol or y2 > h + tol:
        raise ValueError(f"{where}: box {box} lies outside its {w}x{h} image")
    return [round(min(max(v, 0.0), lim), 2) for v, lim in zip(box, (w, h, w, h))]


def check_answers(answers, where):
    answers = [str(a) for a in answers if str(a).strip()]
    if not answers:
        raise ValueError(f"{where}: empty answer list")
    return answers


def write_jsonl(path, rows):
    """One JSON object per line, keys in the order given, UTF-8; written to a temp file and renamed, so a
    crash never leaves half a file and a re-run gives the same bytes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    print(f"{path}: {len(rows)} rows")
    return len(rows)


def load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"'{path}' not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows
