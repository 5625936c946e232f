"""Tests for toy_bandit.py: what is mathematically true on a tabular softmax bandit.

Each test names the equation it checks. Figure 6's whole-run ordering and "continuous rewards keep
entropy higher under sampled GRPO" are *not* asserted here: they are measured by
`python toy_bandit.py` and reported in notes/toy_bandit.md.
"""
import os
import sys
import types

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toy_bandit as tb  # noqa: E402

R0S = (-10.0, -50.0, np.inf, 50.0, 10.0)  # figure 6's order, highest entropy first


def H(z):  # entropy written out again (eq. 6), not imported
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    return -np.sum(p * np.log(p))


# ------------------------------------------------------------------ theorem (supp. A, eqs. 22-28)
def test_first_order_two_actions_by_hand():
    # eq. 23 on two actions, pi = (p, 1-p), dz = (d, 0): Cov_pi(log pi, dz) = p(1-p)(log p - log(1-p)) d
    p, d = 0.2, 0.3
    z = np.array([np.log(p), np.log(1 - p)])
    want = -p * (1 - p) * (np.log(p) - np.log(1 - p)) * d  # = +0.16 * 1.3863 * 0.3: raising the rare action raises H
    assert tb.predicted_dH(z[None], np.array([[d, 0.0]]))[0] == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(0.066542, abs=1e-6)


def test_first_order_is_the_directional_derivative():
    # eq. 23 is dH/dt of H(z + t dz) at t = 0: compare with a central finite difference
    rng = np.random.default_rng(1)
    for _ in range(20):
        z, v = 2 * rng.standard_normal(tb.K), rng.standard_normal(tb.K)
        h = 1e-5
        fd = (H(z + h * v) - H(z - h * v)) / (2 * h)
        assert tb.predicted_dH(z[None], v[None])[0] == pytest.approx(fd, abs=1e-8)


@pytest.mark.parametrize("kind,eta", [("vpg", 0.2), ("npg", 0.01)])
def test_error_ratio_is_one_quarter(kind, eta):
    # eqs. 23/28 drop O(eta^2): halving eta must quarter the error. 300 random policies (logits
    # N(0, 2^2)) and advantages N(0, 1). Band: median in [0.245, 0.255] and >= 97% of cases in
    # [0.2, 0.3]; the few outside are cases whose second-order coefficient is nearly zero, so the
    # O(eta^3) term competes. A first-order formula with a wrong factor would give ratio ~1/2.
    r = tb.theorem_ratios(np.random.default_rng(0), 300, eta, kind)
    assert 0.245 < np.median(r) < 0.255
    assert np.mean((r > 0.2) & (r < 0.3)) >= 0.97


def test_error_bound_and_sign_agreement():
    # eq. 23 with its a-priori remainder |err| <= 0.5 range(dz)^2 (2 log K + 1): holds for every
    # step, small or large, and whenever |prediction| > 2 x bound the actual change has its sign.
    # Steps: generic random dz, and vanilla (eq. 25) / natural PG steps for random advantages.
    rng = np.random.default_rng(2)
    n = 3000
    z = 2 * rng.standard_normal((n, tb.K))
    A = rng.standard_normal((n, tb.K))
    scale = 10.0 ** rng.uniform(-3, 0.5, (n, 1))
    p = tb.softmax(z)
    steps = {"generic": rng.standard_normal((n, tb.K)) * scale * (rng.random((n, tb.K)) < 0.2),
             "vpg": 10 * scale * p * (A - (p * A).sum(-1, keepdims=True)), "npg": scale * A}
    for name, dz in steps.items():
        act = tb.entropy(z + dz) - tb.entropy(z)
        pred, bound = tb.predicted_dH(z, dz), tb.error_bound(dz)
        assert np.all(np.abs(act - pred) <= bound + 1e-12), name
        sure = np.abs(pred) > 2 * bound + 1e-12
        assert sure.sum() >= 100, name  # the statement is not vacuous
        assert np.all(np.sign(act[sure]) == np.sign(pred[sure])), name


