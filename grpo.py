"""
GRPO for vision-language models, in one file.

(Work in progress: data, prompts and rewards. The loop follows.)
"""
import json
import math
import os
import re

from PIL import Image

import vlm

# ----------------------------------------------------------------------------
# data: one JSON object per line. Grounding rows carry `query` and `box`
# (pixels of the original image), reasoning rows `question` and `answer`.
# `image` is a path relative to the jsonl file's folder.
NEEDS = {"grounding": ("image", "query", "box"), "reasoning": ("image", "question", "answer"),
         "detail": ("image", "question", "answer")}


def load_rows(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file '{path}' not found (the shapes data: python data/shapes/prepare.py)")
    rows, root = [], os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            task = row.get("task", "grounding" if "box" in row and "query" in row else "reasoning")
            missing = [k for k in NEEDS.get(task, ()) if k not in row]
            if task not in NEEDS or missing:
                raise ValueError(f"{path}:{n}: a '{task}' row needs fields {NEEDS.get(task)}; missing {missing}")
            row["task"], row["image"], row["where"] = task, os.path.join(root, row["image"]), f"{path}:{n}"
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def load_image(row):
    try:
        return Image.open(row["image"]).convert("RGB")
    except (OSError, ValueError) as e:  # missing file, truncated or not an image
        raise OSError(f"{row['where']}: cannot read image '{row['image']}': {e}") from None


# Prompts: VLM-R1 for grounding, EasyR1 (VICRA appendix D) for reasoning.
PROMPTS = {
    "grounding": ("Please provide the bounding box coordinates of the region this sentence describes: {query}. "
                  "First output the thinking process in <think> </think> tags and then output the final answer "
                  "in <answer> </answer> tags. Output the final answer in JSON format."),
    "reasoning": ("{question} You FIRST think about the reasoning process as an internal monologue and then "
                  "provide the final answer. The reasoning process MUST BE enclosed within <think> </think> tags. "
                  "The final answer MUST BE put in \\boxed{{}}."),
}


def prompt_text(row):
    return PROMPTS[row["task"]].format(**row)


# ----------------------------------------------------------------------------
# rewards: (total, format, accuracy). Any parse failure scores 0, never raises.
GROUNDING_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?\{.*\[\d+,\s*\d+,\s*\d+,\s*\d+\].*\}.*?</answer>",
                              re.DOTALL)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
BOX = re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*\]")
REASONING_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)


def iou(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def parse_box(text):
    """The first [x1,y1,x2,y2] inside the first <answer>...</answer>, or None."""
    answer = ANSWER.search(text)
    box = BOX.search(answer.group(1)) if answer else None
    if not box:
        return None
    box = [float(v) for v in box.groups()]
    return box if all(map(math.isfinite, box)) and box[2] > box[0] and box[3] > box[1] else None


def grounding_reward(text, gt_box, fam, orig_wh, resized_wh):
    """format + IoU, with the predicted box moved from the model's convention to original pixels."""
    fmt = 1.0 if GROUNDING_FORMAT.search(text) else 0.0
    box = parse_box(text)
    acc = iou(vlm.to_pixels(box, fam, orig_wh, resized_wh), gt_box) if box else 0.0
    return fmt + acc, fmt, acc


def last_boxed(text):
    """Content of the last \\boxed{...}, braces balanced, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def normalise(answer):
    a = answer.strip().strip("$").strip().rstrip(".").strip().lower()
    a = re.sub(r"^\\text\{(.*)\}$", r"\1", a)
    try:
        return float(a.replace(",", ""))  # numbers compare as numbers: "3" == "3.0"
    except ValueError:
        return a


def reasoning_reward(text, answer):
    """0.9 * accuracy + 0.1 * format (EasyR1)."""
    fmt = 1.0 if REASONING_FORMAT.search(text) else 0.0
    pred = last_boxed(text)
    acc = 1.0 if pred is not None and normalise(pred) == normalise(str(answer)) else 0.0
    return 0.9 * acc + 0.1 * fmt, fmt, acc
