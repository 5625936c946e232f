"""egg_ground.py on every model family (issue 20): the visual-token layout of each family is spatially right, not
just the right shape, and grounding gives boxes inside the image; plus the --reference_code variants of the
authors' public LLaVA code (notes/egg_ground.md, "Reference code vs paper") on hand-made inputs.

Layout check: paint a small white square on a noise image and take the change of the hooked visual output
(what the LLM sees) as a stand-in gradient. Its saliency grid (egg_ground.saliency_grid on the family's layout)
must peak in a cell whose pixel box overlaps the square, for four off-diagonal points on images of four shapes:
a transposed grid, misordered tiles, a misplaced thumbnail or a wrong crop offset puts the peak elsewhere.
The models are the tiny random ones of tests/tiny_families.py (untrained: the ViT's residual path keeps each
patch's change mostly in its own token)."""
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import egg_ground as egg  # noqa: E402
import vlm  # noqa: E402
from tiny_families import FAMILIES, build  # noqa: E402

torch.set_num_threads(1)
SHAPES = [(40, 30), (64, 48), (30, 52), (96, 40)]  # (w, h): landscape, portrait, wide: 1 to 4 tiles
POINTS = [(0.15, 0.8), (0.85, 0.25), (0.6, 0.9), (0.3, 0.3)]  # off the diagonal: a transpose moves them


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for f in FAMILIES:
        model, processor = build(f, str(tmp_path_factory.mktemp("egg-" + f)))
        out[f] = (model.eval(), processor, vlm.family(model))
    return out


def visual_output(model, processor, fam, images):
    """The hooked visual module's output for one prompt holding `images`, flattened to (N, D), and the inputs."""
    x = egg.encode(processor, images, "What colour is the small shape?")
    got = []

    def hook(module, args, out):
        v = out if torch.is_tensor(out) else out.pooler_output
        got.append(v.detach().reshape(-1, v.shape[-1]).clone())
    h = vlm.visual_module(model, fam).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(**x)
    finally:
        h.remove()
    return got[0], x


def noise(wh, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (wh[1], wh[0], 3), dtype=np.uint8))


def assert_local_changes_land_in_their_cells(model, processor, fam, shapes):
    for wh in shapes:
        base = noise(wh)
        V0, x = visual_output(model, processor, fam, [base])
        lay = egg.layouts(processor, fam, x, [base], V0.shape[0])[0]
        egg.check_layouts([lay], V0.shape[0])
        x0, y0, x1, y1 = lay["box"]
        for fx, fy in POINTS:
            cx, cy = int(fx * wh[0]), int(fy * wh[1])
            if not (x0 <= cx - 3 and cx + 3 <= x1 and y0 <= cy - 3 and cy + 3 <= y1):
                continue  # outside what the model sees (LLaVA's centre crop): tested below
            im = base.copy()
            im.paste((255, 255, 255), (cx - 3, cy - 3, cx + 3, cy + 3))
            V1, _ = visual_output(model, processor, fam, [im])
            S = egg.saliency_grid(V1 - V0, lay)
            assert S.max() > 0, (fam["model_type"], wh, (cx, cy))
            r, c = np.unravel_index(S.argmax(), S.shape)
            b = egg.cells_to_pixels((r, c, r, c), S.shape, lay["box"])
            assert b[0] < cx + 3 and cx - 3 < b[2] and b[1] < cy + 3 and cy - 3 < b[3], (fam["model_type"], wh,
                                                                                          (cx, cy), b)


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_puts_a_local_change_in_its_own_cell(models, family):
    assert_local_changes_land_in_their_cells(*models[family], SHAPES)


def test_mllama_four_tiles_row_major(models):
    """The tiny Mllama has at most 2 tiles (1 x 2 or 2 x 1), where row- and column-major tile orders agree. The same
    architecture with 4 tiles (random weights; the layout, not the quality, is under test) on a 64 x 64 image:
    a 2 x 2 canvas, so a column-major reading would swap the off-diagonal tiles."""
    import copy

    from transformers import MllamaForConditionalGeneration
    model, processor, fam = models["mllama"]
    cfg = copy.deepcopy(model.config)
    cfg.vision_config.max_num_tiles = 4
    cfg.vision_config.supported_aspect_ratios = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
    torch.manual_seed(0)
    m4 = MllamaForConditionalGeneration(cfg).eval()
    p4 = copy.deepcopy(processor)
    p4.image_processor.max_image_tiles = 4
    x = egg.encode(p4, [noise((64, 64))], "q")
    assert int(x["aspect_ratio_mask"].sum()) == 4
    assert_local_changes_land_in_their_cells(m4, p4, fam, [(64, 64), (64, 48)])


