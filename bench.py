"""
Speed and memory of the three phases of one GRPO step on a Qwen2.5-VL with random weights at real
scale (or the tiny Qwen3-VL of checkpoints/tiny-shapes) (no hub needed: the configs are written below, the weights are random, the inputs are random
tokens and pixels of the right shapes):

  rollout   generate --new_tokens completions for a batch of image prompts (sampling, KV cache)
  logprob   one no-grad teacher-forced forward over prompt + completion (grpo.py runs it for the
            old and the reference policy; vicra.py adds one more, vepo.py two more)
  train     forward + backward + AdamW step of the policy loss on the same batch

    python bench.py --memory                                   # per-GPU memory of the paper settings, DDP/FSDP/LoRA
    python bench.py                                            # tiny model on CPU: ratios only
    python bench.py --scale 3b --device cuda --dtype bfloat16  # on a GPU: seconds, tokens/s, GiB

Absolute times mean something only on the GPU; on the CPU, read the ratios between phases. --memory prints an
estimate (arithmetic on the released configs' parameter counts, built on the meta device: Qwen2.5-VL-3B/7B,
InternVL3-8B, Llama-3.2-11B-Vision), not a measurement: see memory_rows for what it counts.
"""
import argparse
import functools
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



@functools.lru_cache(maxsize=None)  # meta models: shapes only, nothing to free
def build_real(name):
    """One of MEMORY's models on the meta device (shapes only): the released configs, written in."""
    if name.startswith("qwen2.5-vl"):
        return build(name.split("-")[-1], None, "meta")[0]
    if name == "internvl3-8b":  # OpenGVLab/InternVL3-8B-hf: InternViT-300M + Qwen2.5-7B
        from transformers import InternVLConfig as Config, InternVLForConditionalGeneration as Model
        cfg = Config(vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                        intermediate_size=4096, image_size=[448, 448], patch_size=[14, 14],
                                        attention_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1),
                     text_config=dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                      vocab_size=151674, tie_word_embeddings=False),
                     downsample_ratio=0.5, projector_hidden_act="gelu", tie_word_embeddings=False)
    elif name == "llama-3.2-11b-vision":  # meta-llama/Llama-3.2-11B-Vision-Instruct
        from transformers import MllamaConfig as Config, MllamaForConditionalGeneration as Model
        cfg = Config(vision_config=dict(hidden_size=1280, num_hidden_layers=32, num_global_layers=8,
                                        attention_heads=16, intermediate_size=5120, vision_output_dim=7680,
                                        image_size=560, patch_size=14, max_num_tiles=4,
                                        intermediate_layers_indices=[3, 7, 15, 23, 30]),
                     text_config=dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=40,
                                      num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                                      cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
                                      tie_word_embeddings=False))
    else:
        raise ValueError(f"unknown model {name!r}; one of {[m for m, *_ in MEMORY]}")
    with torch.device("meta"):
        return Model(cfg)


# The README's paper settings: (model, script, G, batch_size, micro_batch_size, max_new_tokens). Llama-3.2-11B
# takes VICRA's 7B setting (the paper's other main model).
MEMORY = [("qwen2.5-vl-3b", "grpo/ecvgpo (REC)", 8, 4, 4, 256), ("qwen2.5-vl-3b", "vepo", 8, 4, 2, 64),
          ("qwen2.5-vl-7b", "vicra", 5, 4, 4, 2048), ("internvl3-8b", "ecvgpo --r0 -50", 8, 4, 4, 256),
          ("llama-3.2-11b-vision", "vicra", 5, 4, 4, 2048)]


