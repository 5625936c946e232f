"""sft.py: targets score as perfect answers, soft labels are what they claim, a few steps lower the loss,
and the shipped tiny checkpoint sits in the stated Acc@0.5 band on the shapes grounding val split."""
import math
import os
import random
import types

import pytest
import torch

import sft
import vlm
from data.shapes.prepare import make_split
from grpo import grounding_reward, load_rows, reasoning_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "checkpoints", "tiny-shapes")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Small train splits and the first 60 grounding val rows, regenerated (bytes equal the shipped seed's)."""
    out = str(tmp_path_factory.mktemp("shapes"))
    for task, split, n in [("grounding", "train", 16), ("reasoning", "train", 16), ("detail", "train", 8),
                           ("grounding", "val", 60)]:
        make_split(task, split, n, 0, out)
    return {f"{t}_{s}": load_rows(os.path.join(out, f"{t}_{s}.jsonl"))
            for t, s in [("grounding", "train"), ("reasoning", "train"), ("detail", "train"), ("grounding", "val")]}


@pytest.fixture(scope="module")
def tiny(shapes):
    torch.set_num_threads(1)
    rows = shapes["grounding_train"] + shapes["reasoning_train"] + shapes["detail_train"]
    corpus = [sft.prompt_text(r) for r in rows] + [sft.target_of(r, vlm.FAMILIES["qwen2_5_vl"], (1, 1), (1, 1))
                                                 for r in rows] + ["user\n", "assistant\n"]
    model, processor = vlm.build_tiny(corpus, seed=0)
    return model, processor, vlm.family(model)


def test_targets_are_perfect_answers(shapes, tiny):
    _, processor, fam = tiny
    for r in shapes["grounding_train"][:5]:
        wh = (r["width"], r["height"])
        text = sft.target_of(r, fam, wh, wh)  # stored images are already multiples of 16: resized == original
        total, fmt, acc = grounding_reward(text, r["box"], fam, wh, wh)
        assert fmt == 1.0 and acc == pytest.approx(1.0)
    for r in shapes["reasoning_train"][:5]:
        assert reasoning_reward(sft.target_of(r, fam, None, None), r["answer"]) == (1.0, 1.0, 1.0)
    q3 = vlm.FAMILIES["qwen3_vl"]  # norm1000: rounding to 1/1000 of 112 px moves an edge by < 0.06 px
    for r in shapes["grounding_train"][:5]:
        wh = (r["width"], r["height"])
        total, fmt, acc = grounding_reward(sft.target_of(r, q3, wh, None), r["box"], q3, wh, None)
        assert fmt == 1.0 and acc > 0.99


def test_soft_targets_are_gaussians_over_same_spelling_neighbours(tiny):
    _, processor, _ = tiny
    tok = processor.tokenizer
    ids_t, w_t = sft.coordinate_soft_targets(tok, sigma=1.5)
    i40 = tok.convert_tokens_to_ids("40")
    ids, w = ids_t[i40], w_t[i40]
    values = [int(tok.convert_ids_to_tokens(int(j))) for j in ids]
    assert values == list(range(35, 46))  # +-ceil(3 sigma), all without a leading space
    assert w.sum().item() == pytest.approx(1.0)
    assert w[values.index(40)] == w.max() and w[values.index(39)] == pytest.approx(w[values.index(41)].item())
    ratio = (w[values.index(41)] / w[values.index(40)]).item()
    assert ratio == pytest.approx(torch.exp(torch.tensor(-0.5 / 1.5 ** 2)).item(), rel=1e-5)
    ids_sp = ids_t[tok.convert_tokens_to_ids("\u012040")]
    assert all(tok.convert_ids_to_tokens(int(j)).startswith("\u0120") for j in ids_sp)
    i_box = tok.convert_tokens_to_ids("answer")  # any other token: one-hot on itself
    assert ids_t[i_box, 0] == i_box and w_t[i_box].tolist() == [1.0] + [0.0] * (w_t.shape[1] - 1)


def test_prompt_only_positions_carry_no_label(shapes, tiny):
    _, processor, fam = tiny
    rows = shapes["reasoning_train"][:3]
    batch, labels = sft.sft_batch(processor, fam, rows, [True, False, True], "cpu")
    tok = processor.tokenizer
    for i, r in enumerate(rows):
        ids = labels[i][labels[i] != -100].tolist()
        assert tok.decode(ids) == sft.target_of(r, fam, None, None) + tok.eos_token
    assert int((batch["input_ids"][1] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == 0


def test_a_few_steps_lower_the_loss(shapes, tiny):
    model, processor, fam = tiny
    torch.manual_seed(0)
    rows = shapes["grounding_train"][:8]
    soft = sft.coordinate_soft_targets(processor.tokenizer, 1.5)
    batch, labels = sft.sft_batch(processor, fam, rows, [True] * len(rows), "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = sft.sft_loss(model, batch, labels, soft)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses  # measured: 6.90 -> 4.16 in 12 steps


HAVE_CKPT = os.path.exists(os.path.join(CKPT, "model.safetensors"))


@pytest.fixture(scope="module")
def shipped_metrics():
    """Greedy Acc@0.5 and format on all 200 grounding val rows (conftest makes data/shapes)."""
    torch.set_num_threads(1)
    model, processor, fam = vlm.load(CKPT)
    m = sft.evaluate(model, processor, fam, load_rows(os.path.join(ROOT, "data", "shapes", "grounding_val.jsonl")))
    print(f"shipped checkpoint on 200 grounding val rows: Acc@0.5 {m['acc']:.3f}, format {m['format']:.3f}")
    return m


@pytest.mark.skipif(not HAVE_CKPT, reason="no shipped checkpoint")
def test_shipped_checkpoint_writes_the_answer_format(shipped_metrics):
    assert shipped_metrics["format"] >= 0.95


# Issues 7 and 23 ask for Acc@0.5 in [0.30, 0.85] on all 200 val rows (notes/sft.md, "Seventh attempt", has the figure).
@pytest.mark.skipif(not HAVE_CKPT, reason="no shipped checkpoint")
def test_shipped_checkpoint_localises(shipped_metrics):
    """The band's lower edge: something to improve from (the Qwen2.5-VL checkpoint before issue 23: 0.14)."""
    assert shipped_metrics["acc"] >= 0.30


@pytest.mark.skipif(not HAVE_CKPT, reason="no shipped checkpoint")
def test_shipped_checkpoint_leaves_room_above(shipped_metrics):
    """The band's upper edge of issue 7: room for RL above. Measured 0.82 (notes/sft.md, eighth attempt: the late
    mix gives grounding 0.1 of the batches after its take-off; with 0.35 it reached 0.935, with 0.2 0.90)."""
    assert shipped_metrics["acc"] <= 0.85


def test_soft_loss_matches_a_token_by_token_reference(tiny):
    """sft_loss gathers every coordinate token's Gaussian at once; check it against the plain per-token sum."""
    _, processor, _ = tiny
    tok = processor.tokenizer
    soft = sft.coordinate_soft_targets(tok, 1.5)
    torch.manual_seed(0)
    V = len(tok)
    logits = torch.randn(2, 9, V)
    coords = tok.convert_tokens_to_ids(["0", "40", "\u0120256", "\u012041", "7"])  # "0": a clipped Gaussian
    labels = torch.tensor([[-100, -100, coords[0], 7, coords[1], coords[2], 11, -100, -100],
                           [-100, 3, coords[3], 9, 9, coords[4], coords[0], 5, 2]])
    fake = lambda **_: types.SimpleNamespace(logits=logits)  # noqa: E731
    logp = torch.log_softmax(logits[:, :-1], -1)
    ref = []
    for i in range(2):
        for t in range(8):
            y = int(labels[i, t + 1])
            if y != -100:
                if tok.convert_ids_to_tokens(y).lstrip("\u0120").isdigit():
                    ids, w = soft[0][y], soft[1][y]
                    assert len(set(ids[w > 0].tolist())) > 1
                    ref.append(-(logp[i, t, ids] * w).sum())
                else:
                    ref.append(-logp[i, t, y])
    assert sft.sft_loss(fake, {}, labels, soft).item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-6)
    plain = torch.stack([-logp[i, t, int(labels[i, t + 1])] for i in range(2) for t in range(8) if labels[i, t + 1] != -100])
    assert sft.sft_loss(fake, {}, labels, None).item() == pytest.approx(plain.mean().item(), rel=1e-6)


# ----------------------------------------------------------------------------- the binding levers (issue 23)
def row_with(objects, **kw):
    return dict({"task": "reasoning", "width": 112, "height": 112,
                 "objects": [{"colour": c, "shape": s, "box": b} for c, s, b in objects]}, **kw)


def test_about_names_the_objects_the_text_is_about():
    objs = [("red", "circle", [0, 0, 20, 20]), ("blue", "circle", [40, 0, 60, 20]), ("red", "square", [80, 0, 99, 20])]
    q = lambda text: sft.about(row_with(objs, question=text))  # noqa: E731
    assert q("What colour is the square?") == [[80, 0, 99, 20]]
    assert q("What shape is the blue object?") == [[40, 0, 60, 20]]
    assert q("How many red shapes are there?") == [[0, 0, 20, 20], [80, 0, 99, 20]]
    assert q("How many circles are there?") == [[0, 0, 20, 20], [40, 0, 60, 20]]
    assert q("How many triangles are there?") == []  # an absent shape: nothing is asked about
    assert sft.about(dict(row_with(objs, task="grounding", query="the blue circle"), box=[40, 0, 60, 20])) == [[40, 0, 60, 20]]
    assert sft.about({"task": "reasoning", "question": "What colour is the square?"}) is None  # no objects: no target


def test_aux_targets_by_hand(tiny):
    """16-px cells (patch 8 x merge 2) in raster order; positive when the overlap is > 2 px in both axes."""
    _, processor, _ = tiny
    from PIL import Image
    rows = [row_with([("green", "triangle", [20, 20, 40, 40]), ("red", "square", [30, 60, 34, 80])],
                     question="What colour is the triangle?"),
            row_with([("red", "square", [30, 60, 34, 80])], question="What colour is the square?"),
            {"task": "reasoning", "width": 112, "height": 112, "question": "What colour is the square?"}]
    img = Image.new("RGB", (112, 112))
    batch = sft.encode_prompts(processor, rows, [img] * 3, [True, True, True])
    t = sft.aux_targets(processor, rows, [True, True, True], batch)
    assert len(t["bind"]) == 3 * 49 == int((batch["input_ids"] == processor.image_token_id).sum())
    on = {k for k in range(49) if t["bind"][k] == 1}
    assert on == {7 * 1 + 1, 7 * 1 + 2, 7 * 2 + 1, 7 * 2 + 2}  # x, y overlaps 12 and 8 px with cells 1 and 2
    green, triangle = list(sft.COLOURS).index("green"), sft.SHAPES.index("triangle")
    assert all(t["colour"][k] == green and t["shape"][k] == triangle for k in on)
    # the 4-px-wide square overlaps its cells by exactly 2 px in x: under no token, asked about or not
    assert t["bind"][49:98].sum() == 0 and (t["colour"][49:98] == len(sft.COLOURS)).all()
    assert t["valid"][:98].all() and not t["valid"][98:].any()  # the row without objects gets no loss
    assert (t["shape"][:49] == len(sft.SHAPES)).sum() == 49 - 4


def test_soft_sigma_is_in_pixels_of_the_image():
    assert sft.sigma_units(1.5, vlm.FAMILIES["qwen2_5_vl"], 112) == 1.5
    assert sft.sigma_units(1.5, vlm.FAMILIES["qwen3_vl"], 112) == pytest.approx(1.5 * 1000 / 112, rel=1e-3)


@pytest.fixture(scope="module")
def tiny_q3(shapes, tmp_path_factory):
    torch.set_num_threads(1)
    rows = shapes["grounding_train"] + shapes["reasoning_train"] + shapes["detail_train"]
    corpus = [sft.prompt_text(r) for r in rows] + [sft.target_of(r, vlm.FAMILIES["qwen3_vl"], (112, 112), None)
                                                 for r in rows if r["task"] == "grounding"] + ["user\n", "assistant\n"]
    model, processor = vlm.build_tiny(corpus, seed=0, arch="qwen3_vl", hidden=48, layers=2, vision_hidden=32)
    return model, processor, vlm.family(model)


def test_aux_heads_train_and_are_never_saved(shapes, tiny_q3, tmp_path):
    """A few steps of LM + auxiliary losses lower both; the saved checkpoint holds exactly the model's tensors
    and loads with vlm.load and with plain transformers, no missing or unexpected keys."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText
    model, processor, fam = tiny_q3
    rows = shapes["grounding_train"][:4] + shapes["reasoning_train"][:4]
    batch, labels = sft.sft_batch(processor, fam, rows, [True] * 8, "cpu")
    targets = sft.aux_targets(processor, rows, [True] * 8, batch)
    assert targets["bind"].sum() > 0
    heads = sft.aux_heads(48, (1.0, 1.0))
    soft = sft.coordinate_soft_targets(processor.tokenizer, sft.sigma_units(1.5, fam, 112))
    opt = torch.optim.AdamW(list(model.parameters()) + [heads["W"], heads["b"]], lr=2e-3)
    parts = []
    for _ in range(10):
        loss, p = sft.sft_loss(model, batch, labels, soft, heads, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        parts.append(p)
    assert parts[-1]["bind"] < 0.8 * parts[0]["bind"] and parts[-1]["attr"] < 0.8 * parts[0]["attr"], parts
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert set(saved) == {k for k in model.state_dict() if "lm_head" not in k}  # tied lm_head is not stored
    assert tuple(heads["W"].shape) not in saved.values()  # the (hidden, 12) head map is nowhere in the file
    _, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    loaded, _, fam2 = vlm.load(str(tmp_path))
    assert fam2["box"] == "norm1000"
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, loaded.eval()(**batch).logits)


def test_soft_labels_only_on_coordinates(tiny):
    """With coordinate_openers, a number is soft only right after '[' or ','; the count in '{3}' and the 2 of
    'bbox_2d' stay one-hot (run 1 of notes/sft.md's sixth attempt smeared them and lost counting)."""
    _, processor, _ = tiny
    tok = processor.tokenizer
    ids, w = sft.coordinate_soft_targets(tok, 1.5)
    openers = sft.coordinate_openers(tok)
    assert {tok.convert_tokens_to_string([t]).strip() for t, i in tok.get_vocab().items() if openers[i]} <= {"[", ","}
    text = '<answer>{"bbox_2d": [40, 41]}</answer> \\boxed{3}'
    y = tok(text, add_special_tokens=False)["input_ids"]
    labels = torch.tensor([[-100] + y])
    torch.manual_seed(0)
    logits = torch.randn(1, len(y) + 1, len(tok))
    logp = torch.log_softmax(logits[0, :-1], -1)
    coord = {i for i in range(1, len(y)) if openers[y[i - 1]]}  # label index i (of y) is predicted at position i
    assert [tok.decode([y[i]]).strip() for i in sorted(coord)] == ["40", "41"]
    ref = [-(logp[i, ids[y[i]]] * w[y[i]]).sum() if i in coord else -logp[i, y[i]] for i in range(len(y))]
    fake = lambda **_: types.SimpleNamespace(logits=logits)  # noqa: E731
    got = sft.sft_loss(fake, {}, labels, (ids, w, openers))
    assert got.item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-6)
    assert got.item() != pytest.approx(sft.sft_loss(fake, {}, labels, (ids, w)).item(), rel=1e-3)  # "2", "3" differ


# ----------------------------------------------------------------------------- the shipped checkpoint binds (issue 23)
def test_soft_targets_spread_only_over_reachable_values(tiny_q3):
    """norm1000 at 112 px writes round(k * 1000 / 112): 113 values, 8-9 apart. The Gaussian of 1.5 px (13.4 units)
    restricted to them puts ~26% on the written value (over all 1001 values: ~3%), the weights by hand."""
    _, processor, fam = tiny_q3
    tok = processor.tokenizer
    values = sft.reachable_values(fam, 112)
    assert len(values) == 113 and {0, 9, 18, 27, 991, 1000} <= values and 5 not in values
    assert sft.reachable_values(vlm.FAMILIES["qwen2_5_vl"], 112) == set(range(113))  # pixels: every integer
    sigma = sft.sigma_units(1.5, fam, 112)
    ids_t, w_t = sft.coordinate_soft_targets(tok, sigma, values=values)
    i = tok.convert_tokens_to_ids("446")  # round(50 * 1000 / 112)
    got = {int(tok.convert_ids_to_tokens(int(j))): w for j, w in zip(ids_t[i].tolist(), w_t[i].tolist()) if w > 0}
    near = [u for u in range(446 - 41, 446 + 42) if u in values]  # r = ceil(3 sigma) = 41
    g = {u: math.exp(-0.5 * ((u - 446) / sigma) ** 2) for u in near}
    assert set(got) == set(near)
    for u in near:
        assert got[u] == pytest.approx(g[u] / sum(g.values()), rel=1e-5)
    assert 0.24 < got[446] < 0.28
    _, w_all = sft.coordinate_soft_targets(tok, sigma)  # unrestricted: the old, flat spread
    assert w_all[i].max() < 0.04


def test_scene_cap_ramps_from_the_fewest_to_the_most_objects():
    grounding = [{"n_objects": n} for n in (1, 2, 3, 4)]
    reasoning = [{"n_objects": n} for n in (2, 3, 4, 5)]
    assert [sft.scene_cap(grounding, s, 1000) for s in (0, 249, 251, 499, 501, 751, 1000, 5000)] == [1, 1, 2, 2, 3, 4, 4, 4]
    assert [sft.scene_cap(reasoning, s, 1000) for s in (0, 249, 251, 501, 751, 1000)] == [2, 2, 3, 4, 5, 5]


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    model, processor, fam = vlm.load(CKPT)
    return model.eval(), processor, fam


@pytest.mark.skipif(not HAVE_CKPT, reason="no shipped checkpoint")
def test_shipped_checkpoint_moves_its_box_with_the_query(shipped):
    """notes/binding.py's swap test: 2-object scenes asked once per object. A model that localises but does not
    bind gives the same box for both queries (the Qwen2.5-VL checkpoint before issue 23: 58 of 60 pairs)."""
    from notes.binding import swap, two_object_pairs
    rows = load_rows(os.path.join(ROOT, "data", "shapes", "grounding_val.jsonl")) + \
        load_rows(os.path.join(ROOT, "data", "shapes", "grounding_test.jsonl"))
    s = swap(*shipped, two_object_pairs(rows, 60))
    print(s)
    assert s["same_box"] <= 0.30 and s["on_target"] > s["on_other"] + 0.2, s


@pytest.mark.skipif(not HAVE_CKPT, reason="no shipped checkpoint")
def test_shipped_checkpoint_answers_about_the_asked_object(tmp_path):
    """notes/bind2.py: 'What colour is the {shape}?' / 'What shape is the {colour} object?' on 2-object scenes;
    the asked object's attribute must beat the other object's by >= 0.3 on each question type. Measured (200 rows):
    colour 0.75 / 0.05, shape 1.00 / 0.00 (the sixth attempt's checkpoint: 0.23 / 0.17, 0.27 / 0.22)."""
    from notes import bind2
    bind2.write("val", 10000, 200, out_dir=str(tmp_path))
    s = bind2.score(CKPT, path=str(tmp_path / "bind2_eval.jsonl"))
    for q, m in s.items():
        assert m["correct"] - m["other"] >= 0.3, (q, m)
