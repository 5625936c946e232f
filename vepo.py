"""
VEPO: Vision-Entropy token selection for Policy Optimization, as a diff against grpo.py.

    python vepo.py                                   # tiny Qwen3-VL, shapes reasoning split, CPU
    python vepo.py --select entropy                  # Top-Entropy baseline (the "80/20" recipe)
    torchrun --nproc_per_node 8 vepo.py --model Qwen/Qwen2.5-VL-7B-Instruct ...   (notes/vepo.md)

Paper (seed 002, arXiv 2606.03937): only its abstract, figure captions and a review survive, so the
coupling below is OUR RECONSTRUCTION from them (SPEC.md "VEPO"), not the paper's published equations.
What the seed states: Top-Entropy token selection misses vision-sensitive tokens whose entropy is low
(figure 2: it misses ~41% of the Top-JSD tokens at k = 20%); VEPO runs a counterfactual forward with a
noise-perturbed image, measures per token the Jensen-Shannon divergence and the entropy gap between the
next-token distributions under the clean and the perturbed image, couples this visual sensitivity with
the token entropy multiplicatively, and gives the policy gradient only to the top-k fraction of tokens.
Our reconstruction, per completion token t (means over the batch's valid completion tokens):

    JSD_t   = JS( pi(.|I, q, o_<t) || pi(.|I~, q, o_<t) )            I~: the perturbed image
    dH_t    = H(pi(.|I, q, o_<t)) - H(pi(.|I~, q, o_<t))
    V_t     = alpha * JSD_t / mean(JSD) + (1 - alpha) * |dH_t| / mean(|dH|)     visual sensitivity
    score_t = H_t * V_t                                                       multiplicative coupling
    A_t     = A_i if t is among the top round(k * n_valid) scores of the batch, else 0

"The batch" is one rollout chunk (batch_size prompts x G samples) on one rank. Zeroing A_t (rather than
masking the loss) keeps the KL term on every token and keeps GRPO's loss denominators: an unselected token
still counts in its sequence's length, so the policy gradient is the selected tokens' share of GRPO's, not
renormalised to them (on the tiny model that share is ~all of it: notes/vepo.md).
--select entropy | vision | random give the Top-Entropy, vision-only (score = V) and Random-k baselines;
all modes run the counterfactual pass, so the logged overlaps and step times are comparable.
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
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from PIL import Image
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                    register_fsdp_forward_method)
from tqdm import tqdm

import vlm

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
    old_pass=False,  # at mu = 1 pi_old is the policy itself and the old pass is skipped, unless this is set
    loss_agg="seq-mean",  # seq-mean (VLM-R1, TRL) | token-mean (EasyR1, DAPO)
    filter_groups=False,  # DAPO: drop groups whose rewards are all equal
    steps=60, lr=1e-5, weight_decay=0.0, grad_clip=1.0,  # lr: tiny model (1e-4 undoes its grounding; notes/grpo.md); real: 1e-6
    vision_lr=1.0,  # lr of the vision side (tower + projector: vlm.vision_parameters) as a fraction of lr; 0 freezes it
    gradient_checkpointing=False,
    eval_every=20, val_n=100, save_every=20, resume=False, seed=0, wandb=False, wandb_project="vlm-entropy-rl",
    device="cuda" if torch.cuda.is_available() else "cpu",
    dtype="bfloat16" if torch.cuda.is_available() else "float32",  # autocast dtype; weights stay float32
    threads=0,  # torch CPU threads (0: torch's default)
    # 7-11B models (notes/scale.md, bench.py's memory table). --fsdp: FSDP2 shards weights, grads and AdamW state
    # over the ranks; --lora_r N: train rank-N adapters only (peft), the frozen base doubling as the reference.
    # Either way checkpoints are sharded (out_dir/dcp) and the full model is written to out_dir at the end.
    fsdp=False, ref_offload=False,  # ref_offload: the FSDP reference model's shards live in CPU memory
    lora_r=0, lora_alpha=32.0, lora_vision=False,  # lora_vision: adapt the vision tower and projector too
    export=False,  # with --resume: write out_dir's full model from the last sharded checkpoint, train nothing
)


# --- VEPO ------------------------------------------------------------------
# VEPO defaults: the shapes reasoning split (counting, colour and shape questions: the answer needs the image)
config.update(
    data="data/shapes/reasoning_train.jsonl", val="data/shapes/reasoning_val.jsonl", out_dir="out/vepo",
    select="vepo",  # vepo (H * V) | entropy (Top-Entropy) | vision (V alone) | random (Random-k)
    k=0.2,  # fraction of the batch's valid completion tokens that receive the policy gradient
    alpha=0.7,  # weight of JSD vs |dH| in V; the seed's ablation: at alpha >= 0.7, k = 0.2 is best
    noise="gauss",  # the counterfactual image: gauss (pixel noise) | patch (blacken visual tokens, VPPO-style)
    noise_std=0.5,  # gauss: std in 0..1 pixel units, before the processor's normalisation (notes/vepo.md)
    mask_ratio=0.6,  # patch: fraction of visual tokens blackened
    old_pass=True,  # the selection needs the entropy and the clean logits before step 4: keep it at mu = 1 too
)
# --- end VEPO --------------------------------------------------------------
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
def next_token_logits(model, inputs, n, temperature):
    """The (N, n, vocab) next-token logits / T at the n completion positions: the logits at position P-1+t
    predict completion token t, so keep the last n+1 positions and drop the final one. Divided by T: the samples
    came from softmax(logits / T). Placeholders get finfo.min, not -inf: 0 * log 0 must stay 0."""
    logits = model(**inputs, logits_to_keep=n + 1).logits[:, :-1].float() / temperature
    logits[..., placeholders(model)] = torch.finfo(logits.dtype).min
    return logits


def token_logprobs(model, inputs, ids, temperature, entropy=False):
    """log pi(o_t | I, q, o_<t) of every completion token (N, T) and, if asked, the entropy of the whole
    next-token distribution at t (no grad: it is logged, not trained on)."""
    logp = next_token_logits(model, inputs, ids.shape[1], temperature).log_softmax(-1)
    lp = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        return lp, (-(logp.exp() * logp).sum(-1) if entropy else None)


@torch.no_grad()
def token_stats(model, inputs, ids, temperature, micro_batch_size, signals=None):
    """[log pi, entropy, *signals], each (N, T), of a whole chunk, micro-batched, no grad. signals(mb, logits):
    a method's own per-token signals from one extra forward (vepo.py's perturbed image, vicra.py's image-free
    prompt), handed the clean logits of micro-batch mb while they are alive, so that nothing is run twice."""
    parts = []
    for mb in micro_batches(len(ids), micro_batch_size):
        logits = next_token_logits(model, take(inputs, mb, vlm.family(model)), ids.shape[1], temperature)
        logp = logits.log_softmax(-1)
        parts.append((logp.gather(-1, ids[mb].unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1),
                      *(signals(mb, logits) if signals else ())))
    return [torch.cat(p) for p in zip(*parts)]


# --- VEPO ------------------------------------------------------------------
def jsd_from_logits(logits_p, logits_q):
    """Jensen-Shannon divergence (nats, in [0, log 2]) of softmax(logits_p) and softmax(logits_q). Written as
    sum_v m_v g(t_v) with m = (p + q) / 2, t = (p - q) / (p + q) = tanh((log p - log q) / 2) and
    g(t) = ((1 + t) log(1 + t) + (1 - t) log(1 - t)) / 2 = t^2/2 + t^4/12 + ...: no O(1) terms cancel, so float32
    resolves tiny divergences (the textbook KL(p||m) + KL(q||m) has a float32 floor near 1e-8). 0 log 0 = 0."""
    lp, lq = logits_p.float().log_softmax(-1), logits_q.float().log_softmax(-1)
    lm, t = torch.logaddexp(lp, lq) - math.log(2), torch.tanh((lp - lq) / 2)
    g = torch.where(t > -1, (1 + t) * torch.log1p(t), 0.0) + torch.where(t < 1, (1 - t) * torch.log1p(-t), 0.0)
    return torch.where(lm > -math.inf, lm.exp() * g / 2, 0.0).sum(-1).clamp(0.0, math.log(2))


def perturb_pixels(pixel_values, image_processor, noise, noise_std=0.5, mask_ratio=0.6, generator=None, cell=28):
    """The counterfactual image, made in the processor's output space, so the image size, the visual token
    count and every position stay those of the clean image. Two layouts (vlm.FAMILIES 'pixels'):
    Qwen: 2-D, one row per patch laid out (channel, temporal copy, p, p), merge_size^2 consecutive rows form one
    visual token; the others: images or tiles (..., channel, H, W) (InternVL tiles, LLaVA images, LLaVA-NeXT
    views, Mllama tiles), where patch blackens cells of `cell` px (28: an InternVL token, 2 x 2 LLaVA tokens)."""
    ip, C = image_processor, len(image_processor.image_mean)
    qwen = pixel_values.dim() == 2
    x = pixel_values.reshape(len(pixel_values), C, ip.temporal_patch_size, -1) if qwen else pixel_values
    cdim = 1 if qwen else x.dim() - 3  # the channel axis
    shape = [C if d == cdim else 1 for d in range(x.dim())]
    mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(shape) for v in (ip.image_mean, ip.image_std))
    lo, hi = -mean / std, (1 - mean) / std  # pixel values 0 and 1 after normalisation
    if noise == "gauss":  # Qwen: one draw for both temporal copies: it is still one (noisy) image
        eps = torch.randn(x.shape[:2] + (1,) + x.shape[3:] if qwen else x.shape, generator=generator).to(x)
        x = torch.minimum(torch.maximum(x + eps * noise_std / std, lo), hi)
    elif noise == "patch" and qwen:  # blacken a random mask_ratio of the visual tokens (all their patches)
        drop = torch.rand(len(x) // ip.merge_size ** 2, generator=generator) < mask_ratio
        x = torch.where(drop.repeat_interleave(ip.merge_size ** 2).to(x.device)[:, None, None, None], lo, x)
    elif noise == "patch":  # blacken a random mask_ratio of the cell x cell squares of every image / tile
        H, W = x.shape[-2:]
        drop = torch.rand(x.shape[:-3] + (1, -(-H // cell), -(-W // cell)), generator=generator) < mask_ratio
        drop = drop.repeat_interleave(cell, -2).repeat_interleave(cell, -1)[..., :H, :W].to(x.device)
        x = torch.where(drop, lo, x)
    else:
        raise ValueError(f"--noise must be gauss or patch, not {noise!r}")
    return x.reshape(pixel_values.shape)


def perturbed_signals(model, image_processor, inputs, ids, temperature, noise, noise_std, mask_ratio, generator,
                      mb, logits):
    """(JSD, H_clean - H_perturbed), each (n, T), of micro-batch mb: its completions re-scored with only
    pixel_values perturbed (same ids, mm_token_type_ids and image_grid_thw, so the same positions), against the
    clean logits the old pass hands over (token_stats's signals): one extra forward."""
    H = lambda z: -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)  # noqa: E731  z: finite (placeholders finfo.min)
    x = take(inputs, mb, vlm.family(model))
    xp = dict(x, pixel_values=perturb_pixels(x["pixel_values"], image_processor, noise, noise_std, mask_ratio,
                                             generator))
    lp = next_token_logits(model, xp, ids.shape[1], temperature)
    return jsd_from_logits(logits, lp), H(logits) - H(lp)


