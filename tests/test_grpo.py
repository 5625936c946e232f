"""grpo.py: rewards by hand (coordinate rescaling included) and under 10k malformed strings, advantages by
hand, the chunk/group assignment, the loss against autograd of the plain policy gradient, clipping and k3,
batched left-padded log-probs against one unpadded sequence at a time, the non-finite step skip, and
(subprocesses on the tiny checkpoint) exact resume, DDP == one process, and learning (slow)."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import grpo
import vlm
from data.shapes.prepare import make_split

torch.set_num_threads(1)  # 2-core machines shared with other jobs
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "checkpoints", "tiny-shapes")
QWEN = vlm.FAMILIES["qwen2_5_vl"]
CORPUS = [grpo.PROMPTS["grounding"].format(query=f"the {c} {s}") for c in ("red", "blue") for s in ("circle", "square")]
CORPUS += ['<think>Find the red circle.</think><answer>{"bbox_2d": [12, 40, 48, 76]}</answer>', "user\n", "assistant\n"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A small grounding train/val split, regenerated (bytes equal the shipped seed's)."""
    out = str(tmp_path_factory.mktemp("shapes"))
    make_split("grounding", "train", 48, 0, out, progress=False)
    make_split("grounding", "val", 8, 0, out, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path, model, processor): a copy of the shipped checkpoint, else a fresh random tiny Qwen2.5-VL."""
    path = str(tmp_path_factory.mktemp("tiny") / "model")
    if os.path.exists(os.path.join(CKPT, "model.safetensors")):
        shutil.copytree(CKPT, path)
    else:
        vlm.build_tiny(CORPUS, out_dir=path, seed=0)
    model, processor, _ = vlm.load(path)
    return path, model.eval(), processor


needs_ckpt = pytest.mark.skipif(not os.path.exists(os.path.join(CKPT, "model.safetensors")),
                                reason="needs the shipped checkpoint: a random model earns reward 0, so A = 0 and "
                                       "nothing would move")


# ----------------------------------------------------------------------------- rewards
def test_grounding_reward_by_hand_with_rescaling(tiny):
    _, _, processor = tiny
    # a 100x70 image is resized to multiples of 16 (patch 8 x merge 2): round(100/16)*16 = 96, round(70/16)*16 = 64
    img = Image.new("RGB", (100, 70), (230, 230, 230))
    thw = processor(text=[vlm.prompt(processor, "x")], images=[img], return_tensors="pt")["image_grid_thw"][0]
    assert vlm.resized_size(processor, thw) == (96, 64)
    text = '<think>look</think> <answer>{"bbox_2d": [48, 32, 96, 64]}</answer>'  # resized px -> [50, 35, 100, 70]
    assert grpo.grounding_reward(text, [50, 35, 100, 70], QWEN, (100, 70), (96, 64)) == (2.0, 1.0, 1.0)
    # ground truth [25, 35, 75, 70]: intersection 25x35 = 875, union 1750 + 1750 - 875 = 2625 -> IoU 1/3
    total, fmt, acc = grpo.grounding_reward(text, [25, 35, 75, 70], QWEN, (100, 70), (96, 64))
    assert fmt == 1.0 and acc == pytest.approx(1 / 3) and total == pytest.approx(4 / 3)
    # without the rescaling the same answer would score 1334 / 1952 against [50, 35, 100, 70], not 1
    assert grpo.iou([48, 32, 96, 64], [50, 35, 100, 70]) == pytest.approx(1334 / 1952)
    # norm1000 (InternVL, Qwen3-VL): 0..1000 of the original image
    norm = dict(box="norm1000")
    assert grpo.grounding_reward('<think></think><answer>{"b": [500, 500, 1000, 1000]}</answer>', [50, 35, 100, 70],
                                 norm, (100, 70), None) == (2.0, 1.0, 1.0)


@pytest.mark.parametrize("text,fmt,acc", [
    ('<think>a</think><answer>{"bbox_2d": [0, 0, 10, 10]}</answer>', 1.0, 1.0),
    ('<answer>{"bbox_2d": [0, 0, 10, 10]}</answer>', 0.0, 1.0),  # no think: IoU still counts
    ('<think>a</think><answer>[0, 0, 10, 10]</answer>', 0.0, 1.0),  # not JSON-like: no format
    ('<think>a</think><answer>{"bbox_2d": [0, 0, 5, 10]}</answer>', 1.0, 0.5),
    ('<think>a</think><answer>{"b": [0, 0, 10, 10]} {"b": [20, 20, 30, 30]}</answer>', 1.0, 1.0),  # first box
    ('[0, 0, 10, 10] <think>a</think><answer>{"b": [20, 20, 30, 30]}</answer>', 1.0, 0.0),  # box outside answer
    ('<think>a</think><answer>{"b": [10, 10, 0, 0]}</answer>', 1.0, 0.0),  # inverted box
    ('<think>a</think><answer>{"b": [0.0, 0.0, 10.0, 10.0]}</answer>', 0.0, 1.0),  # decimals parse, not format
    ("<think>a</think><answer>{}</answer>", 0.0, 0.0),
])
def test_grounding_cases(text, fmt, acc):
    same = (10, 10)  # resized == original: boxes compare as written
    assert grpo.grounding_reward(text, [0, 0, 10, 10], QWEN, same, same) == (pytest.approx(fmt + acc), fmt,
                                                                            pytest.approx(acc))


@pytest.mark.parametrize("text,answer,want", [
    ("<think>two reds</think> \\boxed{3}", "3", (1.0, 1.0, 1.0)),
    ("\\boxed{3.0}", "3", (0.9, 0.0, 1.0)),  # numbers compare as numbers; no think: no format
    ("<think>x</think> \\boxed{4}", "3", (0.1, 1.0, 0.0)),
    ("<think>x</think> \\boxed{2} no, \\boxed{ 3 }", "3", (1.0, 1.0, 1.0)),  # the last box
    ("<think>x</think> \\boxed{\\text{Red}.}", "red", (1.0, 1.0, 1.0)),
    ("<think>x</think> \\boxed{3", "3", (0.0, 0.0, 0.0)),  # unbalanced
    ("<think>x</think> 3", "3", (0.0, 0.0, 0.0)),
])
def test_reasoning_cases(text, answer, want):
    assert grpo.reasoning_reward(text, answer) == pytest.approx(want)


def test_rewards_never_raise_on_10k_malformed_strings():
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "<answer", "think>", "{", "}", "[", "]", ",", ", ", " ",
              "\n", ":", '"', '"bbox_2d"', "\\boxed{", "\\text{", "$", ".", "-", "+", "e", "0", "7", "42", "3.5",
              "9" * 400, "1e309", "nan", "inf", "-1", "\u00e9", "\u4e2d", "\U0001d7d8", "\u0663", "\u00bd", "\x00",
              "<|im_end|>", "\ufffd"]
    grounding = dict(task="grounding", box=[10, 10, 40, 40])
    rows = [grounding, dict(task="reasoning", answer="3"), dict(task="reasoning", answer="red"),
            dict(task="detail", answer="red")]
    for n in range(10_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        for row in rows:
            total, fmt, acc = grpo.reward(row, text, QWEN, (112, 100), (112, 96))
            assert 0.0 <= fmt <= 1.0 and 0.0 <= acc <= 1.0 and 0.0 <= total <= 2.0, (text, row)


def test_missing_image_names_file_and_row(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(dict(image="nope.png", query="the red circle", box=[0, 0, 1, 1])) + "\n")
    row = grpo.load_rows(str(tmp_path / "d.jsonl"))[0]
    with pytest.raises(OSError, match=r"d\.jsonl:1.*nope\.png"):
        grpo.load_image(row)


# ----------------------------------------------------------------------------- advantages and groups
def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 0.0, 0.0])
    a = grpo.group_advantages(r, 4)
    s = (1 / 3) ** 0.5  # unbiased std of [1, 0, 0, 1]
    want = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4)]
    assert torch.allclose(a[:4], torch.tensor([want[0], want[1], want[1], want[0]]))
    assert torch.equal(a[4:8], torch.zeros(4))  # std 0: A = 0, no NaN
    s = 1.5  # [0, 3, 0, 0]: mean 0.75, unbiased var (3 * 0.5625 + 5.0625) / 3 = 2.25
    assert torch.allclose(a[8:], torch.tensor([-0.75, 2.25, -0.75, -0.75]) / (s + 1e-4))


@pytest.mark.parametrize("pos", [0, 37, 90])  # 90: a step across the epoch boundary of 96 rows
def test_chunks_cover_the_data_and_groups_never_span_ranks(pos):
    n, seed, B, chunks = 96, 3, 3, 4  # 4 chunks per step: world 1 x accum 4, 2 x 2 or 4 x 1
    per_world = {}
    for world in (1, 2, 4):
        accum = chunks // world
        per_rank = [[i for a in range(accum) for i in grpo.chunk_indices(n, seed, pos, r * accum + a, B)]
                    for r in range(world)]
        assert all(len(p) == accum * B for p in per_rank)  # every rank holds whole prompts (with all G samples)
        per_world[world] = [i for p in per_rank for i in p]
    assert per_world[1] == per_world[2] == per_world[4]  # the same global batch whatever the world size
    if pos == 0:  # successive steps walk one permutation: every row exactly once per epoch
        epoch = [i for step in range(n // (chunks * B)) for g in range(chunks)
                 for i in grpo.chunk_indices(n, seed, step * chunks * B, g, B)]
        assert sorted(epoch) == list(range(n)) and epoch != list(range(n))
    assert grpo.chunk_seed(0, 5, 1) == grpo.chunk_seed(0, 5, 1) != grpo.chunk_seed(0, 5, 2)


def test_rollout_rows_are_prompt_major_groups(tiny, shapes):
    _, model, processor = tiny
    rows = grpo.load_rows(os.path.join(shapes, "grounding_train.jsonl"))[:3]
    images = [grpo.load_image(r) for r in rows]
    images[1] = images[1].resize((64, 80))  # a different image size: a different number of patches
    torch.manual_seed(0)
    inputs, ids, mask, texts = grpo.rollout(model, processor, rows, images, 2, 6, 1.0)
    one = [grpo.encode(processor, [r], [im]) for r, im in zip(rows, images)]
    for i in range(6):  # sequence i belongs to prompt i // 2, with that prompt's image patches
        x = grpo.take(inputs, slice(i, i + 1), vlm.family(model))
        P = one[i // 2]["input_ids"].shape[1]
        prompt_part = x["input_ids"][0, :inputs["input_ids"].shape[1] - ids.shape[1]]
        assert torch.equal(prompt_part[-P:], one[i // 2]["input_ids"][0])
        assert torch.equal(x["pixel_values"], one[i // 2]["pixel_values"])
    assert len(texts) == 6 and mask.shape == ids.shape


def test_completion_mask_stops_after_first_eos(tiny, shapes):
    """Generate never sees the mask logic: check it on the returned ids directly."""
    _, model, processor = tiny
    rows = grpo.load_rows(os.path.join(shapes, "grounding_train.jsonl"))[:2]
    torch.manual_seed(1)
    _, ids, mask, _ = grpo.rollout(model, processor, rows, [grpo.load_image(r) for r in rows], 4, 24, 1.0)
    eos = model.generation_config.eos_token_id
    for row, m in zip(ids.tolist(), mask.tolist()):
        first = row.index(eos) if eos in row else len(row) - 1
        assert m == [1] * (first + 1) + [0] * (len(row) - first - 1)


# ----------------------------------------------------------------------------- loss
def toy(seed=0, N=6, T=7, V=11):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (N, T), generator=g)
    lens = torch.tensor([7, 1, 4, 7, 2, 5])
    mask = (torch.arange(T)[None] < lens[:, None]).double()  # right padding of varying length
    adv = torch.randn(N, generator=g, dtype=torch.float64)[:, None] * mask
    return z, ids, mask, adv


def logp_of(z, ids):
    return z.log_softmax(-1).gather(-1, ids[..., None])[..., 0]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
def test_mu1_gradient_is_plain_policy_gradient(agg):
    z, ids, mask, adv = toy()
    n_tok, n_seq = mask.sum().item(), mask.shape[0]
    # grpo: two micro-batches, normalised by the global counts, gradients accumulated
    for mb in (slice(0, 2), slice(2, 6)):
        logp = logp_of(z, ids)[mb]
        loss, n_clipped, _ = grpo.policy_loss(logp, logp.detach(), adv[mb], mask[mb], n_tok, n_seq, 0.2, 0.28, agg)
        loss.backward()
        assert n_clipped == 0  # ratio = 1
    got, z.grad = z.grad.clone(), None
    # the plain policy gradient of A * log pi, averaged by hand
    logp = logp_of(z, ids)
    if agg == "token-mean":
        ref = -(adv * logp * mask).sum() / mask.sum()
    else:
        ref = -sum((adv[i] * logp[i] * mask[i]).sum() / mask[i].sum() for i in range(6)) / 6
    ref.backward()
    assert torch.allclose(got, z.grad, atol=1e-12, rtol=1e-10)
    assert got.abs().sum() > 0


def test_aggregations_differ_on_unequal_lengths():
    z, ids, mask, adv = toy()
    logp = logp_of(z, ids)
    args = (logp, logp.detach() - 0.1, adv, mask, mask.sum().item(), 6, 0.2, 0.2)
    assert abs(grpo.policy_loss(*args, "token-mean")[0].item() - grpo.policy_loss(*args, "seq-mean")[0].item()) > 1e-3


@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28)])
def test_clipping_engages_exactly_outside_the_range(eps_low, eps_high):
    ratios = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.19, 1.21, 1.27, 1.29, 1.6], dtype=torch.float64)
    for sign in (1.0, -1.0):
        logp = ratios.log()[None].clone().requires_grad_(True)
        adv, mask = torch.full_like(logp, sign), torch.ones_like(logp)
        loss, n_clipped, _ = grpo.policy_loss(logp, torch.zeros_like(logp), adv, mask, mask.sum().item(), 1,
                                              eps_low, eps_high, "token-mean")
        loss.backward()
        # A > 0: the update stops once the ratio exceeds 1 + eps_high; A < 0: once it drops below 1 - eps_low
        want = ratios > 1 + eps_high if sign > 0 else ratios < 1 - eps_low
        assert torch.equal(logp.grad[0] == 0, want), (sign, logp.grad)
        assert n_clipped == want.sum().item()
        # outside the clip, d loss / d logp = -A * ratio / n_tok
        assert torch.allclose(logp.grad[0][~want], -sign * ratios[~want] / len(ratios))


def test_k3_nonnegative_and_zero_at_reference():
    z, ids, mask, _ = toy(seed=1)
    logp = logp_of(z, ids)
    ref = logp_of(torch.randn_like(z), ids)
    zero = torch.zeros_like(logp)
    loss, _, kl = grpo.policy_loss(logp, logp.detach(), zero, mask, mask.sum().item(), 6, 0.2, 0.2, "token-mean",
                                   beta=1.0, logp_ref=ref)
    d = ref - logp
    assert (torch.exp(d) - d - 1 >= 0).all() and kl > 0
    assert loss.item() == pytest.approx(kl / mask.sum().item())
    loss, _, kl = grpo.policy_loss(logp, logp.detach(), zero, mask, mask.sum().item(), 6, 0.2, 0.2, "token-mean",
                                   beta=1.0, logp_ref=logp.detach())
    loss.backward()
    assert kl == 0.0 and loss.item() == 0.0 and z.grad.abs().max() < 1e-12  # k3 is flat at pi = pi_ref


def test_nonfinite_gradient_skips_the_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 3)).sum().mul(float("nan")).backward()
    norm, stepped = grpo.optimizer_step(model, opt, 1.0)
    assert not stepped and all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not opt.state
    assert all(p.grad is None for p in model.parameters())  # the NaN gradient does not leak into the next step
    model(torch.randn(4, 3)).sum().backward()
    norm, stepped = grpo.optimizer_step(model, opt, 1.0)
    assert stepped and not torch.equal(before[0], model.weight)


# ----------------------------------------------------------------------------- log-probs
def test_batched_padded_logprobs_equal_one_sequence_at_a_time(tiny, shapes):
    _, model, processor = tiny
    model = model.float()
    rows = grpo.load_rows(os.path.join(shapes, "grounding_train.jsonl"))[:3]
    rows[2] = dict(rows[2], query="the blue circle that is next to the large green square")  # a longer prompt
    images = [grpo.load_image(r) for r in rows]
    images[1] = images[1].resize((64, 80))  # fewer visual tokens: more left padding
    g = torch.Generator().manual_seed(0)
    lens = [9, 3, 6]  # completions of different lengths: right padding
    ids = torch.randint(10, 200, (3, 9), generator=g)
    mask = (torch.arange(9)[None] < torch.tensor(lens)[:, None]).long()
    ids = ids.masked_fill(mask == 0, processor.tokenizer.pad_token_id)
    prompt = grpo.encode(processor, rows, images)
    assert len(set(prompt["attention_mask"].sum(1).tolist())) == 3  # three prompt lengths
    inputs = grpo.with_completion(prompt, ids, mask)
    lp, ent = grpo.token_stats(model, inputs, ids, 0.7, micro_batch_size=2)  # a 2 + 1 split exercises take()
    for i in range(3):
        one = grpo.with_completion(grpo.encode(processor, rows[i:i + 1], images[i:i + 1]), ids[i:i + 1, :lens[i]],
                                   mask[i:i + 1, :lens[i]])
        with torch.no_grad():
            lp1, ent1 = grpo.token_logprobs(model, one, ids[i:i + 1, :lens[i]], 0.7, entropy=True)
            full = model(**one).logits[0].double() / 0.7  # every position, no logits_to_keep: the alignment by hand
            full[:, grpo.placeholders(model)] = -float("inf")  # the policy never emits <|image_pad|> / <|video_pad|>
        P = one["input_ids"].shape[1] - lens[i]
        by_hand = [full[P - 1 + t].log_softmax(-1)[ids[i, t]].item() for t in range(lens[i])]
        assert torch.allclose(lp1[0].double(), torch.tensor(by_hand, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(lp[i, :lens[i]], lp1[0], atol=1e-5), (i, (lp[i, :lens[i]] - lp1[0]).abs().max())
        assert torch.allclose(ent[i, :lens[i]], ent1[0], atol=1e-5)
    # the test can see 3-D positions: without mm_token_type_ids Qwen2.5-VL falls back to 1-D ones, Qwen3-VL refuses
    flat = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        if model.config.model_type == "qwen3_vl":
            with pytest.raises(ValueError, match="mm_token_type_ids"):
                grpo.token_logprobs(model, flat, ids, 0.7)
        else:
            lp_flat = grpo.token_logprobs(model, flat, ids, 0.7)[0]
            assert (lp_flat - lp).abs().max() > 1e-4


# ----------------------------------------------------------------------------- whole runs (subprocesses)
TINY_RUN = ["--batch_size", "2", "--G", "4", "--max_new_tokens", "32", "--micro_batch_size", "4", "--eval_every", "0",
            "--save_every", "0", "--threads", "1", "--lr", "3e-4"]


def run(args, torchrun=False):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun else [])
    out = subprocess.run(cmd + ["grpo.py"] + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def params(path):
    return load_file(os.path.join(path, "model.safetensors"))


@needs_ckpt
def test_resume_is_bit_identical(tiny, shapes, tmp_path):
    path = tiny[0]
    data = ["--model", path, "--data", os.path.join(shapes, "grounding_train.jsonl"), "--mu", "2", "--beta", "0.04"]
    run(data + TINY_RUN + ["--steps", "4", "--out_dir", str(tmp_path / "straight")])
    run(data + TINY_RUN + ["--steps", "2", "--out_dir", str(tmp_path / "resumed")])
    run(data + TINY_RUN + ["--steps", "4", "--out_dir", str(tmp_path / "resumed"), "--resume"])
    a, b, init = params(tmp_path / "straight"), params(tmp_path / "resumed"), params(path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], init[k]) for k in a)  # and training moved them
    logs = [[json.loads(x) for x in open(tmp_path / d / "log.jsonl")] for d in ("straight", "resumed")]
    assert [r["reward"] for r in logs[0]] == [r["reward"] for r in logs[1]]  # same rollouts, steps 1-4


@needs_ckpt
def test_ddp_two_ranks_equals_one_process(tiny, shapes, tmp_path):
    path = tiny[0]
    data = ["--model", path, "--data", os.path.join(shapes, "grounding_train.jsonl"), "--steps", "2",
            "--loss_agg", "token-mean", "--device", "cpu", "--dtype", "float32"]
    run(data + TINY_RUN + ["--grad_accum", "2", "--out_dir", str(tmp_path / "one")])
    run(data + TINY_RUN + ["--grad_accum", "1", "--out_dir", str(tmp_path / "ddp")], torchrun=True)
    a, b, init = params(tmp_path / "one"), params(tmp_path / "ddp"), params(path)
    # All-reduce and local accumulation sum the gradients in different orders (~1e-7 relative), and AdamW's
    # division by sqrt(v) carries that into the weights unevenly: measured max difference 1.8e-6 after 2 steps
    # (embeddings) against a movement of 6e-4 per weight. A wrong reduction (sum instead of mean, a missed
    # rank) differs by the movement itself.
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    assert moved > 1e-4  # the comparison is not vacuous
    logs = [[json.loads(x) for x in open(tmp_path / d / "log.jsonl")] for d in ("one", "ddp")]
    assert [r["reward"] for r in logs[0]] == [r["reward"] for r in logs[1]]


@needs_ckpt
def test_vision_lr_scales_the_towers_step_and_zero_freezes_it(tiny, shapes, tmp_path):
    """AdamW's first step moves every weight with a nonzero gradient by about its group's lr (m / sqrt(v) = sign g),
    so after one step the vision tower's largest move is vision_lr x the rest's; at vision_lr 0 it does not move."""
    path = tiny[0]
    data = ["--model", path, "--data", os.path.join(shapes, "grounding_train.jsonl"), "--steps", "1", "--beta", "0"]
    init = params(path)
    moves = {}
    for frac in ("0.1", "0"):
        run(data + TINY_RUN + ["--vision_lr", frac, "--out_dir", str(tmp_path / frac)])
        a = params(tmp_path / frac)
        vis = max((a[k] - init[k]).abs().max().item() for k in a if ".visual." in k)
        rest = max((a[k] - init[k]).abs().max().item() for k in a if ".visual." not in k)
        moves[frac] = vis, rest
    lr = float(TINY_RUN[TINY_RUN.index("--lr") + 1])
    assert moves["0.1"][1] == pytest.approx(lr, rel=0.05)  # the rest: one full-lr step
    assert moves["0.1"][0] == pytest.approx(0.1 * lr, rel=0.05)  # the tower: a tenth of it
    assert moves["0"][0] == 0.0 and moves["0"][1] == pytest.approx(lr, rel=0.05)


def expected_reward(path, rows, n, seed):
    """Mean total / IoU reward of n samples (T = 1, the rollout's sampler) per prompt of rows, under a fixed seed."""
    model, processor, fam = vlm.load(path)
    images = [grpo.load_image(r) for r in rows]
    torch.manual_seed(seed)
    with torch.no_grad():
        inputs, _, _, texts = grpo.rollout(model.eval(), processor, rows, images, n, 64, 1.0)
    sizes = vlm.seen_sizes(processor, fam, inputs)
    got = [grpo.reward(rows[i // n], t, fam, images[i // n].size, sizes[i]) for i, t in enumerate(texts)]
    return sum(g[0] for g in got) / len(got), sum(g[2] for g in got) / len(got)


def reward_before_after(path, shapes, out, seed, steps=10, n=32, lr=1e-4):
    """GRPO (defaults: 8 samples per prompt, beta 0.04) for `steps` steps on a fixed set of 4 prompts
    (the first 4 rows with 2+ objects: every step sees all of them), then the expected reward on those prompts
    before and after, each from n samples per prompt under the same sampling seed."""
    rows = [r for r in grpo.load_rows(os.path.join(shapes, "grounding_train.jsonl")) if r["n_objects"] >= 2][:4]
    os.makedirs(out, exist_ok=True)
    data = os.path.join(out, "four.jsonl")
    with open(data, "w") as f:  # absolute image paths: the rows live outside the shapes folder now
        f.writelines(json.dumps(dict(r, image=os.path.join(shapes, r["image"]))) + "\n" for r in rows)
    run(["--model", path, "--data", data, "--steps", str(steps), "--eval_every", "0", "--save_every", "0",
         "--threads", "1", "--seed", str(seed), "--lr", str(lr), "--out_dir", os.path.join(out, "run")])
    rows = grpo.load_rows(data)
    return expected_reward(path, rows, n, 1000 + seed), expected_reward(os.path.join(out, "run"), rows, n, 1000 + seed)


@needs_ckpt
def test_a_few_steps_raise_the_expected_reward(tiny, shapes, tmp_path):
    """Policy improvement where it must show first: on the 4 prompts it trains on, 20 GRPO steps (lr 1e-4) raise
    the expected reward (32 samples per prompt before and after, the same sampling seed). Measured on the shipped
    checkpoint (notes/grpo.md, section g), after - before for seeds 0-4: +0.058, +0.048, +0.031, +0.074, +0.066
    (IoU part +0.058, +0.064, +0.031, +0.059, +0.066); asserted: +0.02. (The previous checkpoint, greedy Acc@0.5
    0.935, moved by <= 0.03 and one seed fell: this was an xfail. The earlier 8-step test compared steps 1-3 with
    6-8 over changing prompts, where the draw hides a trend.)"""
    (before, iou_before), (after, iou_after) = reward_before_after(tiny[0], shapes, str(tmp_path), seed=0, steps=20,
                                                                   lr=1e-4)
    print(f"expected reward before {before:.3f} (IoU {iou_before:.3f}), after {after:.3f} (IoU {iou_after:.3f})")
    assert after - before >= 0.02
