"""
VICRA: Visually-grounded Credit Assignment (seed 003, sections 3.2-3.3, appendices C, H, I, J) on top of GRPO.

    python vicra.py                          # tiny Qwen2.5-VL, shapes reasoning split, CPU
    python vicra.py --distort noise          # appendix I: discard | patch_black | black | noise | blur
    python vicra.py --score kl               # appendix H: KL(pi(.|I,q) || pi(.|q)) instead of the probability gap
    torchrun --nproc_per_node 8 vicra.py --model Qwen/Qwen2.5-VL-7B-Instruct ...   (notes/vicra.md)

GRPO gives every token of a response the same advantage A_i. VICRA (eqs. 4-6) moves credit towards the
tokens the image made likely. After the rollout and the old-logprob pass, one extra no-grad forward of the
SAME sampled completions with the image removed from the prompt (or distorted) gives, per token,
  w_t   = pi(o_t | I, q, o_<t) - pi(o_t | q, o_<t)               (eq. 4, probabilities, rollout policy)
  psi_t = 1 + (w_t - mean_t' w_t')   over the response's tokens   (eq. 6, sum-preserving)
  A'_t  = A_t * psi_t                                            (eq. 5)
and the PPO loss of grpo.py runs on A'. Logged: the entropy of visually-grounded tokens (w > 0.2) and of
the others (the paper's figure 2), the grounded fraction, mean psi, and the extra forward's time.
`diff grpo.py vicra.py` is the whole method (the VICRA blocks).
"""
import argparse
import collections
import contextlib
import functools
import json
import math
import os
import random
import re
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import vlm
# --- VICRA ----------------------------------------------------------------
from PIL import ImageFilter  # the blur distortion (appendix I)
# --- end VICRA ------------------------------------------------------------

# ----------------------------------------------------------------------------
# config: plain defaults, any of them overridable as --name value (unknown flags are errors)
config = dict(
    model="checkpoints/tiny-shapes",  # local path or hub id, e.g. Qwen/Qwen2.5-VL-3B-Instruct
    data="data/shapes/grounding_train.jsonl",  # comma-separated jsonl files; each row says its task
    val="data/shapes/grounding_val.jsonl",
    out_dir="out/grpo",
    G=8,  # completions per prompt: the group
    batch_size=4,  # prompts per chunk; one step = world_size * grad_accum chunks
    grad_accum=1,
    micro_batch_size=16,  # sequences per forward in the old-logprob pass and the update
    max_new_tokens=64, temperature=1.0,
    beta=0.04,  # weight of the k3 KL to the initial model; 0 loads no reference model
    eps_low=0.2, eps_high=0.2,  # clip range [1 - eps_low, 1 + eps_high]; DAPO's clip-higher: --eps_high 0.28
    mu=1,  # updates per rollout batch
    loss_agg="seq-mean",  # seq-mean (VLM-R1, TRL) | token-mean (EasyR1, DAPO)
    filter_groups=False,  # DAPO: drop groups whose rewards are all equal
    steps=60, lr=1e-4, weight_decay=0.0, grad_clip=1.0,  # lr: tiny model; real models use 1e-6
    gradient_checkpointing=False,
    eval_every=20, val_n=100, save_every=20, resume=False, seed=0, wandb=False, wandb_project="vlm-entropy-rl",
    device="cuda" if torch.cuda.is_available() else "cpu",
    dtype="bfloat16" if torch.cuda.is_available() else "float32",  # autocast dtype; weights stay float32
    threads=0,  # torch CPU threads (0: torch's default)
)
# --- VICRA ----------------------------------------------------------------
# VICRA's defaults: the shapes reasoning split, whose counting and attribute questions need the image
config.update(data="data/shapes/reasoning_train.jsonl", val="data/shapes/reasoning_val.jsonl", out_dir="out/vicra",
              distort="discard",  # how the image is removed (appendix I): discard | patch_black | black | noise | blur
              score="pdiff",  # pdiff: eq. 4's probability gap | kl: KL(pi(.|I,q) || pi(.|q)) per position (app. H)
              vg_threshold=0.2,  # w above it = a visually-grounded token (section 3.2): the logged entropy split
              reweight=True)  # False: compute and log w, but train on GRPO's advantages (figure 2's GRPO analysis)
# --- end VICRA ------------------------------------------------------------


