"""
Supervised fine-tuning (the "w/ SFT" baseline of ECVGPO table 1), and the way
the shipped tiny checkpoint is made:

    python data/shapes/prepare.py
    python sft.py                       # tiny Qwen3-VL from scratch -> checkpoints/tiny-shapes (~50 min, one thread)
    # the Qwen2.5-VL design of notes/sft.md sections 1-5 (the old checkpoint also had soft labels on every number):
    python sft.py --tiny_arch qwen2_5_vl --aux_bind 0 --aux_attr 0 --steps 5000 --mix 0.7,0.22,0.08 --curriculum 2000 \
        --curriculum_tasks grounding --mix_late ""

Teacher-forced cross-entropy on the answer tokens only, in exactly the answer
formats the RL scripts reward (prompts and rewards are imported from grpo.py):
  grounding  <think>...</think><answer>{"bbox_2d": [x1, y1, x2, y2]}</answer>   (the model's box convention)
  reasoning  <think>...</think> \\boxed{answer}
  detail     a single word (egg_ground.py's open-ended prompt)
Three levers make referring learnable on a CPU (SPEC.md probes): a curriculum
on the number of objects, soft labels on coordinate tokens (a Gaussian over
the neighbouring values a box can take), and the tiny template's query-before-image order.
Two more make the model bind the query to the image (notes/sft.md, "Sixth
attempt"): the Qwen3-VL design (vlm.build_tiny(arch="qwen3_vl")), and auxiliary
heads during SFT only, on the last hidden state of every visual token (which,
query first, can see the query): "is this token on an object the text is
about?" (binary cross-entropy) and "what colour / shape is the object under this
token?" (cross-entropy). They give the query-to-image matching a dense gradient
at the visual tokens instead of only through 4 coordinate tokens. The heads are
plain tensors outside the model, so they are never saved; rows without an
"objects" list get no auxiliary loss. The attribute answers bind last
("Seventh attempt"): the questions too start on 2-object scenes, and after
step late_after they get the larger share of batches (mix_late).
A fraction of examples drop the image (same target) so the model also learns
the text-only prior p(o | q) that VICRA's score subtracts.
"""
import argparse
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import vlm
from data.shapes.prepare import COLOURS, SHAPES
from grpo import evaluate, load_image, load_rows, prompt_text  # evaluate: greedy decoding, Acc@0.5 / accuracy

RATIONALE = {"grounding": "Find {query}.", "reasoning": "I look at the shapes."}

# ----------------------------------------------------------------------------
# config: plain defaults, any of them overridable as --name value
config = dict(
    model="tiny",  # 'tiny' builds a fresh tiny model (vlm.build_tiny); otherwise a path or hub id
    data="data/shapes/grounding_train.jsonl,data/shapes/reasoning_train.jsonl,data/shapes/detail_train.jsonl",
    val="data/shapes/grounding_val.jsonl,data/shapes/reasoning_val.jsonl,data/shapes/detail_val.jsonl",
    mix="0.6,0.3,0.1",  # probability of a batch from each data file (notes/sft.md, "Sixth attempt")
    # the mix from step late_after on (empty: keep mix): once grounding has taken off (run 3 of notes/sft.md:
    # between steps 1000 and 1500), the questions get the larger share so the answer learns to read the bound object,
    # and grounding's 0.1 share holds it in the band (0.82; at 0.35 it reached 0.935: notes/sft.md, eighth attempt)
    mix_late="0.1,0.8,0.1", late_after=1400,
    out="checkpoints/tiny-shapes",
    steps=2400, batch_size=16, lr=2e-3, warmup=100, weight_decay=0.0, grad_clip=1.0,
    vision_lr=0.1,  # the vision side's lr (tower + projector) as a fraction of lr (see below)
    # only with --model tiny (vlm.build_tiny); rope_theta 0: the arch's default (qwen3_vl 1e4, qwen2_5_vl 3)
    tiny_arch="qwen3_vl", tiny_hidden=192, tiny_layers=3, rope_theta=0.0, mrope_section="",
    curriculum=1000,  # steps over which scenes ramp from the fewest objects to all (scene_cap; 0: off)
    curriculum_tasks="grounding,reasoning",  # the tasks the curriculum applies to (comma-separated)
    # std of the Gaussian soft label over coordinate values, in pixels of the grounding image (0: one-hot);
    # converted to the family's units: 1.5 px = 1.5 resized_px = 13.4 norm1000 units at 112 px
    soft_sigma=1.5,
    aux_bind=1.0,  # weight of the "token is on an object the text is about" BCE (0: off)
    aux_attr=1.0,  # weight of the per-token colour + shape cross-entropy (0: off)
    drop_image=0.1,  # fraction of examples trained without their image
    eval_every=500, eval_n=60,  # eval_every 0: only at the end
    seed=0, device="cuda" if torch.cuda.is_available() else "cpu",
    threads=0,  # torch threads (0: torch's default); give side-by-side runs 1 each
)