@torch.no_grad()
def visual_signals(model, image_processor, inputs, ids, temperature, micro_batch_size, noise, noise_std,
                   mask_ratio, generator=None):
    """(JSD, dH) of a whole chunk: perturbed_signals through token_stats (clean + perturbed forward per
    micro-batch, as the training loop's old pass runs them)."""
    return token_stats(model, inputs, ids, temperature, micro_batch_size,
                       functools.partial(perturbed_signals, model, image_processor, inputs, ids, temperature, noise,
                                         noise_std, mask_ratio, generator))[2:]


def stopwatch(fn, times):
    """fn, appending each call's wall time to the list times (the extra forward's share of the old pass)."""
    def run(*args):
        t = time.time()
        out = fn(*args)
        times.append(time.time() - t)
        return out
    return run


def vision_sensitivity(jsd, dH, mask, alpha):
    """V = alpha * JSD / mean(JSD) + (1 - alpha) * |dH| / mean(|dH|), means over the valid tokens."""
    m = mask.bool()
    return (alpha * jsd / jsd[m].mean().clamp_min(1e-12)
            + (1 - alpha) * dH.abs() / dH.abs()[m].mean().clamp_min(1e-12))


def vepo_token_mask(entropy, jsd, dH, mask, alpha=0.7, k=0.2, select="vepo", generator=None):
    """Bool (N, T): the round(k * n_valid) valid tokens with the highest score; padding is never chosen."""
    m = mask.bool()
    if select == "random":
        score = torch.rand(m.shape, generator=generator).to(m.device)
    elif select in ("vepo", "vision", "entropy"):
        V = vision_sensitivity(jsd.float(), dH.float(), m, alpha) if select != "entropy" else 1.0
        score = entropy.float() * V if select == "vepo" else (entropy.float() if select == "entropy" else V)
    else:
        raise ValueError(f"--select must be vepo, entropy, vision or random, not {select!r}")
    top = score.masked_fill(~m, -math.inf).flatten().topk(round(k * int(m.sum()))).indices
    return torch.zeros(m.numel(), dtype=torch.bool, device=m.device).index_fill_(0, top, True).view(m.shape)


