"""
Re-measure every method's claims-table figures on one tiny checkpoint (README "Claims we checked", notes/*.md).

    python notes/remeasure.py grpo   [--ckpt checkpoints/tiny-shapes] [--threads 1] [--seeds 0 1 2] [--steps 60]
    python notes/remeasure.py ecvgpo [--seeds 0] [--steps 30]
    python notes/remeasure.py vicra  [--seeds 0] [--steps 30] [--n 200]
    python notes/remeasure.py vepo   [--seeds 0] [--steps 25] [--n 64]
    python notes/remeasure.py egg    [--seeds 0] [--n 0]
    python notes/remeasure.py report                     # every summary.json -> markdown-ready figures
    # --lr passes a learning rate to every training run (e.g. the old default: ecvgpo --lr 1e-4 --out runs/rm_lr1e-4)

Each subcommand is independent (two can run side by side, one per core) and writes its raw outputs under
runs/remeasure/<name>/ (one folder per training run: log.jsonl, stdout.txt, the final model) and
runs/remeasure/<name>/summary.json. Training runs are the scripts themselves, through their CLI; a run whose
folder already holds a finished log of the same command is reused, so an interrupted measurement resumes.
--shapes points at the shapes data (default data/shapes; e.g. /work/main/data/shapes to avoid regenerating it).

Wall time at the defaults, one thread per job, measured on the shipped checkpoint (a third job shared the 2 cores):
grpo 12 min (3 seeds), ecvgpo 13 min, vicra 5 min, vepo 7 min, egg 2 min; `ecvgpo; vicra` and `grpo; vepo; egg`
side by side took 16 and 20 min.
"""
import argparse
import functools
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import grpo  # noqa: E402
import vepo  # noqa: E402
import vlm  # noqa: E402

R0 = ["-10", "-50", "off", "50", "10"]  # ECVGPO figure 6's entropy order, highest first


# ---------------------------------------------------------------------------- helpers
def train(a, script, name, *flags):
    """Run `script` (repo root) with the common flags into <out>/<name>; return its log.jsonl records.
    Reuses a finished run of the identical command and checkpoint (cmd.json) instead of training again."""
    out = os.path.join(a.out, name)
    cmd = [sys.executable, os.path.join(ROOT, script), "--model", a.ckpt, "--threads", str(a.threads),
           "--out_dir", out, *map(str, flags), *(["--lr", str(a.lr)] if a.lr else [])]
    log_path, cmd_path = os.path.join(out, "log.jsonl"), os.path.join(out, "cmd.json")
    weights = os.path.join(a.ckpt, "model.safetensors")  # a new checkpoint at the same path is not reused
    key = dict(cmd=cmd, ckpt_mtime=os.path.getmtime(weights) if os.path.exists(weights) else None)
    if os.path.exists(cmd_path) and json.load(open(cmd_path)) == key and os.path.exists(os.path.join(out, "done")):
        print(f"reusing {out}")
        return [json.loads(x) for x in open(log_path)]
    os.makedirs(out, exist_ok=True)
    json.dump(key, open(cmd_path, "w"))
    if os.path.exists(os.path.join(out, "done")):
        os.remove(os.path.join(out, "done"))
    print(" ".join(cmd), flush=True)
    t = time.time()
    with open(os.path.join(out, "stdout.txt"), "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS=str(a.threads))).returncode
    if rc:
        raise RuntimeError(f"{script} failed (exit {rc}); see {out}/stdout.txt:\n"
                           + "".join(open(os.path.join(out, "stdout.txt")).readlines()[-15:]))
    open(os.path.join(out, "done"), "w").write(f"{time.time() - t:.0f} s\n")
    print(f"  {time.time() - t:.0f} s", flush=True)
    return [json.loads(x) for x in open(log_path)]


def steps_of(log):
    return [r for r in log if "reward" in r]  # training steps; the step-0 record holds the eval only


def window(log, key, first, last=None):
    """Mean of `key` over training steps first..last (1-based, inclusive); first = -n: the last n steps."""
    v = [r[key] for r in steps_of(log) if r.get(key) is not None]
    v = v[first:] if first < 0 else v[first - 1:last]
    return float(np.mean(v)) if v else None


def evals(log, task):
    return {r["step"]: r[f"val_{task}_acc"] for r in log if f"val_{task}_acc" in r}


def run_summary(log, task):
    """The figures every training run reports: reward windows, per-step rewards, val acc by step."""
    s = steps_of(log)
    return dict(steps=len(s), reward_first5=window(log, "reward", 1, 5), reward_last5=window(log, "reward", -5),
                entropy_mean=float(np.mean([r["entropy"] for r in s])), val_acc=evals(log, task),
                t_step=float(np.mean([r["t_step"] for r in s])), reward=[r["reward"] for r in s])


def shapes(a, split):
    return os.path.join(a.shapes, f"{split}.jsonl")


def save_summary(a, name, summary):
    os.makedirs(os.path.join(a.out, name), exist_ok=True)
    summary = dict(ckpt=a.ckpt, seeds=a.seeds, steps=a.steps, **summary)
    with open(os.path.join(a.out, name, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items()}, indent=1)[:4000])