def parse_config(defaults, argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for k, v in defaults.items():
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(v, bool) else type(v)
        p.add_argument(f"--{k}", type=kind, default=v)
    return vars(p.parse_args(argv))


# ----------------------------------------------------------------------------
def target_of(row, fam, orig_wh, resized_wh):
    if row["task"] == "grounding":
        x1, y1, x2, y2 = vlm.from_pixels(row["box"], fam, orig_wh, resized_wh)
        think = RATIONALE["grounding"].format(**row)
        return f'<think>{think}</think><answer>{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}</answer>'
    if row["task"] == "reasoning":
        return f"<think>{RATIONALE['reasoning']}</think> \\boxed{{{row['answer']}}}"
    return row["answer"]


def encode_prompts(processor, rows, images, with_image):
    """Left-padded prompt batch; rows without image get a text-only prompt."""
    texts = [vlm.prompt(processor, prompt_text(r), image=w) for r, w in zip(rows, with_image)]
    imgs = [im for im, w in zip(images, with_image) if w]
    return processor(text=texts, images=imgs or None, padding=True, return_tensors="pt")


def resized_sizes(processor, batch, with_image):
    grids = iter(batch["image_grid_thw"]) if "image_grid_thw" in batch else iter(())
    return [vlm.resized_size(processor, next(grids)) if w else None for w in with_image]


def coordinate_soft_targets(tokenizer, sigma, max_value=1000, values=None):
    """(ids, weights), both (vocab, K): row t is token t's target distribution. Coordinate tokens get a
    Gaussian over nearby values of the same spelling; every other token is one-hot (itself, weight 1; the
    padding entries of a row repeat the token with weight 0). One table, so the loss is one gather.
    values: the coordinate values the writer can produce (reachable_values); the Gaussian spreads over those
    only. norm1000 at 112 px writes 113 of the 1001 values: spread over all 1001 at sigma 13 units, no single
    token is likely (peak ~3%) and a stray word wins the greedy argmax mid-box (notes/sft.md, seventh attempt)."""
    vocab, r = tokenizer.get_vocab(), math.ceil(3 * sigma)
    V = max(len(tokenizer), max(vocab.values()) + 1)
    ids = torch.arange(V)[:, None].repeat(1, 2 * r + 1)
    w = torch.zeros(V, 2 * r + 1)
    w[:, 0] = 1.0
    for space in ("", "\u0120"):  # byte-level BPE writes a leading space as U+0120
        num = {v: vocab[space + str(v)] for v in range(max_value + 1) if space + str(v) in vocab}
        for v, i in num.items():
            near = [u for u in range(v - r, v + r + 1) if u in num and (values is None or u in values or u == v)]
            g = torch.tensor([math.exp(-0.5 * ((u - v) / sigma) ** 2) for u in near])
            ids[i, :len(near)] = torch.tensor([num[u] for u in near])
            w[i] = 0.0
            w[i, :len(near)] = g / g.sum()
    return ids, w


def about(row):
    """Boxes of the objects the row's text is about, or None when the row has no object list:
    the referred object (grounding), the small shape (detail), the asked object (attribute questions),
    every counted object (counting questions; none when the counted colour / shape is absent)."""
    if "objects" not in row:
        return None
    if row["task"] in ("grounding", "detail"):
        return [row["box"]]
    words = set(row["question"].lower().rstrip("?").split())  # "How many circles", "the red object", ...
    return [o["box"] for o in row["objects"] if o["colour"] in words or o["shape"] in words
            or o["shape"] + "s" in words]


def overlap(a, b):
    """(x, y) overlap in pixels of boxes a and b ([x1, y1, x2, y2])."""
    return min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])


