"""VICRA (seed 003, eqs. 4-6, appendices C, H, I): psi against eq. 6 by a slow loop, sum
preservation, agreement with the appendix C snippet where it is defined to agree, the
no-image forward against a prompt built from scratch, the distortions measured on pixels and
through the processor, and on the shipped checkpoint: template tokens' w and the main loop against
grpo.py. The answer-vs-template hypothesis is measured (w_by_token_class), not asserted: notes/vicra.md."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import grpo  # noqa: E402
import vicra  # noqa: E402
import vlm  # noqa: E402

torch.set_num_threads(1)


def random_padded(B=7, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    p_img, p_no = torch.rand(B, T, generator=g, dtype=torch.float64), torch.rand(B, T, generator=g, dtype=torch.float64)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    lens[0] = T  # one full row, one single-token row
    lens[1] = 1
    mask = torch.arange(T)[None] < lens[:, None]
    return p_img, p_no, mask


# ----------------------------------------------------------------------------- eq. 6
def test_psi_matches_eq6_by_loop():
    p_img, p_no, mask = random_padded()
    w = p_img - p_no
    psi = vicra.vicra_psi(w, mask)
    for i in range(w.shape[0]):
        valid = [t for t in range(w.shape[1]) if mask[i, t]]
        mean = sum(float(w[i, t]) for t in valid) / len(valid)
        for t in range(w.shape[1]):
            want = 1 + float(w[i, t]) - mean if mask[i, t] else 0.0
            assert abs(float(psi[i, t]) - want) < 1e-12


def test_psi_hand_values():
    # w = [0.5, -0.1, 0.2] -> mean 0.2 -> psi = [1.3, 0.7, 1.0]; padding ignored and zeroed
    w = torch.tensor([[0.5, -0.1, 0.2, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert torch.allclose(vicra.vicra_psi(w, mask), torch.tensor([[1.3, 0.7, 1.0, 0.0]]))


def test_sum_preservation_per_response():
    p_img, p_no, mask = random_padded(seed=1)
    adv_seq = torch.randn(mask.shape[0], dtype=torch.float64)
    out = vicra.vicra_advantages(adv_seq, p_img, p_no, mask)
    base = adv_seq[:, None] * mask
    assert torch.allclose(out.sum(-1), base.sum(-1), atol=1e-12)
    assert not torch.allclose(out, base)  # it does reweight tokens
    # a per-token A (constant over a response, as GRPO's) gives the same result
    assert torch.allclose(vicra.vicra_advantages(adv_seq[:, None].expand_as(p_img), p_img, p_no, mask), out)


def appendix_c_snippet(advantages, visually_groundeds_probs, response_mask):
    """Verbatim from the paper's appendix C (clamps the SUM of w at 1e-8)."""
    response_len = response_mask.sum(dim=-1, keepdim=True)
    w = visually_groundeds_probs * response_mask
    w_sum = w.sum(dim=-1, keepdim=True).clamp_min(1e-8)
    pi = 1 + (w - w_sum / response_len)
    return advantages * pi


def test_snippet_agrees_where_sum_w_nonnegative_only():
    p_img, p_no, mask = random_padded(B=40, seed=2)
    w = p_img - p_no
    adv = torch.randn(40, 1, dtype=torch.float64).expand_as(w)
    ours = vicra.vicra_advantages(adv, p_img, p_no, mask)
    snip = appendix_c_snippet(adv, w, mask.double()) * mask
    wsum = (w * mask).sum(-1)
    pos, neg = wsum >= 0, wsum < 0
    assert pos.sum() >= 5 and neg.sum() >= 5  # both cases are exercised
    assert torch.allclose(ours[pos], snip[pos], atol=1e-12)
    # where the sum is negative the snippet's psi no longer averages to 1 (eq. 6 is not what it computes)
    assert not torch.allclose(ours[neg], snip[neg])
    assert not torch.allclose(snip[neg].sum(-1), (adv * mask)[neg].sum(-1))