# ---------------------------------------------------------------------------- 1. GRPO: the README main job
def cmd_grpo(a):
    """`python grpo.py` as the README runs it (shapes grounding, 60 steps, eval_every 20 on val_n 100), per seed.
    Estimate: ~5 min per seed at one thread (smoke, --steps 2: 25 s, 3.1 s/step + two 100-row evals), ~15 min."""
    per_seed = {}
    for s in a.seeds:
        log = train(a, "grpo.py", f"grpo/seed_{s}", "--seed", s, "--steps", a.steps,
                    "--data", shapes(a, "grounding_train"), "--val", shapes(a, "grounding_val"))
        ev = evals(log, "grounding")
        per_seed[s] = dict(run_summary(log, "grounding"), acc_step0=ev.get(0), acc_last=ev.get(a.steps),
                           format_by_eval={r["step"]: r["val_grounding_format"] for r in log
                                           if "val_grounding_format" in r},
                           format_first5=window(log, "reward_format", 1, 5),
                           format_last5=window(log, "reward_format", -5),
                           iou_first5=window(log, "reward_accuracy", 1, 5),
                           iou_last5=window(log, "reward_accuracy", -5),
                           entropy_first5=window(log, "entropy", 1, 5), entropy_last5=window(log, "entropy", -5),
                           # tests/test_grpo.py's margin: steps 1-3 vs 6-8 (that test runs 8 steps on its own data)
                           reward_1_3=window(log, "reward", 1, 3),
                           reward_6_8=window(log, "reward", 6, 8) if a.steps >= 8 else None)
    keys = ["acc_step0", "acc_last", "reward_first5", "reward_last5", "format_first5", "format_last5", "iou_first5",
            "iou_last5", "entropy_first5", "entropy_last5", "entropy_mean"]
    mean = {k: float(np.mean([p[k] for p in per_seed.values()])) for k in keys
            if all(p[k] is not None for p in per_seed.values())}
    save_summary(a, "grpo", dict(per_seed=per_seed, mean_over_seeds=mean))


# ---------------------------------------------------------------------------- 2. ECVGPO: the r0 sweep (figure 6)
def in_order(values):
    return all(x > y for x, y in zip(values, values[1:]))


def running_mean(v, w=5):
    return [float(np.mean(v[i - w + 1:i + 1])) for i in range(w - 1, len(v))]