def aux_targets(processor, rows, with_image, batch, cell=None, min_overlap=2):
    """Per visual token (all images of the batch, in the order the image tokens appear: raster order per
    image), targets of the auxiliary heads: bind (1.0 when the token's cell overlaps an object the text is
    about by > min_overlap px in both axes), colour / shape (index of the object under the cell, the one
    with the largest overlap, len(COLOURS) / len(SHAPES) = background), and valid (the row has objects)."""
    ip = processor.image_processor
    cell = cell or ip.patch_size * ip.merge_size  # one merged visual token covers cell x cell pixels
    bind, colour, shape, valid = [], [], [], []
    for r, rs in zip(rows, resized_sizes(processor, batch, with_image)):
        if rs is None:
            continue
        sx, sy = rs[0] / r["width"], rs[1] / r["height"]
        scale = lambda b: [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy]  # noqa: E731
        boxes = about(r)
        objs = [(scale(o["box"]), o) for o in r.get("objects", [])]
        asked = [scale(b) for b in boxes or []]
        for gy in range(rs[1] // cell):
            for gx in range(rs[0] // cell):
                c = [gx * cell, gy * cell, (gx + 1) * cell, (gy + 1) * cell]
                on = lambda b: min(overlap(b, c)) > min_overlap  # noqa: E731
                bind.append(float(any(on(b) for b in asked)))
                under = [(overlap(b, c)[0] * overlap(b, c)[1], o) for b, o in objs if on(b)]
                o = max(under, key=lambda t: t[0])[1] if under else None
                colour.append(list(COLOURS).index(o["colour"]) if o else len(COLOURS))
                shape.append(SHAPES.index(o["shape"]) if o else len(SHAPES))
                valid.append(boxes is not None)
    return dict(bind=torch.tensor(bind), colour=torch.tensor(colour, dtype=torch.long),
                shape=torch.tensor(shape, dtype=torch.long), valid=torch.tensor(valid, dtype=torch.bool))


def aux_heads(hidden, weights, seed=0):
    """The auxiliary heads: one linear map hidden -> [bind logit, colour logits, shape logits], plain
    tensors outside the model (never saved with it)."""
    g = torch.Generator().manual_seed(seed)
    k = 1 + len(COLOURS) + 1 + len(SHAPES) + 1
    W = (torch.randn(hidden, k, generator=g) * hidden ** -0.5).requires_grad_()
    return dict(W=W, b=torch.zeros(k, requires_grad=True), weights=weights)


def aux_loss(h, heads, targets):
    """(bind BCE, attribute CE): h (n_visual, hidden), the last hidden state of the visual tokens."""
    v = targets["valid"]
    if not v.any():
        return h.sum() * 0, h.sum() * 0
    z = h[v] @ heads["W"] + heads["b"]
    nc = len(COLOURS) + 1
    bind = F.binary_cross_entropy_with_logits(z[:, 0], targets["bind"][v])
    attr = F.cross_entropy(z[:, 1:1 + nc], targets["colour"][v]) + F.cross_entropy(z[:, 1 + nc:], targets["shape"][v])
    return bind, attr


def sigma_units(sigma_px, fam, width):
    """A soft-label std in pixels of a width-px image -> the family's coordinate units (resized_px: the stored
    images are multiples of 16, so resized == original; norm1000: 1000 / width units per pixel)."""
    return sigma_px * vlm.from_pixels([0, 0, 100, 100], fam, (width, width), (width, width))[2] / 100


def reachable_values(fam, width):
    """The coordinate values a box on a width x width image can have in the family's convention (integer
    pixels through vlm.from_pixels: resized_px all of 0..width, norm1000 round(k * 1000 / width))."""
    return {v for k in range(width + 1) for v in vlm.from_pixels([k, k, k, k], fam, (width, width), (width, width))}


def scene_cap(pool, step, curriculum):
    """Curriculum on scene size (SPEC.md probes): over the first `curriculum` steps the largest number of
    objects allowed in a batch grows from the pool's smallest to its largest (grounding 1 -> 4, reasoning
    2 -> 5: the attribute questions are first asked of 2-object scenes, the bind2 task of issue 23)."""
    lo, hi = min(r["n_objects"] for r in pool), max(r["n_objects"] for r in pool)
    return lo + int(min(1.0, step / curriculum) * (hi - lo + 0.999))


def coordinate_openers(tokenizer):
    """(vocab,) bool: tokens after which a number is a box coordinate ('[' or ','). Soft labels apply only
    there: a count answer ("{3}") and the 2 of "bbox_2d" are number tokens too, and a Gaussian of 13
    norm1000 units over them would make every count, and the format's key, look alike (notes/sft.md)."""
    V = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    out = torch.zeros(V, dtype=torch.bool)
    for tok, i in tokenizer.get_vocab().items():
        out[i] = tokenizer.convert_tokens_to_string([tok]).rstrip().endswith(("[", ","))
    return out


def sft_batch(processor, fam, rows, with_image, device):
    """input tensors + labels (-100 on prompt and padding) for teacher forcing."""
    images = [load_image(r) for r in rows]
    batch = encode_prompts(processor, rows, images, with_image)
    tok = processor.tokenizer
    targets = [target_of(r, fam, im.size, rs)
               for r, im, rs in zip(rows, images, resized_sizes(processor, batch, with_image))]
    comp = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in targets]
    L = max(map(len, comp))
    comp_ids = torch.full((len(rows), L), tok.pad_token_id)
    comp_mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, c in enumerate(comp):
        comp_ids[i, :len(c)], comp_mask[i, :len(c)] = torch.tensor(c), 1
    P = batch["input_ids"].shape[1]
    batch["input_ids"] = torch.cat([batch["input_ids"], comp_ids], 1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], comp_mask], 1)
    batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(comp_ids)], 1)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, P:] = torch.where(comp_mask.bool(), comp_ids, -100)
    return {k: v.to(device) for k, v in batch.items()}, labels.to(device)


