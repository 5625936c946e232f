"""Greedy evaluation of any checkpoint on prepared splits: the papers' metric per split, and a JSON summary.

    python evaluate.py --model checkpoints/tiny-shapes --data data/shapes/grounding_val.jsonl
    python evaluate.py --model out/grpo-3b-rec \\
        --data data/refcoco/refcoco_val.jsonl,data/refcoco/refcoco_testA.jsonl,data/refcoco/refcoco_testB.jsonl
    python evaluate.py --model Qwen/Qwen2.5-VL-7B-Instruct --data data/vqa/textvqa_val.jsonl,data/vqa/pope_random.jsonl

Metric per split, by the rows' task:
  grounding  Acc@0.5: IoU(predicted box, ground truth) > 0.5, with grpo.evaluate (ECVGPO tables 1-2, VLM-R1);
  reasoning  accuracy of the last \\boxed{} against the answer, grpo.answers_match: exact match, else
             mathematical equivalence by math-verify (VICRA tables 1-2 use a GPT-4o judge instead);
  detail     exact single-word match (the shapes data);
  vqa        the row's `metric` (data/vqa/prepare.py sets it; EGG table 1's benchmarks):
             vqa    VQA soft accuracy over the 10 human answers (TextVQA);
             exact  normalised exact match with any accepted answer (GQA);
             choice the first option letter in the reply against the label (V*);
             yesno  POPE's own parse of the reply into yes / no, against the label;
             anls   ANLS, threshold 0.5 (DocVQA).
Prompts are grpo.py's (PROMPTS); vqa rows use its one-word `detail` prompt, as lmms-eval does for these sets.
"""
import json
import os
import re
import sys
import time

import torch
from tqdm import tqdm

import grpo
import vlm

config = dict(
    model="checkpoints/tiny-shapes",  # local path or hub id
    data="data/shapes/grounding_val.jsonl",  # comma-separated prepared jsonl files: one split each
    out="",  # JSON summary; default: out/eval_<model folder name>.json
    n=0,  # rows per split (0: all)
    batch_size=16, max_new_tokens=256,
    device="cuda" if torch.cuda.is_available() else "cpu",
    dtype="bfloat16" if torch.cuda.is_available() else "float32",
    threads=0,
)


# ----------------------------------------------------------------------------
# VQA metrics
# The official VQA answer normalisation (VQA eval script / EvalAI; lmms-eval's EvalAIAnswerProcessor):
# punctuation, number words, articles, contractions written without their apostrophe.
CONTRACTIONS = {w.replace("'", ""): w for w in (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd she'd've she'll "
    "she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd "
    "someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've "
    "there're there's they'd they'd've they'll they're they've 'twas wasn't we'd we'd've we're we've weren't "
    "what'll what're what's what've when's where'd where's where've who'd who'd've who'll who're who's who've "
    "why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
    "you're you've").split()}
NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBERS["none"] = "0"
ARTICLES = {"a", "an", "the"}
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # (sic: the official regex)
COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")