def test_llava_grid_spans_the_centre_crop_only(models):
    """LLaVA-1.5 (HF CLIPImageProcessor): resize the short side to 32, centre-crop 32 x 32. On a 64 x 48 image the
    resize gives 42 x 32 and the crop starts at int((42 - 32) / 2) = 5 -> x from 5 * 64 / 42 = 7.62 to
    37 * 64 / 42 = 56.38 in the original. A change at x < 2 is cropped away: the output must not move at all;
    one just inside must."""
    model, processor, fam = models["llava"]
    base = noise((64, 48))
    V0, x = visual_output(model, processor, fam, [base])
    lay = egg.layouts(processor, fam, x, [base], V0.shape[0])[0]
    assert lay["box"] == pytest.approx([5 * 64 / 42, 0, 37 * 64 / 42, 48])
    for box, moves in (((0, 10, 2, 30), False), ((62, 10, 64, 30), False), ((12, 10, 14, 30), True)):
        im = base.copy()
        im.paste((255, 255, 255), box)
        V1, _ = visual_output(model, processor, fam, [im])
        assert bool((V1 - V0).abs().max() > 0) == moves, box


# hand-worked layouts of a 64 x 48 image (w x h) for the tiny configs (tests/tiny_families.py):
# grid (rows, cols), extent box in pixels, coarse views' shapes, unused tokens
EXPECTED = {
    # Qwen2-VL / 2.5-VL: 8-px patches, merge 2 -> 16 px per token, 64 x 48 kept -> 3 x 4
    "qwen2_vl": ((3, 4), [0, 0, 64, 48], [], 0),
    "qwen2_5_vl": ((3, 4), [0, 0, 64, 48], [], 0),
    # Qwen3-VL: 16-px patches, merge 2 -> 32 px per token; smart_resize rounds 48 to 64 -> 2 x 2
    "qwen3_vl": ((2, 2), [0, 0, 64, 48], [], 0),
    # InternVL: aspect 4:3 ties 1x1 and 2x2 tiles; 3072 px > half of 2x2 tiles' area -> 2 x 2 tiles of 32 px,
    # 16 patches -> pixel shuffle -> 2 x 2 tokens each -> 4 x 4, plus a 2 x 2 thumbnail
    "internvl": ((4, 4), [0, 0, 64, 48], [(2, 2)], 0),
    # LLaVA: 4 x 4 over the centre crop (see above)
    "llava": ((4, 4), [5 * 64 / 42, 0, 37 * 64 / 42, 48], [], 0),
    # LLaVA-NeXT: best pinpoint 64 x 64 (2 x 2 tiles, mosaic 8 x 8 cells of 8 px); the image is 64 x 48 pasted at
    # y = 8; unpad keeps int(round(48 * 8 / 64)) = 6 rows from (8 - 6) // 2 = 1: rows 1..6 = canvas y 8..56 =
    # the image exactly; 16 padded tokens unused; the 4 x 4 base view is coarse
    "llava_next": ((6, 8), [0, 0, 64, 48], [(4, 4)], 16),
    # Mllama: canvas 1 x 2 tiles of 32 px (32 x 64), image fit to 42 x 32 at the top left; cells of 8 px:
    # ceil(32 / 8) = 4 rows, ceil(42 / 8) = 6 cols -> 48 x 64 / 42 = 73.1 px wide in the original; each tile's CLS
    # is coarse; 2 padding columns of 4 cells = 8 tokens unused
    "mllama": ((4, 6), [0, 0, 6 * 8 * 64 / 42, 48], [(1, 1), (1, 1)], 8),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_grounding_gives_the_family_grid_and_boxes_inside_the_image(models, family, tmp_path):
    model, processor, fam = models[family]
    image = noise((64, 48), seed=1)
    image.paste((220, 40, 40), (40, 8, 52, 20))
    q = "What colour is the small shape?"
    G, lays, _ = egg.entropy_gradient(model, processor, image, q)
    shape, box, coarse, unused = EXPECTED[family]
    lay = lays[0]
    assert lay["index"].shape == shape and lay["box"] == pytest.approx(box)
    assert [c.shape for c, _ in lay["coarse"]] == coarse and len(lay["unused"]) == unused
    assert G.abs().sum() > 0  # the gradient reaches the visual embeddings (Mllama: through the cross-attention)
    for reference_code in (False, True):
        g = egg.ground(model, processor, image, q, k=2, iters=2, reference_code=reference_code)
        if reference_code and family == "llava_next":  # the code reads LLaVA-1.6's base view only
            shape, box = (4, 4), [0, 0, 64, 48]
        assert g["saliency"].shape == shape and g["saliency_box"] == pytest.approx(box)
        assert g["regions"], (family, reference_code)
        for r in g["regions"]:
            x0, y0, x1, y1 = r["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 48, (family, reference_code, r["box"])
        for v in g["views"][1:]:
            assert 0 <= v["box"][0] < v["box"][2] <= 64 and 0 <= v["box"][1] < v["box"][3] <= 48
    # answering: the original plus crops in one prompt (every family's processor takes several images)
    text, p = egg.answer(model, processor, [v["image"] for v in g["views"]], q, 2)
    assert isinstance(text, str) and 0 < p <= 1
    # table 6's later decoding step: the prompt grows by a token (Mllama: its cross-attention mask too)
    G2, lays2, _ = egg.entropy_gradient(model, processor, image, q, token=2)
    assert G2.shape == G.shape and lays2[0]["index"].shape == lay["index"].shape
    # the overlay places the grid over its extent (LLaVA's crop, Mllama's padding) in an image-sized PNG
    out = egg.overlay(image, g["saliency"], [r["box"] for r in g["regions"]], str(tmp_path / "o.png"),
                      g["saliency_box"])
    assert out.size == image.size


@pytest.mark.parametrize("family", FAMILIES)
def test_joint_pass_splits_tokens_per_image(models, family):
    """--reference_code's joint pass: one prompt holding three images gives three layouts whose tokens are
    exactly those of each image alone, in order (the saliency of image 2 is read from image 2's tokens)."""
    model, processor, fam = models[family]
    ims = [noise((64, 48), 1), noise((30, 52), 2), noise((40, 30), 3)]
    V, x = visual_output(model, processor, fam, ims)
    lays = egg.layouts(processor, fam, x, ims, V.shape[0])
    egg.check_layouts(lays, V.shape[0])
    assert len(lays) == 3
    for im, lay in zip(ims, lays):
        V1, x1 = visual_output(model, processor, fam, [im])
        alone = egg.layouts(processor, fam, x1, [im], V1.shape[0])[0]
        assert lay["index"].shape == alone["index"].shape and lay["box"] == pytest.approx(alone["box"])
        # same pixels in, same tokens out, at the places the layout says (cross-image attention aside, the ViT
        # sees each image / tile alone)
        torch.testing.assert_close(V[lay["index"].ravel()], V1[alone["index"].ravel()], atol=1e-5, rtol=1e-4)


def test_llava_next_mosaic_matches_the_models_own_packing(models):
    """The model unpads and packs the tiles itself (pack_image_features): feed it token ids as features and read
    back the grid it builds; ours must be that grid, cell for cell."""
    model, processor, fam = models["llava_next"]
    for wh in SHAPES:
        im = noise(wh)
        V, x = visual_output(model, processor, fam, [im])
        lay = egg.layouts(processor, fam, x, [im], V.shape[0])[0]
        views = x["pixel_values"].shape[1]
        ids = torch.arange(V.shape[0], dtype=torch.float64).reshape(views, -1, 1)
        packed, lens = model.model.pack_image_features([ids], x["image_sizes"], "default",
                                                       image_newline=torch.tensor([-1.0], dtype=torch.float64))
        packed = packed[0][:, 0]  # one image
        n = ids.shape[1]
        assert packed[:n].tolist() == list(range(n))  # the base view first, as is
        rows = packed[n:].reshape(lay["index"].shape[0], -1)  # one newline closes each row
        assert (rows[:, -1] == -1).all()
        assert rows[:, :-1].long().numpy().tolist() == lay["index"].tolist(), wh


def test_internvl_pixel_shuffle_keeps_row_major_order(models):
    """InternVLModel.pixel_shuffle on a 4 x 4 grid whose features are their own (row, col): token (i, j) of the
    2 x 2 output must hold patches (2i..2i+1, 2j..2j+1): the two permutes cancel, no transpose."""
    model = models["internvl"][0]
    rr, cc = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    out = model.model.pixel_shuffle(torch.stack([rr, cc], -1)[None], 0.5)[0]  # (2, 2, 8)
    for i in range(2):
        for j in range(2):
            got = {(int(out[i, j, k]), int(out[i, j, k + 1])) for k in range(0, 8, 2)}
            assert got == {(2 * i + a, 2 * j + b) for a in (0, 1) for b in (0, 1)}


# ------------------------------------------------------------------ --reference_code pieces, by hand
def test_reference_mask_is_strict_and_stop_statistic_is_mass_based():
    # no smoothing (sigma 0.01 -> radius 0): sorted [0]*6 + [1, 5, 10]; the knee (max |y - x| on scaled axes) is
    # the value 1. Eq. 5 (>=) keeps the 1, the code (>) drops it.
    S = np.array([[10.0, 0, 0], [0, 0, 0], [5.0, 0, 1.0]])
    assert egg.elbow_threshold(S) == 1.0
    regs, _ = egg.regions(S, sigma=0.01)
    regs_code, H_code = egg.regions(S, sigma=0.01, reference_code=True)
    assert sorted(r["size"] for r in regs) == [1, 1, 1] and sorted(r["size"] for r in regs_code) == [1, 1]
    # code's spatial entropy: B = relu(S - 2 mean) = relu(S - 32/9); cells with B > 1: 10 -> 6.44, 5 -> 1.44;
    # they are not 8-neighbours -> two components; P = mass / total mass of B
    B = np.maximum(S - 2 * S.mean(), 0)
    P = np.array([B[0, 0], B[2, 0]]) / B.sum()
    assert H_code == pytest.approx(-(P * np.log(P)).sum())
    # 8-connectivity: a diagonal pair is one component for the code's statistic, two for eq. 7's 4-connected one
    D = np.zeros((4, 4))
    D[1, 1], D[2, 2] = 10.0, 10.0
    assert egg.spatial_entropy_code(D, 0.0) == 0.0  # one component holding all the mass
    labels, n = egg.connected_components(D > 0)
    assert n == 2 and egg.spatial_entropy(labels, n) == pytest.approx(math.log(2))
    assert egg.spatial_entropy_code(np.zeros((3, 3)), 0.0) == math.inf


def test_elbow_equals_the_codes_unscaled_chord():
    """The code's elbow_chord measures distance to the chord on raw (index, value) axes; ours scales both to
    [0, 1]. Perpendicular distance to a line is proportional to vertical distance, so the knee is the same."""
    def elbow_chord(values):  # written again from utils.elbow_chord's description
        y = np.sort(np.asarray(values, np.float64))
        x = np.arange(len(y), dtype=np.float64)
        p0, line = np.array([x[0], y[0]]), np.array([x[-1] - x[0], y[-1] - y[0]])
        u = line / np.linalg.norm(line)
        v = np.stack([x, y], 1) - p0
        return y[np.argmax(np.linalg.norm(v - (v @ u)[:, None] * u, axis=1))]
    rng = np.random.default_rng(0)
    for _ in range(50):
        v = rng.gamma(0.5, 1e-3, size=int(rng.integers(5, 600)))
        assert egg.elbow_threshold(v) == elbow_chord(v)


def test_code_box_truncates_and_caps_aspect_ratio_at_3():
    # 30 x 5 (6:1) grows to 30 x 10 about its centre (y 22.5 +- 5)
    assert egg.code_box([10.7, 20.2, 40.9, 25.3], (100, 100)) == pytest.approx([10, 17.5, 40, 27.5])
    # 4 x 20 (1:5): the code sets w = 3 h (not h / 3), so a tall box becomes a 60 x 20 wide one, clipped at 0
    assert egg.code_box([1.0, 0.0, 5.0, 20.0], (100, 100)) == pytest.approx([0, 0, 33, 20])
    assert egg.code_box([0, 0, 30, 20], (100, 100)) == [0, 0, 30, 20]  # within 3:1: as is


def test_reference_topp_is_the_unrenormalised_nucleus():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    p = torch.softmax(logits, -1)  # 0.636, 0.234, 0.086, 0.032, 0.012: the nucleus (>= 0.9) is the top 3
    assert egg.topp_entropy_code(logits).item() == pytest.approx(-(p[:3] * p[:3].log()).sum().item(), rel=1e-12)
    q = p[:3] / p[:3].sum()
    assert egg.topp_entropy(logits).item() == pytest.approx(-(q * q.log()).sum().item(), rel=1e-12)


def test_stop_rules_paper_vs_reference_code(monkeypatch):
    """Scripted spatial entropies per round, one component per round: the top-left quarter of the newest view, so
    round t's crop is the original's top-left 64 / 2^(t+1) pixels and tells which round's views came back.
    Paper (algorithm 1): stop at the first H_t >= H_{t-1}, return the views of round t-1 (its crops).
    Code: stop at the first H_t > H_{t-1} or H_t = 0, return the views built from round t."""
    image = Image.new("RGB", (64, 64))
    lay = egg._grid(np.arange(16).reshape(4, 4), (0, 0, 64, 64))

    def scripted(script):
        calls = []

        def fake(model, processor, views, question, objective, token, sigma, reference_code, cache):
            H = script[len(calls)]
            calls.append(len(views))
            reg = dict(cells=(0, 0, 1, 1), score=1.0, size=4)  # top-left quarter of the newest view
            return [(np.ones((4, 4)), lay, [reg] if i == len(views) - 1 else [], H) for i in range(len(views))]
        return fake, calls

    def run(script, reference_code):
        fake, calls = scripted(script)
        monkeypatch.setattr(egg, "view_maps", fake)
        return egg.ground(None, None, image, "q", k=1, iters=10, reference_code=reference_code)

    # falls, falls, rises: paper stops at round 2 keeping round 1's crop; code keeps round 2's crop too
    g = run([0.9, 0.5, 0.7, 0.1], False)
    assert g["iterations"] == 3 and g["history"][-1]["criterion"] == 0.7
    g_code = run([0.9, 0.5, 0.7, 0.1], True)
    assert g_code["iterations"] == 3
    assert g["views"][1]["box"] == pytest.approx([0, 0, 16, 16])  # round 1's crop (V_2 in the paper's indexing)
    assert g_code["views"][1]["box"] == pytest.approx([0, 0, 8, 8])  # round 2's: one step further
    assert g["regions"][0]["box"] == pytest.approx([0, 0, 16, 16]) and g_code["regions"][0]["box"] == pytest.approx(
        [0, 0, 8, 8])
    # a tie: the paper stops (>=), the code goes on (>)
    assert run([0.9, 0.9, 0.3, 0.4], False)["iterations"] == 2
    assert run([0.9, 0.9, 0.3, 0.4], True)["iterations"] == 4
    # H = 0 (one blob): the code stops at once, keeping that round's crop; the paper accepts it, then stops at the
    # next round (0 >= 0)
    assert run([0.0, 0.0, 0.0], True)["iterations"] == 1 and len(run([0.0, 0.0, 0.0], True)["views"]) == 2
    assert run([0.0, 0.0, 0.0], False)["iterations"] == 2
    # round caps: T = 3 (paper), 16 (code) when iters is not given
    monkeypatch.setattr(egg, "view_maps", scripted([1.0 - 0.01 * i for i in range(40)])[0])
    assert egg.ground(None, None, image, "q", k=1)["iterations"] == 3
    monkeypatch.setattr(egg, "view_maps", scripted([1.0 - 0.01 * i for i in range(40)])[0])
    assert egg.ground(None, None, image, "q", k=1, reference_code=True)["iterations"] == 16