# ----------------------------------------------------------------------------- appendix I distortions
def scene(W=112, H=112, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(30, 256, (H, W, 3)).astype(np.uint8))  # no pixel is black already


def test_black_and_patch_black():
    img = scene()
    assert np.asarray(vicra.distort_image(img, "black", (7, 7))).max() == 0
    a = np.asarray(vicra.distort_image(img, "patch_black", (7, 7), seed=3))
    black = (a == 0).all(-1)
    assert abs(black.mean() - 0.6) < 0.02  # round(0.6 * 49) = 29 cells of 16x16 px -> 0.592
    assert black.mean() == pytest.approx(29 / 49)
    # whole cells: every 16x16 token cell is all black or untouched
    cells = black.reshape(7, 16, 7, 16).mean((1, 3))
    assert set(np.unique(cells)) == {0.0, 1.0}
    untouched = ~black
    assert (a[untouched] == np.asarray(img)[untouched]).all()
    # a different seed blackens a different set of cells
    b = (np.asarray(vicra.distort_image(img, "patch_black", (7, 7), seed=4)) == 0).all(-1)
    assert (b != black).any()


def test_noise_std_and_clipping():
    flat = Image.new("RGB", (200, 200), (128, 128, 128))
    a = np.asarray(vicra.distort_image(flat, "noise", (1, 1), seed=0)).astype(float)
    # N(128, 200) clipped to [0, 255]: most pixels saturate, so compare with the clipped normal
    ref = np.clip(np.random.default_rng(1).normal(128, 200, 10 ** 6), 0, 255).round()
    assert abs(a.std() - ref.std()) < 1.0 and abs(a.mean() - ref.mean()) < 1.0
    assert ((a == 0) | (a == 255)).mean() == pytest.approx(((ref == 0) | (ref == 255)).mean(), abs=0.01)
    # before clipping the std is 200: on a mid-grey image the unclipped fraction is P(|z| < 127.5/200)
    assert ((a > 0) & (a < 255)).mean() == pytest.approx(0.476, abs=0.01)


def test_blur_radius_is_std_5():
    a = np.zeros((101, 101, 3), np.uint8)
    a[:, 50:] = 255
    b = np.asarray(vicra.distort_image(Image.fromarray(a), "blur", (1, 1))).astype(float)[50, :, 0] / 255
    d = np.diff(b)  # the derivative of a blurred step edge is the blur kernel
    x = np.arange(len(d))
    m = (d * x).sum() / d.sum()
    assert np.sqrt((d * (x - m) ** 2).sum() / d.sum()) == pytest.approx(5.0, rel=0.05)


def test_unknown_distortion_raises():
    with pytest.raises(ValueError, match="distort"):
        vicra.distort_image(scene(), "jpeg", (7, 7))


# ----------------------------------------------------------------------------- the extra forward (tiny, random weights)
G, TEMP = 2, 0.7


@pytest.fixture(scope="module")
def tiny():
    rows = grpo.load_rows(str(ROOT / "data/shapes/reasoning_val.jsonl"))
    corpus = [grpo.prompt_text(r) for r in rows[:100]] + ["<think>I look at the shapes.</think> \\boxed{3}",
                                                          "user\n", "assistant\n"]
    model, processor = vlm.build_tiny(corpus, seed=0)
    # three prompts of different lengths, so the text-only batch is left-padded differently per row
    by_type = {}
    for r in rows:
        by_type.setdefault(r["qtype"], r)
    picked = [by_type["count_colour"], by_type["colour_of_shape"], by_type["shape_of_colour"]]
    images = [grpo.load_image(r) for r in picked]
    g = torch.Generator().manual_seed(0)
    N, T = len(picked) * G, 9
    ids = torch.randint(10, 300, (N, T), generator=g)
    lens = torch.tensor([9, 3, 6, 1, 8, 5])
    ids[torch.arange(N), lens - 1] = model.generation_config.eos_token_id
    mask = (torch.arange(T)[None] < lens[:, None]).long()
    inputs = grpo.with_completion(grpo.encode(processor, picked, images, G), ids, mask)
    return model.eval(), processor, picked, images, ids, mask, inputs


