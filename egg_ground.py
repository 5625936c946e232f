"""
Entropy-gradient grounding (EGG, seed 004): training-free evidence retrieval in one file.

    python egg_ground.py --image data/shapes/images/detail_test/00000.png \\
        --question "What colour is the small shape?" --out figs/egg/detail_test_00000.png
    python egg_ground.py --data data/shapes/detail_test.jsonl --iters 1     # single pass
    python egg_ground.py --data data/shapes/detail_test.jsonl               # iterative (spatial-entropy stop)

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
from grpo import PROMPTS, iou, load_image, load_rows

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
    iters=3,  # max iterations T of algorithm 1 (1 = single pass)
    token=1,  # decoding step whose distribution is backpropagated (table 6)
    sigma=1.5,  # Gaussian smoothing on the token grid (sec. 3.3)
    zoom=1.0,  # crops are resized to zoom x the original's longer side (0: native crop pixels)
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


def maxprob(logits):
    return torch.log_softmax(wide(logits), -1).max()  # log of the top-1 probability (ViCrop's pure-grad)


OBJECTIVES = dict(entropy=entropy, topp=topp_entropy, maxprob=maxprob)


# ----------------------------------------------------------------------------
# step 1: saliency on the visual-token grid (sec. 3.2)
def token_grid(processor, fam, inputs):
    """(rows, cols) of the visual tokens the LLM sees, in the order the visual module emits them."""
    if fam["model_type"] in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        # patches are grouped in merge x merge blocks in row-major order; one token per block
        m = processor.image_processor.merge_size
        t, h, w = (int(v) for v in inputs["image_grid_thw"][0])
        if t != 1:
            raise ValueError(f"expected one temporal patch for an image, got image_grid_thw {t, h, w}")
        return h // m, w // m
    raise NotImplementedError(f"egg_ground.py does not know the visual-token layout of family "
                              f"'{fam['model_type']}' (e.g. InternVL's tiles + thumbnail); add it to token_grid")


def user_prompt(processor, text, n_images):
    """The family's own chat template, n images then the text (the tiny template moves the text first)."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)


def entropy_gradient(model, processor, image, question, objective="entropy", token=1):
    """G = dL/dV (eq. 3) for the one image's projected visual embeddings: (G [N, D], (rows, cols), info)."""
    fam = vlm.family(model)
    inputs = processor(text=[user_prompt(processor, DETAIL_PROMPT.format(question=question), 1)],
                       images=[image], return_tensors="pt").to(model.device)
    grid = token_grid(processor, fam, inputs)
    if token > 1:  # table 6: unroll t-1 greedy steps first, then differentiate step t
        with torch.no_grad():
            new = model.generate(**inputs, do_sample=False, max_new_tokens=token - 1)[:, inputs["input_ids"].shape[1]:]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], new], 1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(new)], 1)
        if "mm_token_type_ids" in inputs:  # without it Qwen silently falls back to 1-D positions
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(new)], 1)
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
            L = (OBJECTIVES[objective] if isinstance(objective, str) else objective)(logits)
            grads = torch.autograd.grad(L, leaves)
    finally:
        handle.remove()
        for p in frozen:
            p.requires_grad_(True)
    G = torch.cat([wide(g) for g in grads], -1)  # per token: all of its embeddings
    if G.shape[0] != grid[0] * grid[1]:
        raise RuntimeError(f"{G.shape[0]} visual tokens do not fill the {grid} grid")
    info = dict(objective=L.item(), maxprob=torch.softmax(wide(logits), -1).max().item())
    return G, grid, info


def entropy_gradient_map(model, processor, image, question, objective="entropy", token=1):
    """Saliency s_i = ||G_i||_2 (eq. 4) reshaped to the token grid, as a numpy array."""
    G, (h, w), _ = entropy_gradient(model, processor, image, question, objective, token)
    return G.norm(dim=-1).reshape(h, w).cpu().numpy().astype(np.float64)


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


def connected_components(mask):
    """4-connected labels (0 = off, 1..n in raster order of their first cell) and n."""
    mask = np.asarray(mask, bool)
    labels, n = np.zeros(mask.shape, int), 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        n += 1
        labels[start], stack = n, [start]
        while stack:
            r, c = stack.pop()
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
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


