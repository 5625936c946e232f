"""VEPO (vepo.py): JSD, token selection, perturbation, counterfactual forward, statistics.

Reference values are hand computations or independent slow implementations
(numpy / Python sorting), never the functions under test.
"""
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

import grpo  # noqa: E402
import vepo  # noqa: E402
import vlm  # noqa: E402
from data.shapes.prepare import make_split  # noqa: E402


# ----------------------------------------------------------------------------
# Jensen-Shannon divergence
def jsd_slow(p, q):
    """Textbook JSD in nats from probability vectors (numpy, float64)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    m = 0.5 * (p + q)
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_jsd_hand_computed():
    # p = (1/2, 1/2), q = (9/10, 1/10): m = (7/10, 3/10)
    hand = 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)) \
        + 0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3))
    got = vepo.jsd_from_logits(torch.tensor([0.0, 0.0]), torch.log(torch.tensor([0.9, 0.1])) + 2.0)
    assert got.item() == pytest.approx(hand, abs=1e-6)
    assert hand == pytest.approx(0.1018, abs=1e-3)  # sanity of the hand value itself


def test_jsd_matches_slow_and_is_symmetric_and_bounded():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 37, generator=g, dtype=torch.float64) * 3
    b = torch.randn(50, 37, generator=g, dtype=torch.float64) * 3
    got = vepo.jsd_from_logits(a, b)
    slow = [jsd_slow(torch.softmax(x, -1).numpy(), torch.softmax(y, -1).numpy()) for x, y in zip(a, b)]
    np.testing.assert_allclose(got.numpy(), slow, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got, vepo.jsd_from_logits(b, a), rtol=1e-6, atol=1e-7)
    assert (got >= 0).all() and (got <= math.log(2)).all()


def test_jsd_zero_for_identical_and_shift_invariant():
    a = torch.randn(8, 11)
    assert vepo.jsd_from_logits(a, a).abs().max().item() < 1e-6
    assert vepo.jsd_from_logits(a, a + 5.0).abs().max().item() < 1e-6  # softmax ignores a constant shift


def test_jsd_extreme_logits_no_nan():
    big = 1e4
    p = torch.tensor([[big, -big, 0.0], [big, -big, -big], [0.0, -math.inf, 1.0], [-math.inf, 3.0, -math.inf]])
    q = torch.tensor([[-big, big, 0.0], [big, -big, -big], [0.0, 2.0, -math.inf], [2.0, -math.inf, -math.inf]])
    j = vepo.jsd_from_logits(p, q)
    assert torch.isfinite(j).all()
    assert j[0].item() == pytest.approx(math.log(2), abs=1e-6)  # disjoint supports: the maximum
    assert j[1].item() == pytest.approx(0.0, abs=1e-7)
    assert j[3].item() == pytest.approx(math.log(2), abs=1e-6)
    # partially overlapping supports with -inf logits, against the slow version
    assert j[2].item() == pytest.approx(jsd_slow(torch.softmax(p[2], -1), torch.softmax(q[2], -1)), abs=1e-6)


def test_jsd_float32_resolves_tiny_divergences():
    """Nearly identical distributions (a weak visual signal): float32 from logits must match float64 textbook to
    0.1%. The textbook float32 sum KL(p||m) + KL(q||m) fails this (its rounding floor is ~1e-8)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(64, 1024, generator=g) * 4
    b = a + 1e-3 * torch.randn(64, 1024, generator=g)
    ref = torch.tensor([jsd_slow(torch.softmax(x.double(), -1).numpy(), torch.softmax(y.double(), -1).numpy())
                        for x, y in zip(a, b)])
    assert ref.max() < 1e-6  # the regime of the tiny checkpoint's answer tokens
    got = vepo.jsd_from_logits(a, b).double()
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-12)
    assert vepo.jsd_from_logits(a, a).abs().max().item() == 0.0  # exactly zero, not a rounding floor


