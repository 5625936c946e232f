"""
Entropy-gradient grounding (EGG, seed 004): training-free evidence retrieval in one file.

    python egg_ground.py --image data/shapes/images/detail_test/00000.png \\
        --question "What colour is the small shape?" --out figs/egg/detail_test_00000.png
    python egg_ground.py --data data/shapes/detail_test.jsonl --iters 1     # single pass
    python egg_ground.py --data data/shapes/detail_test.jsonl               # iterative (spatial-entropy stop)
    python egg_ground.py --data data/shapes/detail_test.jsonl --reference_code true  # as the authors' code

1. Backpropagate the entropy of the first next-token distribution to the projected visual
   embeddings V (the visual module's output, what the LLM sees); saliency s_i = ||dH/dV_i||_2
   on the visual-token grid (eqs. 1-4).
2. Smooth, threshold at the elbow of the sorted values, connected components, score each by the
   sum of unsmoothed saliency, map to boxes in image pixels (sec. 3.3, eqs. 5-6).
3. Iterate over views = {image} + crops, pooling components of all views, keep global top-K,
   stop when the spatial entropy of the best view's mask stops falling (appendix A, eqs. 7-8).
4. Answer greedily with the original image plus the final crops as extra images.
Ablations (tables 2, 3, 4, 6): --objective entropy|topp|maxprob, --k, --stop
spatial|confidence|iters, --token t. The model is frozen; nothing is trained.
Every family in vlm.FAMILIES: layouts() says where each visual token lies in the image (Qwen's merged
grid, InternVL's tiles + thumbnail, LLaVA's centre crop, LLaVA-NeXT's unpadded anyres mosaic + base
view, Mllama's tiles + per-tile CLS). --reference_code follows the authors' public LLaVA code where it
departs from the paper (notes/egg_ground.md, "Reference code vs paper").
"""
import argparse
import json
import math
import os
import random
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

import vlm
from grpo import PROMPTS, iou, load_image, load_rows, with_completion

DETAIL_PROMPT = PROMPTS["detail"]  # appendix G's open-ended prompt; the tiny model is SFT-trained on it

# ----------------------------------------------------------------------------
# config: plain defaults, any of them overridable as --name value
config = dict(
    model="checkpoints/tiny-shapes",  # local path or hub id
    image="", question="", out="figs/egg/overlay.png",  # single image -> answer, boxes, PNG
    data="", n=0,  # or a jsonl split (n > 0: its first n rows)
    objective="entropy",  # entropy | topp | maxprob (table 3)
    k=2,  # regions kept per iteration (table 4)
    stop="spatial",  # spatial | confidence | iters (table 2)
    iters=0,  # max iterations T of algorithm 1 (1 = single pass; 0 = 3, or 16 with --reference_code)
    token=1,  # decoding step whose distribution is backpropagated (table 6)
    sigma=1.5,  # Gaussian smoothing on the token grid (sec. 3.3)
    zoom=1.0,  # crops are resized to zoom x the original's longer side (0: native crop pixels)
    reference_code=False,  # follow the authors' public LLaVA code where it differs from the paper (notes/egg_ground.md)
    max_new_tokens=16, seed=0, device="cuda" if torch.cuda.is_available() else "cpu",
    dtype="float32", threads=0,
)


