"""Tabular-softmax bandit: the entropy theorems of ECVGPO (seed 000), checked exactly.

pi = softmax(z) over actions 0..40, target action 20. Three updates of the logits:
  vpg   exact vanilla policy gradient   dz = eta * pi * (A - E_pi A)          (eq. 25)
  npg   exact natural policy gradient   dz = eta * A
  grpo  sampled GRPO groups of G        dz = eta/G * sum_i A_i (e_{a_i} - pi) (eqs. 1-4, mu=1)
The paper's theorem (supp. A, eqs. 22-28) is the first-order law
  H(softmax(z + dz)) - H(softmax(z)) = -Cov_{a~pi}(log pi(a), dz_a) + O(|dz|^2)   (eq. 23)
which holds for *any* logit step dz, so it also holds for ECVGPO's reshaped step (eq. 17).
Here we measure, numerically and exactly, (1) the theorem, (2) ECVGPO's mechanism, (3) the
continuous-reward argument of section 3.3 (eqs. 9-13) and (4) figure 6's r0 ordering.

Run:   python toy_bandit.py                 (tables on stdout, a few seconds)
       python toy_bandit.py --plot figs/toy (also PNG figures; needs matplotlib)
"""
import argparse
import os
import time

import numpy as np

K, TARGET = 41, 20  # eqs. 9-10: actions 0..40, the correct answer is 20
ACTIONS = np.arange(K)
GRPO = np.inf  # r0 = inf means "no reshaping": A - S/inf = A, i.e. plain GRPO
R0S = (-10.0, -50.0, GRPO, 50.0, 10.0)  # figure 6's order, highest entropy first
REGIMES = ("onehot", "num", "plateau", "ambig")


def r0_name(r0):
    return "GRPO" if np.isinf(r0) else f"{r0:g}"


# ----------------------------------------------------------------------------- softmax, entropy
def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def softmax(z):
    return np.exp(log_softmax(z))


def entropy(z):  # eq. 6
    lp = log_softmax(z)
    return -(np.exp(lp) * lp).sum(-1)


def predicted_dH(z, dz):
    """eq. 23: first-order entropy change -Cov_{a~pi}(log pi(a), dz_a). Exact derivative of H
    along dz at z, since dH/dz_a = -pi_a (log pi_a + H)."""
    lp = log_softmax(z)
    p = np.exp(lp)
    lc = lp - (p * lp).sum(-1, keepdims=True)
    dc = dz - (p * dz).sum(-1, keepdims=True)
    return -(p * lc * dc).sum(-1)


def error_bound(dz):
    """A priori bound on |dH - predicted_dH|. Along z + t*dz, d2H/dt2 = -E_pi[(log pi + H + 1) v^2]
    with v = dz - E_pi dz, so |d2H/dt2| <= range(dz)^2 (2H + 1) <= range(dz)^2 (2 log K + 1), and
    Taylor's remainder is at most half of that. Used to make "sign agreement" a real statement."""
    return 0.5 * np.ptp(dz, axis=-1) ** 2 * (2 * np.log(dz.shape[-1]) + 1)


# ----------------------------------------------------------------------------- rewards
def expected_reward(regime, lam=0.1, M=7, amb=2):
    """Reward of each action (for 'ambig', its expectation over the random target)."""
    d = np.abs(ACTIONS - TARGET)
    if regime == "onehot":  # eq. 9: reasoning-like, one correct answer
        return (d == 0).astype(float)
    if regime == "num":  # eq. 10: grounding-like, continuous
        return np.maximum(0.0, 1.0 - lam * d)
    if regime == "plateau":  # eq. 11 with delta = 0: M tied near-optimal actions
        lo = TARGET - (M - 1) // 2
        return ((ACTIONS >= lo) & (ACTIONS < lo + M)).astype(float)
    if regime == "ambig":  # eqs. 11-13: the annotated target is 20 + U{-amb..amb} per sample
        return (d <= amb) / (2.0 * amb + 1.0)
    raise ValueError(regime)


