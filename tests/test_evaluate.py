"""evaluate.py on the tiny checkpoint: the figures are grpo.evaluate's own (Acc@0.5, reasoning accuracy) on the
same rows, chunked or not; vqa splits score the greedy replies with the row's metric; the CLI writes the
JSON summary; bad input names the file."""
import json
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import grpo
import vlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "checkpoints", "tiny-shapes")
SHAPES = os.path.join(ROOT, "data", "shapes")


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return vlm.load(CKPT, torch.device("cpu"))


@pytest.mark.parametrize("task,n", [("grounding", 12), ("reasoning", 6)])
def test_same_as_grpo_evaluate(tiny, task, n):
    model, processor, fam = tiny
    rows = grpo.load_rows(os.path.join(SHAPES, f"{task}_val.jsonl"))[:n]
    ref = grpo.evaluate(model, processor, fam, rows, batch_size=n, max_new_tokens=48)
    got = evaluate.evaluate_split(model, processor, fam, rows, batch_size=5, max_new_tokens=48)  # 5 does not divide n
    assert got["n"] == n and got["metric"] == {"grounding": "Acc@0.5", "reasoning": "accuracy"}[task]
    assert got["value"] == pytest.approx(ref["acc"], abs=1e-12) and got["format"] == pytest.approx(ref["format"])


def test_refcoco_fixture_split(tiny, tmp_path):
    """A prepared RefCOCO split (the fixture of test_data_prepare) evaluates like grpo.evaluate on it."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_data_prepare as t
    m = t.load("refcoco")
    m.prepare(str(tmp_path / "out"), t.make_coco(tmp_path), refer=t.make_refer(tmp_path), train_n=0)
    rows = evaluate.load_split(str(tmp_path / "out" / "refcoco_testB.jsonl"))
    model, processor, fam = tiny
    ref = grpo.evaluate(model, processor, fam, rows, 8, 48)
    assert evaluate.evaluate_split(model, processor, fam, rows, 1, 48)["value"] == pytest.approx(ref["acc"])


def vqa_split(tmp_path, metric, answers_of):
    rows = grpo.load_rows(os.path.join(SHAPES, "detail_val.jsonl"))[:6]
    path = tmp_path / f"{metric}.jsonl"
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(dict(task="vqa", image=os.path.relpath(r["image"], tmp_path), question=r["question"],
                                    answers=answers_of(r), metric=metric)) + "\n")
    return str(path), rows


def test_vqa_split(tiny, tmp_path):
    """The split's value is the mean of the metric over the greedy replies to the one-word prompt."""
    model, processor, fam = tiny
    path, rows = vqa_split(tmp_path, "vqa", lambda r: [r["answer"]] * 4 + ["zzz"] * 6)
    vrows = evaluate.load_split(path)
    images = [grpo.load_image(r) for r in rows]
    texts = grpo.rollout(model.eval(), processor, rows, images, 1, 16, temperature=0)[3]  # detail rows: same prompt
    expected = sum(1.0 if evaluate.vqa_normalise(t) == evaluate.vqa_normalise(r["answer"]) else 0.0
                   for t, r in zip(texts, rows)) / len(rows)  # 4 of 10 humans agree: accuracy 1 or 0
    got = evaluate.evaluate_split(model, processor, fam, vrows, 4, 16)
    assert got == dict(metric="vqa", value=pytest.approx(expected), n=6)


def test_cli_summary_and_errors(tmp_path):
    rows = grpo.load_rows(os.path.join(SHAPES, "grounding_val.jsonl"))[:4]
    split = tmp_path / "g.jsonl"
    with open(split, "w") as f:
        for r in rows:
            f.write(json.dumps(dict(r, image=os.path.relpath(r["image"], tmp_path), where=None)) + "\n")
    out = tmp_path / "s.json"
    cmd = [sys.executable, "evaluate.py", "--model", CKPT, "--data", str(split), "--out", str(out),
           "--max_new_tokens", "48", "--threads", "1"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    s = json.load(open(out))["splits"][str(split)]
    model, processor, fam = vlm.load(CKPT, torch.device("cpu"))
    ref = grpo.evaluate(model, processor, fam, grpo.load_rows(str(split)), 4, 48)
    assert (s["metric"], s["n"]) == ("Acc@0.5", 4) and s["value"] == pytest.approx(ref["acc"])
    # a split name that does not exist: the error lists the ones that do
    with pytest.raises(FileNotFoundError, match=r"g_val.jsonl' not found; splits in '.*': g$"):
        evaluate.load_split(str(tmp_path / "g_val.jsonl"))


def test_vqa_row_errors(tmp_path):
    path, _ = vqa_split(tmp_path, "anls", lambda r: [r["answer"]])
    lines = open(path).read().splitlines()
    bad = json.loads(lines[2])
    bad["answers"] = [" "]
    open(path, "w").write("\n".join(lines[:2] + [json.dumps(bad)] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"anls.jsonl:3: empty answer list"):
        evaluate.load_split(path)
    bad["answers"], bad["image"] = ["x"], "nope.png"
    open(path, "w").write("\n".join(lines[:2] + [json.dumps(bad)] + lines[3:]) + "\n")
    with pytest.raises(FileNotFoundError, match=r"anls.jsonl:3: image .*nope.png' not found"):
        evaluate.load_split(path)
