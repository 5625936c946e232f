"""Step time of GRPO (with / without the old pass) and of each method, side by side (notes/scale.md).

    python notes/scale_steptime.py --reps 3 --steps 4

Every script runs on the embedded default (tiny checkpoint, G 8 x 4 prompts, 64 new tokens) on the same data
(the shapes reasoning split) with --lr 0: the policy never moves, so every run samples exactly the same
completions at every step and the step times differ by the method's own work only. Runs are interleaved
(rep 1 of every config, then rep 2, ...) so that load from other jobs hits all configs alike; step 1 (warm-up)
is dropped; the figure is the median t_step over the remaining steps of all reps. t_step is the process's CPU
time (each script runs with time.time replaced by time.process_time, one torch thread): on a machine shared with
other jobs wall time varied 2-3x between identical steps, CPU time by a few percent.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "grpo (no old pass)": ["grpo.py"],
    "grpo --old_pass": ["grpo.py", "--old_pass"],
    "ecvgpo": ["ecvgpo.py"],
    "vicra (discard)": ["vicra.py"],
    "vicra --distort noise": ["vicra.py", "--distort", "noise"],
    "vicra --score kl": ["vicra.py", "--score", "kl"],
    "vepo": ["vepo.py"],
}

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    common = ["--data", "data/shapes/reasoning_train.jsonl", "--lr", "0", "--eval_every", "0", "--save_every", "0",
              "--threads", "1", "--steps", str(args.steps)]
    times = {k: [] for k in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for name, cmd in CONFIGS.items():
                out = os.path.join(tmp, f"{rep}-{cmd[0]}-{len(times[name])}")
                code = ("import runpy, sys, time; time.time = time.process_time; sys.argv = sys.argv[1:]; "
                        "sys.path.insert(0, '.'); runpy.run_path(sys.argv[0], run_name='__main__')")
                r = subprocess.run([sys.executable, "-c", code] + cmd + common + ["--out_dir", out], cwd=ROOT,
                                   capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
                if r.returncode:
                    raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
                log = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
                times[name] += [x["t_step"] for x in log[1:]]
                print(f"rep {rep} {name:24s} t_step {[round(x['t_step'], 2) for x in log]}", flush=True)
    base, old = statistics.median(times["grpo (no old pass)"]), statistics.median(times["grpo --old_pass"])
    print(f"\n{'config':24s} {'median t_step (s)':>18s} {'/ grpo --old_pass':>18s} {'/ grpo (no old pass)':>21s}")
    for name, t in times.items():
        m = statistics.median(t)
        print(f"{name:24s} {m:18.3f} {m / old:18.3f} {m / base:21.3f}")