def tie_set(regime, lam=0.1, M=7, amb=2):
    R = expected_reward(regime, lam, M, amb)
    return np.flatnonzero(R == R.max())


# ----------------------------------------------------------------------------- ECVGPO
def reshape(A, S, r0, l0=25.0, gate=True):
    """eq. 17: A' = max(A/l0, A - S/r0) where A > 0 and r_std < delta (gate), else A.
    A - S/r0 = A + log(pi)/r0: r0 < 0 adds S/|r0| > 0 (never hits the floor), r0 > 0 subtracts
    it and the floor A/l0 keeps positive samples positive. r0 = inf gives A' = A, plain GRPO.
    r0 may be an array broadcasting against A (one r0 per row: several r0 in one batch)."""
    return np.where((A > 0) & gate, np.maximum(A / l0, A - S / r0), A)


# ----------------------------------------------------------------------------- updates
def exact_advantage(z, R, norm="raw"):
    """Population analogue of eq. 1: A = R - E_pi R ('raw', the centred advantage of supp. A),
    or additionally divided by std_pi R + 1e-4 ('std', GRPO's normalisation)."""
    p = softmax(z)
    A = R - (p * R).sum(-1, keepdims=True)
    if norm == "std":
        A = A / (np.sqrt((p * A * A).sum(-1, keepdims=True)) + 1e-4)
    return A


def exact_step(z, R, kind, eta, r0=GRPO, l0=25.0, delta=np.inf, G=8, norm="raw"):
    """One exact (expected) update. ECVGPO in the exact setting: every action with A(a) > 0 is a
    'positive sample' with S = -log pi(a) (eq. 15). The gate r_std < delta uses eq. 16 for a group
    whose G rewards are distributed exactly as pi: r_std = sqrt(G * Var_pi R) (no 1/N, as eq. 16)."""
    lp = log_softmax(z)
    p = np.exp(lp)
    A = exact_advantage(z, R, norm)
    r_std = np.sqrt(G * (p * (R - (p * R).sum(-1, keepdims=True)) ** 2).sum(-1, keepdims=True))
    A = reshape(A, -lp, r0, l0, r_std < delta)
    if kind == "vpg":  # eq. 25: pi * (A - E_pi A); reshaped A' is no longer centred, so keep E_pi A'
        return eta * p * (A - (p * A).sum(-1, keepdims=True))
    if kind == "npg":  # natural gradient of a tabular softmax: the Fisher inverse undoes the pi factor
        return eta * A
    raise ValueError(kind)


def group_stats(r):
    """Rewards r (B, G) -> group-normalised advantages (eq. 1, unbiased std as torch.std; a group
    whose rewards are all equal carries no signal: A = 0) and r_std of eq. 16, literally (no 1/N)."""
    rc = r - r.mean(1, keepdims=True)
    std = r.std(1, ddof=1, keepdims=True)
    return np.where(std > 0, rc / (std + 1e-4), 0.0), np.sqrt((rc ** 2).sum(1, keepdims=True))


