"""Step time of GRPO (with / without the old pass) and of each method, from the parts of one step timed side by
side in one process (notes/scale.md).

    python notes/scale_components.py --reps 7

The embedded default (tiny checkpoint, 4 prompts x G 8 of the shapes reasoning split, 64 new tokens, micro-batches
of 16, beta 0.04): one rollout is sampled, then every part of a step is run on it, round-robin, reps times, each
part's figure being its fastest run (other jobs on the machine only ever add time). Parts: rollout (generate),
old (token_stats: the no-grad pass), ref (the reference's pass), update (forward + backward + AdamW of every
micro-batch), and each method's old pass with its extra forward fed by token_stats (vicra_signals,
perturbed_signals; VICRA's input building included) or its advantage work (ECVGPO). Step times:
  GRPO = rollout + ref + update (+ old with --old_pass); method = rollout + ref + update + its old pass.
"""
import argparse
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ecvgpo  # noqa: E402
import grpo  # noqa: E402
import vepo  # noqa: E402
import vicra  # noqa: E402
import vlm  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ckpt, G, T, mbs = os.path.join(root, "checkpoints", "tiny-shapes"), 8, 1.0, 16
    model, processor, fam = vlm.load(ckpt)
    ref = grpo.reference_weights(vlm.load(ckpt)[0], torch.float32)
    rows = grpo.load_rows(os.path.join(root, "data", "shapes", "reasoning_train.jsonl"))[:4]
    images = [grpo.load_image(r) for r in rows]
    model.eval()
    inputs, ids, mask, texts = grpo.rollout(model, processor, rows, images, G, 64, T)
    maskf = mask.float()
    rewards = torch.tensor([grpo.reward(r, t, fam, im.size, vlm.resized_size(processor, thw))[0] for (r, im), t, thw
                            in zip([(r, im) for r, im in zip(rows, images) for _ in range(G)], texts,
                                   inputs["image_grid_thw"])])
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    logp_ref = grpo.token_stats(ref, inputs, ids, T, mbs)[0]

    def rollout():
        torch.manual_seed(0)
        grpo.rollout(model, processor, rows, images, G, 64, T)

    def old():
        grpo.token_stats(model, inputs, ids, T, mbs)

    def ref_pass():
        grpo.token_stats(ref, inputs, ids, T, mbs)

    def update():
        model.train()
        adv = grpo.group_advantages(rewards, G)[:, None] * maskf
        for mb in grpo.micro_batches(len(ids), mbs):
            logp, H = grpo.token_logprobs(model, grpo.take(inputs, mb), ids[mb], T, entropy=True)
            loss = grpo.policy_loss(logp, logp.detach(), adv[mb], maskf[mb], maskf.sum(), len(ids), 0.2, 0.2,
                                    "seq-mean", 0.04, logp_ref[mb])[0]
            loss.backward()
        grpo.optimizer_step(model, opt, 1.0)
        model.eval()

    def ecvgpo_old():
        lp, H = ecvgpo.token_stats(model, inputs, ids, T, mbs)
        adv = ecvgpo.group_advantages(rewards, G)[:, None] * maskf
        new = ecvgpo.reshape_advantages(adv, lp, maskf, rewards, G, 10.0)
        ecvgpo.ecvgpo_sums(adv, new, lp, H, maskf, rewards, G, 0.1)

    def vicra_old(kind="discard", kl=False):
        x = vicra.vicra_inputs(processor, rows, images, ids, mask, G, kind, inputs.get("image_grid_thw"), seed=0)
        vicra.token_stats(model, inputs, ids, T, mbs, functools.partial(vicra.vicra_signals, model, x, ids, T, kl))

    def vepo_old():
        gen = torch.Generator().manual_seed(0)
        vepo.token_stats(model, inputs, ids, T, mbs, functools.partial(
            vepo.perturbed_signals, model, processor.image_processor, inputs, ids, T, "gauss", 0.5, 0.6, gen))

    parts = dict(rollout=rollout, old=old, ref=ref_pass, update=update, ecvgpo_old=ecvgpo_old,
                 vicra_old=vicra_old, vicra_noise_old=functools.partial(vicra_old, "noise"),
                 vicra_kl_old=functools.partial(vicra_old, kl=True), vepo_old=vepo_old)
    best = {k: float("inf") for k in parts}
    for rep in range(args.reps):
        for name, fn in parts.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
        print(f"rep {rep}: " + ", ".join(f"{k} {v:.3f}" for k, v in best.items()), flush=True)
    base = best["rollout"] + best["ref"] + best["update"]
    steps = {"grpo (no old pass)": base, "grpo --old_pass": base + best["old"],
             "ecvgpo": base + best["ecvgpo_old"], "vicra (discard)": base + best["vicra_old"],
             "vicra --distort noise": base + best["vicra_noise_old"], "vicra --score kl": base + best["vicra_kl_old"],
             "vepo": base + best["vepo_old"]}
    print(f"\ntokens: {int(mask.sum())} completion tokens in {len(ids)} sequences; parts (s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in best.items()))
    print(f"{'config':24s} {'step (s)':>9s} {'/ grpo --old_pass':>18s} {'/ grpo (no old pass)':>21s}")
    for name, t in steps.items():
        print(f"{name:24s} {t:9.3f} {t / steps['grpo --old_pass']:18.3f} {t / steps['grpo (no old pass)']:21.3f}")