def cmd_ecvgpo(a):
    """r0 in -10 -50 off 50 10 (delta = inf; off = --r0 inf --delta 0.1, as notes/ecvgpo.md), per seed.
    Estimate: ~3 min per 30-step run at one thread (smoke, --steps 2: 2 min for the 5 runs, ~5 s/step), so
    ~15 min for 5 runs x 1 seed, ~30 min for 2 seeds."""
    per_seed = {}
    for s in a.seeds:
        logs = {r0: steps_of(train(a, "ecvgpo.py", f"ecvgpo/r0_{r0}_seed_{s}", "--seed", s, "--steps", a.steps,
                                   "--eval_every", a.steps, "--save_every", 0,
                                   "--r0", "inf" if r0 == "off" else r0, "--delta", "0.1" if r0 == "off" else "inf",
                                   "--data", shapes(a, "grounding_train"), "--val", shapes(a, "grounding_val")))
                for r0 in R0}
        H = {r0: [r["entropy"] for r in logs[r0]] for r0 in R0}
        n = min(map(len, H.values()))
        per_step = [in_order([H[r0][t] for r0 in R0]) for t in range(n)]
        smooth = {r0: running_mean(H[r0][:n]) for r0 in R0}
        smoothed = [in_order([smooth[r0][t] for r0 in R0]) for t in range(max(n - 4, 0))]
        cov = {r0: [r["cov_logp_adv_reshaped"] for r in logs[r0]] for r0 in R0}
        # eq. 17 moves Cov(log pi_old, A) by Cov(log pi_old, A' - A), which should have the sign of 1/r0
        shift_sign = {r0: float(np.mean([np.sign(r["cov_logp_adv_reshaped"] - r["cov_logp_adv"]) == np.sign(1 / float(r0))
                                         for r in logs[r0]])) for r0 in R0 if r0 != "off"}
        per_seed[s] = dict(
            entropy_mean_steps_2_on={r0: float(np.mean(H[r0][1:])) if n > 1 else None for r0 in R0},
            entropy_mean_order_holds=in_order([np.mean(H[r0][1:]) for r0 in R0]) if n > 1 else None,
            order_steps=int(sum(per_step)), order_steps_of=n, order_at=[t + 1 for t, ok in enumerate(per_step) if ok],
            order_steps_smoothed5=int(sum(smoothed)), order_steps_smoothed5_of=len(smoothed),
            pair_order_steps=int(sum(H["-10"][t] > H["off"][t] > H["10"][t] for t in range(n))),
            cov_shift_sign_1_over_r0=shift_sign,  # fraction of steps
            cov_reshaped_ordered_by_1_over_r0=int(sum(in_order([cov[r0][t] for r0 in R0[::-1]]) for t in range(n))),
            premise_steps=int(sum(r["pos_logp"] < r["neg_entropy"] for r in logs["off"])),  # eq. 13, off run
            reward_mean={r0: float(np.mean([r["reward"] for r in logs[r0]])) for r0 in R0},
            dadv_abs={r0: float(np.mean([r["dadv_abs"] for r in logs[r0]])) for r0 in R0},
            entropy=H)
    save_summary(a, "ecvgpo", dict(r0=R0, per_seed=per_seed))


# ---------------------------------------------------------------------------- 3. VICRA: w by token class, GRPO vs VICRA
def w_table(path, rows, teacher=False):
    """Mean w (eq. 4, discard, T = 1) by token class, as notes/vicra.md's table: tests/test_vicra.py's
    w_by_token_class (imported, not copied) on the model at `path`."""
    from tests.test_vicra import w_by_token_class
    model, processor, _ = vlm.load(path)
    return {k: dict(mean_w=m, n=n) for k, (m, n) in w_by_token_class(model.eval(), processor, rows, teacher).items()}


def cmd_vicra(a):
    """w by token class on the first --n reasoning val questions (checkpoint: greedy and teacher-forced; after the
    GRPO and VICRA runs: greedy), and grpo.py vs vicra.py from the same seed on the reasoning split.
    Estimate: ~0.5 min per 200-row w table (4 tables) + ~2 / ~2.5 min per 30-step grpo / vicra run (3.4 / 4.3
    s/step in the smoke run: 56 s with 16 rows, 2 steps) = ~10 min at one thread."""
    rows = grpo.load_rows(shapes(a, "reasoning_val"))[:a.n]
    tables = dict(ckpt_greedy=w_table(a.ckpt, rows), ckpt_teacher=w_table(a.ckpt, rows, teacher=True))
    runs = {}
    for s in a.seeds:
        flags = ["--seed", s, "--steps", a.steps, "--eval_every", a.steps, "--save_every", 0,
                 "--data", shapes(a, "reasoning_train"), "--val", shapes(a, "reasoning_val")]
        logs = {m: train(a, f"{m}.py", f"vicra/{m}_seed_{s}", *flags) for m in ("grpo", "vicra")}
        runs[s] = {m: run_summary(log, "reasoning") for m, log in logs.items()}
        g, v = (runs[s][m]["reward"] for m in ("grpo", "vicra"))
        runs[s]["reward_equal_steps"] = int(sum(abs(x - y) < 1e-9 for x, y in zip(g, v)))
        runs[s]["vg_frac_mean"] = float(np.mean([r["vg_frac"] for r in steps_of(logs["vicra"])]))
        for m in ("grpo", "vicra"):
            tables[f"{m}_seed_{s}_greedy"] = w_table(os.path.join(a.out, f"vicra/{m}_seed_{s}"), rows)
    save_summary(a, "vicra", dict(n=len(rows), w_by_class=tables, runs=runs))