def grpo_step(z, regime, eta, rng, G=8, r0=GRPO, l0=25.0, delta=np.inf, lam=0.1, M=7, amb=2, reps=1):
    """One sampled GRPO step per row of z (rows = independent seeds). With mu = 1 the ratio is 1,
    so the loss gradient on the logits is the score function: d/dz log pi(a) = e_a - pi.
    reps > 1: z holds reps blocks of rows (e.g. one per r0) that share their random numbers."""
    lp = log_softmax(z)
    p = np.exp(lp)
    u = np.tile(rng.random((z.shape[0] // reps, G)), (reps, 1))
    a = np.minimum((u[..., None] > np.cumsum(p, -1)[:, None, :]).sum(-1), K - 1)  # inverse-cdf sampling
    if regime == "ambig":  # a fresh annotation per sample: reward 1 only if it hits *that* target
        r = (a == TARGET + np.tile(rng.integers(-amb, amb + 1, (z.shape[0] // reps, G)), (reps, 1))).astype(float)
    else:
        r = expected_reward(regime, lam, M, amb)[a]
    A, r_std = group_stats(r)
    S = -np.take_along_axis(lp, a, 1)  # eq. 15: self-information of each sampled action
    gate = r_std < delta
    A2 = reshape(A, S, r0, l0, gate)
    onehot = (a[..., None] == ACTIONS).astype(float)
    dz = eta / G * (np.einsum("bg,bgk->bk", A2, onehot) - A2.sum(1, keepdims=True) * p)
    dz0 = eta / G * (np.einsum("bg,bgk->bk", A, onehot) - A.sum(1, keepdims=True) * p)
    pos = A > 0
    info = dict(n_pos=pos.sum(1), pos_p=(np.exp(-S) * pos).sum(1),  # eq. 13: pi of positive samples
                pos_rare=((-S < (p * lp).sum(1, keepdims=True)) & pos).sum(1),  # positive, log pi < -H
                floor=(pos & gate & (A / l0 > A - S / r0)).sum(1),  # eq. 17's floor binds
                gated=(gate & (r_std > 0))[:, 0], informative=(r_std > 0)[:, 0],
                # the reshaping's own first-order entropy effect on these very samples (eq. 23 on dz - dz0)
                dH_reshape=predicted_dH(z, dz - dz0))
    return dz, info


# ----------------------------------------------------------------------------- runs
def init_logits(rng, B, init="random", sigma=1.0, warm=0.2):
    """'random': z ~ N(0, sigma^2). 'warm': the same, then the target holds mass `warm` (as after SFT)."""
    z = sigma * rng.standard_normal((B, K))
    if init == "warm":
        others = np.delete(z, TARGET, 1)
        z[:, TARGET] = np.log(warm / (1 - warm)) + np.log(np.exp(others).sum(1))
    return z


def run(kind, regime, z0, steps, eta, seed=0, r0=GRPO, l0=25.0, delta=np.inf, G=8,
        lam=0.1, M=7, amb=2, norm="raw", stop_h=None):
    """Trajectory of a batch of policies z0 (B, K); r0 a scalar or a list (then every r0 runs on
    its own copy of z0, rows r*B..(r+1)*B-1, with shared random numbers). Returns entropies
    H (steps+1, rows), first-order predictions pred (steps, rows), the a-priori error check, the
    final logits z and, for grpo, per-step per-row statistics (see grpo_step).
    stop_h: stop early once every policy's entropy is below it."""
    rng = np.random.default_rng(seed)
    R = expected_reward(regime, lam, M, amb)
    r0 = np.atleast_1d(np.asarray(r0, float))
    z = np.tile(z0, (len(r0), 1))
    r0 = np.repeat(r0, len(z0))[:, None]
    H, pred, bound, st = [entropy(z)], [], [], {}
    for _ in range(steps):
        if kind == "grpo":
            dz, info = grpo_step(z, regime, eta, rng, G, r0, l0, delta, lam, M, amb, reps=len(z) // len(z0))
            for k, v in info.items():
                st.setdefault(k, []).append(v)
        else:
            dz = exact_step(z, R, kind, eta, r0, l0, delta, G, norm)
        pred.append(predicted_dH(z, dz))
        bound.append(error_bound(dz))
        z = z + dz
        H.append(entropy(z))
        if stop_h is not None and np.all(H[-1] < stop_h):
            break
    H, pred = np.array(H), np.array(pred)
    bound = np.array(bound) + 1e-12  # slack for float64 rounding of H itself (|H| <= log K, eps ~ 1e-16)
    err = np.abs(np.diff(H, axis=0) - pred)
    sure = np.abs(pred) > 2 * bound  # here the bound makes the sign of the actual change certain
    agree = np.sign(np.diff(H, axis=0)) == np.sign(pred)
    return dict(H=H, pred=pred, z=z, err_over_bound=err / bound, n_sure=int(sure.sum()),
                sure_agree=agree[sure].mean() if sure.any() else np.nan, **{k: np.array(v) for k, v in st.items()})


def steps_to_collapse(H, h=0.1):
    """First step with entropy below h (per column); len(H) if never."""
    below = H < h
    return np.where(below.any(0), below.argmax(0), len(H)).astype(float)


# ----------------------------------------------------------------------------- measurements
def theorem_ratios(rng, n=200, eta=0.05, kind="npg", sigma=2.0):
    """err(eta/2)/err(eta) for random policies and random advantages; -> 1/4 if err = O(eta^2)."""
    z = sigma * rng.standard_normal((n, K))
    A = rng.standard_normal((n, K))
    p = softmax(z)
    step = p * (A - (p * A).sum(-1, keepdims=True)) if kind == "vpg" else A
    err = [np.abs(entropy(z + e * step) - entropy(z) - predicted_dH(z, e * step)) for e in (eta, eta / 2)]
    return err[1] / err[0]


def constructed_case(rng, case, n_pos=3, scale=1.0):
    """Policies for the one-step mechanism test (eq. 17 + eq. 23). 'rare': n_pos rewarded actions
    each holding 0.2-1% of the mass, well below the typical probability exp(-H) (eq. 13's premise).
    'mode': the only rewarded action is the policy's mode. Returns logits z (K,) and reward R (K,)."""
    z = rng.standard_normal(K)
    R = np.zeros(K)
    if case == "rare":
        P = TARGET - 1 + np.arange(n_pos)
        others = np.delete(np.arange(K), P)
        zo = np.log(np.exp(z[others]).sum())
        q = rng.uniform(0.002, 0.01, n_pos)  # target probabilities of the rewarded actions
        z[P] = zo + np.log(q / (1 - q.sum()))
    else:
        P = np.array([TARGET])
        z[TARGET] = np.delete(z, TARGET).max() + rng.uniform(0.3, 2.0)
    R[P] = scale
    return z, R


def one_step_dH(z, R, kind, eta, r0, l0=25.0):
    """Exact and first-order entropy change of one (reshaped) exact step from z."""
    dz = exact_step(z[None], R, kind, eta, r0, l0)
    return (entropy(z[None] + dz) - entropy(z[None]))[0], predicted_dH(z[None], dz)[0]


def order_holds(H, reverse=False):
    """H: (len(R0S), ...). Figure 6's strict order -10 > -50 > GRPO > 50 > 10 (or its reverse)."""
    d = np.diff(H, axis=0)
    return np.all(d > 0, 0) if reverse else np.all(d < 0, 0)


# ----------------------------------------------------------------------------- main
def main(args):
    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    kw = dict(lam=args.lam, M=args.M, amb=args.amb)
    eta = dict(vpg=args.eta_vpg, npg=args.eta_npg, grpo=args.eta_grpo)
    B, T = args.seeds, args.steps
    marks = [0, T // 10, T // 4, T // 2, T]
    z_rand = init_logits(np.random.default_rng(args.seed + 1), B, "random", args.sigma)
    z_warm = init_logits(np.random.default_rng(args.seed + 1), B, "warm", args.sigma, args.warm)
    print(f"tabular softmax bandit: K={K} actions, target {TARGET}, lambda={args.lam}, M={args.M}, "
          f"ambiguity +-{args.amb}, G={args.G}, seeds={B}, steps={T}, eta={eta}, l0={args.l0}, delta={args.delta}")
    figs = {"regime": {}, "r0": {}}

    print("\n## 1. Theorem (eqs. 22-28): err(eta/2)/err(eta), 1000 random policies and advantages (-> 1/4 if O(eta^2))")
    print(f"{'kind':5} {'eta':>6} {'median':>8} {'p1':>8} {'p99':>8} {'in [0.2,0.3]':>13}")
    for kind, e in (("vpg", 0.2), ("npg", 0.01)):
        rr = theorem_ratios(rng, 1000, e, kind)
        print(f"{kind:5} {e:6.2f} {np.median(rr):8.4f} {np.percentile(rr, 1):8.4f} {np.percentile(rr, 99):8.4f} "
              f"{np.mean((rr > 0.2) & (rr < 0.3)):13.3f}")
    print(f"\n## 2. Entropy vs step per regime and update kind (mean over {B} seeds)")
    print(f"{'init':6} {'kind':5} {'regime':8} " + " ".join(f"{'t=' + str(m):>7}" for m in marks))
    traj = {}
    for init, z0 in (("random", z_rand), ("warm", z_warm)):
        for kind in ("vpg", "npg", "grpo"):
            for regime in REGIMES:
                out = traj[(init, kind, regime)] = run(kind, regime, z0, T, eta[kind], args.seed, G=args.G, **kw)
                H = figs["regime"][(init, kind, regime)] = out["H"].mean(1)
                print(f"{init:6} {kind:5} {regime:8} " + " ".join(f"{H[m]:7.3f}" for m in marks))

    print(f"\n## 3. Theorem along the trajectories of section 2 ({B} seeds x {T} steps): sum of per-step predictions"
          "\n   vs actual change; sign agreement counted where |prediction| > 2 x the a-priori error bound")
    print(f"{'init':6} {'kind':5} {'regime':8} {'actual':>8} {'predicted':>9} {'max|step err|':>13} "
          f"{'max err/bound':>13} {'n(|pred|>2b)':>12} {'sign agree':>10}")
    for (init, kind, regime), out in traj.items():
        act, pred = np.diff(out["H"], axis=0), out["pred"]
        print(f"{init:6} {kind:5} {regime:8} {(out['H'][-1] - out['H'][0]).mean():8.4f} {pred.sum(0).mean():9.4f} "
              f"{np.abs(act - pred).max():13.2e} {np.max(out['err_over_bound']):13.3f} "
              f"{out['n_sure']:12d} {out['sure_agree']:10.3f}")
    figs["theorem"] = (traj[("random", "npg", "num")]["pred"].ravel(), np.diff(traj[("random", "npg", "num")]["H"], axis=0).ravel())

    lams = (0.4, 0.2, 0.1, 0.05, 0.025)
    print(f"\n## 4. Steps to collapse (H < {args.collapse_h}) vs lambda (eq. 10), uniform start (grpo: median of {B} seeds)")
    print(f"{'kind':5} {'A':4} {'eta':>5} " + " ".join(f"{'l=' + str(l):>8}" for l in lams) + "   steps(l/2)/steps(l)")
    for kind, norm, e, Tmax in (("npg", "raw", 1.0, 2000), ("npg", "std", 1.0, 2000), ("vpg", "raw", 5.0, 2000),
                                ("grpo", "grp", args.eta_grpo, 1000)):
        n = B if kind == "grpo" else 1
        steps = [np.median(steps_to_collapse(run(kind, "num", np.zeros((n, K)), Tmax, e, args.seed, G=args.G, lam=l,
                                                 norm=norm, stop_h=args.collapse_h)["H"], args.collapse_h)) for l in lams]
        print(f"{kind:5} {norm:4} {e:5g} " + " ".join(f"{s:8.0f}" if s <= Tmax else f"{'>' + str(Tmax):>8}" for s in steps)
              + "   " + " ".join(f"{s2 / s1:.2f}" for s1, s2 in zip(steps, steps[1:])))
    print("(A: raw = R - E_pi R, std = divided by std_pi R, grp = group-normalised, eq. 1)")

    print(f"\n## 5. eq. 13 under sampled GRPO: mean pi of positive-advantage samples vs 1/M, exp(-H) (the typical pi),"
          "\n   and the fraction of positive samples with log pi < -H (the premise of the r0 mechanism)")
    print(f"{'init':6} {'regime':8} {'M':>3} {'1/M':>6} | " + "  ".join(f"{'t=' + str(m):>16}" for m in marks[:-1]))
    for init, z0 in (("random", z_rand), ("warm", z_warm)):
        for regime in REGIMES:
            out = run("grpo", regime, z0, T, eta["grpo"], args.seed, G=args.G, **kw)
            Mr = len(tie_set(regime, **kw)) if regime != "num" else int(np.sum(expected_reward("num", **kw) > 0.8))
            n = np.where(out["n_pos"].sum(1) > 0, out["n_pos"].sum(1), np.nan)  # nan: no positive sample
            cells = [f"{out['pos_p'][m].sum() / n[m]:.3f}/{np.exp(-out['H'][m]).mean():.3f}/"
                     f"{out['pos_rare'][m].sum() / n[m]:.2f}" for m in marks[:-1]]
            print(f"{init:6} {regime:8} {Mr:3d} {1 / Mr:6.3f} | " + "  ".join(f"{c:>16}" for c in cells))
    print("(cells: mean pi(pos) / mean exp(-H) / frac(log pi < -H); nan = no positive sample at that step;"
          " M for 'num' = actions with reward > 0.8)")

    print("\n## 6. ECVGPO, one exact step on 200 constructed policies (eq. 17 + eq. 23): fraction in figure 6's order")
    for kind, e in (("npg", 0.05), ("vpg", 1.0)):
        for case in ("rare", "mode"):
            res = []
            for _ in range(200):
                z, R = constructed_case(rng, case, n_pos=int(rng.integers(1, 6)))
                res.append(order_holds(np.array([one_step_dH(z, R, kind, e, r0, args.l0)[0] for r0 in R0S]), case == "mode"))
            want = "-10>-50>GRPO>50>10" if case == "rare" else "10>50>GRPO>-50>-10"
            print(f"{kind} eta={e:<5g} {case:4} ({want}): {np.mean(res):.3f}")

    print(f"\n## 7. Figure 6 along whole runs, r0 = -10/-50/GRPO/50/10: mean entropy over {B} seeds at step t, then"
          "\n   [fraction of seeds in the full order -10>-50>GRPO>50>10 | fraction with H(-10) > H(GRPO) > H(10)]")
    for kind, norm in (("grpo", "raw"), ("npg", "raw"), ("npg", "std")):
        for init, z0 in (("random", z_rand), ("warm", z_warm)):
            for regime in REGIMES:
                out = run(kind, regime, z0, T, eta[kind], args.seed, R0S, args.l0, args.delta, args.G, norm=norm, **kw)
                H = out["H"].reshape(T + 1, len(R0S), B).transpose(1, 0, 2)  # (r0, step, seed)
                name = kind + ("-std" if norm == "std" else "")
                figs["r0"][(name, init, regime)] = H.mean(2)
                cells = [f"t={m}: " + "/".join(f"{h:.2f}" for h in H[:, m].mean(1)) +
                         f" [{order_holds(H[:, m]).mean():.2f}|{np.mean((H[0, m] > H[2, m]) & (H[2, m] > H[4, m])):.2f}]"
                         for m in marks[1:]]
                print(f"{name:7} {init:6} {regime:8} " + "  ".join(cells))
                if kind == "grpo":  # the mechanism on the very samples: sign of the reshaping's own first-order dH
                    d = out["dH_reshape"].reshape(-1, len(R0S), B)
                    fl = out["floor"].reshape(-1, len(R0S), B).sum((0, 2)) / out["n_pos"].reshape(-1, len(R0S), B).sum((0, 2))
                    good = [np.sum(np.sign(d[:, i]) == -np.sign(r0)) / max(np.sum(d[:, i] != 0), 1)
                            if np.any(d[:, i] != 0) else np.nan for i, r0 in enumerate(R0S) if not np.isinf(r0)]
                    print(f"{'':23}steps where reshaping moves H the way fig. 6 wants (up for r0<0, down for r0>0): " +
                          " ".join(f"{r0_name(r0)}:{g:.2f}" for r0, g in zip([r for r in R0S if not np.isinf(r)], good)) +
                          f"; floor binds for a positive sample: 50:{fl[3]:.3f} 10:{fl[4]:.3f}"
                          f"; informative groups passing r_std < delta: {out['gated'].sum() / out['informative'].sum():.2f}")
    print("(npg: A = R - E_pi R; npg-std: A / std_pi R, GRPO's scale. Under npg-std a run freezes once the mass off the"
          "\n best reward set is below float64 resolution: E_pi R rounds to max R and A = 0 - a float64 effect, not the math)")
    print(f"\ndone in {time.time() - t0:.1f}s")
    if args.plot:
        plot(args.plot, figs)


def plot(outdir, figs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); tables above are complete without it")
        return
    os.makedirs(outdir, exist_ok=True)
    pred, act = figs["theorem"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(pred, act, s=4)
    lim = [min(pred.min(), act.min()), max(pred.max(), act.max())]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set(xlabel="predicted dH = -Cov(log pi, dz)  (eq. 23)", ylabel="actual dH", title="npg, R_num: one step")
    fig.tight_layout(), fig.savefig(os.path.join(outdir, "theorem_pred_vs_actual.png"), dpi=120), plt.close(fig)
    for init in ("random", "warm"):
        fig, axs = plt.subplots(1, len(REGIMES), figsize=(16, 3.6), sharey=True)
        for ax, regime in zip(axs, REGIMES):
            for kind in ("vpg", "npg", "grpo"):
                ax.plot(figs["regime"][(init, kind, regime)], label=kind)
            ax.set(title=f"{regime} ({init} start)", xlabel="step")
        axs[0].set_ylabel("entropy (nats)"), axs[0].legend()
        fig.tight_layout(), fig.savefig(os.path.join(outdir, f"entropy_by_regime_{init}.png"), dpi=120), plt.close(fig)
    for (kind, init) in [(k, i) for k in ("grpo", "npg", "npg-std") for i in ("random", "warm")]:
        fig, axs = plt.subplots(1, len(REGIMES), figsize=(16, 3.6), sharey=True)
        for ax, regime in zip(axs, REGIMES):
            for r0, H in zip(R0S, figs["r0"][(kind, init, regime)]):
                ax.plot(H, label=f"r0={r0_name(r0)}")
            ax.set(title=f"{kind} {regime} ({init} start)", xlabel="step")
        axs[0].set_ylabel("entropy (nats)"), axs[0].legend()
        fig.tight_layout(), fig.savefig(os.path.join(outdir, f"entropy_by_r0_{kind}_{init}.png"), dpi=120), plt.close(fig)
    print("wrote", ", ".join(sorted(os.listdir(outdir))), "to", outdir)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=32, help="independent policies per setting (vectorised)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--G", type=int, default=8, help="group size (rollouts per prompt)")
    p.add_argument("--eta_vpg", type=float, default=5.0)
    p.add_argument("--eta_npg", type=float, default=0.1)
    p.add_argument("--eta_grpo", type=float, default=2.0)
    p.add_argument("--lam", type=float, default=0.1, help="decay rate of R_num (eq. 10)")
    p.add_argument("--M", type=int, default=7, help="size of the plateau of tied actions (eq. 11)")
    p.add_argument("--amb", type=int, default=2, help="annotation ambiguity: target = 20 + U{-amb..amb}")
    p.add_argument("--sigma", type=float, default=1.0, help="std of random initial logits")
    p.add_argument("--warm", type=float, default=0.2, help="target mass of the warm start")
    p.add_argument("--l0", type=float, default=25.0, help="eq. 17 floor A/l0")
    p.add_argument("--delta", type=float, default=np.inf, help="eq. 17 gate r_std < delta (inf: InternVL, fig. 6)")
    p.add_argument("--collapse_h", type=float, default=0.1, help="entropy (nats) that counts as collapsed")
    p.add_argument("--plot", default="", help="directory for PNG figures (needs matplotlib)")
    main(p.parse_args())