def overlap(a, b):
    """|a & b| / |b|: the fraction of b's tokens that a also selects (1 - overlap = what a misses of b)."""
    return (a & b).sum().item() / max(b.sum().item(), 1)


def selection_stats(sel, entropy, jsd, dH, mask, alpha, k):
    """Per batch: overlap of the selection with Top-Entropy / Top-Vision at the same k; what Top-Entropy misses
    of Top-JSD and Top-|dH| (the seed's figure 2); mean entropy and V of selected vs unselected tokens."""
    m, top = mask.bool(), lambda a, s: vepo_token_mask(entropy, jsd, dH, mask, a, k, s)
    ent, V, rest = top(alpha, "entropy"), vision_sensitivity(jsd.float(), dH.float(), mask, alpha), m & ~sel
    avg = lambda x, s: x[s].float().mean().item() if s.any() else float("nan")
    return dict(ovl_entropy=overlap(sel, ent), ovl_vision=overlap(sel, top(alpha, "vision")),
                ent_miss_jsd=1 - overlap(ent, top(1.0, "vision")), ent_miss_dh=1 - overlap(ent, top(0.0, "vision")),
                H_sel=avg(entropy, sel), H_rest=avg(entropy, rest), V_sel=avg(V, sel), V_rest=avg(V, rest),
                jsd=avg(jsd, m), dH=avg(dH.abs(), m))


