"""
Speed and memory of the three phases of one GRPO step on a Qwen2.5-VL with random weights at real
scale (or the tiny Qwen3-VL of checkpoints/tiny-shapes) (no hub needed: the configs are written below, the weights are random, the inputs are random
tokens and pixels of the right shapes):

  rollout   generate --new_tokens completions for a batch of image prompts (sampling, KV cache)
  logprob   one no-grad teacher-forced forward over prompt + completion (grpo.py runs it for the
            old and the reference policy; vicra.py adds one more, vepo.py two more)
  train     forward + backward + AdamW step of the policy loss on the same batch

    python bench.py                                            # tiny model on CPU: ratios only
    python bench.py --scale 3b --device cuda --dtype bfloat16  # on a GPU: seconds, tokens/s, GiB

Absolute times mean something only on the GPU; on the CPU, read the ratios between phases.
"""
import argparse
import json
import time

import torch

SCALES = {  # text / vision configs of the released checkpoints (config.json), and of checkpoints/tiny-shapes
    "tiny": (dict(hidden_size=192, intermediate_size=768, num_hidden_layers=3, num_attention_heads=4, head_dim=48,
                  num_key_value_heads=4, vocab_size=2509, tie_word_embeddings=True, mrope=[8, 8, 8], theta=1e4,
                  arch="qwen3_vl"),
             dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, patch_size=8,
                  num_position_embeddings=196, deepstack_visual_indexes=[0, 1])),
    "3b": (dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, mrope=[16, 24, 24], theta=1e6),
           dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                window_size=112, fullatt_block_indexes=[7, 15, 23, 31])),
    "7b": (dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, mrope=[16, 24, 24], theta=1e6),
           dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                window_size=112, fullatt_block_indexes=[7, 15, 23, 31])),
}

config = dict(
    scale="tiny", device="cuda" if torch.cuda.is_available() else "cpu", dtype="float32",
    batch=8,  # sequences per phase (prompts x G)
    prompt_tokens=64, image_px=0,  # image side in pixels (0: 112 for tiny, 448 otherwise)
    new_tokens=128, repeats=3, grad_ckpt=False, threads=0, seed=0,
)


def build(scale, dtype, device="cpu"):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration)
    text, vision = (dict(d) for d in SCALES[scale])
    mrope, theta, arch = text.pop("mrope"), text.pop("theta"), text.pop("arch", "qwen2_5_vl")
    V = text["vocab_size"]
    ids = dict(image_token_id=V - 5, video_token_id=V - 4, vision_start_token_id=V - 3, vision_end_token_id=V - 2)
    rope = dict(rope_type="default", rope_theta=theta, mrope_section=mrope)
    Config, Model = ((Qwen3VLConfig, Qwen3VLForConditionalGeneration) if arch == "qwen3_vl" else
                     (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration))
    cfg = Config(
        text_config=dict(text, max_position_embeddings=32768, bos_token_id=0, eos_token_id=V - 1, pad_token_id=0,
                         rope_parameters=dict(rope, mrope_interleaved=True) if arch == "qwen3_vl" else rope),
        vision_config=dict(vision, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text["hidden_size"]),
        tie_word_embeddings=text["tie_word_embeddings"], **ids)
    # on "meta" only shapes exist (tests count parameters this way); elsewhere transformers' own init runs on
    # the device (normal(0.02) weights, zero biases, unit norms, computed rope buffers), then the cast
    with torch.device(device):
        model = Model(cfg)
    return (model if device == "meta" else model.to(dtype)), ids