def sft_loss(model, batch, labels, soft, heads=None, targets=None):
    """Teacher-forced LM loss (scalar). With heads (aux_heads) and targets (aux_targets) it returns
    (LM + weighted auxiliary losses, dict of the parts) instead."""
    out = model(**batch, output_hidden_states=heads is not None)
    lm = token_loss(out.logits, labels, soft)
    if heads is None:
        return lm
    h = out.hidden_states[-1][batch["input_ids"] == model.config.image_token_id].float()
    bind, attr = aux_loss(h, heads, {k: t.to(h.device) for k, t in targets.items()})
    w_bind, w_attr = heads["weights"]
    return lm + w_bind * bind + w_attr * attr, dict(lm=lm.item(), bind=bind.item(), attr=attr.item())


def token_loss(logits, labels, soft):
    """soft: None (one-hot), (ids, weights) from coordinate_soft_targets (every number token soft), or
    (ids, weights, openers): soft only for a number right after a coordinate opener (coordinate_openers)."""
    prev = labels[:, :-1]
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    valid = labels != -100
    logp = F.log_softmax(logits[valid], -1)
    y = labels[valid]
    if soft is None:
        nll = -logp.gather(1, y[:, None])[:, 0]
    else:  # cross-entropy against each token's target distribution: a Gaussian for coordinates, else one-hot
        ids, w = soft[0], soft[1]
        nll = -(logp.gather(1, ids[y]) * w[y]).sum(1)
        if len(soft) == 3:  # a number not right after '[' or ',' is not a coordinate: one-hot
            nll = torch.where(soft[2][prev[valid].clamp(min=0)], nll, -logp.gather(1, y[:, None])[:, 0])
    return nll.mean()