# --- end VEPO --------------------------------------------------------------
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
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # FSDP: a DTensor
    stepped = ok and math.isfinite(norm)
    if stepped:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm, stepped


# ----------------------------------------------------------------------------
# scale: FSDP2 sharding and LoRA adapters (notes/scale.md)
def shard(model, dtype, offload=False):
    """FSDP2 (fully_shard) on every block the model names in _no_split_modules (its decoder layers and vision
    blocks: every HF family declares them), then on the root (embeddings, lm_head, norms). A block's weights are
    all-gathered just before its forward and backward and freed after, so a GPU holds 1/world of the fp32
    weights, grads and AdamW state plus a block or two in full. Mixed precision: blocks compute with the
    weights cast to dtype (bf16 on CUDA), gradients are reduce-scattered and kept in fp32, the shards stay fp32.
    offload: the shards live in CPU memory (the frozen reference model, --ref_offload)."""
    kw = dict(mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32),
              offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    blocks = set(model._no_split_modules or ())
    for m in model.modules():
        if type(m).__name__ in blocks:
            fully_shard(m, **kw)
    fully_shard(model, **kw)
    # generate() enters the root's FSDP hooks first (it runs the vision tower outside forward()). transformers,
    # seeing an FSDP module, decodes in lockstep across ranks (synced_gpus: a rank that is done keeps stepping
    # until all are), so every rank runs the same forwards and the FSDP states stay alike
    register_fsdp_forward_method(model, "generate")
    return model