def vqa_normalise(text):
    t = str(text).replace("\n", " ").replace("\t", " ").strip()
    out = t
    for p in PUNCT:  # a punctuation mark next to a space (or any in '1,000'-like text) is dropped, else a space
        out = out.replace(p, "") if (p + " " in t or " " + p in t or COMMA_NUMBER.search(t)) else out.replace(p, " ")
    out = PERIOD.sub("", out)
    words = [NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(pred, answers):
    """VQA soft accuracy: the mean over the 10 leave-one-out subsets of 9 human answers of
    min(#humans in the subset who gave pred / 3, 1). With m matching humans of 10: 0, 0.3, 0.6, 0.9, then 1
    (the often-quoted min(m / 3, 1) is the same up to this averaging)."""
    p, gts = vqa_normalise(pred), [vqa_normalise(a) for a in answers]
    return sum(min(1.0, sum(g == p for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))) / len(gts)


def exact_match(pred, answers):
    return float(vqa_normalise(pred) in {vqa_normalise(a) for a in answers})


def choice_match(pred, answers):
    """The first option letter of the reply ('B', '(B) red', 'B. red', 'The answer is B') vs the label."""
    m = re.search(r"\b([A-F])\b", str(pred).strip())
    return float(m is not None and m.group(1) == str(answers[0]).strip().strip("()").upper())


def pope_yesno(pred):
    """POPE's evaluate.py: the first sentence, commas dropped; a 'No', 'no' or 'not' word means no, else yes."""
    words = str(pred).split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def yesno_match(pred, answers):
    return float(pope_yesno(pred) == str(answers[0]).strip().lower())


def levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(pred, answers, tau=0.5):
    """Average Normalised Levenshtein Similarity (DocVQA): max over answers of 1 - NL if NL < tau else 0,
    NL = edit distance / max length, on lower-cased, stripped strings."""
    p, best = " ".join(str(pred).strip().lower().split()), 0.0
    for a in answers:
        a = " ".join(str(a).strip().lower().split())
        nl = levenshtein(p, a) / max(len(p), len(a), 1)
        best = max(best, 1 - nl if nl < tau else 0.0)
    return best


METRICS = {"vqa": vqa_accuracy, "exact": exact_match, "choice": choice_match, "yesno": yesno_match, "anls": anls}


# ----------------------------------------------------------------------------
def load_split(path):
    """Rows of one prepared split. grounding / reasoning / detail rows go through grpo.load_rows; vqa rows
    (which grpo.py does not train on) are checked here. A missing file names the splits that do exist."""
    if not os.path.exists(path):
        folder = os.path.dirname(path) or "."
        have = sorted(f[:-len(".jsonl")] for f in os.listdir(folder) if f.endswith(".jsonl")) \
            if os.path.isdir(folder) else []
        raise FileNotFoundError(f"split '{path}' not found; splits in '{folder}': {', '.join(have) or 'none'}")
    with open(path, encoding="utf-8") as f:
        first = next((json.loads(l) for l in f if l.strip()), {})
    if first.get("task") != "vqa":
        return grpo.load_rows(path)
    rows, root = [], os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            where = f"{path}:{n}"
            missing = [k for k in ("image", "question", "answers", "metric") if k not in r]
            if missing:
                raise ValueError(f"{where}: a 'vqa' row needs image, question, answers, metric; missing {missing}")
            if not [a for a in r["answers"] if str(a).strip()]:
                raise ValueError(f"{where}: empty answer list")
            if r["metric"] not in METRICS:
                raise ValueError(f"{where}: unknown metric '{r['metric']}' (one of {sorted(METRICS)})")
            r["image"], r["where"] = os.path.join(root, r["image"]), where
            if not os.path.exists(r["image"]):
                raise FileNotFoundError(f"{where}: image '{r['image']}' not found")
            rows.append(r)
    return rows


METRIC_NAME = {"grounding": "Acc@0.5", "reasoning": "accuracy", "detail": "accuracy"}


@torch.no_grad()
def evaluate_split(model, processor, fam, rows, batch_size, max_new_tokens, desc=""):
    """{'metric', 'value', 'format', 'n'} of one split. grounding / reasoning / detail: grpo.evaluate, chunk
    by chunk (for the progress bar), so the figure is grpo.py's own; vqa: greedy replies scored by METRICS."""
    task = rows[0]["task"]
    if any(r["task"] != task for r in rows):
        raise ValueError(f"{rows[0]['where']}: a split must hold one task; found {sorted({r['task'] for r in rows})}")
    total, fmt = 0.0, 0.0
    for i in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
        chunk = rows[i:i + batch_size]
        if task != "vqa":
            out = grpo.evaluate(model, processor, fam, chunk, batch_size, max_new_tokens)
            total, fmt = total + out["acc"] * len(chunk), fmt + out["format"] * len(chunk)
            continue
        was_training = model.training
        model.eval()
        images = [grpo.load_image(r) for r in chunk]
        prompts = [dict(r, task="detail") for r in chunk]  # the one-word prompt
        texts = grpo.rollout(model, processor, prompts, images, 1, max_new_tokens, temperature=0)[3]
        model.train(was_training)
        total += sum(METRICS[r["metric"]](t, r["answers"]) for r, t in zip(chunk, texts))
    if task == "vqa":
        names = sorted({r["metric"] for r in rows})
        return dict(metric="+".join(names), value=total / len(rows), n=len(rows))
    return dict(metric=METRIC_NAME[task], value=total / len(rows), format=fmt / len(rows), n=len(rows))


if __name__ == "__main__":
    cfg = grpo.parse_config(config)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    splits = {p: load_split(p) for p in cfg["data"].split(",")}  # every file checked before the model loads
    dtype = getattr(torch, cfg["dtype"])
    model, processor, fam = vlm.load(cfg["model"], torch.device(cfg["device"]), dtype)  # no training: bf16 weights do
    amp = torch.autocast(cfg["device"], dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
    summary = dict(model=cfg["model"], family=fam, max_new_tokens=cfg["max_new_tokens"], splits={})
    t0 = time.time()
    for path, rows in splits.items():
        rows = rows[:cfg["n"]] if cfg["n"] else rows
        with amp:
            res = evaluate_split(model, processor, fam, rows, cfg["batch_size"], cfg["max_new_tokens"],
                                 desc=os.path.basename(path))
        summary["splits"][path] = res
        tqdm.write(f"{path}: {res['metric']} {res['value']:.4f}" +
                   (f" (format {res['format']:.3f})" if "format" in res else "") + f", {res['n']} rows")
    summary["seconds"] = round(time.time() - t0, 1)
    out = cfg["out"] or os.path.join("out", f"eval_{os.path.basename(cfg['model'].rstrip('/'))}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"summary: {out}", file=sys.stderr)