# ----------------------------------------------------------------------------
if __name__ == "__main__":
    cfg = parse_config(config)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    train = [load_rows(p) for p in cfg["data"].split(",")]
    val = [load_rows(p)[:cfg["eval_n"]] for p in cfg["val"].split(",")]
    mix = [float(x) for x in cfg["mix"].split(",")]
    mix_late = [float(x) for x in cfg["mix_late"].split(",")] if cfg["mix_late"] else mix
    assert len(mix) == len(mix_late) == len(train), f"--mix / --mix_late need one weight per data file ({len(train)})"
    if cfg["model"] == "tiny":
        corpus = [prompt_text(r) for rows in train for r in rows[:2000]]
        corpus += [target_of(r, dict(box="resized_px"), (1, 1), (1, 1)) for rows in train for r in rows[:2000]]
        corpus += ["user\n", "assistant\n"]
        model, processor = vlm.build_tiny(corpus, seed=cfg["seed"], hidden=cfg["tiny_hidden"], arch=cfg["tiny_arch"],
                                          layers=cfg["tiny_layers"], rope_theta=cfg["rope_theta"] or None,
                                          mrope_section=[int(x) for x in cfg["mrope_section"].split(",") if x])
        model, fam = model.to(cfg["device"]), vlm.family(model)
    else:
        model, processor, fam = vlm.load(cfg["model"], cfg["device"])
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {fam}")
    soft = None
    if cfg["soft_sigma"] > 0:
        W = next((r["width"] for rows in train for r in rows[:1] if r["task"] == "grounding"), 112)
        sigma = sigma_units(cfg["soft_sigma"], fam, W)
        soft = tuple(t.to(cfg["device"]) for t in coordinate_soft_targets(processor.tokenizer, sigma,
                                                                          values=reachable_values(fam, W))
                     + (coordinate_openers(processor.tokenizer),))
        print(f"soft labels: sigma {cfg['soft_sigma']} px = {sigma:.1f} {fam['box']} units")
    heads = None
    if cfg["aux_bind"] or cfg["aux_attr"]:
        heads = aux_heads(model.config.get_text_config().hidden_size, (cfg["aux_bind"], cfg["aux_attr"]), cfg["seed"])
        heads["W"].data, heads["b"].data = heads["W"].data.to(cfg["device"]), heads["b"].data.to(cfg["device"])
    # The vision tower trains at vision_lr x lr (LLaVA/Qwen-VL practice). At the full lr its output norm
    # random-walks from ~1 to ~100 in a few hundred steps, while its gradient is still mostly noise (the
    # model does not yet use the image), and the image tokens' residual stream drowns what attention adds.
    visual = {id(p) for p in vlm.vision_parameters(model)}  # tower + projector (for Qwen: model.visual)
    aux_params = [heads["W"], heads["b"]] if heads else []
    opt = torch.optim.AdamW([dict(params=[p for p in model.parameters() if id(p) not in visual] + aux_params,
                                  lr_scale=1.0),
                             dict(params=[p for p in model.parameters() if id(p) in visual],
                                  lr_scale=cfg["vision_lr"])], lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    os.makedirs(cfg["out"], exist_ok=True)
    log = open(os.path.join(cfg["out"], "sft_log.jsonl"), "w")
    model.train()
    t0 = time.time()
    bar = tqdm(range(1, cfg["steps"] + 1), desc="sft")
    for step in bar:
        lr = cfg["lr"] * min(1.0, step / cfg["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / cfg["steps"]))
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        k = random.choices(range(len(train)), weights=mix_late if step > cfg["late_after"] else mix)[0]
        pool = train[k]
        if cfg["curriculum"] and pool[0]["task"] in cfg["curriculum_tasks"].split(",") and "n_objects" in pool[0]:
            cap = scene_cap(pool, step, cfg["curriculum"])  # few objects first, then more distractors
            pool = [r for r in pool if r["n_objects"] <= cap] or pool
        rows = random.sample(pool, min(cfg["batch_size"], len(pool)))
        # grounding keeps its image: its target box needs the image's resized size
        with_image = [r["task"] == "grounding" or random.random() >= cfg["drop_image"] for r in rows]
        batch, labels = sft_batch(processor, fam, rows, with_image, cfg["device"])
        parts = {}
        if heads is None:
            loss = sft_loss(model, batch, labels, soft)
        else:
            loss, parts = sft_loss(model, batch, labels, soft, heads, aux_targets(processor, rows, with_image, batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        rec = dict(step=step, task=pool[0]["task"], loss=loss.item(), **parts, lr=lr, minutes=(time.time() - t0) / 60)
        bar.set_postfix(loss=f"{loss.item():.3f}", task=rec["task"][:4])
        if (cfg["eval_every"] and step % cfg["eval_every"] == 0) or step == cfg["steps"]:
            for rows_v in val:
                m = evaluate(model, processor, fam, rows_v)
                rec[f"val_{rows_v[0]['task']}_acc"], rec[f"val_{rows_v[0]['task']}_format"] = m["acc"], m["format"]
            tqdm.write(json.dumps(rec))
            model.save_pretrained(cfg["out"])  # save as we go: an interrupted run keeps its last eval's weights
            processor.save_pretrained(cfg["out"])
        log.write(json.dumps(rec) + "\n")
        log.flush()
    print(f"done in {(time.time() - t0) / 60:.1f} min -> {cfg['out']}")