@contextlib.contextmanager
def gathered(model):
    """FSDP2: gather the whole model once for generation and keep it gathered through every decoding step, then
    free it; otherwise each of the hundreds of decoding steps would all-gather every block again. The cost: the
    full model in the compute dtype on every GPU while generating (2 bytes x parameters: 16 GB for 8B) on top
    of its shards. Every rank must enter (the gather is collective). A no-op on a model that is not sharded."""
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            if m is not model:  # the root keeps its default: not resharded after forward (backward needs it)
                m.set_reshard_after_forward(True, recurse=False)


def reference_weights(model, dtype):
    """The frozen reference stored at the precision the policy computes with under autocast: Linear weights and
    biases in dtype (autocast rounds the policy's float32 ones to dtype at every use: the same values, half the
    memory), the rest (norms, embeddings, a head tied to them) float32 like the policy's."""
    emb = model.get_input_embeddings().weight
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.weight is not emb:
            m.to(dtype)
    return model.eval().requires_grad_(False)


def add_lora(model, r, alpha, vision=False):
    """peft LoRA (Hu et al. 2021) on every Linear layer of the language model (model.get_decoder(), whatever the
    family) and, with vision=True, of the vision tower and projector; never the output head. All else is frozen.
    B starts at 0, so the adapted model is the base model at step 0. No dropout: the old pass (eval mode) and
    the update (train mode) must score the same policy."""
    from peft import LoraConfig, get_peft_model
    lm, head = set(map(id, model.get_decoder().modules())), model.get_output_embeddings()
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m is not head and (vision or id(m) in lm)]
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=names))


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


def save(out_dir, model, processor, opt, step, pos, sharded=False):
    """Plain: rank 0 writes the full model (save_pretrained) and the optimizer to state.pt. sharded (--fsdp,
    --lora_r): every rank writes its own shards of the trainable weights and of the AdamW state to out_dir/dcp
    (torch.distributed.checkpoint: no rank ever holds a full copy; LoRA: the adapters only), rank 0 the step,
    data position and RNG to state.pt; export() writes the full model at the end. Call on every rank."""
    if sharded:
        msd, osd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
        dcp.save(dict(model=msd, optimizer=osd), checkpoint_id=os.path.join(out_dir, "dcp"))
    if dist.is_initialized() and dist.get_rank() > 0:
        return
    if not sharded:
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    rng = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    torch.save(dict(optimizer=None if sharded else opt.state_dict(), step=step, pos=pos, rng=rng),
               os.path.join(out_dir, "state.pt.tmp"))
    os.replace(os.path.join(out_dir, "state.pt.tmp"), os.path.join(out_dir, "state.pt"))  # never half-written


