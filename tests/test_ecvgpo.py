"""ECVGPO (seed 000, section 4, eqs. 14-17; supp. A eq. 22): hand-computed eq. 17 cases, the
logged covariance against an independent computation, and reshaping-off == grpo.py.
Figure 6's r0 ordering is measured in notes/ecvgpo.md, never asserted here."""
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ecvgpo  # noqa: E402

torch.set_num_threads(1)
INF = float("inf")


def T(x):
    return torch.tensor(x, dtype=torch.float64)


def reshape(adv, logp, mask, rewards, G, r0, l0=25.0, delta=INF, si="token"):
    return ecvgpo.reshape_advantages(T(adv), T(logp), T(mask), T(rewards), G, r0, l0, delta, si)


# ----------------------------------------------------------------------------- eq. 17 by hand
def test_floor_binds_for_positive_r0():
    # A = 1: S = 5 gives 1 - 5/10 = 0.5 > 1/25; S = 20 gives 1 - 2 = -1, so the floor A/l0 = 0.04
    # binds (a positive sample stays positive); S = 0.1 gives 0.99
    out = reshape([[1.0, 1.0, 1.0]], [[-5.0, -20.0, -0.1]], [[1, 1, 1]], [0.0], 1, r0=10.0)
    assert torch.allclose(out, T([[0.5, 0.04, 0.99]]))
    out = reshape([[2.0]], [[-30.0]], [[1]], [0.0], 1, r0=10.0, l0=4.0)  # 2 - 3 = -1 < 2/4
    assert torch.allclose(out, T([[0.5]]))


def test_negative_r0_raises_low_probability_tokens_most():
    # r0 = -10: A' = A + S/10. log pi = -3 -> +0.3; log pi = -0.1 -> +0.01; the floor never binds
    out = reshape([[1.0, 1.0]], [[-3.0, -0.1]], [[1, 1]], [0.0], 1, r0=-10.0)
    assert torch.allclose(out, T([[1.3, 1.01]]))
    out = reshape([[0.5, 0.5]], [[-3.0, -0.1]], [[1, 1]], [0.0], 1, r0=-50.0)
    assert torch.allclose(out, T([[0.56, 0.502]]))


def test_negative_and_zero_advantages_untouched():
    adv = [[-1.0, -1.0], [0.0, 0.0], [2.0, 2.0]]
    logp = [[-4.0, -0.2], [-4.0, -0.2], [-4.0, -0.2]]
    for r0 in (-50.0, -10.0, 10.0, 50.0):
        out = reshape(adv, logp, [[1, 1]] * 3, [0.0] * 3, 3, r0)
        assert torch.equal(out[:2], T(adv[:2]))
        assert not torch.equal(out[2], T(adv[2]))


def test_eq16_literal_no_one_over_n_and_the_gate():
    # rewards (1, 1, 1, 1.06): deviations -0.015 x3, +0.045 -> sum of squares 0.0027,
    # r_std = sqrt(0.0027) = 0.05196 (eq. 16). With 1/N it would be 0.02598, with 1/(N-1) 0.03.
    r = T([1.0, 1.0, 1.0, 1.06])
    assert ecvgpo.reward_spread(r, 4).item() == pytest.approx(math.sqrt(0.0027), rel=1e-9)
    adv = [[-0.5], [-0.5], [-0.5], [1.5]]
    logp = [[-2.0]] * 4
    # delta = 0.04 sits between the 1/N value and eq. 16's: eq. 16 says r_std >= delta -> untouched
    assert torch.equal(reshape(adv, logp, [[1]] * 4, r.tolist(), 4, -10.0, delta=0.04), T(adv))
    # delta = 0.06 > 0.052: the gate opens and only the positive sample moves, 1.5 + 2/10
    out = reshape(adv, logp, [[1]] * 4, r.tolist(), 4, -10.0, delta=0.06)
    assert torch.allclose(out, T([[-0.5], [-0.5], [-0.5], [1.7]]))
    # r_std == delta is not < delta: untouched
    out = reshape(adv, logp, [[1]] * 4, r.tolist(), 4, -10.0, delta=ecvgpo.reward_spread(r, 4).item())
    assert torch.equal(out, T(adv))