def test_cumulative_prediction_tracks_trajectory():
    # eq. 23 summed along a trajectory: total error is steps x O(eta^2) = O(eta) at fixed eta*steps,
    # so halving eta (doubling steps) halves it. Band [0.4, 0.6]. Exact natural PG, R_num (eq. 10).
    z0 = tb.init_logits(np.random.default_rng(3), 8)
    errs = []
    for eta, steps in ((0.1, 100), (0.05, 200)):
        out = tb.run("npg", "num", z0, steps, eta)
        errs.append(np.abs(out["pred"].sum(0) - (out["H"][-1] - out["H"][0])))
        assert np.all(errs[-1] < 0.01 * np.abs(out["H"][-1] - out["H"][0]))
    assert np.all((errs[1] / errs[0] > 0.4) & (errs[1] / errs[0] < 0.6))


# ------------------------------------------------------------------ ECVGPO (eq. 17, eq. 16, eq. 1)
def test_reshape_by_hand():
    A = np.array([2.0, 0.1, -1.0, 0.5, 0.0])
    S = np.array([3.0, 3.0, 3.0, 3.0, 3.0])
    # eq. 17: max(A/l0, A - S/r0) for A > 0; negative and zero advantages untouched
    assert np.allclose(tb.reshape(A, S, 10.0), [1.7, 0.004, -1.0, 0.2, 0.0])  # 0.1 - 0.3 < 0.1/25: floor
    assert np.allclose(tb.reshape(A, S, -10.0), [2.3, 0.4, -1.0, 0.8, 0.0])  # r0 < 0 adds S/|r0|
    assert np.array_equal(tb.reshape(A, S, np.inf), A)  # r0 = inf is plain GRPO
    assert np.array_equal(tb.reshape(A, S, 10.0, gate=False), A)  # r_std >= delta: no reshaping


def test_group_stats_by_hand():
    # eq. 1 (unbiased std + 1e-4) and eq. 16 (sum of squares, no 1/N) for one hit in a group of 8
    A, r_std = tb.group_stats(np.array([[1.0, 0, 0, 0, 0, 0, 0, 0], [0.3] * 8]))
    std = np.sqrt((0.875 ** 2 + 7 * 0.125 ** 2) / 7)
    assert A[0, 0] == pytest.approx(0.875 / (std + 1e-4)) and A[0, 1] == pytest.approx(-0.125 / (std + 1e-4))
    assert r_std[0, 0] == pytest.approx(np.sqrt(0.875))  # 0.9354: a one-hot hit never passes delta = 0.1
    assert np.all(A[1] == 0) and r_std[1, 0] == 0  # std-0 group: no signal


def test_grpo_step_against_slow_finite_differences():
    # eqs. 1, 15, 17 and the GRPO gradient (mu = 1): dz = eta * d/dz (1/G) sum_i A'_i log pi(a_i),
    # here by finite differences of an independently written loss, with scripted random numbers.
    rng = np.random.default_rng(4)
    z = rng.standard_normal(tb.K)
    z[20] += 1.5
    p = np.exp(z) / np.exp(z).sum()
    cdf = np.cumsum(p)
    acts = np.array([20, 19, 3, 20, 21, 40, 0, 22])
    u = np.where(acts > 0, (cdf[acts - 1] + cdf[acts]) / 2, cdf[0] / 2)
    offsets = np.array([0, -1, 2, 1, 1, -2, 0, 2])
    fake = types.SimpleNamespace(random=lambda shape: u.reshape(shape), integers=lambda lo, hi, shape: offsets.reshape(shape))
    eta, r0, l0 = 0.7, -10.0, 25.0
    dz, _ = tb.grpo_step(z[None], "ambig", eta, fake, G=8, r0=r0, l0=l0)
    r = (acts == 20 + offsets).astype(float)  # ambiguous targets: hits at samples 0, 1, 4
    A = (r - r.mean()) / (r.std(ddof=1) + 1e-4)
    S = -np.log(p[acts])
    A2 = np.where(A > 0, np.maximum(A / l0, A - S / r0), A)

    def loss(zz):
        return np.mean(A2 * (zz[acts] - np.log(np.exp(zz).sum())))

    h = 1e-6
    grad = np.array([(loss(z + h * e) - loss(z - h * e)) / (2 * h) for e in np.eye(tb.K)])
    assert np.allclose(dz[0], eta * grad, atol=1e-8)