def parse_config(defaults, argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for k, v in defaults.items():
        if isinstance(v, bool):  # --flag, --flag true, --flag false
            p.add_argument(f"--{k}", type=lambda s: s.lower() in ("1", "true", "yes"), default=v, nargs="?", const=True)
        else:
            p.add_argument(f"--{k}", type=type(v), default=v)
    return vars(p.parse_args(argv))


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


@functools.lru_cache(maxsize=4)
def epoch_order(n, seed, epoch):
    return random.Random(f"{seed}-epoch-{epoch}").sample(range(n), n)


def chunk_indices(n_rows, seed, pos, g, batch_size):
    """Rows of global chunk g of a step that starts at data position pos. The data is a fixed permutation
    per epoch; chunk g takes positions pos + g*B .. pos + (g+1)*B - 1, so a prompt (and its group of G
    samples) lives in exactly one chunk, on one rank, whatever the world size."""
    return [epoch_order(n_rows, seed, p // n_rows)[p % n_rows]
            for p in range(pos + g * batch_size, pos + (g + 1) * batch_size)]


def chunk_seed(seed, step, g):
    """RNG seed of chunk g at a step: rollouts depend on (seed, step, g) only, never on the world size."""
    return random.Random(f"{seed}-{step}-{g}").getrandbits(63)


# Prompts: VLM-R1 for grounding, EasyR1 (VICRA appendix D) for reasoning, the open-ended
# single-word prompt (egg_ground.py) for detail.
PROMPTS = {
    "grounding": ("Please provide the bounding box coordinates of the region this sentence describes: {query}. "
                  "First output the thinking process in <think> </think> tags and then output the final answer "
                  "in <answer> </answer> tags. Output the final answer in JSON format."),
    "reasoning": ("{question} You FIRST think about the reasoning process as an internal monologue and then "
                  "provide the final answer. The reasoning process MUST BE enclosed within <think> </think> tags. "
                  "The final answer MUST BE put in \\boxed{{}}."),
    "detail": "{question}\nAnswer the question using a single word or phrase.",
}


def prompt_text(row):
    return PROMPTS[row["task"]].format(**row)


# ----------------------------------------------------------------------------
# rewards: (total, format, accuracy). Any parse failure scores 0, never raises.
# VLM-R1's format check, per box convention (vlm.FAMILIES): a JSON box of integers; LLaVA's 0..1 boxes are decimals
GROUNDING_FORMAT = {conv: re.compile(r"<think>.*?</think>\s*<answer>.*?\{.*\[N,\s*N,\s*N,\s*N\].*\}.*?</answer>"
                                     .replace("N", r"\d+(?:\.\d+)?" if conv == "norm1" else r"\d+"), re.DOTALL)
                    for conv in ("resized_px", "norm1000", "norm1")}
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
    box = [float(v) for v in box.groups()]  # a 400-digit number parses as inf: rejected below
    return box if all(map(math.isfinite, box)) and box[2] > box[0] and box[3] > box[1] else None


def grounding_reward(text, gt_box, fam, orig_wh, resized_wh):
    """format + IoU, with the predicted box moved from the model's convention to original pixels."""
    fmt = 1.0 if GROUNDING_FORMAT[fam["box"]].search(text) else 0.0
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


WORD = re.compile(r"[a-z][a-z ]*[a-z]")  # a plain word or phrase, after normalise()


def answers_match(pred, answer):
    """(equal, how) of a predicted final answer and the reference. how says which check decided:
      'exact'        normalise() equal (numbers as numbers, case, $, trailing period, \\text{});
      'math-verify'  mathematical equivalence by math-verify, the checker open-r1 and TRL use:
                     \\frac{1}{2} = 0.5 = 1/2 = \\dfrac12, x = 4 vs 4, (A) vs A, 4\\% vs 4, 2\\sqrt{2} vs \\sqrt{8};
      'word'         a plain word on either side and no exact match: not equal. math-verify would read
                     'red' as the product r*e*d and call 'red' and 'der' equal.
    Never raises: a math-verify failure or timeout is 'not equal'."""
    pred, answer = str(pred), str(answer)
    if normalise(pred) == normalise(answer):
        return True, "exact"
    if any(isinstance(a, str) and WORD.fullmatch(a) for a in (normalise(pred), normalise(answer))):
        return False, "word"
    # imported here, not at the top, so that the file imports without it (the reward section is the only user)
    import threading
    import math_verify
    # math-verify's timeouts are signal.alarm: only the main thread may set one (there a pathological answer
    # such as 9^{9^{9^9}} costs at most ~5 s per parse or verify); elsewhere it runs without, unbounded
    t = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = math_verify.parse("\\boxed{" + answer + "}", parsing_timeout=t)
        got = math_verify.parse("\\boxed{" + pred + "}", parsing_timeout=t)
        return bool(gold and got and math_verify.verify(gold, got, timeout_seconds=t)), "math-verify"
    except Exception:  # includes math-verify's TimeoutException
        return False, "math-verify"


def reasoning_reward(text, answer):
    """0.9 * accuracy + 0.1 * format (EasyR1); accuracy: the last \\boxed{} matches the answer (answers_match)."""
    fmt = 1.0 if REASONING_FORMAT.search(text) else 0.0
    pred = last_boxed(text)
    acc = 1.0 if pred is not None and answers_match(pred, answer)[0] else 0.0
    return 0.9 * acc + 0.1 * fmt, fmt, acc


def reward(row, text, fam, orig_wh, resized_wh):
    """(total, format, accuracy) of one completion. resized_wh: the image the model saw (vlm.resized_size)."""
    if row["task"] == "grounding":
        return grounding_reward(text, row["box"], fam, orig_wh, resized_wh)
    if row["task"] == "reasoning":
        return reasoning_reward(text, row["answer"])
    acc = float(text.strip().rstrip(".").lower() == str(row["answer"]).lower())  # detail: one word
    return acc, 1.0, acc


# ----------------------------------------------------------------------------
# rollout: G completions per prompt, then the inputs of a teacher-forced forward over prompt + completion
def encode(processor, rows, images, G=1):
    """Left-padded prompt batch with every prompt repeated G times (prompt-major: rows j*G .. j*G+G-1 are
    prompt j). We repeat *before* the processor: rows of pixel_values are patches, not images, so
    repeating the processed tensor would silently pair images with the wrong prompts. Images go one list per
    prompt, the layout every family's processor accepts (Mllama's requires it)."""
    texts = [vlm.prompt(processor, prompt_text(r)) for r in rows for _ in range(G)]
    return processor(text=texts, images=[[im] for im in images for _ in range(G)], padding=True, return_tensors="pt")


def with_completion(prompt, ids, mask):
    """Prompt batch + completion tokens -> model inputs. All of input_ids, mm_token_type_ids (extended with
    zeros: text) and image_grid_thw must be passed, or Qwen2.5-VL silently falls back to 1-D positions.
    (Other families need no position_ids: left padding shifts all of a row's positions by one constant, which
    rotary embeddings, relative by construction, do not see.) Mllama's cross_attention_mask gets one row per
    completion token, a copy of the last prompt position's, which is what its generate() does at every step."""
    x = dict(prompt)
    x["input_ids"] = torch.cat([prompt["input_ids"], ids], 1)
    x["attention_mask"] = torch.cat([prompt["attention_mask"], mask], 1)
    if "mm_token_type_ids" in x:
        x["mm_token_type_ids"] = torch.cat([x["mm_token_type_ids"], x["mm_token_type_ids"].new_zeros(ids.shape)], 1)
    if "cross_attention_mask" in x:
        cam = x["cross_attention_mask"]
        x["cross_attention_mask"] = torch.cat([cam, cam[:, -1:].expand(-1, ids.shape[1], -1, -1)], 1)
    return x


@torch.no_grad()
def rollout(model, processor, rows, images, G, max_new_tokens, temperature):
    """Sample G completions per prompt (temperature 0: greedy). Returns (inputs, ids, mask, texts): model inputs
    for prompt + completion, completion ids (N, T), mask (N, T) = 1 up to and including the first EOS, texts."""
    prompt = encode(processor, rows, images, G).to(model.device)
    # Sample from exactly softmax(logits / T): transformers adds top_k=50 by default and Qwen's own
    # generation_config sets top_k, top_p and a repetition penalty; any of them breaks the ratio pi / pi_old.
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)
    out = model.generate(**prompt, max_new_tokens=max_new_tokens, repetition_penalty=1.0,
                         suppress_tokens=placeholders(model), **sampling)
    ids = out[:, prompt["input_ids"].shape[1]:]
    eos = model.generation_config.eos_token_id
    is_eos = torch.isin(ids, torch.tensor(eos if isinstance(eos, list) else [eos], device=ids.device)).long()
    mask = (is_eos.cumsum(1) - is_eos == 0).long()  # no EOS strictly before t
    texts = processor.batch_decode(ids.masked_fill(mask == 0, processor.tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    return with_completion(prompt, ids, mask), ids, mask, texts


def take(inputs, rows, fam):
    """Rows `rows` (a slice) of a batch of model inputs, at most one image per row. Every tensor is cut by row
    except a 'flat' pixel_values (vlm.FAMILIES: Qwen's patches, InternVL's tiles, one after another for the
    whole batch), of which each row owns a share proportional to its image-placeholder tokens: a fixed number
    per patch (1/4 for Qwen's 2x2 merge) or per tile (InternVL's 256)."""
    flat = "pixel_values" in inputs and fam["pixels"] == "flat"
    out = {k: v[rows] for k, v in inputs.items() if not (flat and k == "pixel_values")}
    if flat:
        n = (inputs["input_ids"] == fam["image_token_id"]).sum(1)
        ends = (F.pad(n.cumsum(0), (1, 0)) * len(inputs["pixel_values"]) // n.sum()).tolist()
        out["pixel_values"] = inputs["pixel_values"][ends[rows.start]:ends[rows.stop]]
    return out


def micro_batches(n, size):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def placeholders(model):
    """Image/video placeholder ids inside the LM head's vocabulary. A sampled <|image_pad|> is an image slot
    without an image (the next forward fails), so the policy is the model with these tokens removed: generate
    suppresses them and token_logprobs renormalises without them."""
    return vlm.family(model)["placeholders"]


# ----------------------------------------------------------------------------
# per-token log-probs, advantages, loss
def token_logprobs(model, inputs, ids, temperature, entropy=False):
    """log pi(o_t | I, q, o_<t) of every completion token (N, T) and, if asked, the entropy of the whole
    next-token distribution at t. Logits are divided by T: the samples came from softmax(logits / T)."""
    # the logits at position P-1+t predict completion token t: keep the last T+1 positions, drop the final one
    logits = model(**inputs, logits_to_keep=ids.shape[1] + 1).logits[:, :-1].float() / temperature
    logits[..., placeholders(model)] = torch.finfo(logits.dtype).min  # not -inf: 0 * log 0 must stay 0
    logp = logits.log_softmax(-1)
    lp = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return lp, (-(logp.exp() * logp).sum(-1) if entropy else None)


@torch.no_grad()
def token_stats(model, inputs, ids, temperature, micro_batch_size):
    """(log pi, entropy), each (N, T), of a whole chunk, micro-batched, no grad."""
    parts = [token_logprobs(model, take(inputs, mb, vlm.family(model)), ids[mb], temperature, entropy=True)
             for mb in micro_batches(len(ids), micro_batch_size)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def group_advantages(rewards, G):
    """A_i = (r_i - mean_G r) / (std_G r + 1e-4) over each prompt's G consecutive samples (DeepSeekMath eq. 21;
    std unbiased, as TRL and VLM-R1). A group whose rewards are all equal gets A = 0, never NaN."""
    r = rewards.view(-1, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)


def policy_loss(logp, logp_old, adv, mask, n_tok, n_seq, eps_low, eps_high, loss_agg, beta=0.0, logp_ref=None):
    """PPO-clipped surrogate (+ beta * k3 KL) of one micro-batch, (N, T) tensors in, a scalar out.

    loss_t = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t) + beta k3_t,  rho_t = pi / pi_old,
    k3_t = pi_ref/pi - log(pi_ref/pi) - 1 >= 0 (Schulman's unbiased, low-variance KL estimator).
    Normalised by GLOBAL counts (all micro-batches, chunks and ranks), so summing the micro-batch losses
    gives the loss of the whole batch: token-mean = sum of token losses / n_tok; seq-mean = sum over
    sequences of their mean token loss / n_seq. Returns (loss, #clipped tokens, sum of k3)."""
    ratio = torch.exp(logp - logp_old)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    loss = -torch.minimum(ratio * adv, clipped)
    k3 = torch.zeros_like(logp)
    if beta > 0:
        d = logp_ref - logp
        k3 = torch.exp(d) - d - 1
        loss = loss + beta * k3
    if loss_agg == "token-mean":
        total = (loss * mask).sum() / n_tok
    else:
        total = ((loss * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seq
    is_clipped = (clipped < ratio * adv).float()  # the min took the clipped branch: no gradient from this token
    return total, (is_clipped * mask).sum().item(), (k3 * mask).sum().item()


def optimizer_step(model, opt, grad_clip, ok=True):
    """Clip the gradient norm and step; skip (keeping weights and Adam state) if the norm is not finite.
    Gradients are all-reduced before this, so every rank sees the same norm and makes the same choice."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).item()
    stepped = ok and math.isfinite(norm)
    if stepped:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm, stepped


# --- VICRA ----------------------------------------------------------------
# VICRA: w_t = pi(o_t | I, q, o_<t) - pi(o_t | q, o_<t) (eq. 4) from one extra forward without the image
def vicra_psi(w, mask):
    """psi = 1 + (w - mean_t w) over the response's valid tokens (eq. 6), 0 on padding. Sum-preserving:
    sum_t A_i psi_t = sum_t A_i. The paper's appendix C code clamps sum_t w at 1e-8 from below, which breaks
    this whenever a response's mean w is negative; we implement eq. 6."""
    m = mask.to(w.dtype)
    return (1 + w - (w * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)) * m


def vicra_advantages(adv, p_img, p_noimg, mask):
    """A * psi(p_img - p_noimg) (eq. 5). adv: (N,) per sequence or (N, T) per token; the rest (N, T)."""
    return (adv[:, None] if adv.dim() == 1 else adv) * vicra_psi(p_img - p_noimg, mask)


def distort_image(img, kind, grid, seed=0, ratio=0.6, noise_std=200.0, blur_radius=5.0):
    """Appendix I's distortions; sizes are kept, so the visual tokens and positions are too. patch_black:
    round(ratio * rows * cols) random cells of a (rows, cols) grid go black. With Qwen the grid is the visual
    tokens' (one merged 2x2-patch token: 28 px for Qwen2.5-VL, 16 px for the tiny model), so a masked token
    keeps no trace of the image; other families resize or tile the image their own way, so their cells are
    28 px of the original image (Qwen2.5-VL's token size; appendix I gives none). noise: + N(0, noise_std) on
    0..255, clipped. blur: radius = the Gaussian's std (px)."""
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(blur_radius))
    a, rng = np.asarray(img.convert("RGB"), dtype=np.float64), np.random.default_rng(seed)
    if kind == "black":
        a = a * 0
    elif kind == "patch_black":
        (rows, cols), (H, W) = grid, a.shape[:2]
        ys, xs = np.linspace(0, H, rows + 1).round().astype(int), np.linspace(0, W, cols + 1).round().astype(int)
        for k in rng.choice(rows * cols, size=round(ratio * rows * cols), replace=False):
            a[ys[k // cols]:ys[k // cols + 1], xs[k % cols]:xs[k % cols + 1]] = 0
    elif kind == "noise":
        a = np.clip(a + rng.normal(0.0, noise_std, a.shape), 0, 255)
    else:
        raise ValueError(f"--distort must be discard, patch_black, black, noise or blur, not {kind!r}")
    return Image.fromarray(a.round().astype(np.uint8))


def vicra_inputs(processor, rows, images, ids, mask, G, kind, grid_thw=None, seed=0):
    """Inputs for each prompt without its image + the SAME completions (prompt-major, as sampled). discard:
    the prompt rebuilt with no image (no image tokens, pixel_values or image_grid_thw; mm_token_type_ids all
    0) and 1-D positions counted over real tokens, as for a text-only prompt built alone. Otherwise the image
    is distorted (grid_thw: the rollout's image_grid_thw, for patch_black's cells; None: 28-px cells). Mllama
    sees the image only through cross-attention: discard drops <|image|>, the pixels and the cross-attention
    mask, so its text runs through the language model alone, as a text-only prompt does."""
    if kind == "discard":
        texts = [vlm.prompt(processor, prompt_text(r), image=False) for r in rows for _ in range(G)]
        x = with_completion(processor(text=texts, padding=True, return_tensors="pt").to(ids.device), ids, mask)
        x["position_ids"] = (x["attention_mask"].cumsum(1) - 1).clamp(min=0)
        return x
    merge = getattr(processor.image_processor, "merge_size", 1)
    grids = ([(h // merge, w // merge) for _, h, w in grid_thw[::G].tolist()] if grid_thw is not None else
             [(math.ceil(im.height / 28), math.ceil(im.width / 28)) for im in images])
    bad = [distort_image(im, kind, grid, seed=[seed, j]) for j, (im, grid) in enumerate(zip(images, grids))]
    return with_completion(encode(processor, rows, bad, G).to(ids.device), ids, mask)


@torch.no_grad()
def vicra_stats(model, inputs, x, ids, temperature, micro_batch_size, kl=False):
    """pi(o_t | q, o_<t) of the sampled tokens (N, T) from x, micro-batched like the old pass; with kl also
    KL(pi(.|I,q,o_<t) || pi(.|q,o_<t)) per position (appendix H), which re-runs the with-image forward (the
    old pass keeps only the sampled tokens' log-probs). Logits as in token_logprobs."""
    def logp(z, mb):
        logits = model(**take(z, mb, vlm.family(model)), logits_to_keep=ids.shape[1] + 1).logits[:, :-1].float() / temperature
        logits[..., placeholders(model)] = torch.finfo(logits.dtype).min
        return logits.log_softmax(-1)
    p, d = [], []
    for mb in micro_batches(len(ids), micro_batch_size):
        lq = logp(x, mb)
        p.append(lq.gather(-1, ids[mb].unsqueeze(-1)).squeeze(-1).exp())
        if kl:
            lp = logp(inputs, mb)
            d.append((lp.exp() * (lp - lq)).sum(-1))
    return torch.cat(p), (torch.cat(d) if kl else None)
# --- end VICRA ------------------------------------------------------------
# ----------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, processor, fam, rows, batch_size=32, max_new_tokens=64):
    """Greedy decoding: {'acc', 'format'}; acc is Acc@0.5 (IoU > 0.5) for grounding, accuracy otherwise."""
    was_training, acc, fmt = model.training, 0.0, 0.0
    model.eval()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        images = [load_image(r) for r in chunk]
        inputs, _, _, texts = rollout(model, processor, chunk, images, 1, max_new_tokens, temperature=0)
        for r, im, t, wh in zip(chunk, images, texts, vlm.seen_sizes(processor, fam, inputs)):
            _, f, a = reward(r, t, fam, im.size, wh)
            acc, fmt = acc + (float(a > 0.5) if r["task"] == "grounding" else a), fmt + f
    model.train(was_training)
    return dict(acc=acc / len(rows), format=fmt / len(rows))


def save(out_dir, model, processor, opt, step, pos):
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    rng = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    torch.save(dict(optimizer=opt.state_dict(), step=step, pos=pos, rng=rng), os.path.join(out_dir, "state.pt.tmp"))
    os.replace(os.path.join(out_dir, "state.pt.tmp"), os.path.join(out_dir, "state.pt"))  # never half-written


def all_sum(stats, device):
    """Sum a dict of floats over ranks (a no-op in one process)."""
    keys = sorted(stats)
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


# ----------------------------------------------------------------------------
if __name__ == "__main__":
    cfg = parse_config(config)
    assert cfg["loss_agg"] in ("seq-mean", "token-mean") and cfg["temperature"] > 0 and cfg["G"] >= 2
    # --- VICRA ------------------------------------------------------------
    assert cfg["distort"] in ("discard", "patch_black", "black", "noise", "blur") and cfg["score"] in ("pdiff", "kl")
    # --- end VICRA --------------------------------------------------------
    # DDP: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; plain python is a world of one
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cfg["device"] == "cuda" else cfg["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    # float32 master weights + autocast: a bf16 weight cannot absorb an lr-1e-6 update (its spacing is ~1e-2 relative)
    dtype = getattr(torch, cfg["dtype"])
    amp = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    torch.manual_seed(cfg["seed"])
    train = [r for p in cfg["data"].split(",") for r in load_rows(p)]
    val = [load_rows(p)[:cfg["val_n"]] for p in cfg["val"].split(",")]
    model, processor, fam = vlm.load(cfg["out_dir"] if cfg["resume"] else cfg["model"], device)
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # the frozen initial policy for the KL term; not even loaded when beta == 0
    ref = vlm.load(cfg["model"], device, dtype)[0].eval().requires_grad_(False) if cfg["beta"] > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    step, pos = 0, 0  # optimizer steps done, prompts consumed (the data position)
    if cfg["resume"]:
        st = torch.load(os.path.join(cfg["out_dir"], "state.pt"), weights_only=False)
        opt.load_state_dict(st["optimizer"])
        step, pos, rng = st["step"], st["pos"], st["rng"]
        torch.set_rng_state(rng["torch"]), random.setstate(rng["python"]), np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    B, G, T, A, mbs = cfg["batch_size"], cfg["G"], cfg["temperature"], cfg["grad_accum"], cfg["micro_batch_size"]
    if master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        log = open(os.path.join(cfg["out_dir"], "log.jsonl"), "a" if cfg["resume"] else "w")
        print(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {fam}; {len(train)} "
              f"prompts; a step = {world} ranks x {A} chunks x {B} prompts x {G} samples")
        if cfg["wandb"]:
            import wandb
            wandb.init(project=cfg["wandb_project"], config=cfg, resume="allow")

    def write(rec):
        line = json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in rec.items()})
        log.write(line + "\n"), log.flush(), tqdm.write(line)
        if cfg["wandb"]:
            wandb.log(rec, step=rec["step"])

    def validate():
        with amp():
            return {f"val_{rows[0]['task']}_{k}": v for rows in val
                    for k, v in evaluate(model, processor, fam, rows, mbs, cfg["max_new_tokens"]).items()}

    stop = []  # Ctrl-C / SIGTERM: finish the step, save, exit; the ranks agree through the all-reduce

    def request_stop(*_):
        stop.append(1)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

    signal.signal(signal.SIGINT, request_stop), signal.signal(signal.SIGTERM, request_stop)
    if master and step == 0 and cfg["eval_every"] > 0:
        write(dict(step=0, **validate()))
    for step in tqdm(range(step, cfg["steps"]), initial=step, total=cfg["steps"], disable=not master):
        t0 = time.time()
        # 1-2. rollout and reward, chunk by chunk; global chunk g = rank * grad_accum + a
        model.eval()
        chunks = []
        for a in range(A):
            g = rank * A + a
            seed = chunk_seed(cfg["seed"], step, g)
            torch.manual_seed(seed), random.seed(seed)
            rows = [train[i] for i in chunk_indices(len(train), cfg["seed"], pos, g, B)]
            images = [load_image(r) for r in rows]
            with amp():
                inputs, ids, mask, texts = rollout(model, processor, rows, images, G, cfg["max_new_tokens"], T)
            rep = [(row, im) for row, im in zip(rows, images) for _ in range(G)]  # prompt-major, as sampled
            r = torch.tensor([reward(row, text, fam, im.size, wh) for (row, im), text, wh
                              in zip(rep, texts, vlm.seen_sizes(processor, fam, inputs))], device=device)
            chunks.append(dict(rows=rows, images=images, inputs=inputs, ids=ids, mask=mask.float(), rewards=r))
        t1 = time.time()
        # 3. old pass: log pi_old and the policy's entropy at every sampled token (+ log pi_ref for the KL)
        for c in chunks:
            with amp():
                c["logp_old"], c["entropy"] = token_stats(model, c["inputs"], c["ids"], T, mbs)
                if ref is not None:
                    c["logp_ref"] = token_stats(ref, c["inputs"], c["ids"], T, mbs)[0]
        # --- VICRA --------------------------------------------------------
        # VICRA: one extra no-grad forward of the sampled completions without the image (eq. 4's second term)
        tv = time.time()
        for a, c in enumerate(chunks):
            x = vicra_inputs(processor, c["rows"], c["images"], c["ids"], c["mask"].long(), G, cfg["distort"],
                             c["inputs"].get("image_grid_thw"), seed=chunk_seed(cfg["seed"], step, rank * A + a))
            with amp():
                c["p_noimg"], c["kl"] = vicra_stats(model, c["inputs"], x, c["ids"], T, mbs, cfg["score"] == "kl")
        t_vicra = time.time() - tv
        # --- end VICRA ----------------------------------------------------
        # 4. advantages: GRPO gives every token of completion i the same A_i
        for c in chunks:
            c["adv"] = group_advantages(c["rewards"][:, 0], G)[:, None] * c["mask"]  # (N, T)
            # --- VICRA ----------------------------------------------------
            # VICRA: w under the rollout policy (eq. 4), psi (eq. 6), A * psi (eq. 5); figure 2's split uses w
            w = (c["logp_old"].exp() - c["p_noimg"]) * c["mask"]
            psi = vicra_psi(w if cfg["score"] == "pdiff" else c["kl"], c["mask"])
            if cfg["reweight"]:
                c["adv"] = c["adv"] * psi  # = vicra_advantages(A, p_img, p_noimg, mask) for pdiff
            c["w"], c["psi"], c["vg"] = w, psi, (w > cfg["vg_threshold"]).float() * c["mask"]
            # --- end VICRA ------------------------------------------------
            c["flat"] = c["rewards"][:, 0].view(-1, G).std(1) == 0  # all rewards equal: A = 0
            c["loss_mask"] = c["mask"] * ~c["flat"].repeat_interleave(G)[:, None] if cfg["filter_groups"] else c["mask"]
        S = collections.Counter()  # step statistics, summed over chunks, then over ranks
        for c in chunks:
            r, m = c["rewards"], c["mask"]
            S.update(reward=r[:, 0].sum().item(), format=r[:, 1].sum().item(), accuracy=r[:, 2].sum().item(),
                     seqs=len(r), tokens=m.sum().item(), entropy=(c["entropy"] * m).sum().item(),
                     std0=c["flat"].sum().item(), groups=len(c["flat"]), loss_tokens=c["loss_mask"].sum().item(),
                     loss_seqs=(c["loss_mask"].sum(1) > 0).sum().item())
            # --- VICRA ----------------------------------------------------
            vg, H = c["vg"], c["entropy"]
            S.update(vg_tokens=vg.sum().item(), vg_entropy=(H * vg).sum().item(), other_entropy=(H * (m - vg)).sum().item(),
                     w=c["w"].sum().item(), psi=c["psi"].sum().item(), psi_vg=(c["psi"] * vg).sum().item())
            # --- end VICRA ------------------------------------------------
        S = all_sum(S, device)  # the global counts normalise the loss
        t2 = time.time()
        # 5. update. With mu = 1 the policy still equals pi_old, so the ratio is 1 and clipping never
        # activates: the loss is then the plain policy gradient of A * log pi (+ the KL term).
        model.train()
        U, norms = collections.Counter(stop=len(stop)), []
        work = [(c, mb) for c in chunks for mb in micro_batches(len(c["ids"]), mbs)]
        for _ in range(cfg["mu"]):
            for k, (c, mb) in enumerate(work):
                # DDP all-reduces gradients on the last backward only, and averages them: hence loss * world
                with contextlib.nullcontext() if world == 1 or k == len(work) - 1 else ddp_model.no_sync():
                    with amp():
                        logp = token_logprobs(ddp_model, take(c["inputs"], mb, fam), c["ids"][mb], T)[0]
                    loss, clipped, kl = policy_loss(
                        logp, c["logp_old"][mb], c["adv"][mb], c["loss_mask"][mb], max(S["loss_tokens"], 1),
                        max(S["loss_seqs"], 1), cfg["eps_low"], cfg["eps_high"], cfg["loss_agg"], cfg["beta"],
                        c["logp_ref"][mb] if ref is not None else None)
                    (loss * world).backward()
                U.update(loss=loss.item(), clipped=clipped, kl=kl)
            norms.append(optimizer_step(model, opt, cfg["grad_clip"], ok=S["loss_seqs"] > 0))
        U = all_sum(U, device)
        pos += world * A * B
        t3 = time.time()
        # logging, eval, checkpoints: rank 0 only
        if master:
            n, mu, skipped = max(S["loss_tokens"], 1) * cfg["mu"], cfg["mu"], sum(not ok for _, ok in norms)
            rec = dict(step=step + 1, reward=S["reward"] / S["seqs"], reward_format=S["format"] / S["seqs"],
                       reward_accuracy=S["accuracy"] / S["seqs"], entropy=S["entropy"] / S["tokens"],
                       length=S["tokens"] / S["seqs"], kl=U["kl"] / n, clip_frac=U["clipped"] / n,
                       std0_frac=S["std0"] / S["groups"], loss=U["loss"] / mu, grad_norm=norms[-1][0],
                       skipped=skipped, t_rollout=t1 - t0, t_old=t2 - t1, t_train=t3 - t2, t_step=t3 - t0,
                       tokens_per_s=S["tokens"] / (t3 - t0))
            # --- VICRA ----------------------------------------------------
            # VICRA: figure 2's entropy split; psi_mean is 1 by eq. 6 (a check), psi_vg = grounded tokens' weight
            nv, n_all = S["vg_tokens"], max(S["tokens"], 1)
            rec.update(entropy_vg=S["vg_entropy"] / nv if nv else None,
                       entropy_other=S["other_entropy"] / max(n_all - nv, 1), vg_frac=nv / n_all, w_mean=S["w"] / n_all,
                       psi_mean=S["psi"] / n_all, psi_vg=S["psi_vg"] / nv if nv else None, t_vicra=t_vicra)
            # --- end VICRA ------------------------------------------------
            if skipped:
                tqdm.write(f"step {step + 1}: non-finite gradient norm or no group left: update skipped")
            last = step + 1 == cfg["steps"] or U["stop"] > 0
            if cfg["eval_every"] > 0 and ((step + 1) % cfg["eval_every"] == 0 or last):
                rec.update(validate())
            write(rec)
            if (cfg["save_every"] > 0 and (step + 1) % cfg["save_every"] == 0) or last:
                save(cfg["out_dir"], model, processor, opt, step + 1, pos)
        if U["stop"] > 0:
            break
    if world > 1:
        dist.destroy_process_group()