def test_gate_is_per_group():
    # two groups of 2: group 0 rewards (0, 0.01) r_std = 0.00707 < 0.1, group 1 (0, 1) r_std = 0.707
    adv = [[-1.0], [1.0], [-1.0], [1.0]]
    out = reshape(adv, [[-1.0]] * 4, [[1]] * 4, [0.0, 0.01, 0.0, 1.0], 2, -10.0, delta=0.1)
    assert torch.allclose(out, T([[-1.0], [1.1], [-1.0], [1.0]]))


def test_token_vs_seq_level_and_padding():
    # one response of 2 tokens + 1 pad (log pi = -100 there, must be ignored). token: S = (1, 3);
    # seq (eq. 14): S_i = mean(1, 3) = 2 on both tokens. r0 = -10, A = 1.
    adv, logp, mask = [[1.0, 1.0, 0.0]], [[-1.0, -3.0, -100.0]], [[1, 1, 0]]  # per-token A comes masked
    tok = reshape(adv, logp, mask, [0.0], 1, -10.0, si="token")
    seq = reshape(adv, logp, mask, [0.0], 1, -10.0, si="seq")
    assert torch.allclose(tok, T([[1.1, 1.3, 0.0]]))
    assert torch.allclose(seq, T([[1.2, 1.2, 0.0]]))
    # per-sequence advantages (N,) broadcast to the same result
    assert torch.allclose(reshape([1.0], logp, mask, [0.0], 1, -10.0), tok)
    with pytest.raises(ValueError):
        reshape(adv, logp, mask, [0.0], 1, -10.0, si="sentence")


def test_reshaping_off_returns_advantages_unchanged():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(6, 5, generator=g, dtype=torch.float64) * 5
    mask = (torch.rand(6, 5, generator=g) > 0.3).double()
    adv = torch.randn(6, 1, generator=g, dtype=torch.float64) * mask  # as grpo.py hands them over
    r = torch.zeros(6, dtype=torch.float64)
    for r0 in (0.0, INF, -INF):
        out = ecvgpo.reshape_advantages(adv, logp, mask, r, 3, r0, 25.0, INF, "token")
        assert torch.equal(out, adv * mask)
    # and the gate closed (delta = 0 can never be beaten) is also plain GRPO
    out = ecvgpo.reshape_advantages(adv, logp, mask, r, 3, -10.0, 25.0, 0.0, "token")
    assert torch.equal(out, adv * mask)


def test_detached_self_information():
    logp = T([[-1.0, -2.0]]).requires_grad_()
    out = ecvgpo.reshape_advantages(T([1.0]), logp, T([[1, 1]]), T([0.0]), 1, -10.0, 25.0, INF, "token")
    assert not out.requires_grad  # eq. 15's S is a constant of the loss: no gradient through A'


# ----------------------------------------------------------------------------- logged covariance
def stats(adv_tok, adv2, logp, H, mask, rewards, G, delta):
    return ecvgpo.ecvgpo_log(ecvgpo.ecvgpo_sums(adv_tok, adv2, logp, H, mask, rewards, G, delta))


def slow_stats(adv, adv2, logp, H, mask):
    """Independent: python loops over the valid tokens, np.cov with bias=True (1/n)."""
    lp, a, a2, h = [], [], [], []
    for i in range(len(mask)):
        for t in range(len(mask[i])):
            if mask[i][t]:
                lp.append(logp[i][t]), a.append(adv[i]), a2.append(adv2[i][t]), h.append(H[i][t])
    lp, a, a2 = np.array(lp), np.array(a), np.array(a2)
    pos = a > 0
    return dict(cov_logp_adv=np.cov(lp, a, bias=True)[0, 1], cov_logp_adv_reshaped=np.cov(lp, a2, bias=True)[0, 1],
                reshaped_frac=np.mean(a2[pos] != a[pos]), dadv_abs=np.mean(np.abs(a2 - a)),
                pos_logp=lp[pos].mean(), neg_entropy=-np.mean(h))