# ---------------------------------------------------------------------------- 4. VEPO: figure 2b overlap, runs
def spearman(x, y):
    rank = lambda v: np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float)  # noqa: E731 (ties rare)
    return float(np.corrcoef(rank(x), rank(y))[0, 1])


def pad_cat(ts):
    T = max(t.shape[1] for t in ts)
    return torch.cat([torch.nn.functional.pad(t, (0, T - t.shape[1])) for t in ts])


def vepo_overlap(model, processor, rows, seed, noise, G=8, B=4, k=0.2, alpha=0.7, T=1.0):
    """notes/vepo.md's figure-2b table: `rows` x G samples at temperature T in chunks of B prompts (the training
    batch); per chunk and pooled, vepo.selection_stats (Top-Entropy misses of Top-JSD / Top-|dH|, overlaps of the
    VEPO selection) and Spearman(H, JSD) over all valid tokens. Noise: vepo.py's defaults (gauss 0.5, patch 0.6)."""
    chunks = []
    for i in range(0, len(rows), B):
        rs = rows[i:i + B]
        torch.manual_seed(grpo.chunk_seed(seed, 0, i // B))
        images = [grpo.load_image(r) for r in rs]
        inputs, ids, mask, _ = grpo.rollout(model, processor, rs, images, G, 64, T)
        gen = torch.Generator().manual_seed(grpo.chunk_seed(seed + 1, 0, i // B))
        signals = functools.partial(vepo.perturbed_signals, model, processor.image_processor, inputs, ids, T, noise,
                                    0.5, 0.6, gen)
        _, H, jsd, dH = vepo.token_stats(model, inputs, ids, T, 16, signals)
        chunks.append(dict(entropy=H, jsd=jsd, dH=dH, mask=mask.float()))

    def stats(c):
        sel = vepo.vepo_token_mask(c["entropy"], c["jsd"], c["dH"], c["mask"], alpha, k, "vepo")
        return vepo.selection_stats(sel, c["entropy"], c["jsd"], c["dH"], c["mask"], alpha, k)
    per_chunk = [stats(c) for c in chunks]
    pooled = {key: pad_cat([c[key] for c in chunks]) for key in chunks[0]}
    m = pooled["mask"].bool()
    return dict(noise=noise, tokens=int(m.sum()), per_chunk_mean={key: float(np.nanmean([s[key] for s in per_chunk]))
                                                                  for key in per_chunk[0]},
                pooled=stats(pooled), spearman_H_jsd=spearman(pooled["entropy"][m].numpy(), pooled["jsd"][m].numpy()))


def cmd_vepo(a):
    """Top-Entropy vs Top-JSD at k = 0.2 on the first --n reasoning val prompts x 8 (gauss and patch noise), and
    grpo.py vs vepo.py (--select vepo, entropy) from the same seed on the reasoning split, --steps steps.
    Estimate: ~2 min for the overlap (64 prompts, 2 noises) + ~1.5-2 min per 25-step run (3.4 / 4.6 / 4.7
    s/step in the smoke run: 84 s with 8 prompts, 2 steps) = ~9 min at one thread."""
    torch.set_num_threads(a.threads)
    model, processor, _ = vlm.load(a.ckpt)
    rows = grpo.load_rows(shapes(a, "reasoning_val"))[:a.n]
    with torch.no_grad():
        overlap = {noise: vepo_overlap(model.eval(), processor, rows, a.seeds[0], noise) for noise in ("gauss", "patch")}
    runs = {}
    for s in a.seeds:
        flags = ["--seed", s, "--steps", a.steps, "--eval_every", a.steps, "--save_every", 0,
                 "--data", shapes(a, "reasoning_train"), "--val", shapes(a, "reasoning_val")]
        logs = {"grpo": train(a, "grpo.py", f"vepo/grpo_seed_{s}", *flags)}
        for sel in ("vepo", "entropy"):
            logs[sel] = train(a, "vepo.py", f"vepo/{sel}_seed_{s}", *flags, "--select", sel)
        runs[s] = {m: dict(run_summary(log, "reasoning"),
                           grad_norm_mean=float(np.mean([r["grad_norm"] for r in steps_of(log)])),
                           ent_miss_jsd_logged=window(log, "vepo_ent_miss_jsd", 1))
                   for m, log in logs.items()}
    save_summary(a, "vepo", dict(n=len(rows), overlap=overlap, runs=runs))


# ---------------------------------------------------------------------------- 5. EGG on the detail test split
def cmd_egg(a):
    """egg_ground.py --data detail_test.jsonl, single pass (--iters 1) and iterative (the default T = 3, spatial
    stop): its own JSON report (IoU of our top box vs same-size centred / random boxes, pointing game).
    Estimate: ~0.5 s per row and pass (smoke: 20 s for 3 rows, both passes, model loads included), ~2 min."""
    out = {}
    for s in a.seeds:
        for mode, flags in (("single", ["--iters", 1]), ("iterative", [])):
            cmd = [sys.executable, os.path.join(ROOT, "egg_ground.py"), "--model", a.ckpt, "--threads", str(a.threads),
                   "--data", shapes(a, "detail_test"), "--n", str(a.n), "--seed", str(s), *map(str, flags)]
            print(" ".join(cmd), flush=True)
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
            if p.returncode:
                raise RuntimeError(f"egg_ground.py failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
            report = json.loads(p.stdout[p.stdout.index('{\n "data"'):])
            os.makedirs(os.path.join(a.out, "egg"), exist_ok=True)
            json.dump(report, open(os.path.join(a.out, "egg", f"{mode}_seed_{s}.json"), "w"), indent=1)
            out[f"{mode}_seed_{s}"] = report
    save_summary(a, "egg", dict(runs=out))


# ---------------------------------------------------------------------------- report
def f(x, d=3):
    return "-" if x is None else f"{x:.{d}f}"


def accs(val_acc):
    return " -> ".join(f"{v:.2f} (step {k})" for k, v in val_acc.items())


def cmd_report(a):
    S = {os.path.basename(os.path.dirname(p)): json.load(open(p))
         for p in sorted(glob.glob(os.path.join(a.out, "*", "summary.json")))}
    if not S:
        raise SystemExit(f"no summary.json under {a.out}: run a subcommand first")
    for name, s in S.items():
        print(f"\n### {name} (ckpt {s['ckpt']}, seeds {s['seeds']}, steps {s['steps']})\n")
        if name == "grpo":
            print("| seed | Acc@0.5 step 0 -> last | reward 1-5 -> last 5 | format | IoU reward | entropy | reward 1-3 / 6-8 |")
            print("|---|---|---|---|---|---|---|")
            for seed, p in s["per_seed"].items():
                print(f"| {seed} | {f(p['acc_step0'], 2)} -> {f(p['acc_last'], 2)} | {f(p['reward_first5'])} -> "
                      f"{f(p['reward_last5'])} | {f(p['format_first5'])} -> {f(p['format_last5'])} | "
                      f"{f(p['iou_first5'])} -> {f(p['iou_last5'])} | {f(p['entropy_first5'])} -> "
                      f"{f(p['entropy_last5'])} | {f(p['reward_1_3'])} / {f(p['reward_6_8'])} |")
            print(f"\nmean over seeds: {json.dumps({k: round(v, 4) for k, v in s['mean_over_seeds'].items()})}")
        elif name == "ecvgpo":
            print("| seed | mean H (steps 2+) " + " / ".join(s["r0"]) + " | full order steps (raw, 5-smoothed) | "
                  "-10 > off > 10 steps | Cov shift has 1/r0's sign | reshaped Cov ordered by 1/r0 |")
            print("|---|---|---|---|---|---|")
            for seed, p in s["per_seed"].items():
                H = " / ".join(f(p["entropy_mean_steps_2_on"][r], 4) for r in s["r0"])
                sign = ", ".join(f"{r}: {v:.2f}" for r, v in p["cov_shift_sign_1_over_r0"].items())
                print(f"| {seed} | {H} (ordered: {p['entropy_mean_order_holds']}) | {p['order_steps']}/"
                      f"{p['order_steps_of']}, {p['order_steps_smoothed5']}/{p['order_steps_smoothed5_of']} | "
                      f"{p['pair_order_steps']}/{p['order_steps_of']} | {sign} | "
                      f"{p['cov_reshaped_ordered_by_1_over_r0']}/{p['order_steps_of']} |")
        elif name == "vicra":
            classes = sorted({c for t in s["w_by_class"].values() for c in t})
            print("| model, completions | " + " | ".join(classes) + " |\n|---|" + "---|" * len(classes))
            for t, tab in s["w_by_class"].items():
                print(f"| {t} | " + " | ".join(f"{tab[c]['mean_w']:+.4f} (n {tab[c]['n']})" if c in tab else "-"
                                              for c in classes) + " |")
            for seed, r in s["runs"].items():
                for m in ("grpo", "vicra"):
                    print(f"\nseed {seed} {m}: reward first 5 {f(r[m]['reward_first5'])}, last 5 "
                          f"{f(r[m]['reward_last5'])}, val acc {accs(r[m]['val_acc'])}, {r[m]['t_step']:.2f} s/step")
                print(f"rewards equal at {r['reward_equal_steps']}/{r['grpo']['steps']} steps; "
                      f"grounded tokens (w > 0.2) {100 * r['vg_frac_mean']:.2f}% of tokens")
        elif name == "vepo":
            for noise, o in s["overlap"].items():
                c, p = o["per_chunk_mean"], o["pooled"]
                print(f"{noise}: Top-Entropy misses {100 * c['ent_miss_jsd']:.0f}% of Top-JSD per chunk "
                      f"({100 * p['ent_miss_jsd']:.0f}% pooled), {100 * c['ent_miss_dh']:.0f}% of Top-|dH| "
                      f"({100 * p['ent_miss_dh']:.0f}%); Spearman(H, JSD) {o['spearman_H_jsd']:.2f}; "
                      f"{o['tokens']} tokens; mean JSD {c['jsd']:.2e}")
            for seed, r in s["runs"].items():
                print("\n| run (seed %s) | reward 1-5 | last 5 | val acc | grad norm |\n|---|---|---|---|---|" % seed)
                for m, x in r.items():
                    print(f"| {m} | {f(x['reward_first5'])} | {f(x['reward_last5'])} | {accs(x['val_acc'])} | "
                          f"{x['grad_norm_mean']:.3f} |")
        elif name == "egg":
            print("| run | IoU ours | centred | random | peak on target (chance) | base / grounded acc | rounds |")
            print("|---|---|---|---|---|---|---|")
            for k, r in s["runs"].items():
                print(f"| {k} | {r['iou_ours']:.4f} | {r['iou_centre']:.4f} | {r['iou_random']:.4f} | "
                      f"{r['point_target']:.3f} ({r['point_chance']:.3f}) | {r['acc_base']:.2f} / "
                      f"{r['acc_grounded']:.2f} | {r['mean_iterations']:.2f} |")


# ----------------------------------------------------------------------------
COMMANDS = dict(grpo=(cmd_grpo, [0, 1, 2], 60, 0), ecvgpo=(cmd_ecvgpo, [0], 30, 0), vicra=(cmd_vicra, [0], 30, 200),
                vepo=(cmd_vepo, [0], 25, 64), egg=(cmd_egg, [0], 0, 0), report=(cmd_report, [0], 0, 0))

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--ckpt", default="checkpoints/tiny-shapes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 for grpo, 0 otherwise")
    p.add_argument("--steps", type=int, help="training steps (default: 60 grpo, 30 ecvgpo / vicra, 25 vepo)")
    p.add_argument("--n", type=int, help="rows measured (default: vicra 200, vepo 64, egg 0 = all 100)")
    p.add_argument("--shapes", default="data/shapes", help="folder of the shapes jsonl splits")
    p.add_argument("--out", default="runs/remeasure")
    p.add_argument("--lr", type=float, default=0.0, help="passed to every training run (0: the scripts' default)")
    a = p.parse_args()
    fn, seeds, steps, n = COMMANDS[a.command]
    a.seeds, a.steps, a.n = a.seeds or seeds, steps if a.steps is None else a.steps, n if a.n is None else a.n
    a.ckpt, a.shapes, a.out = (os.path.abspath(x) for x in (a.ckpt, a.shapes, a.out))
    if a.command != "report" and not os.path.exists(shapes(a, "grounding_val")):
        raise SystemExit(f"no shapes data in {a.shapes}: python data/shapes/prepare.py, or --shapes <folder>")
    torch.set_num_threads(a.threads)
    fn(a)