def scratch_logp(model, processor, text, completion, image=None):
    """log pi(. | prompt, o_<t) of one sequence built alone: no padding, no batch, the model's own positions."""
    enc = processor(text=[text], images=[image] if image else None, return_tensors="pt")
    x = grpo.with_completion(enc, completion[None], torch.ones_like(completion)[None])
    with torch.no_grad():
        logits = model(**x).logits[0, -len(completion) - 1:-1].float() / TEMP
    logits[:, grpo.placeholders(model)] = -1e30
    return logits.log_softmax(-1)


def test_discard_forward_equals_text_only_prompt_built_from_scratch(tiny):
    model, processor, rows, images, ids, mask, inputs = tiny
    x = vicra.vicra_inputs(processor, rows, images, ids, mask, G, "discard")
    assert "pixel_values" not in x and "image_grid_thw" not in x
    assert int(x["mm_token_type_ids"].sum()) == 0 and not (x["input_ids"] == model.config.image_token_id).any()
    assert (x["attention_mask"][:, 0] == 0).any()  # some rows really are left-padded
    p_no, kl = vicra.vicra_stats(model, inputs, x, ids, TEMP, micro_batch_size=4, kl=True)  # 2 micro-batches
    p_img = grpo.token_stats(model, inputs, ids, TEMP, 4)[0].exp()
    for n in range(len(ids)):
        row, L = rows[n // G], int(mask[n].sum())
        lq = scratch_logp(model, processor, vlm.prompt(processor, grpo.prompt_text(row), image=False), ids[n, :L])
        # compared as log-probs: random weights give p ~ 1/vocab, too small for an absolute tolerance
        assert torch.allclose(p_no[n, :L].log(), lq.gather(1, ids[n, :L, None])[:, 0], atol=1e-4), n
        lp = scratch_logp(model, processor, vlm.prompt(processor, grpo.prompt_text(row)), ids[n, :L], images[n // G])
        assert torch.allclose(p_img[n, :L].log(), lp.gather(1, ids[n, :L, None])[:, 0], atol=1e-4), n
        want_kl = (lp.exp() * (lp - lq)).sum(-1)
        assert torch.allclose(kl[n, :L], want_kl, atol=1e-5), n
    # and the image matters: the two passes differ on every row
    assert ((p_img.log() - p_no.log()).abs() * mask).amax(1).min() > 0.05
    assert (kl * mask).amin() >= -1e-6 and (kl * mask).amax() > 1e-3


def test_same_inputs_give_w_zero_and_kl_zero(tiny):
    model, processor, rows, images, ids, mask, inputs = tiny
    p, kl = vicra.vicra_stats(model, inputs, inputs, ids, TEMP, 6, kl=True)
    assert torch.allclose(p, grpo.token_stats(model, inputs, ids, TEMP, 6)[0].exp(), atol=1e-6)
    assert kl.abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["patch_black", "black", "noise", "blur"])
def test_distortions_keep_tokens_and_positions(tiny, kind):
    model, processor, rows, images, ids, mask, inputs = tiny
    x = vicra.vicra_inputs(processor, rows, images, ids, mask, G, kind, inputs["image_grid_thw"], seed=1)
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(x[k], inputs[k]), k
    assert x["pixel_values"].shape == inputs["pixel_values"].shape
    assert not torch.allclose(x["pixel_values"], inputs["pixel_values"])
    # the 3-D multimodal positions the model builds are identical too
    pos = lambda z: model.model.get_rope_index(z["input_ids"], z["mm_token_type_ids"], z["image_grid_thw"],
                                                attention_mask=z["attention_mask"])[0]
    assert torch.equal(pos(x), pos(inputs))
    p, _ = vicra.vicra_stats(model, inputs, x, ids, TEMP, 6)
    gap = (p.log() - grpo.token_stats(model, inputs, ids, TEMP, 6)[0]).abs() * mask
    assert torch.isfinite(p).all() and gap.max() > 1e-3


def test_patch_black_blackens_whole_visual_tokens(tiny):
    """Through the processor: 29 of each image's 49 merged tokens (0.6 * 49 rounded) are entirely black."""
    model, processor, rows, images, ids, mask, inputs = tiny
    x = vicra.vicra_inputs(processor, rows, images, ids, mask, G, "patch_black", inputs["image_grid_thw"], seed=1)
    ip = processor.image_processor
    black = torch.tensor([-m / s for m, s in zip(ip.image_mean, ip.image_std)])  # pixel 0 after normalisation
    C, per_tok = len(ip.image_mean), ip.merge_size ** 2
    pv = x["pixel_values"].reshape(-1, per_tok, C, ip.temporal_patch_size * ip.patch_size ** 2)
    is_black = (pv - black[None, None, :, None]).abs().amax((1, 2, 3)) < 1e-4  # one flag per merged token
    n_tok = int(inputs["image_grid_thw"][0].prod()) // per_tok
    assert n_tok == 49
    per_image = is_black.reshape(-1, n_tok).sum(1)
    assert per_image.tolist() == [29] * len(ids)
    # the G copies of one prompt share the distorted image; different prompts get different cells
    flags = is_black.reshape(-1, n_tok)
    assert torch.equal(flags[0], flags[1]) and not torch.equal(flags[0], flags[2])


# ----------------------------------------------------------------------------- the shipped tiny checkpoint
# VICRA_CKPT: measure another checkpoint (e.g. a snapshot of a run) with the same tests
CKPT = pathlib.Path(os.environ.get("VICRA_CKPT", ROOT / "checkpoints" / "tiny-shapes"))
needs_ckpt = pytest.mark.skipif(not (CKPT / "model.safetensors").exists(), reason="needs the shipped tiny checkpoint")


def w_by_token_class(model, processor, rows, teacher=False, T=1.0, batch=32):
    """Mean w (eq. 4, discard) per token class on reasoning rows. Completions: the model's greedy answers,
    or (teacher) the reference target `<think>I look at the shapes.</think> \\boxed{answer}` + EOS.
    Classes: `answer` (tokens overlapping the last \\boxed{...}'s content) by qtype, `<think>` (the tokens
    of the opening tag), `template` (every other completion token, EOS included)."""
    tok, eos = processor.tokenizer, model.generation_config.eos_token_id
    sums = {}
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        images = [grpo.load_image(r) for r in chunk]
        if teacher:
            comp = [tok(f"<think>I look at the shapes.</think> \\boxed{{{r['answer']}}}")["input_ids"] + [eos]
                    for r in chunk]
            L = max(map(len, comp))
            ids = torch.tensor([c + [tok.pad_token_id] * (L - len(c)) for c in comp])
            mask = (torch.arange(L)[None] < torch.tensor([len(c) for c in comp])[:, None]).long()
            inputs = grpo.with_completion(grpo.encode(processor, chunk, images), ids, mask)
        else:
            inputs, ids, mask, _ = grpo.rollout(model, processor, chunk, images, 1, 32, temperature=0)
        p_img = grpo.token_stats(model, inputs, ids, T, batch)[0].exp()
        x = vicra.vicra_inputs(processor, chunk, images, ids, mask, 1, "discard")
        w = p_img - vicra.vicra_stats(model, inputs, x, ids, T, batch)[0]
        for n, r in enumerate(chunk):
            pieces = [tok.decode([int(t)]) for t in ids[n][mask[n].bool()]]
            text, ends = "", []
            for p in pieces:
                text += p
                ends.append(len(text))
            start = text.rfind("\\boxed{")
            a0 = start + len("\\boxed{") if start >= 0 else len(text) + 1
            a1 = text.find("}", a0) if start >= 0 else a0
            for t, (e, p) in enumerate(zip(ends, pieces)):
                s = e - len(p)
                if s < a1 and e > a0:
                    cls = f"answer:{r['qtype']}"
                elif text.startswith("<think>") and e <= len("<think>"):
                    cls = "<think>"
                else:
                    cls = "template"
                acc = sums.setdefault(cls, [0.0, 0])
                acc[0], acc[1] = acc[0] + float(w[n, t]), acc[1] + 1
    return {k: (s / n, n) for k, (s, n) in sorted(sums.items())}


@needs_ckpt
def test_template_tokens_do_not_need_the_image_on_the_checkpoint():
    """On the shipped checkpoint the fixed template (`<think>I look at the shapes.</think> \\boxed{`, EOS) is
    as likely without the image as with it (sft.py trains 10% of reasoning examples without their image):
    |mean w| < 0.01. A broken text-only pass (wrong positions, stray image tokens) would put that prompt out
    of distribution and lower pi(template | q). The issue's hypothesis -- answer tokens naming counts or
    colours get a higher mean w than template tokens -- is MEASURED here and in notes/vicra.md, not asserted:
    it does not hold on this checkpoint, whose reasoning answers ignore the image (its greedy answers are
    the same with and without it on 184 of the first 200 val questions)."""
    model, processor, _ = vlm.load(str(CKPT))
    rows = grpo.load_rows(str(ROOT / "data/shapes/reasoning_val.jsonl"))[:100]
    stats = w_by_token_class(model.eval(), processor, rows)
    print({k: (round(m, 4), n) for k, (m, n) in stats.items()})
    assert stats["template"][1] >= 100 * 12 and stats["<think>"][1] == 300  # `<`, `think`, `>` per answer
    assert abs(stats["template"][0]) < 0.01 and abs(stats["<think>"][0]) < 0.01
    assert sum(n for k, (_, n) in stats.items() if k.startswith("answer:")) == 100  # one answer token each


def run_script(script, out, *flags):
    cmd = [sys.executable, str(ROOT / script), "--model", str(CKPT), "--out_dir", str(out), "--steps", "2",
           "--G", "6", "--batch_size", "3", "--max_new_tokens", "24", "--beta", "0", "--eval_every", "0",
           "--save_every", "0", "--threads", "1", "--device", "cpu", "--dtype", "float32",
           "--data", str(ROOT / "data/shapes/reasoning_train.jsonl"), *flags]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return [json.loads(line) for line in open(out / "log.jsonl")]


@needs_ckpt
def test_main_loop_reweight_off_is_grpo_and_on_is_not(tmp_path):
    """Same seed: with --reweight false the extra forward changes nothing (rewards, loss, gradient norm equal
    grpo.py's to float precision, step 2 included, so the update was the same); with VICRA on, step 1's
    rollouts are the same but the update differs."""
    keys = ("reward", "entropy", "length", "loss", "grad_norm")
    base = run_script("grpo.py", tmp_path / "grpo")
    off = run_script("vicra.py", tmp_path / "off", "--reweight", "false")
    on = run_script("vicra.py", tmp_path / "on")
    for b, o in zip(base, off):
        assert all(b[k] == pytest.approx(o[k], rel=1e-4, abs=1e-7) for k in keys), (b, o)
        assert o["psi_mean"] == pytest.approx(1.0, abs=1e-6)  # eq. 6 preserves each response's sum
    assert on[0]["reward"] == base[0]["reward"] and on[0]["length"] == base[0]["length"]
    moved = [k for k, b in enumerate(base) if b["grad_norm"] > 0]
    assert moved, "no group with a reward spread: nothing to compare"
    # float noise between two identical runs is ~1e-7 relative; reweighting moved it 3e-4 on the shipped checkpoint
    assert on[moved[0]]["grad_norm"] != pytest.approx(base[moved[0]]["grad_norm"], rel=1e-5)