# ----------------------------------------------------------------------------
# selection
def batch(seed=0, B=6, T=17):
    g = torch.Generator().manual_seed(seed)
    H = torch.rand(B, T, generator=g) * 3
    J = torch.rand(B, T, generator=g) * 0.3
    dH = torch.randn(B, T, generator=g)
    lens = torch.randint(3, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lens[:, None]  # right padding, ragged
    # padded positions carry huge values: a selection that looks at them is caught
    H, J, dH = H.masked_fill(~mask, 1e3), J.masked_fill(~mask, 1e3), dH.masked_fill(~mask, 1e3)
    return H, J, dH, mask


def topk_slow(score, mask, k):
    """Indices of the round(k * n) best valid tokens, by Python sorting."""
    items = [(float(s), i) for i, (s, v) in enumerate(zip(score.flatten().tolist(), mask.flatten().tolist())) if v]
    n = round(k * len(items))
    return set(i for _, i in sorted(items, reverse=True)[:n])


def V_slow(J, dH, mask, alpha):
    m = mask.numpy()
    j, h = J.numpy().astype(np.float64), np.abs(dH.numpy()).astype(np.float64)
    return torch.tensor(alpha * j / j[m].mean() + (1 - alpha) * h / h[m].mean())


def chosen(sel):
    return set(torch.nonzero(sel.flatten()).flatten().tolist())


@pytest.mark.parametrize("k", [0.05, 0.2, 0.37, 0.5, 1.0])
@pytest.mark.parametrize("select", ["vepo", "entropy", "vision", "random"])
def test_selection_count_and_never_padding(k, select):
    H, J, dH, mask = batch(1)
    sel = vepo.vepo_token_mask(H, J, dH, mask, 0.7, k, select, generator=torch.Generator().manual_seed(3))
    assert sel.dtype == torch.bool and sel.shape == mask.shape
    assert int(sel.sum()) == round(k * int(mask.sum()))
    assert not (sel & ~mask).any()


@pytest.mark.parametrize("seed", range(4))
def test_selection_rules_match_slow(seed):
    H, J, dH, mask = batch(seed)
    k, alpha = 0.2, 0.7
    V = V_slow(J, dH, mask, alpha)
    assert chosen(vepo.vepo_token_mask(H, J, dH, mask, alpha, k, "entropy")) == topk_slow(H, mask, k)
    assert chosen(vepo.vepo_token_mask(H, J, dH, mask, alpha, k, "vision")) == topk_slow(V, mask, k)
    assert chosen(vepo.vepo_token_mask(H, J, dH, mask, alpha, k, "vepo")) == topk_slow(H.double() * V, mask, k)
    # V itself, on the valid tokens
    torch.testing.assert_close(vepo.vision_sensitivity(J, dH, mask, alpha)[mask].double(), V[mask],
                               rtol=1e-5, atol=1e-6)


def test_alpha_extremes():
    H, J, dH, mask = batch(5)
    V1 = vepo.vision_sensitivity(J, dH, mask, 1.0)
    V0 = vepo.vision_sensitivity(J, dH, mask, 0.0)
    torch.testing.assert_close(V1[mask], J[mask] / J[mask].mean())  # pure JSD
    torch.testing.assert_close(V0[mask], dH[mask].abs() / dH[mask].abs().mean())  # pure entropy gap
    assert chosen(vepo.vepo_token_mask(H, J, dH, mask, 1.0, 0.3, "vision")) == topk_slow(J, mask, 0.3)
    assert chosen(vepo.vepo_token_mask(H, J, dH, mask, 0.0, 0.3, "vision")) == topk_slow(dH.abs(), mask, 0.3)
    assert chosen(vepo.vepo_token_mask(H, J, dH, mask, 1.0, 0.3, "vepo")) == topk_slow(H * J, mask, 0.3)


def test_scale_invariance_of_normalisation():
    # dividing by the batch means makes V invariant to rescaling each signal
    H, J, dH, mask = batch(2)
    a = vepo.vepo_token_mask(H, J, dH, mask, 0.5, 0.2, "vepo")
    b = vepo.vepo_token_mask(H, J * 7.0, dH * 0.01, mask, 0.5, 0.2, "vepo")
    assert torch.equal(a, b)


def test_random_reproducible_by_seed():
    H, J, dH, mask = batch(0)
    f = lambda s: vepo.vepo_token_mask(H, J, dH, mask, 0.7, 0.2, "random", torch.Generator().manual_seed(s))
    assert torch.equal(f(11), f(11))
    assert not torch.equal(f(11), f(12))
    assert int(f(11).sum()) == round(0.2 * int(mask.sum()))


def test_zero_signals_do_not_nan():
    # an image the model ignores: JSD = dH = 0 everywhere -> V = 0, still k tokens, no NaN
    H, J, dH, mask = batch(0)
    V = vepo.vision_sensitivity(torch.zeros_like(J), torch.zeros_like(dH), mask, 0.7)
    assert torch.isfinite(V).all()
    sel = vepo.vepo_token_mask(H, torch.zeros_like(J), torch.zeros_like(dH), mask, 0.7, 0.2, "vepo")
    assert int(sel.sum()) == round(0.2 * int(mask.sum())) and not (sel & ~mask).any()


# ----------------------------------------------------------------------------
# statistics on a constructed case
def test_overlap_statistic_constructed():
    # 10 valid tokens (+2 padded), k = 0.2 -> 2 tokens per selection
    H = torch.tensor([[9., 8., 1., 1., 1., 1., 1., 1., 1., 1., 100., 100.]])
    J = torch.tensor([[.9, .1, .1, .1, .8, .1, .1, .1, .1, .1, 100., 100.]])
    dH = torch.tensor([[.1, .1, .1, .1, .1, .1, .1, .1, .7, .9, 100., 100.]])
    mask = torch.tensor([[True] * 10 + [False, False]])
    # Top-Entropy = {0, 1}; Top-JSD = {0, 4}; Top-|dH| = {9, 8}
    ent = vepo.vepo_token_mask(H, J, dH, mask, 0.7, 0.2, "entropy")
    assert chosen(ent) == {0, 1}
    s = vepo.selection_stats(ent, H, J, dH, mask, 0.7, 0.2)
    assert s["ent_miss_jsd"] == pytest.approx(0.5)  # Top-Entropy misses token 4 of Top-JSD
    assert s["ent_miss_dh"] == pytest.approx(1.0)  # and both Top-|dH| tokens
    assert s["ovl_entropy"] == pytest.approx(1.0)
    # V (alpha 0.7): mean J = 0.25, mean|dH| = 0.24 -> V_0 = .7*3.6 + .3*.1/.24, V_4 = .7*3.2 + .3*.1/.24, ...
    V = 0.7 * J / 0.25 + 0.3 * dH / 0.24
    assert chosen(vepo.vepo_token_mask(H, J, dH, mask, 0.7, 0.2, "vision")) == {0, 4}
    assert s["ovl_vision"] == pytest.approx(0.5)
    assert s["H_sel"] == pytest.approx(8.5) and s["H_rest"] == pytest.approx(1.0)
    assert s["V_sel"] == pytest.approx(float(V[0, :2].mean()), rel=1e-5)
    assert s["V_rest"] == pytest.approx(float(V[0, 2:10].mean()), rel=1e-5)
    assert vepo.overlap(torch.tensor([True, True, False]), torch.tensor([False, True, True])) == 0.5


# ----------------------------------------------------------------------------
# perturbation of pixel_values
class IP:  # the attributes of a Qwen2-VL image processor that perturb_pixels reads
    image_mean = [0.48145466, 0.4578275, 0.40821073]
    image_std = [0.26862954, 0.26130258, 0.27577711]
    temporal_patch_size, merge_size, patch_size = 2, 2, 8


def grey_pixels(n_rows=400, value=0.5):
    m, s = torch.tensor(IP.image_mean), torch.tensor(IP.image_std)
    x = ((value - m) / s)[None, :, None].expand(n_rows, 3, 2 * 64)
    return x.reshape(n_rows, -1).clone()


def to_unit(pv):
    m, s = torch.tensor(IP.image_mean), torch.tensor(IP.image_std)
    return pv.reshape(pv.shape[0], 3, 2, -1) * s[None, :, None, None] + m[None, :, None, None]


def test_gauss_noise_in_pixel_units():
    pv = grey_pixels()
    out = vepo.perturb_pixels(pv, IP, "gauss", 0.1, generator=torch.Generator().manual_seed(0))
    assert out.shape == pv.shape
    d = to_unit(out) - to_unit(pv)
    assert d.std().item() == pytest.approx(0.1, rel=0.03)  # std in 0..1 pixel units, every channel
    for c in range(3):
        assert d[:, c].std().item() == pytest.approx(0.1, rel=0.05)
    torch.testing.assert_close(d[:, :, 0], d[:, :, 1])  # same noise on both temporal copies of a still image
    big = to_unit(vepo.perturb_pixels(pv, IP, "gauss", 5.0, generator=torch.Generator().manual_seed(0)))
    assert big.min().item() >= -1e-5 and big.max().item() <= 1 + 1e-5  # clipped to valid pixels


def test_patch_blackening():
    pv = grey_pixels(4 * 500)
    out = vepo.perturb_pixels(pv, IP, "patch", mask_ratio=0.6, generator=torch.Generator().manual_seed(0))
    u = to_unit(out).reshape(500, 4, -1)  # visual tokens x their 2x2 patches
    black = (u.abs() < 1e-5).all(-1)
    same = ((u - 0.5).abs() < 1e-5).all(-1)
    assert (black | same).all()
    assert (black.all(1) | same.all(1)).all()  # a visual token is blackened whole or not at all
    assert black.all(1).float().mean().item() == pytest.approx(0.6, abs=0.06)


# ----------------------------------------------------------------------------
# the counterfactual forward on the tiny model


CKPT = ROOT / "checkpoints" / "tiny-shapes"
HAS_CKPT = (CKPT / "model.safetensors").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, processor, rows): the shipped checkpoint, else a random tiny Qwen2.5-VL; 4 reasoning rows."""
    out = str(tmp_path_factory.mktemp("shapes"))
    make_split("reasoning", "train", 4, 0, out, progress=False)
    rows = grpo.load_rows(os.path.join(out, "reasoning_train.jsonl"))
    path = str(tmp_path_factory.mktemp("tiny") / "model")
    if HAS_CKPT:
        shutil.copytree(CKPT, path)
    else:
        vlm.build_tiny([grpo.prompt_text(r) for r in rows] + ["<think>I look.</think> \\boxed{3}"], out_dir=path)
    model, processor, _ = vlm.load(path)
    return model.eval(), processor, rows


def chunk(model, processor, rows, lens=(7, 3, 5, 6)):
    """Model inputs for the rows + fixed completions of different lengths (right padding)."""
    images = [grpo.load_image(r) for r in rows]
    images[1] = images[1].resize((64, 96))  # another size: another visual token count, more left padding
    tok = processor.tokenizer
    text = tok("<think>I look at the shapes.</think> \\boxed{3}", add_special_tokens=False)["input_ids"]
    ids = torch.full((len(rows), max(lens)), tok.pad_token_id)
    for i, n in enumerate(lens):
        ids[i, :n] = torch.tensor(text[:n])
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(lens)[:, None]).long()
    return grpo.with_completion(grpo.encode(processor, rows, images), ids, mask), ids, mask


@pytest.mark.parametrize("noise", ["gauss", "patch"])
def test_perturbed_forward_same_positions_different_distributions(tiny, noise):
    model, processor, rows = tiny
    inputs, ids, mask = chunk(model, processor, rows)
    seen = []  # what the language model receives in each forward: positions and embeddings

    def hook(module, args, kwargs):
        seen.append((kwargs["position_ids"].clone(), kwargs["inputs_embeds"].clone()))
    h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        J, dH = vepo.visual_signals(model, processor.image_processor, inputs, ids, 1.0, 3, noise, 0.5, 0.6,
                                    torch.Generator().manual_seed(0))
    finally:
        h.remove()
    assert len(seen) == 4  # micro-batches of 3 + 1, a clean and a perturbed forward each
    image = inputs["input_ids"] == model.config.image_token_id
    for (pos_c, emb_c), (pos_p, emb_p), mb in zip(seen[0::2], seen[1::2], (slice(0, 3), slice(3, 4))):
        im = image[mb]
        assert torch.equal(pos_c, pos_p) and emb_c.shape == emb_p.shape  # same tokens, same 3-D positions
        assert pos_c.shape[0] == 3 and (pos_c[2][im] != pos_c[0][im]).any()  # (t, h, w) rope: really 3-D
        assert torch.equal(emb_c[~im], emb_p[~im])  # only the visual tokens change...
        assert (emb_c[im] - emb_p[im]).abs().amax(-1).gt(0).all()  # ...and every one of them does
    m = mask.bool()
    assert J.shape == dH.shape == ids.shape and torch.isfinite(J).all() and torch.isfinite(dH).all()
    assert J[m].max() > 0 and dH[m].abs().max() > 0  # the distributions move (how much: notes/vepo.md)
    assert (J[m] >= 0).all() and (J[m] <= math.log(2)).all()


def test_zero_noise_is_the_clean_forward(tiny):
    model, processor, rows = tiny
    inputs, ids, mask = chunk(model, processor, rows)
    for noise, std, ratio in (("gauss", 0.0, 0.6), ("patch", 0.5, 0.0)):  # no noise / nothing blackened
        J, dH = vepo.visual_signals(model, processor.image_processor, inputs, ids, 1.0, 4, noise, std, ratio)
        assert J[mask.bool()].abs().max().item() < 1e-6 and dH[mask.bool()].abs().max().item() < 1e-6


# ----------------------------------------------------------------------------
# the blocks inside the training loop (subprocesses on the shipped checkpoint)


needs_ckpt = pytest.mark.skipif(not HAS_CKPT, reason="needs the shipped checkpoint: a random model earns reward 0, "
                                                     "so every advantage is 0 and nothing would move")
RUN = ["--batch_size", "2", "--G", "4", "--max_new_tokens", "24", "--micro_batch_size", "8", "--eval_every", "0",
       "--save_every", "0", "--threads", "1", "--lr", "3e-4", "--beta", "0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    make_split("reasoning", "train", 16, 0, str(out), progress=False)
    make_split("reasoning", "val", 2, 0, str(out), progress=False)
    data = ["--model", str(CKPT), "--data", str(out / "reasoning_train.jsonl"),
            "--val", str(out / "reasoning_val.jsonl")]

    def run(script, name, *args):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        res = subprocess.run([sys.executable, script] + data + RUN + ["--out_dir", str(out / name)] + list(args),
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return load_file(str(out / name / "model.safetensors")), [json.loads(x) for x in open(out / name / "log.jsonl")]
    return run


@needs_ckpt
def test_k1_is_grpo_and_k0_moves_nothing(runs):
    """k = 1 keeps every token: vepo.py must then train exactly as grpo.py (the blocks touch nothing else, and
    the perturbation draws from its own generator, not the global RNG). k = 0: no policy gradient at all."""
    init = load_file(str(CKPT / "model.safetensors"))
    base, log_b = runs("grpo.py", "grpo", "--steps", "2")
    full, log_f = runs("vepo.py", "k1", "--steps", "2", "--k", "1.0")
    none, log_n = runs("vepo.py", "k0", "--steps", "1", "--k", "0.0")
    assert any(not torch.equal(base[k], init[k]) for k in base)  # GRPO did learn something from these rollouts
    assert all(torch.equal(base[k], full[k]) for k in base)
    assert [r["reward"] for r in log_b] == [r["reward"] for r in log_f]
    assert all(torch.equal(none[k], init[k]) for k in init)
    assert log_n[0]["loss"] == 0.0 and log_f[0]["t_vepo"] > 0


@pytest.mark.slow  # two more runs (~30 s); the k = 1 / k = 0 runs above already exercise the blocks
@needs_ckpt
@pytest.mark.parametrize("select,key", [("entropy", "vepo_ovl_entropy"), ("vision", "vepo_ovl_vision")])
def test_select_flag_reaches_the_selection(runs, select, key):
    _, log = runs("vepo.py", select, "--steps", "1", "--select", select)
    assert log[0][key] == 1.0  # the selection made in the loop is exactly that baseline's top-k
    sig = "H" if select == "entropy" else "V"
    assert log[0][f"vepo_{sig}_sel"] >= log[0][f"vepo_{sig}_rest"]