def inputs(model, ids, batch, prompt_tokens, image_px, device):
    """Random text tokens around one image, laid out as the Qwen2.5-VL template lays them out."""
    vc = model.config.vision_config
    g = image_px // vc.patch_size  # patches per side
    n_img = (g // 2) ** 2  # visual tokens after the 2x2 merge
    V = model.config.text_config.vocab_size
    half = prompt_tokens // 2
    row = lambda: torch.cat([torch.randint(1, V - 10, (half,)), torch.tensor([ids["vision_start_token_id"]]),
                             torch.full((n_img,), ids["image_token_id"]), torch.tensor([ids["vision_end_token_id"]]),
                             torch.randint(1, V - 10, (prompt_tokens - half,))])
    input_ids = torch.stack([row() for _ in range(batch)])
    return dict(input_ids=input_ids.to(device), attention_mask=torch.ones_like(input_ids).to(device),
                mm_token_type_ids=(input_ids == ids["image_token_id"]).long().to(device),
                pixel_values=torch.randn(batch * g * g, 3 * 2 * vc.patch_size ** 2).to(device, model.dtype),
                image_grid_thw=torch.tensor([[1, g, g]] * batch).to(device))


def timed(fn, device, repeats):
    """(median seconds, peak GiB allocated) over repeats calls after one warm-up call."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)  # GPU kernels are asynchronous
    fn()
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None  # CPU: not measured
    return sorted(times)[len(times) // 2], peak


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for k, v in config.items():
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(v, bool) else type(v)
        p.add_argument(f"--{k}", type=kind, default=v)
    cfg = vars(p.parse_args())
    if cfg["scale"] not in SCALES:
        p.error(f"--scale {cfg['scale']!r}: choose one of {', '.join(SCALES)}")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    dev, dtype = cfg["device"], getattr(torch, cfg["dtype"])
    model, ids = build(cfg["scale"], dtype, dev)
    if cfg["grad_ckpt"]:
        model.gradient_checkpointing_enable()
    px = cfg["image_px"] or (112 if cfg["scale"] == "tiny" else 448)
    prompt = inputs(model, ids, cfg["batch"], cfg["prompt_tokens"], px, dev)
    P = prompt["input_ids"].shape[1]

    def rollout():
        with torch.no_grad():
            return model.generate(**prompt, max_new_tokens=cfg["new_tokens"], min_new_tokens=cfg["new_tokens"],
                                  do_sample=True, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0)

    seq = rollout()
    full = dict(prompt, input_ids=seq, attention_mask=torch.ones_like(seq),
                mm_token_type_ids=torch.cat([prompt["mm_token_type_ids"],
                                             torch.zeros_like(seq[:, P:])], 1))
    target = seq[:, P:]

    def logp():  # log-probs of the completion tokens, as grpo.py's token_stats computes them
        logits = model(**full, logits_to_keep=target.shape[1] + 1).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]

    def logprob():
        with torch.no_grad():
            logp()

    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)

    def train():
        model.train()
        loss = -logp().mean()  # the policy loss is elementwise in the log-probs: same cost
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()

    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    res = dict(scale=cfg["scale"], params_B=round(n_params / 1e9, 4), device=dev, dtype=cfg["dtype"],
               batch=cfg["batch"], prompt_len=P, visual_tokens=int(prompt["mm_token_type_ids"][0].sum()),
               new_tokens=cfg["new_tokens"], grad_ckpt=cfg["grad_ckpt"])
    for name, fn in [("rollout", rollout), ("logprob", logprob), ("train", train)]:
        s, gib = timed(fn, dev, cfg["repeats"])
        res[f"{name}_s"], res[f"{name}_peak_GiB"] = round(s, 4), gib and round(gib, 2)
        tokens = cfg["batch"] * (cfg["new_tokens"] if name == "rollout" else P + cfg["new_tokens"])
        res[f"{name}_tokens_per_s"] = round(tokens / s, 1)
        print(f"{name:8s} {s:9.4f} s  {tokens / s:12.1f} tok/s  peak " + (f"{gib:6.2f} GiB" if gib else "n/a"), flush=True)
    res["logprob_over_train"] = round(res["logprob_s"] / res["train_s"], 3)
    res["rollout_over_train"] = round(res["rollout_s"] / res["train_s"], 3)
    print(json.dumps(res))