def parse_config(defaults, argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    for k, v in defaults.items():
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(v, bool) else type(v)
        p.add_argument(f"--{k}", type=kind, default=v)
    return vars(p.parse_args(argv))


# ----------------------------------------------------------------------------
# objectives on the next-token logits (eq. 2 and table 3's alternatives), in float32 or wider
def wide(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


def entropy(logits):
    logp = torch.log_softmax(wide(logits), -1)
    return -(logp.exp() * logp).sum()


def topp_entropy(logits, p=0.9):
    """Entropy of the renormalised smallest token set holding >= p of the mass (the set is fixed, not differentiated)."""
    probs = torch.softmax(wide(logits), -1)
    sp, order = probs.sort(descending=True)
    keep = order[: int((sp.cumsum(0) < p).sum()) + 1]
    return entropy(logits[keep])


def topp_entropy_code(logits, p=0.9):
    """--reference_code's top-p objective (utils.calc_grad, mode 'entropyTopP'): -sum p log p over the nucleus of
    the full softmax, not renormalised (the gradient also flows through the full normalisation)."""
    probs = torch.softmax(wide(logits), -1)
    sp, order = probs.sort(descending=True)
    keep = order[: int((sp.cumsum(0) < p).sum()) + 1]
    return -(probs[keep] * probs[keep].log()).sum()


def maxprob(logits):
    return torch.log_softmax(wide(logits), -1).max()  # log of the top-1 probability (ViCrop's pure-grad)


OBJECTIVES = dict(entropy=entropy, topp=topp_entropy, maxprob=maxprob)


# ----------------------------------------------------------------------------
# step 1: saliency on the visual-token grid (sec. 3.2)
def _size(d, key):
    """A processor size field, whether it is a SizeDict or a plain dict."""
    return d.get(key) if isinstance(d, dict) else getattr(d, key, None)


def _grid(index, box, coarse=(), unused=()):
    """A layout: `index` (rows, cols) = row of G at each cell, the cells spanning `box` (x0, y0, x1, y1, pixels of
    the image; may reach past its edges, e.g. over padding); `coarse` = [(index, box)] global views (thumbnail,
    base view, Mllama's per-tile CLS) whose tokens each describe a larger area; `unused` = rows of G that describe
    no image location (Mllama's padding tiles, LLaVA-NeXT's padded mosaic cells)."""
    return dict(index=np.asarray(index), box=[float(v) for v in box], coarse=list(coarse), unused=list(unused))


def layouts(processor, fam, inputs, images, N, reference_code=False):
    """Where each row of G (the hooked visual module's output, flattened to (N, D)) lies in each image of a
    one-prompt input (N rows): one layout per image, in the order the visual module emits the tokens.
    The per-family arithmetic below follows transformers' image processors and models (notes/egg_ground.md)."""
    t, ip, out, off = fam["model_type"], processor.image_processor, [], 0
    if t in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        # patches are grouped in merge x merge blocks in row-major order, one token per block; the resize keeps
        # the whole image (no crop), so the grid spans it
        m = ip.merge_size
        for im, (tt, h, w) in zip(images, inputs["image_grid_thw"].tolist()):
            if tt != 1:
                raise ValueError(f"expected one temporal patch for an image, got image_grid_thw {tt, h, w}")
            n = (h // m) * (w // m)
            out.append(_grid(off + np.arange(n).reshape(h // m, w // m), (0, 0) + im.size))
            off += n
    elif t == "internvl":
        # GotOcr2ImageProcessor.crop_to_patches: the image is resized (aspect not kept) to cols x rows tiles, cut
        # row-major, plus a thumbnail of the whole image last when there is more than one tile. Per tile the ViT's
        # f x f patches are pixel-shuffled by downsample_ratio (2x2 neighbours -> one token, still row-major; the
        # two permutes in InternVLModel.pixel_shuffle cancel) and projected: q x q tokens per tile.
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas
        seq = processor.image_seq_length
        q = math.isqrt(seq)
        th, tw = _size(ip.size, "height"), _size(ip.size, "width")
        for im in images:
            cols, rows = 1, 1
            if ip.crop_to_patches and ip.max_patches > 1:
                cols, rows = get_optimal_tiled_canvas((im.height, im.width), (th, tw), ip.min_patches, ip.max_patches)
            index = np.zeros((rows * q, cols * q), int)
            for k in range(rows * cols):
                r, c = divmod(k, cols)
                index[r * q:(r + 1) * q, c * q:(c + 1) * q] = off + k * seq + np.arange(seq).reshape(q, q)
            off += rows * cols * seq
            coarse = []
            if rows * cols > 1:  # the thumbnail: q x q tokens over the whole image
                coarse.append((off + np.arange(seq).reshape(q, q), (0, 0) + im.size))
                off += seq
            out.append(_grid(index, (0, 0) + im.size, coarse))
        if off != inputs["pixel_values"].shape[0] * seq:
            raise RuntimeError(f"InternVL: {inputs['pixel_values'].shape[0]} tiles in pixel_values, but the tiling "
                               f"arithmetic gives {off // seq}: processor settings this file does not know")
    elif t == "llava":
        # one CLIP grid (CLS dropped) over what the processor kept: [pad to square], resize, centre crop
        from transformers.image_transforms import get_resize_output_image_size
        ch, cw = _size(ip.crop_size, "height"), _size(ip.crop_size, "width")  # the crop is the ViT's input
        p = processor.patch_size
        for im in images:
            W, H = im.size
            x0, y0, fw, fh = 0.0, 0.0, W, H  # the frame (original pixels) that the processed image shows
            if getattr(ip, "do_pad", False):  # LlavaImageProcessor.pad_to_square: centred
                s = max(W, H)
                x0, y0, fw, fh = -((s - W) // 2), -((s - H) // 2), s, s
            rh, rw = fh, fw
            if ip.do_resize:
                if _size(ip.size, "shortest_edge"):
                    rh, rw = get_resize_output_image_size(np.zeros((fh, fw, 3)), _size(ip.size, "shortest_edge"),
                                                          default_to_square=False, input_data_format="channels_last")
                else:
                    rh, rw = _size(ip.size, "height"), _size(ip.size, "width")
            top, left = 0, 0
            if ip.do_center_crop:  # TorchvisionBackend.center_crop: pads (centred) if the crop is bigger, then int()
                top = -((ch - rh) // 2) if ch > rh else int((rh - ch) / 2.0)
                left = -((cw - rw) // 2) if cw > rw else int((rw - cw) / 2.0)
            else:
                ch, cw = rh, rw
            sx, sy = fw / rw, fh / rh
            box = (x0 + left * sx, y0 + top * sy, x0 + (left + cw) * sx, y0 + (top + ch) * sy)
            g = (ch // p, cw // p)
            cls = N // max(1, len(images)) == g[0] * g[1] + 1  # vision_feature_select_strategy "full": CLS kept
            coarse = [(np.array([[off]]), box)] if cls else []  # the CLS token describes the whole crop
            out.append(_grid(off + cls + np.arange(g[0] * g[1]).reshape(g), box, coarse))
            off += g[0] * g[1] + cls
    elif t == "llava_next":
        # anyres: view 0 = the whole image squashed to the ViT's size (n x n tokens), then the image resized
        # (aspect kept, ceil), pasted centred on the best pinpoint canvas and cut row-major into tiles; the model
        # lays the tiles' tokens out as one mosaic and drops the padded rows / columns (pack_image_features,
        # unpad_image), so the grid is the unpadded mosaic and the base view is a coarse view of the whole image
        from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
        tile = _size(ip.crop_size, "height")  # the ViT's input size = one tile
        n = tile // processor.patch_size
        pins = ip.image_grid_pinpoints
        for im, (H, W) in zip(images, inputs["image_sizes"].tolist()):
            bh, bw = select_best_resolution((H, W), pins)
            nh, nw = get_patch_output_size(np.zeros((H, W, 3)), (bh, bw), "channels_last")
            px, py = (bw - nw) // 2, (bh - nh) // 2
            rows, cols = bh // tile, bw // tile
            base = off + np.arange(n * n).reshape(n, n)
            mosaic = np.zeros((rows * n, cols * n), int)
            for k in range(rows * cols):
                r, c = divmod(k, cols)
                mosaic[r * n:(r + 1) * n, c * n:(c + 1) * n] = off + (1 + k) * n * n + np.arange(n * n).reshape(n, n)
            off += (1 + rows * cols) * n * n
            R, C = mosaic.shape  # unpad_image, same arithmetic
            r0, r1, c0, c1 = 0, R, 0, C
            if W / H > C / R:
                pad = (R - int(round(H * C / W, 7))) // 2
                r0, r1 = pad, R - pad
            else:
                pad = (C - int(round(W * R / H, 7))) // 2
                c0, c1 = pad, C - pad
            cell = tile / n  # canvas pixels per cell; canvas -> original pixels: (x - px) * W / nw
            box = ((c0 * cell - px) * W / nw, (r0 * cell - py) * H / nh, (c1 * cell - px) * W / nw,
                   (r1 * cell - py) * H / nh)
            if reference_code:  # the authors' code feeds LLaVA-1.6 the base view only ('flat', image_tensor[0])
                out.append(_grid(base, (0, 0, W, H), unused=list(mosaic.ravel())))
            else:
                out.append(_grid(mosaic[r0:r1, c0:c1], box, [(base, (0, 0, W, H))],
                                 unused=sorted(set(mosaic.ravel()) - set(mosaic[r0:r1, c0:c1].ravel()))))
    elif t == "mllama":
        # the image is resized (aspect kept) to fit the best tile canvas, padded right / bottom, cut row-major into
        # tiles; per tile the projector emits CLS + n x n patches (the ViT's padding to a multiple of 8 is sliced
        # off before the output), for max_image_tiles tiles (the unused ones are padding, masked out of the
        # cross-attention). The grid is the mosaic trimmed to the cells the image covers; each tile's CLS is a
        # coarse view of its tile.
        from transformers.models.mllama.image_processing_mllama import (get_image_size_fit_to_canvas,
                                                                         get_optimal_tiled_canvas)
        tile, T = _size(ip.size, "height"), ip.max_image_tiles
        per = N // max(1, len(images) * T)  # tokens per tile: CLS + n x n
        n = math.isqrt(max(per - 1, 0))
        if len(images) * T * per != N or n * n != per - 1:
            raise RuntimeError(f"Mllama: {N} visual tokens are not {len(images)} images x {T} tiles x (1 + n^2)")
        cell = tile / n  # canvas pixels per cell
        for i, im in enumerate(images):
            W, H = im.size
            cph, cpw = get_optimal_tiled_canvas(H, W, T, tile)
            nh, nw = get_image_size_fit_to_canvas(H, W, cph, cpw, tile)
            rows, cols = cph // tile, cpw // tile
            if int(inputs["aspect_ratio_mask"][0, i].sum()) != rows * cols:
                raise RuntimeError(f"Mllama image {i}: aspect_ratio_mask has "
                                   f"{int(inputs['aspect_ratio_mask'][0, i].sum())} tiles, the tiling arithmetic "
                                   f"gives {rows} x {cols}: processor settings this file does not know")
            sx, sy = W / nw, H / nh  # canvas -> original pixels (the image sits at the canvas' top left)
            mosaic, coarse = np.zeros((rows * n, cols * n), int), []
            for k in range(rows * cols):
                r, c = divmod(k, cols)
                first = off + k * per
                mosaic[r * n:(r + 1) * n, c * n:(c + 1) * n] = first + 1 + np.arange(n * n).reshape(n, n)
                coarse.append((np.array([[first]]), (c * tile * sx, r * tile * sy, (c + 1) * tile * sx,
                                                     (r + 1) * tile * sy)))
            R, C = math.ceil(nh / cell), math.ceil(nw / cell)  # cells holding some image (the rest is padding)
            unused = list(range(off + rows * cols * per, off + T * per)) + list(mosaic[R:].ravel()) + list(
                mosaic[:R, C:].ravel())
            out.append(_grid(mosaic[:R, :C], (0, 0, C * cell * sx, R * cell * sy), coarse, unused))
            off += T * per
    else:
        raise NotImplementedError(f"egg_ground.py does not know the visual-token layout of family '{t}'")
    return out


def check_layouts(lays, N):
    """Every row of G must sit in exactly one place (a grid cell, a coarse view, or unused): else the layout is
    wrong for this processor / model and a saliency map would silently mix up locations."""
    ids = np.concatenate([np.concatenate([l["index"].ravel()] + [c.ravel() for c, _ in l["coarse"]]
                                         + [np.asarray(l["unused"], int)]) for l in lays])
    if len(ids) != N or not np.array_equal(np.sort(ids), np.arange(N)):
        raise RuntimeError(f"the layout places {len(ids)} tokens ({len(set(ids.tolist()))} distinct) but the "
                           f"visual module emitted {N}")


def _share(fine, coarse):
    """A[i, j] = share of coarse interval j (edges `coarse`) inside fine interval i (edges `fine`), over the part
    of j that the fine intervals cover."""
    A = np.clip(np.minimum(fine[1:, None], coarse[None, 1:]) - np.maximum(fine[:-1, None], coarse[None, :-1]), 0, None)
    s = A.sum(0, keepdims=True)
    return np.divide(A, s, out=np.zeros_like(A), where=s > 0)


def saliency_grid(G, layout):
    """s_i = ||dL/dV||_2 over every embedding that shows location i (eq. 4): the cell's own token, plus each
    coarse token (thumbnail, base view, tile CLS) whose squared norm is shared among the cells it covers in
    proportion to overlap. The squared saliency thus sums to the squared gradient norm of all placed tokens."""
    sq = (wide(G) ** 2).sum(-1).cpu().numpy().astype(np.float64)
    S2 = sq[layout["index"]]
    R, C = S2.shape
    x0, y0, x1, y1 = layout["box"]
    fy, fx = np.linspace(y0, y1, R + 1), np.linspace(x0, x1, C + 1)
    for idx, (a0, b0, a1, b1) in layout["coarse"]:
        r, c = idx.shape
        S2 = S2 + _share(fy, np.linspace(b0, b1, r + 1)) @ sq[idx] @ _share(fx, np.linspace(a0, a1, c + 1)).T
    return np.sqrt(S2)


def user_prompt(processor, text, n_images):
    """The family's own chat template, n images then the text (the tiny template moves the text first)."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)


def encode(processor, images, question):
    """One prompt holding all images (processors take one list of images per prompt; Mllama requires it)."""
    return processor(text=[user_prompt(processor, DETAIL_PROMPT.format(question=question), len(images))],
                     images=[list(images)], return_tensors="pt")


def objective_fn(objective, reference_code=False):
    if callable(objective):
        return objective
    if objective == "topp" and reference_code:
        return topp_entropy_code
    return OBJECTIVES[objective]


def entropy_gradient(model, processor, images, question, objective="entropy", token=1, reference_code=False):
    """G = dL/dV (eq. 3) for the projected visual embeddings of one prompt holding `images` (one image or a list):
    (G [N, D] in the visual module's order, [layout per image], info)."""
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    fam = vlm.family(model)
    inputs = encode(processor, images, question).to(model.device)
    if token > 1:  # table 6: unroll t-1 greedy steps first, then differentiate step t
        with torch.no_grad():
            new = model.generate(**inputs, do_sample=False, max_new_tokens=token - 1)[:, inputs["input_ids"].shape[1]:]
        inputs = with_completion(inputs, new, torch.ones_like(new))  # extends mm_token_type_ids / Mllama's mask
    leaves = []

    def hook(module, args, out):
        # swap the visual embeddings for leaves that require grad; everything upstream stays frozen
        def leaf(x):
            leaves.append(x.detach().requires_grad_(True))
            return leaves[-1]
        if torch.is_tensor(out):
            return leaf(out)
        out.pooler_output = leaf(out.pooler_output)  # Qwen: merged tokens, original order
        if getattr(out, "deepstack_features", None):  # Qwen3-VL also feeds merged tokens to early LLM layers
            out.deepstack_features = [leaf(f) for f in out.deepstack_features]
        return out

    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    handle = vlm.visual_module(model, fam).register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(**inputs, logits_to_keep=1).logits[0, -1]
            L = objective_fn(objective, reference_code)(logits)
            grads = torch.autograd.grad(L, leaves)
    finally:
        handle.remove()
        for p in frozen:
            p.requires_grad_(True)
    # per token: all of its embeddings (Qwen3-VL: main + deepstack); Mllama's (1, images, tiles, tokens, D) and
    # LLaVA's (views, tokens, D) flattened in their own order
    G = torch.cat([wide(g).reshape(-1, g.shape[-1]) for g in grads], -1)
    lays = layouts(processor, fam, inputs, images, G.shape[0], reference_code)
    check_layouts(lays, G.shape[0])
    info = dict(objective=L.item(), maxprob=torch.softmax(wide(logits), -1).max().item())
    return G, lays, info


def entropy_gradient_map(model, processor, image, question, objective="entropy", token=1, reference_code=False):
    """Saliency (eq. 4) on the image's token grid, as a numpy array (its extent: layouts(...)["box"])."""
    G, lays, _ = entropy_gradient(model, processor, image, question, objective, token, reference_code)
    return saliency_grid(G, lays[0])


# ----------------------------------------------------------------------------
# step 2: regions from a saliency grid (sec. 3.3) -- numpy, no scipy
def gaussian_smooth(S, sigma=1.5):
    """Separable Gaussian filter, radius 4 sigma, mirrored edges (scipy.ndimage.gaussian_filter's defaults)."""
    r = int(4 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    out = np.asarray(S, dtype=np.float64)
    for axis in (0, 1):
        a = np.moveaxis(out, axis, 0)
        p = np.pad(a, [(r, r), (0, 0)], mode="symmetric")
        a = sum(k[j] * p[j:j + a.shape[0]] for j in range(2 * r + 1))
        out = np.moveaxis(a, 0, axis)
    return out


def elbow_threshold(values):
    """Kneedle: the sorted value farthest from the chord joining min and max (both axes scaled to [0, 1])."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if len(v) < 3 or v[-1] - v[0] <= 0:
        return v[0]  # flat: no elbow, everything is "on"
    x = np.linspace(0, 1, len(v))
    y = (v - v[0]) / (v[-1] - v[0])
    return v[np.argmax(np.abs(y - x))]


def connected_components(mask, diagonal=False):
    """4-connected (diagonal: 8-connected) labels (0 = off, 1..n in raster order of their first cell) and n."""
    mask = np.asarray(mask, bool)
    labels, n = np.zeros(mask.shape, int), 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        n += 1
        labels[start], stack = n, [start]
        while stack:
            r, c = stack.pop()
            steps = [(-1, 0), (1, 0), (0, -1), (0, 1)] + ([(-1, -1), (-1, 1), (1, -1), (1, 1)] if diagonal else [])
            for rr, cc in ((r + dr, c + dc) for dr, dc in steps):
                if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not labels[rr, cc]:
                    labels[rr, cc] = n
                    stack.append((rr, cc))
    return labels, n


def component_scores(labels, n, S):
    """w_j = sum of the unsmoothed saliency inside component j (eq. 6), for j = 1..n."""
    return np.bincount(labels.ravel(), weights=np.asarray(S, np.float64).ravel(), minlength=n + 1)[1:]


def spatial_entropy(labels, n):
    """H(M) = -sum_i P(C_i) log P(C_i), P(C_i) = |C_i| / sum_j |C_j| (eqs. 7-8); 0 for an empty mask."""
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    if sizes.sum() == 0:
        return 0.0
    P = sizes / sizes.sum()
    return float(-(P * np.log(P)).sum())


def spatial_entropy_code(Ss, tau):
    """--reference_code's stop statistic (utils.spatial_entropy): on B = relu(S~ - 2 mean S~), the cells with
    B > tau, 8-connected; P(C_j) = sum of B in C_j / sum of B over the whole grid (mass, not size, and the
    P's need not sum to 1); inf when B is all zero."""
    B = np.maximum(Ss - 2 * Ss.mean(), 0.0)
    if B.sum() <= 0:
        return math.inf
    labels, n = connected_components(B > tau, diagonal=True)
    P = component_scores(labels, n, B) / B.sum()
    P = P[P > 0]
    return float(-(P * np.log(P)).sum())


def regions(S, sigma=1.5, reference_code=False):
    """All components of one saliency grid, best first: ([dict(cells=(r0, c0, r1, c1), score, size)], H(M)).
    reference_code: the mask is S~ > tau (the code) instead of eq. 5's >=, and H is spatial_entropy_code."""
    S = np.asarray(S, np.float64)
    if not np.any(S > 0):
        return [], (math.inf if reference_code else 0.0)  # no gradient at all: no evidence, nothing to crop
    Ss = gaussian_smooth(S, sigma)
    tau = elbow_threshold(Ss)
    labels, n = connected_components(Ss > tau if reference_code else Ss >= tau)  # eq. 5
    w = component_scores(labels, n, S)
    out = []
    for j in range(1, n + 1):
        rr, cc = np.nonzero(labels == j)
        out.append(dict(cells=(rr.min(), cc.min(), rr.max(), cc.max()), score=float(w[j - 1]), size=len(rr)))
    H = spatial_entropy_code(Ss, tau) if reference_code else spatial_entropy(labels, n)
    return sorted(out, key=lambda d: -d["score"]), H


# ----------------------------------------------------------------------------
# boxes: token cells -> view pixels -> original pixels
def cells_to_pixels(cells, grid, box):
    """Token cells (r0, c0, r1, c1), inclusive, of a rows x cols grid spanning `box` (x0, y0, x1, y1) -> pixels."""
    (r0, c0, r1, c1), (gh, gw), (x0, y0, x1, y1) = cells, grid, box
    sx, sy = (x1 - x0) / gw, (y1 - y0) / gh
    return [float(x0 + c0 * sx), float(y0 + r0 * sy), float(x0 + (c1 + 1) * sx), float(y0 + (r1 + 1) * sy)]


def clip_box(box, wh):
    """A box clipped to a w x h image (a grid may reach over padding or a crop margin); None if nothing is left."""
    b = [max(0.0, box[0]), max(0.0, box[1]), min(float(wh[0]), box[2]), min(float(wh[1]), box[3])]
    return b if b[2] > b[0] and b[3] > b[1] else None


def code_box(box, wh, max_ratio=3.0):
    """--reference_code's crop box (inference_llava.VQADataset._crop_image): corners truncated to ints, then
    adjust_box_aspect_ratio: a box thinner than 3:1 grows about its centre to 3:1, clipped to the image."""
    x0, y0 = int(box[0]), int(box[1])
    x1, y1 = int(x0 + (box[2] - box[0])), int(y0 + (box[3] - box[1]))
    w, h = x1 - x0, y1 - y0
    if w <= 0 or h <= 0:
        return [x0, y0, x1, y1]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if w / h > max_ratio:
        h = w / max_ratio
    elif w / h < 1 / max_ratio:
        w = h * max_ratio
    return [max(0, cx - w / 2), max(0, cy - h / 2), min(wh[0], cx + w / 2), min(wh[1], cy + h / 2)]


def map_box(box, view_box, view_wh):
    """A box in a view's pixels -> pixels of the original image (the view shows view_box, resized to view_wh)."""
    sx, sy = (view_box[2] - view_box[0]) / view_wh[0], (view_box[3] - view_box[1]) / view_wh[1]
    return [view_box[0] + box[0] * sx, view_box[1] + box[1] * sy, view_box[0] + box[2] * sx, view_box[1] + box[3] * sy]


def crop_view(view, box, zoom, long_side):
    """A new view: `box` (view pixels) cropped outward to whole pixels, resized so its longer side is zoom x long_side."""
    W, H = view["image"].size
    b = [max(0, math.floor(box[0])), max(0, math.floor(box[1])), min(W, math.ceil(box[2])), min(H, math.ceil(box[3]))]
    im = view["image"].crop(b)
    if zoom > 0:  # native-resolution models would otherwise see a crop as a handful of tokens: no zoom at all
        s = zoom * long_side / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)
    return dict(image=im, box=map_box(b, view["box"], (W, H)))


# ----------------------------------------------------------------------------
# steps 3-4: iterative refinement (appendix A, algorithm 1) and answering
@torch.no_grad()
def answer(model, processor, images, question, max_new_tokens=16):
    """Greedy answer from one prompt holding all images: (text, max probability of its first token)."""
    inputs = encode(processor, images, question).to(model.device)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                         output_logits=True, return_dict_in_generate=True)
    text = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    return text.strip(), torch.softmax(out.logits[0][0].float(), -1).max().item()


def view_maps(model, processor, views, question, objective, token, sigma, reference_code, cache):
    """(S, layout, regions, H) per view. The paper: one forward + backward per view (the original's is cached:
    it recurs every iteration). reference_code: one joint pass over all views in one prompt, as the authors'
    code does (refine_big: the crops' tokens follow the original's and the gradient is split per view)."""
    if reference_code:
        G, lays, _ = entropy_gradient(model, processor, [v["image"] for v in views], question, objective, token, True)
        return [(S, lay) + regions(S, sigma, True) for lay in lays for S in [saliency_grid(G, lay)]]
    out = []
    for v in views:
        key = (tuple(round(c, 3) for c in v["box"]), v["image"].size)
        if key not in cache:
            G, lays, _ = entropy_gradient(model, processor, v["image"], question, objective, token)
            S = saliency_grid(G, lays[0])
            cache[key] = (S, lays[0]) + regions(S, sigma)
        out.append(cache[key])
    return out


def ground(model, processor, image, question, k=2, iters=0, stop="spatial", objective="entropy", token=1,
           sigma=1.5, zoom=1.0, reference_code=False):
    """Algorithm 1. Returns dict(views: [original, crop 1 (best), ...] each with its box in original pixels,
    regions: the selected components (box, score), saliency: the original's first grid and saliency_box its
    extent in original pixels, iterations, history). iters 0: T = 3 (paper), 16 with reference_code.
    reference_code stops as inference_llava.run_refinement_loop does: when H_t > H_{t-1} (strictly; eq. 7's
    algorithm stops at >=), when H_t = 0, or after 16 rounds, and it returns the views built from round t
    (algorithm 1 returns those of round t-1)."""
    if stop not in ("spatial", "confidence", "iters"):
        raise ValueError(f"--stop must be spatial, confidence or iters, not '{stop}'")
    iters = iters or (16 if reference_code else 3)
    long_side = max(image.size)
    views = [dict(image=image, box=[0.0, 0.0, float(image.width), float(image.height)])]
    # the code's first previous entropy is 1000 (start_ent), so an empty map's inf stops it at once
    chosen, prev, history, cache, first = [], (1000.0 if reference_code else math.inf), [], {}, None
    for t in range(iters):
        pool = []
        for vi, (v, (S, lay, regs, H)) in enumerate(zip(views, view_maps(
                model, processor, views, question, objective, token, sigma, reference_code, cache))):
            first = first or (S, lay["box"])
            for r in regs:  # pool the components of every view (algorithm 1, inner loop)
                px = clip_box(cells_to_pixels(r["cells"], lay["index"].shape, lay["box"]), v["image"].size)
                if px is None:  # a component over padding only (Mllama, LLaVA's pad-to-square): no pixels
                    continue
                if reference_code:
                    px = code_box(px, v["image"].size)
                pool.append(dict(r, view=vi, view_px=px, box=map_box(px, v["box"], v["image"].size), view_H=H))
        top = sorted(pool, key=lambda d: -d["score"])[:k]
        if not top:
            break
        if stop == "spatial":  # eq. 7 on the mask of the view holding the best component
            q = top[0]["view_H"]
        elif stop == "confidence":  # table 2's alternative: stop when the first answer token's max prob drops
            q = -answer(model, processor, [v["image"] for v in views], question, 1)[1]
        else:
            q = -t  # fixed number of iterations: always "improves"
        history.append(dict(iteration=t, criterion=q, boxes=[d["box"] for d in top]))
        nxt = [views[0]] + [crop_view(views[d["view"]], d["view_px"], zoom, long_side) for d in top]
        if reference_code:
            views, chosen = nxt, top
            if q > prev or (stop == "spatial" and q == 0):
                break
            prev = q
            continue
        if q >= prev:
            break
        prev, chosen, views = q, top, nxt
    return dict(views=views, regions=[dict(box=d["box"], score=d["score"]) for d in chosen],
                saliency=first[0] if first else None, saliency_box=first[1] if first else None,
                iterations=len(history), history=history)


# ----------------------------------------------------------------------------
# output: heat-map overlay with numbered boxes
def overlay(image, S, boxes, path, box=None):
    """Write image + saliency (upsampled over its extent `box`, default the whole image; jet-like colours, opacity
    rising with saliency) + numbered boxes (1 = best, red) as a PNG of the image's size."""
    x0, y0, x1, y1 = box or (0, 0) + image.size
    up = np.asarray(Image.fromarray(np.asarray(S, np.float32)).resize(
        (max(1, round(x1 - x0)), max(1, round(y1 - y0))), Image.BILINEAR))
    ys, xs = np.arange(image.height) - round(y0), np.arange(image.width) - round(x0)  # image pixel -> extent pixel
    inside = (ys[:, None] >= 0) & (ys[:, None] < up.shape[0]) & (xs[None] >= 0) & (xs[None] < up.shape[1])
    h = np.where(inside, up[ys.clip(0, up.shape[0] - 1)][:, xs.clip(0, up.shape[1] - 1)], up.min())
    h = (h - h.min()) / (h.max() - h.min() + 1e-12)
    rgb = np.stack([np.clip(1.5 - np.abs(4 * h - c), 0, 1) for c in (3, 2, 1)], -1) * 255
    a = 0.15 + 0.6 * h[..., None]
    out = Image.fromarray(((1 - a) * np.asarray(image.convert("RGB"), np.float32) + a * rgb).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for i, b in enumerate(boxes, 1):
        colour = (255, 0, 0) if i == 1 else (255, 255, 255)
        draw.rectangle([b[0], b[1], b[2] - 1, b[3] - 1], outline=colour, width=2)
        draw.text((b[0] + 2, b[1] + 1), str(i), fill=colour)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    out.save(path)
    return out


def exact_match(pred, row):
    """VQA accuracy when the row lists human answers, exact match against `answer` otherwise."""
    p = pred.strip().rstrip(".").lower()
    if "answers" in row:
        return min(1.0, sum(p == str(a).strip().lower() for a in row["answers"]) / 3)
    return float(p == str(row["answer"]).strip().rstrip(".").lower())


def baseline_boxes(box, wh, rng, n=20):
    """Boxes of our top box's size: the centred one, and n at uniformly random positions inside the image."""
    (W, H), w, h = wh, box[2] - box[0], box[3] - box[1]
    centre = [(W - w) / 2, (H - h) / 2, (W + w) / 2, (H + h) / 2]
    rand = [[x, y, x + w, y + h] for x, y in ((rng.uniform(0, W - w), rng.uniform(0, H - h)) for _ in range(n))]
    return centre, rand


# ----------------------------------------------------------------------------
if __name__ == "__main__":
    cfg = parse_config(config)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    if cfg["objective"] not in OBJECTIVES:
        raise SystemExit(f"--objective must be one of {sorted(OBJECTIVES)}, not '{cfg['objective']}'")
    model, processor, _ = vlm.load(cfg["model"], cfg["device"], getattr(torch, cfg["dtype"]))
    model.eval()
    kw = dict(k=cfg["k"], iters=cfg["iters"], stop=cfg["stop"], objective=cfg["objective"], token=cfg["token"],
              sigma=cfg["sigma"], zoom=cfg["zoom"], reference_code=cfg["reference_code"])
    if cfg["image"]:
        if not cfg["question"]:
            raise SystemExit("--image needs --question")
        image = load_image(dict(image=cfg["image"], where="--image"))
        g = ground(model, processor, image, cfg["question"], **kw)
        text, _ = answer(model, processor, [v["image"] for v in g["views"]], cfg["question"], cfg["max_new_tokens"])
        print(f"answer: {text}")
        for i, r in enumerate(g["regions"], 1):
            print(f"box {i}: [{', '.join(f'{c:.1f}' for c in r['box'])}]  score {r['score']:.4g}")
        print(f"iterations: {g['iterations']}")
        overlay(image, g["saliency"], [r["box"] for r in g["regions"]], cfg["out"], g["saliency_box"])
        print(f"wrote {cfg['out']}")
    elif cfg["data"]:
        from tqdm import tqdm
        rows = load_rows(cfg["data"])[: cfg["n"] or None]
        rng = random.Random(cfg["seed"])
        acc = dict(base=0.0, grounded=0.0)
        ious = dict(ours=[], centre=[], random=[])
        secs = dict(ground=0.0, answer_base=0.0, answer_grounded=0.0)
        iters, point = [], []
        for row in tqdm(rows, desc="egg"):
            image = load_image(row)
            t0 = time.time()
            base, _ = answer(model, processor, [image], row["question"], cfg["max_new_tokens"])
            t1 = time.time()
            g = ground(model, processor, image, row["question"], **kw)
            t2 = time.time()
            grounded, _ = answer(model, processor, [v["image"] for v in g["views"]], row["question"],
                                 cfg["max_new_tokens"])
            t3 = time.time()
            secs["answer_base"] += t1 - t0
            secs["ground"] += t2 - t1
            secs["answer_grounded"] += t3 - t2
            acc["base"] += exact_match(base, row)
            acc["grounded"] += exact_match(grounded, row)
            iters.append(g["iterations"])
            if "box" in row:  # localisation: our best region (the whole image if none) vs same-size baselines
                top = g["regions"][0]["box"] if g["regions"] else [0, 0, image.width, image.height]
                centre, rand = baseline_boxes(top, image.size, rng)
                ious["ours"].append(iou(top, row["box"]))
                ious["centre"].append(iou(centre, row["box"]))
                ious["random"].append(sum(iou(b, row["box"]) for b in rand) / len(rand))
                # pointing game: does the saliency peak's cell touch the target? chance = share of such cells
                S = g["saliency"]
                hits = np.array([[iou(cells_to_pixels((r, c, r, c), S.shape, g["saliency_box"]), row["box"]) > 0
                                  for c in range(S.shape[1])] for r in range(S.shape[0])])
                point.append((hits[np.unravel_index(S.argmax(), S.shape)], hits.mean()))
        n = len(rows)
        report = dict(data=cfg["data"], n=n, **{f"acc_{k}": v / n for k, v in acc.items()},
                      **{f"iou_{k}": sum(v) / len(v) for k, v in ious.items() if v},
                      **{f"sec_{k}": v / n for k, v in secs.items()},
                      sec_grounded_total=(secs["ground"] + secs["answer_grounded"]) / n,
                      mean_iterations=sum(iters) / n, config={k: cfg[k] for k in kw})
        if point:
            report["point_target"], report["point_chance"] = (float(np.mean(v)) for v in zip(*point))
        report["config"] = report.pop("config")
        print(json.dumps(report, indent=1))
    else:
        raise SystemExit("give --image and --question, or --data <jsonl>")
