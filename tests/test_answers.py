"""Answer checking: grpo.answers_match (the reasoning reward's accuracy; same code in ecvgpo/vicra/vepo by
test_sync) on hand-written pairs a grader would call equal / not equal, and the VQA metrics of evaluate.py
on hand-computed cases."""
import threading
import time

import pytest

import evaluate  # noqa: E402  (the VQA metrics)
import grpo

# (reference answer, predicted \boxed{} content, equal?, which check should decide)
PAIRS = [
    ("0.5", "\\frac{1}{2}", True, "math-verify"),
    ("\\frac{1}{2}", "0.5", True, "math-verify"),
    ("\\frac{1}{2}", "1/2", True, "math-verify"),
    ("\\frac{1}{2}", "\\dfrac12", True, "math-verify"),
    ("1/2", "\\tfrac{1}{2}", True, "math-verify"),
    ("4", "x = 4", True, "math-verify"),
    ("A", "(A)", True, "math-verify"),
    ("C", "\\text{C}", True, "exact"),
    ("4", "4\\%", True, "math-verify"),
    ("60", "60^\\circ", True, "math-verify"),
    ("2\\sqrt{2}", "\\sqrt{8}", True, "math-verify"),
    ("\\{1,2\\}", "\\{2,1\\}", True, "math-verify"),
    ("3", "3.0", True, "exact"),
    ("1000", "1,000", True, "exact"),
    ("12", "$12$", True, "exact"),
    ("7", "7.", True, "exact"),
    ("yes", "Yes", True, "exact"),
    ("red", "\\text{red}", True, "exact"),
    ("\\pi/2", "\\frac{\\pi}{2}", True, "math-verify"),
    ("-3", "- 3", True, "math-verify"),
    ("0.25", "\\frac{1}{4}", True, "math-verify"),
    ("x^2+2x+1", "(x+1)^2", True, "math-verify"),
    ("\\sqrt{3}/3", "\\frac{1}{\\sqrt{3}}", True, "math-verify"),
    ("3 cm", "3", True, "math-verify"),
    ("B", "b", True, "exact"),
    # not equal
    ("A", "B", False, "math-verify"),
    ("3", "4", False, "math-verify"),
    ("0.5", "0.55", False, "math-verify"),
    ("\\frac{1}{2}", "\\frac{1}{3}", False, "math-verify"),
    ("red", "der", False, "word"),  # sympy alone: r*e*d == d*e*r
    ("yes", "no", False, "word"),
    ("red", "blue", False, "word"),
    ("\\pi", "3.14", False, "math-verify"),
    ("(1,2)", "(2,1)", False, "math-verify"),
    ("2\\sqrt{2}", "\\sqrt{2}", False, "math-verify"),
    ("4", "x = 5", False, "math-verify"),
    ("A", "(C)", False, "math-verify"),
    ("12", "21", False, "math-verify"),
    ("-3", "3", False, "math-verify"),
    ("x^2", "2x", False, "math-verify"),
    ("10", "", False, "math-verify"),
    ("5", "\\frac{", False, "math-verify"),  # malformed LaTeX: no exception, not equal
]


@pytest.mark.parametrize("answer,pred,equal,how", PAIRS)
def test_answers_match(answer, pred, equal, how):
    assert grpo.answers_match(pred, answer) == (equal, how)


def test_pair_count():
    assert len(PAIRS) >= 40 and sum(p[2] for p in PAIRS) >= 20 and sum(not p[2] for p in PAIRS) >= 15


def test_reasoning_reward_uses_equivalence():
    text = "<think>half of one</think> so \\boxed{\\dfrac12}"
    assert grpo.reasoning_reward(text, "0.5") == (1.0, 1.0, 1.0)
    assert grpo.reasoning_reward("\\boxed{0.4}", "0.5") == (0.0, 0.0, 0.0)
    assert grpo.reasoning_reward("no box at all: 0.5", "0.5") == (0.0, 0.0, 0.0)


def test_off_main_thread_never_raises():
    """math-verify's default timeouts use signal.alarm, which raises off the main thread; the reward
    turns them off there and must still decide."""
    out = []
    th = threading.Thread(target=lambda: out.append([grpo.answers_match(p, a) for a, p, _, _ in PAIRS]))
    th.start(), th.join()
    assert out[0] == [(e, h) for _, _, e, h in PAIRS]


def test_speed():
    """The check runs once per completion; it must stay far below a rollout's cost (measured in the note)."""
    grpo.answers_match("\\frac{1}{2}", "0.5")  # warm-up: sympy's first parse
    t = time.perf_counter()
    for a, p, _, _ in PAIRS:
        grpo.answers_match(p, a)
    per_call = (time.perf_counter() - t) / len(PAIRS)
    print(f"answers_match: {per_call * 1e3:.1f} ms per call over {len(PAIRS)} pairs")
    assert per_call < 0.5