def memory_rows(world=8, prompt_tokens=1024, lora_r=64, GB=2 ** 30):
    """Estimated GiB per GPU for each MEMORY setting under DDP, FSDP (world GPUs) and LoRA (rank lora_r, any
    number of GPUs), from the real parameter counts. Bytes per parameter: fp32 weights 4, fp32 grads 4, AdamW
    8; reference: DDP stores Linear weights in bf16 and the rest fp32 (grpo.reference_weights), FSDP bf16 /
    world, LoRA none (the base with adapters off). Activations with --gradient_checkpointing on one micro-batch
    of S = prompt_tokens + max_new_tokens: every decoder layer's bf16 input, one layer recomputed
    (2 B x (5h + 2 h_kv + 4 I) per token), and the completion logits (16 B per (token, vocab): bf16, the float
    copy, log-softmax, its gradient). Rollout: the KV cache of batch_size x G sequences (bf16); FSDP also holds
    the whole model gathered in bf16 (2 B/param) while generating. Peak = max(rollout, update)."""
    rows = []
    for name, script, G, B, mbs, T in MEMORY:
        model = build_real(name)
        tc = model.config.get_text_config()
        h, I, L, V = tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers, tc.vocab_size
        hkv = tc.num_key_value_heads * (getattr(tc, "head_dim", None) or h // tc.num_attention_heads)  # K (or V) width
        lm, emb = model.get_decoder(), model.get_input_embeddings().weight
        N = sum(p.numel() for p in model.parameters())
        lin = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
                  for p in m.parameters(recurse=False) if p is not emb)
        n_lora = sum(lora_r * (m.in_features + m.out_features) for m in lm.modules() if isinstance(m, torch.nn.Linear))
        blocks = set(model._no_split_modules or ())
        block = max(sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in blocks)
        S = prompt_tokens + T
        act = (L * mbs * S * h * 2 + mbs * S * 2 * (5 * h + 2 * hkv + 4 * I) + mbs * (T + 1) * V * 16) / GB
        kv = B * G * S * L * 2 * hkv * 2 / GB
        for mode in ("DDP", "FSDP", "LoRA"):
            if mode == "DDP":
                par, grad, optim, ref, gather = 4 * N, 4 * N, 8 * N, 2 * lin + 4 * (N - lin), 0
            elif mode == "FSDP":
                par, grad, optim, ref, gather = 4 * N / world, 4 * N / world, 8 * N / world, 2 * N / world, 2 * N
                act += 8 * block / GB  # a block gathered in bf16 (+ the next, prefetched) and its fp32 gradient
            else:
                par, grad, optim, ref, gather = 2 * N + 4 * n_lora, 4 * n_lora, 8 * n_lora, 0, 0
            par, grad, optim, ref, gather = (x / GB for x in (par, grad, optim, ref, gather))
            update, rollout = par + grad + optim + ref + act, par + optim + ref + gather + kv
            rows.append(dict(model=name, script=script, mode=mode, params_B=N / 1e9, weights=par, grads=grad,
                             adamw=optim, ref=ref, activations=act, kv_cache=kv, gathered=gather,
                             peak=max(update, rollout), lora_params_M=n_lora / 1e6 if mode == "LoRA" else None))
            if mode == "FSDP":
                act -= 8 * block / GB
    return rows


def print_memory(rows, world, prompt_tokens, lora_r):
    print(f"Estimated memory per GPU (GiB), world size {world} (LoRA r={lora_r}: per GPU, any world size), "
          f"prompt {prompt_tokens} tokens (image + text) + max_new_tokens; not measured (no GPU)")
    head = ("model", "setting", "mode", "weights", "grads", "AdamW", "ref", "activ.", "KV", "gathered", "peak", "80GB")
    print("{:22s} {:18s} {:5s}".format(*head[:3]) + "".join(f"{x:>9s}" for x in head[3:]))
    for r in rows:
        print(f"{r['model']:22s} {r['script']:18s} {r['mode']:5s}" + "".join(
            f"{r[k]:9.1f}" for k in ("weights", "grads", "adamw", "ref", "activations", "kv_cache", "gathered", "peak"))
            + f"{'fits' if r['peak'] < 80 * 0.93 else 'NO':>9s}")  # ~7% of 80 GB: CUDA context, fragmentation


config = dict(
    memory=False,  # print the per-GPU memory table of the paper settings (no GPU needed) and exit
    mem_world=8, mem_prompt=1024, mem_lora_r=64,  # the table's world size, prompt tokens and LoRA rank
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
        p.add_argument(f"--{k}", type=kind, default=v, **(dict(nargs="?", const=True) if isinstance(v, bool) else {}))
    cfg = vars(p.parse_args())
    if cfg["scale"] not in SCALES:
        p.error(f"--scale {cfg['scale']!r}: choose one of {', '.join(SCALES)}")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg["memory"]:
        print_memory(memory_rows(cfg["mem_world"], cfg["mem_prompt"], cfg["mem_lora_r"]), cfg["mem_world"],
                     cfg["mem_prompt"], cfg["mem_lora_r"])
        raise SystemExit
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