def load_sharded(out_dir, model, opt):
    """Read save(sharded=True)'s weights and AdamW state into the (sharded) model and optimizer, in place;
    DCP reshards if the world size changed."""
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    sd = dict(model=msd, optimizer=osd)
    dcp.load(sd, checkpoint_id=os.path.join(out_dir, "dcp"))  # raises if the checkpoint lacks any of them
    # not strict: LoRA's frozen base is not in sd (it is the initial model, already loaded)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def export(out_dir, model, processor, lora=False):
    """One save_pretrained folder of the full model, which vlm.load reads like any hub model. FSDP: the shards are
    gathered into rank 0's CPU memory one tensor at a time (full_state_dict, cpu_offload), never whole on a
    GPU. LoRA: the adapters are merged into the weights, W + (alpha / r) B A (peft's merge_and_unload; in
    place, so this ends the run). Call on every rank."""
    if lora:
        model = model.merge_and_unload()
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_initialized() or dist.get_rank() == 0:
        model.save_pretrained(out_dir, state_dict=sd)
        processor.save_pretrained(out_dir)


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
    # --- VEPO ----------------------------------------------------------------
    if not cfg["old_pass"]:
        raise ValueError("vepo.py needs the old pass (the selection reads the entropy and JSD before the "
                         "update): drop --old_pass false")
    # --- end VEPO ------------------------------------------------------------
    if cfg["fsdp"] and cfg["lora_r"]:
        raise ValueError("--fsdp and --lora_r together are not supported: LoRA's frozen base fits one GPU (bench.py)")
    if cfg["export"] and not cfg["resume"]:
        raise ValueError("--export writes the model of a checkpoint: add --resume (and the run's --out_dir)")
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
    # sharded checkpoints hold the trainable weights only: the run restarts from the initial model and reads them
    sharded, lora, fsdp = cfg["fsdp"] or cfg["lora_r"] > 0, cfg["lora_r"] > 0, cfg["fsdp"]
    # LoRA: the frozen base in the compute dtype (bf16 on CUDA; only the fp32 adapters need master weights).
    # FSDP: loaded into CPU memory; fully_shard moves each rank's shards to its GPU
    model, processor, fam = vlm.load(cfg["out_dir"] if cfg["resume"] and not sharded else cfg["model"],
                                     "cpu" if fsdp else device, dtype if lora else torch.float32)
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg["vision_lr"] == 0 and not lora:  # (LoRA freezes the whole base already)
        for p in vlm.vision_parameters(model):
            p.requires_grad_(False)
    if lora:
        model = add_lora(model, cfg["lora_r"], cfg["lora_alpha"], cfg["lora_vision"])
    # The frozen initial policy for the KL term; not even loaded when beta == 0. It runs exactly the policy's
    # computation, so KL is exactly 0 at step 0: FSDP casts every weight to dtype for compute (store it so), autocast
    # only Linear layers' (reference_weights). LoRA: the policy itself with its adapters off, no second copy.
    ref, ref_off = None, contextlib.nullcontext
    if cfg["beta"] > 0 and lora:
        ref, ref_off = model, model.disable_adapter
    elif cfg["beta"] > 0 and fsdp:
        ref = vlm.load(cfg["model"], "cpu", dtype)[0].eval().requires_grad_(False)
    elif cfg["beta"] > 0:
        ref = reference_weights(vlm.load(cfg["model"], device)[0], dtype)
    if fsdp:
        shard(model, dtype)
        if ref is not None:
            shard(ref, dtype, offload=cfg["ref_offload"] and device.type == "cuda")  # (on a CPU it is there already)
    # Two parameter groups: the vision side at vision_lr x lr, the rest at lr. Ids after shard():
    # fully_shard swaps each parameter for a sharded one; LoRA: the adapters inside the tower (--lora_vision)
    vis = {id(p) for p in vlm.vision_parameters(model.get_base_model() if lora else model)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if id(p) not in vis], lr=cfg["lr"]),
              dict(params=[p for p in params if id(p) in vis], lr=cfg["lr"] * cfg["vision_lr"])]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    step, pos = 0, 0  # optimizer steps done, prompts consumed (the data position)
    if cfg["resume"]:
        st = torch.load(os.path.join(cfg["out_dir"], "state.pt"), weights_only=False)
        if sharded:
            load_sharded(cfg["out_dir"], model, opt)
        else:
            opt.load_state_dict(st["optimizer"])
        step, pos, rng = st["step"], st["pos"], st["rng"]
        torch.set_rng_state(rng["torch"]), random.setstate(rng["python"]), np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])
    if cfg["export"]:
        cfg["steps"] = step  # nothing to train: the export after the loop is all
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 and not fsdp else model
    # at mu = 1 the old policy is the current one: the update's own log-probs, detached, are log pi_old (ratio
    # exactly 1, as TRL), which saves a forward over the batch; the methods need pi_old before step 4 (--old_pass)
    old_pass = cfg["mu"] > 1 or cfg["old_pass"]
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
        """Rank 0 evaluates. Under FSDP every rank runs the same evaluation on the gathered weights (rank 0's
        figures are logged): generate decodes in lockstep across ranks (see shard), and with rank 0 generating
        alone the ranks' FSDP states also went apart (a collective mismatch at the next gather, 2 gloo ranks)."""
        with amp(), gathered(model):
            return {f"val_{rows[0]['task']}_{k}": v for rows in val if master or fsdp
                    for k, v in evaluate(model, processor, fam, rows, mbs, cfg["max_new_tokens"]).items()}

    stop = []  # Ctrl-C / SIGTERM: finish the step, save, exit; the ranks agree through the all-reduce

    def request_stop(*_):
        stop.append(1)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

    signal.signal(signal.SIGINT, request_stop), signal.signal(signal.SIGTERM, request_stop)
    if step == 0 and cfg["eval_every"] > 0:
        ev = validate()
        if master:
            write(dict(step=0, **ev))
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
            with amp(), gathered(model):
                inputs, ids, mask, texts = rollout(model, processor, rows, images, G, cfg["max_new_tokens"], T)
            rep = [(row, im) for row, im in zip(rows, images) for _ in range(G)]  # prompt-major, as sampled
            r = torch.tensor([reward(row, text, fam, im.size, wh) for (row, im), text, wh
                              in zip(rep, texts, vlm.seen_sizes(processor, fam, inputs))], device=device)
            chunks.append(dict(rows=rows, images=images, inputs=inputs, ids=ids, mask=mask.float(), rewards=r))
            # --- VEPO ------------------------------------------------------------------
            chunks[-1]["vgen"] = torch.Generator().manual_seed(chunk_seed(cfg["seed"] + 1, step, g))  # noise, Random-k
            # --- end VEPO --------------------------------------------------------------
        t1 = time.time()
        # 3. old pass: log pi_old and the policy's entropy at every sampled token (skipped at mu = 1, see
        # old_pass: the update fills them in), and log pi_ref for the KL
        for a, c in enumerate(chunks):
            signals = None  # a method's extra forward, fed the clean logits micro-batch by micro-batch
            # --- VEPO ------------------------------------------------------------------
            # counterfactual forward (no grad) inside the old pass: the same completions re-scored under the
            # perturbed image, compared with the clean logits of the same micro-batch
            c["t_vepo"] = []
            signals = stopwatch(functools.partial(perturbed_signals, model, processor.image_processor, c["inputs"],
                                                  c["ids"], T, cfg["noise"], cfg["noise_std"], cfg["mask_ratio"],
                                                  c["vgen"]), c["t_vepo"])
            # --- end VEPO --------------------------------------------------------------
            with amp():
                if old_pass:
                    c["logp_old"], c["entropy"], *c["signals"] = token_stats(model, c["inputs"], c["ids"], T, mbs,
                                                                             signals)
                    # --- VEPO ------------------------------------------------------------------
                    c["jsd"], c["dH"] = c["signals"]
                    # --- end VEPO --------------------------------------------------------------
                else:
                    c["logp_old"], c["entropy"] = torch.zeros_like(c["mask"]), torch.zeros_like(c["mask"])
                if ref is not None:
                    with ref_off():
                        c["logp_ref"] = token_stats(ref, c["inputs"], c["ids"], T, mbs)[0]
        # 4. advantages: GRPO gives every token of completion i the same A_i
        for c in chunks:
            c["adv"] = group_advantages(c["rewards"][:, 0], G)[:, None] * c["mask"]  # (N, T)
            # --- VEPO ------------------------------------------------------------------
            # only the top-k tokens by H * V keep their advantage: the rest get no policy gradient (the KL stays)
            sel = vepo_token_mask(c["entropy"], c["jsd"], c["dH"], c["mask"], cfg["alpha"], cfg["k"], cfg["select"],
                                  c["vgen"])
            c["adv"] = c["adv"] * sel
            c["vepo"] = selection_stats(sel, c["entropy"], c["jsd"], c["dH"], c["mask"], cfg["alpha"], cfg["k"])
            # --- end VEPO --------------------------------------------------------------
            c["flat"] = c["rewards"][:, 0].view(-1, G).std(1) == 0  # all rewards equal: A = 0
            c["loss_mask"] = c["mask"] * ~c["flat"].repeat_interleave(G)[:, None] if cfg["filter_groups"] else c["mask"]
        S = collections.Counter()  # step statistics, summed over chunks, then over ranks
        for c in chunks:
            r, m = c["rewards"], c["mask"]
            S.update(reward=r[:, 0].sum().item(), format=r[:, 1].sum().item(), accuracy=r[:, 2].sum().item(),
                     seqs=len(r), tokens=m.sum().item(),
                     std0=c["flat"].sum().item(), groups=len(c["flat"]), loss_tokens=c["loss_mask"].sum().item(),
                     loss_seqs=(c["loss_mask"].sum(1) > 0).sum().item())
        # --- VEPO ------------------------------------------------------------------
        for c in chunks:
            S.update({f"vepo_{k}": v for k, v in c["vepo"].items()})
        # --- end VEPO --------------------------------------------------------------
        S = all_sum(S, device)  # the global counts normalise the loss
        t2 = time.time()
        # 5. update. With mu = 1 the policy still equals pi_old, so the ratio is 1 and clipping never
        # activates: the loss is then the plain policy gradient of A * log pi (+ the KL term).
        model.train()
        U, norms = collections.Counter(stop=len(stop)), []
        work = [(c, mb) for c in chunks for mb in micro_batches(len(c["ids"]), mbs)]
        for _ in range(cfg["mu"]):
            for k, (c, mb) in enumerate(work):
                # DDP all-reduces gradients on the last backward only, and averages them: hence loss * world.
                # FSDP reduce-scatters (averaging) at every backward: skipping it would hold full-size gradients
                with contextlib.nullcontext() if world == 1 or fsdp or k == len(work) - 1 else ddp_model.no_sync():
                    with amp():
                        logp, H = token_logprobs(ddp_model, take(c["inputs"], mb, fam), c["ids"][mb], T, not old_pass)
                    if not old_pass:  # mu = 1: pi_old = pi, and the logged entropy comes from this pass
                        c["logp_old"][mb], c["entropy"][mb] = logp.detach(), H
                    loss, clipped, kl = policy_loss(
                        logp, c["logp_old"][mb], c["adv"][mb], c["loss_mask"][mb], max(S["loss_tokens"], 1),
                        max(S["loss_seqs"], 1), cfg["eps_low"], cfg["eps_high"], cfg["loss_agg"], cfg["beta"],
                        c["logp_ref"][mb] if ref is not None else None)
                    (loss * world).backward()
                U.update(loss=loss.item(), clipped=clipped, kl=kl)
            norms.append(optimizer_step(model, opt, cfg["grad_clip"], ok=S["loss_seqs"] > 0))
        U.update(entropy=sum((c["entropy"] * c["mask"]).sum().item() for c in chunks))
        U = all_sum(U, device)
        pos += world * A * B
        t3 = time.time()
        # logging: rank 0; eval and checkpoints: every rank takes part (FSDP gathers, DCP writes shards)
        last = step + 1 == cfg["steps"] or U["stop"] > 0
        ev = validate() if cfg["eval_every"] > 0 and ((step + 1) % cfg["eval_every"] == 0 or last) else {}
        if master:
            n, mu, skipped = max(S["loss_tokens"], 1) * cfg["mu"], cfg["mu"], sum(not ok for _, ok in norms)
            rec = dict(step=step + 1, reward=S["reward"] / S["seqs"], reward_format=S["format"] / S["seqs"],
                       reward_accuracy=S["accuracy"] / S["seqs"], entropy=U["entropy"] / S["tokens"],
                       length=S["tokens"] / S["seqs"], kl=U["kl"] / n, clip_frac=U["clipped"] / n,
                       std0_frac=S["std0"] / S["groups"], loss=U["loss"] / mu, grad_norm=norms[-1][0],
                       skipped=skipped, t_rollout=t1 - t0, t_old=t2 - t1, t_train=t3 - t2, t_step=t3 - t0,
                       tokens_per_s=S["tokens"] / (t3 - t0))
            if skipped:
                tqdm.write(f"step {step + 1}: non-finite gradient norm or no group left: update skipped")
            # --- VEPO ------------------------------------------------------------------
            rec.update({k: v / (world * A) for k, v in S.items() if k.startswith("vepo_")},  # means over chunks
                       t_vepo=sum(sum(c["t_vepo"]) for c in chunks))  # rank 0's counterfactual-pass time
            # --- end VEPO --------------------------------------------------------------
            rec.update(ev)
            write(rec)
        if (cfg["save_every"] > 0 and (step + 1) % cfg["save_every"] == 0) or last:
            save(cfg["out_dir"], model, processor, opt, step + 1, pos, sharded)
        if U["stop"] > 0:
            break
    if sharded:  # the full model, once (LoRA: merged), for vlm.load and egg_ground.py
        export(cfg["out_dir"], model, processor, lora)
    if world > 1:
        dist.destroy_process_group()