def test_exact_steps_are_the_policy_gradient_and_its_natural_form():
    # eq. 25: the vanilla step is eta * grad_z E_pi[A'] with A' held fixed (finite differences of an
    # independently written objective; A' = reshaped, so not centred). Natural PG: the Fisher matrix
    # F = diag(pi) - pi pi^T maps the natural step eta*A' back onto the vanilla one.
    rng = np.random.default_rng(10)
    for case in ("rare", "mode"):
        z, R = tb.constructed_case(rng, case, n_pos=3)
        p = np.exp(z) / np.exp(z).sum()
        A2 = tb.reshape(R - p @ R, -np.log(p), -10.0)

        def J(zz):
            return np.exp(zz) @ A2 / np.exp(zz).sum()

        grad = np.array([(J(z + 1e-6 * e) - J(z - 1e-6 * e)) / 2e-6 for e in np.eye(tb.K)])
        vpg = tb.exact_step(z[None], R, "vpg", 0.3, -10.0)[0]
        npg = tb.exact_step(z[None], R, "npg", 0.3, -10.0)[0]
        assert np.allclose(vpg, 0.3 * grad, atol=1e-9)
        assert np.allclose((np.diag(p) - np.outer(p, p)) @ npg, vpg, atol=1e-12)


def _orders(kind, case, eta, n=60, scale=1.0, seed=5):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        z, R = tb.constructed_case(rng, case, n_pos=int(rng.integers(1, 6)), scale=scale)
        lp = tb.log_softmax(z)
        A = tb.exact_advantage(z[None], R)[0]
        P = A > 0
        if case == "rare":  # the premise of eq. 13 / figure 6: every positive action rarer than typical
            assert np.all(lp[P] < (np.exp(lp) * lp).sum())
        else:
            assert P.sum() == 1 and np.argmax(z) == np.flatnonzero(P)[0]
        floor = np.any(A[P] / 25 > A[P] + lp[P] / 10)  # does max(A/l0, A - S/r0) hit A/l0 at r0 = 10?
        out.append((np.array([tb.one_step_dH(z, R, kind, eta, r0) for r0 in R0S]), z, R, floor))
    return out


@pytest.mark.parametrize("kind,eta", [("npg", 0.05), ("vpg", 1.0)])
def test_ecvgpo_one_step_order_rare_positive_actions(kind, eta):
    # eq. 17 + eq. 23: positive actions rarer than typical (log pi < -H) -> A' - A = S/|r0| > 0 for
    # r0 < 0 lands on the low-probability actions and raises H; r0 > 0 lowers it. The rewarded
    # actions hold 0.2-1% each and A ~ 0.95, S < 6.3: the floor never binds (checked), so no ties.
    for dH, _, _, floor in _orders(kind, "rare", eta):
        assert not floor
        assert np.all(np.diff(dH[:, 0]) < 0), dH[:, 0]  # exact: -10 > -50 > GRPO > 50 > 10
        assert np.all(np.diff(dH[:, 1]) < 0)  # and the first-order prediction agrees


@pytest.mark.parametrize("kind,eta", [("npg", 0.05), ("vpg", 1.0)])
def test_ecvgpo_one_step_order_reverses_at_the_mode(kind, eta):
    # eq. 17 + eq. 23: the only positive action is the mode (log pi > -H): the order reverses
    for dH, _, _, floor in _orders(kind, "mode", eta):
        assert not floor
        assert np.all(np.diff(dH[:, 0]) > 0), dH[:, 0]


def test_ecvgpo_floor_binding_ties_positive_r0():
    # eq. 17 when the floor binds: rewards 0.05 make A ~ 0.05 < S/50 for rare actions, so both
    # r0 = 50 and r0 = 10 give A' = A/l0 exactly: identical steps, identical entropy change (a tie),
    # still below GRPO (the positive step is cut 25-fold); r0 < 0 never reaches the floor.
    for dH, z, R, floor in _orders("npg", "rare", 0.5, n=30, scale=0.05):
        lp = tb.log_softmax(z)
        A = tb.exact_advantage(z[None], R)[0]
        assert np.all(A[A > 0] / 25 > A[A > 0] + lp[A > 0] / 50)  # binds for every positive action
        assert dH[3, 0] == dH[4, 0]
        assert dH[0, 0] > dH[1, 0] > dH[2, 0] > dH[3, 0]