def regions(S, sigma=1.5):
    """All components of one saliency grid, best first: ([dict(cells=(r0, c0, r1, c1), score, size)], H(M))."""
    S = np.asarray(S, np.float64)
    if not np.any(S > 0):
        return [], 0.0  # no gradient at all: no evidence, nothing to crop
    Ss = gaussian_smooth(S, sigma)
    labels, n = connected_components(Ss >= elbow_threshold(Ss))  # eq. 5
    w = component_scores(labels, n, S)
    out = []
    for j in range(1, n + 1):
        rr, cc = np.nonzero(labels == j)
        out.append(dict(cells=(rr.min(), cc.min(), rr.max(), cc.max()), score=float(w[j - 1]), size=len(rr)))
    return sorted(out, key=lambda d: -d["score"]), spatial_entropy(labels, n)


# ----------------------------------------------------------------------------
# boxes: token cells -> view pixels -> original pixels
def cells_to_pixels(cells, grid, wh):
    """Token cells (r0, c0, r1, c1), inclusive, of a rows x cols grid -> box in pixels of a w x h image."""
    (r0, c0, r1, c1), (gh, gw), (W, H) = cells, grid, wh
    return [c0 * W / gw, r0 * H / gh, (c1 + 1) * W / gw, (r1 + 1) * H / gh]


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
    inputs = processor(text=[user_prompt(processor, DETAIL_PROMPT.format(question=question), len(images))],
                       images=list(images), return_tensors="pt").to(model.device)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                         output_logits=True, return_dict_in_generate=True)
    text = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    return text.strip(), torch.softmax(out.logits[0][0].float(), -1).max().item()


def ground(model, processor, image, question, k=2, iters=3, stop="spatial", objective="entropy", token=1,
           sigma=1.5, zoom=1.0):
    """Algorithm 1. Returns dict(views: [original, crop 1 (best), ...] each with its box in original pixels,
    regions: the selected components (box, score), saliency: the original's grid, iterations, history)."""
    if stop not in ("spatial", "confidence", "iters"):
        raise ValueError(f"--stop must be spatial, confidence or iters, not '{stop}'")
    long_side = max(image.size)
    views = [dict(image=image, box=[0.0, 0.0, float(image.width), float(image.height)])]
    chosen, prev, history, cache = [], math.inf, [], {}
    for t in range(iters):
        pool = []
        for vi, v in enumerate(views):
            key = (tuple(round(c, 3) for c in v["box"]), v["image"].size)  # the original recurs every iteration
            if key not in cache:
                G, grid, _ = entropy_gradient(model, processor, v["image"], question, objective, token)
                S = G.norm(dim=-1).reshape(grid).cpu().numpy().astype(np.float64)
                cache[key] = (S, grid) + regions(S, sigma)
            S, grid, regs, H = cache[key]
            for r in regs:  # pool the components of every view (algorithm 1, inner loop)
                px = cells_to_pixels(r["cells"], grid, v["image"].size)
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
        if q >= prev:
            break
        prev, chosen = q, top
        views = [views[0]] + [crop_view(views[d["view"]], d["view_px"], zoom, long_side) for d in top]
    return dict(views=views, regions=[dict(box=d["box"], score=d["score"]) for d in chosen],
                saliency=cache[next(iter(cache))][0] if cache else None, iterations=len(history), history=history)


# ----------------------------------------------------------------------------
# output: heat-map overlay with numbered boxes
def overlay(image, S, boxes, path):
    """Write image + saliency (upsampled, jet-like colours, opacity rising with saliency) + numbered boxes
    (1 = best, red) as a PNG of the image's size."""
    h = np.asarray(Image.fromarray(np.asarray(S, np.float32)).resize(image.size, Image.BILINEAR))
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
              sigma=cfg["sigma"], zoom=cfg["zoom"])
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
        overlay(image, g["saliency"], [r["box"] for r in g["regions"]], cfg["out"])
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
                hits = np.array([[iou(cells_to_pixels((r, c, r, c), S.shape, image.size), row["box"]) > 0
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