def test_logged_covariance_matches_independent_computation_with_padding():
    g = torch.Generator().manual_seed(1)
    N, L, G = 8, 7, 4
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    logp = -torch.rand(N, L, generator=g, dtype=torch.float64) * 4
    H = torch.rand(N, L, generator=g, dtype=torch.float64) * 3
    lengths = [7, 3, 5, 1, 6, 2, 7, 4]
    mask = torch.tensor([[1.0] * n + [0.0] * (L - n) for n in lengths], dtype=torch.float64)
    logp[mask == 0], H[mask == 0] = -1e4, 1e4  # garbage on padding must not leak into the logs
    rewards = torch.tensor([0.0, 0.05, 0.02, 0.01, 1.0, 0.0, 0.5, 0.7], dtype=torch.float64)  # group 0 gated open
    adv2 = ecvgpo.reshape_advantages(adv, logp, mask, rewards, G, 10.0, 25.0, 0.1, "token")
    adv_tok = adv[:, None] * mask
    got = stats(adv_tok, adv2, logp, H, mask, rewards, G, 0.1)
    want = slow_stats(adv.tolist(), adv2.tolist(), logp.tolist(), H.tolist(), mask.tolist())
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert 0 < got["reshaped_frac"] < 1  # group 1 is gated shut
    assert got["cov_logp_adv"] != got["cov_logp_adv_reshaped"]
    # group 0: rewards (0, .05, .02, .01), r_std = sqrt(0.00145) = 0.038 < 0.1; group 1 spread 0.84: shut
    assert got["gate_open"] == 0.5 and got["gate_open_signal"] == 0.5
    # the logs are built from sums, so two chunks (or two ranks) summed give the same numbers as one batch
    halves = [ecvgpo.ecvgpo_sums(adv_tok[s], adv2[s], logp[s], H[s], mask[s], rewards[s], G, 0.1)
              for s in (slice(0, 4), slice(4, 8))]
    summed = ecvgpo.ecvgpo_log({k: halves[0][k] + halves[1][k] for k in halves[0]})
    for k, v in got.items():
        assert summed[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def constructed_batch(pos_logp):
    """G = 4, one group (gate open with delta = inf). Row 0 is the positive sample; every one of its
    tokens has log pi_old = pos_logp. The three others hold tokens at -0.5 and -2.0 (mean -1.25,
    the batch's 'typical' log-prob, the sample estimate of -H). Padding everywhere at the end."""
    logp = T([[pos_logp] * 3 + [0.0], [-0.5, -2.0, 0.0, 0.0], [-2.0, -0.5, -0.5, -2.0], [-0.5, -2.0, 0.0, 0.0]])
    mask = T([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    adv = T([1.5, -0.5, -0.5, -0.5])
    return adv, logp, mask, T([1.0, 0.0, 0.0, 0.0])


R0S = (-10.0, -50.0, INF, 50.0, 10.0)  # figure 6's order, highest entropy first


@pytest.mark.parametrize("pos_logp,below", [(-4.0, True), (-0.05, False)])
def test_covariance_sign_flips_with_the_positive_tokens_probability(pos_logp, below):
    # SPEC "What r0 does": without the floor, A' - A = log pi / r0 on positive tokens and 0 elsewhere, so over
    # the n valid tokens (n+ positive, batch mean m, positive mean m+, positive variance V+)
    #   Cov(log pi, A' - A) = (n+/n) (1/r0) (V+ + m+ (m+ - m)).
    # Here V+ = 0: positive tokens below typical (m+ < m < 0) -> r0 < 0 lowers the covariance (entropy up,
    # eq. 22), r0 > 0 raises it (entropy down), as figure 6; positive tokens at the mode (m+ ~ 0 > m): reversed.
    adv, logp, mask, rewards = constructed_batch(pos_logp)
    m = ((logp * mask).sum() / mask.sum()).item()
    H = torch.full_like(logp, -m)  # mean entropy = -(mean sampled log-prob): "typical" is -H
    covs = []
    for r0 in R0S:
        a2 = ecvgpo.reshape_advantages(adv, logp, mask, rewards, 4, r0, 25.0, INF, "token")
        s = stats(adv[:, None] * mask, a2, logp, H, mask, rewards, 4, INF)
        assert (s["pos_logp"] < s["neg_entropy"]) == below  # eq. 13's premise, as constructed
        d = s["cov_logp_adv_reshaped"] - s["cov_logp_adv"]  # = Cov(log pi, A' - A)
        assert d == pytest.approx(3 / 11 / r0 * pos_logp * (pos_logp - m), abs=1e-12)  # by hand, V+ = 0
        if not math.isinf(r0):
            assert (d < 0) == ((r0 < 0) == below), (r0, d)
        covs.append(s["cov_logp_adv_reshaped"])
    # ordered by 1/r0 (no floor binds: S/r0 <= 0.4 < A (1 - 1/l0)), increasing below typical, decreasing at the mode
    assert (np.diff(covs) > 0).all() if below else (np.diff(covs) < 0).all()


def test_covariance_shift_identity_with_spread_positive_tokens():
    # the same identity with V+ > 0: the V+ term always has the sign of 1/r0, so positive tokens that are
    # more likely than typical on average but spread out (V+ > -m+ (m+ - m)) keep figure 6's direction
    g = torch.Generator().manual_seed(2)
    N, L, G = 8, 6, 4
    logp = -torch.rand(N, L, generator=g, dtype=torch.float64) * 3
    mask = (torch.rand(N, L, generator=g) > 0.2).double()
    mask[:, 0] = 1
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -1.0, -1.0, 0.0], dtype=torch.float64)
    v, pos = mask.bool(), (adv[:, None] * mask > 0) & mask.bool()
    n, lp = v.sum().item(), logp[v]
    mp, Vp = logp[pos].mean().item(), logp[pos].var(unbiased=False).item()
    for r0 in (-10.0, -50.0, 50.0):  # S/50 <= 0.06 < 0.5 (1 - 1/25): the floor never binds
        a2 = ecvgpo.reshape_advantages(adv, logp, mask, torch.zeros(N, dtype=torch.float64), G, r0, 25.0, INF, "token")
        s = stats(adv[:, None] * mask, a2, logp, torch.ones_like(logp), mask, torch.zeros(N), G, INF)
        want = pos.sum().item() / n / r0 * (Vp + mp * (mp - lp.mean().item()))
        assert s["cov_logp_adv_reshaped"] - s["cov_logp_adv"] == pytest.approx(want, rel=1e-9)


# ----------------------------------------------------------------------------- ecvgpo.py == grpo.py when off
CKPT = ROOT / "checkpoints" / "tiny-shapes"
TINY_RUN = ["--batch_size", "2", "--G", "4", "--max_new_tokens", "32", "--micro_batch_size", "8", "--eval_every", "0",
            "--save_every", "0", "--threads", "1", "--lr", "3e-4", "--steps", "1", "--seed", "3"]


def run(script, args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, script] + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.skipif(not (CKPT / "model.safetensors").exists(),
                    reason="needs the shipped checkpoint: a random model earns reward 0, A = 0, nothing moves")
def test_reshaping_off_is_grpo_step_for_step(tmp_path):
    from data.shapes.prepare import make_split
    from safetensors.torch import load_file
    make_split("grounding", "train", 16, 0, str(tmp_path / "shapes"), progress=False)
    common = ["--model", str(CKPT), "--data", str(tmp_path / "shapes" / "grounding_train.jsonl")] + TINY_RUN
    run("grpo.py", common + ["--out_dir", str(tmp_path / "grpo")])
    # delta = inf opens the gate for every group, so r0 alone must switch eq. 17 off
    run("ecvgpo.py", common + ["--out_dir", str(tmp_path / "off"), "--r0", "0", "--delta", "inf"])
    # control: the same step with the reshaping on (gate open) must differ, or the comparison proves nothing
    run("ecvgpo.py", common + ["--out_dir", str(tmp_path / "on"), "--r0", "-10", "--delta", "inf"])
    init, g, off, on = (load_file(str(p / "model.safetensors")) for p in (CKPT, tmp_path / "grpo", tmp_path / "off",
                                                                           tmp_path / "on"))
    assert g.keys() == off.keys() and all(torch.equal(g[k], off[k]) for k in g)  # bit for bit
    assert any(not torch.equal(g[k], init[k]) for k in g)  # the step moved the weights
    assert any(not torch.equal(g[k], on[k]) for k in g)
    logs = {d: json.loads(open(tmp_path / d / "log.jsonl").readlines()[-1]) for d in ("grpo", "off", "on")}
    for k in ("reward", "entropy", "loss", "grad_norm", "kl", "length"):
        assert logs["grpo"][k] == logs["off"][k], k
    assert logs["off"]["reshaped_frac"] == 0 and logs["off"]["dadv_abs"] == 0
    assert logs["on"]["reshaped_frac"] == 1 and logs["on"]["dadv_abs"] > 0
    assert logs["off"]["cov_logp_adv"] == logs["off"]["cov_logp_adv_reshaped"]