def test_reshaped_step_obeys_first_order_law():
    # eq. 23 applied to the reshaped step dz' (eq. 17): error ratio at eta/2 vs eta ~ 1/4
    rng = np.random.default_rng(6)
    ratios = []
    for _ in range(100):
        case = "rare" if rng.random() < 0.5 else "mode"
        z, R = tb.constructed_case(rng, case, n_pos=int(rng.integers(1, 6)))
        r0 = R0S[rng.integers(0, 5)]
        for kind, eta in (("npg", 0.02), ("vpg", 0.5)):
            err = [abs(np.subtract(*tb.one_step_dH(z, R, kind, e, r0))) for e in (eta, eta / 2)]
            ratios.append(err[1] / err[0])
    assert 0.24 < np.median(ratios) < 0.26 and np.mean((np.array(ratios) > 0.2) & (np.array(ratios) < 0.3)) > 0.95


# ------------------------------------------------------------------ ties (eqs. 11-13) and R_num (eq. 10)
@pytest.mark.parametrize("regime", ["plateau", "ambig"])
def test_ties_under_natural_pg_keep_shape_and_entropy(regime):
    # eqs. 11-13, exact natural PG: tied actions get identical logit steps eta*A, so the policy
    # restricted to the tie set keeps its initial shape at every step and H -> H(restricted), not 0.
    T = tb.tie_set(regime)
    z0 = tb.init_logits(np.random.default_rng(7), 6)
    q0 = tb.softmax(z0[:, T])
    z = z0.copy()
    R = tb.expected_reward(regime)
    for _ in range(3000):
        z = z + tb.exact_step(z, R, "npg", 1.0)
        assert np.allclose(tb.softmax(z[:, T]), q0, rtol=0, atol=1e-12)
    h_restricted = -(q0 * np.log(q0)).sum(1)
    assert np.all(h_restricted > 0.5)
    assert np.allclose(tb.entropy(z), h_restricted, atol=1e-6)


def test_ties_under_vanilla_pg_break_toward_likelier_action():
    # eq. 25 on a plateau: dz_a - dz_b = eta (pi_a - pi_b)(1 - E_pi R) > 0 when pi_a > pi_b, so the
    # tied actions' logit gaps only widen (rich get richer), the initially likeliest stays on top and
    # the entropy of the policy restricted to the tie set never rises (entropy is Schur-concave).
    T = tb.tie_set("plateau")
    z = tb.init_logits(np.random.default_rng(8), 6)
    R = tb.expected_reward("plateau")
    order0 = np.argsort(z[:, T], 1)  # tied actions, least to most likely at the start
    gaps0 = gaps = np.diff(np.take_along_axis(z[:, T], order0, 1), axis=1)
    hr = np.full(6, np.inf)
    for _ in range(400):
        z = z + tb.exact_step(z, R, "vpg", 5.0)
        new_gaps = np.diff(np.take_along_axis(z[:, T], order0, 1), axis=1)
        assert np.all(new_gaps >= gaps - 1e-12)  # the order never changes and no gap shrinks
        gaps = new_gaps
        q = tb.softmax(z[:, T])
        h = -(q * np.log(q)).sum(1)
        assert np.all(h <= hr + 1e-12)
        hr = h
    assert np.all(gaps.sum(1) > gaps0.sum(1) + 0.5)  # and the tie really breaks
    assert np.all(np.argmax(z[:, T], 1) == order0[:, -1])


def test_steps_to_collapse_scale_like_one_over_lambda():
    # eq. 10 under exact natural PG, A = R - E_pi R: z_t = z_0 + eta t R + const, and for lambda <= 1/20
    # every action is on the linear part, so pi_t depends on eta*t*lambda only: steps(lambda/2) /
    # steps(lambda) = 2 up to rounding. Band [1.8, 2.2] for halvings 0.2 -> 0.1 -> 0.05 -> 0.025 (the
    # first one is on the truncated part of R_num), from a uniform and from random starts.
    for z0 in (np.zeros((1, tb.K)), tb.init_logits(np.random.default_rng(9), 4)):
        steps = [tb.steps_to_collapse(tb.run("npg", "num", z0, 1500, 1.0, lam=lam, stop_h=0.1)["H"], 0.1)
                 for lam in (0.2, 0.1, 0.05, 0.025)]
        assert np.all(steps[-1] < 1500)
        for s1, s2 in zip(steps, steps[1:]):
            assert np.all((s2 / s1 > 1.8) & (s2 / s1 < 2.2)), (s1, s2)
