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


# ---------------------------------------------------------------------------- VQA metrics, hand-computed
def test_vqa_normalise():
    assert evaluate.vqa_normalise("The Dog's bowl!") == "dog's bowl"
    assert evaluate.vqa_normalise("dont") == "don't"  # contraction written without its apostrophe
    assert evaluate.vqa_normalise("Two") == "2" and evaluate.vqa_normalise("none") == "0"
    assert evaluate.vqa_normalise("1,000") == "1000"  # comma between digits: dropped, not a space
    assert evaluate.vqa_normalise("red-white") == "red white"
    assert evaluate.vqa_normalise("3.5") == "3.5" and evaluate.vqa_normalise("yes.") == "yes"


@pytest.mark.parametrize("m,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_m_of_10(m, expected):
    """m of 10 humans gave the answer: mean over the 10 leave-one-out subsets of min(matches / 3, 1).
    m = 3: 3 subsets hold 2 matches (2/3), 7 hold 3 (1): (3 * 2/3 + 7) / 10 = 0.9."""
    answers = ["stop"] * m + ["go"] * (10 - m)
    assert evaluate.vqa_accuracy("Stop.", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    assert evaluate.vqa_accuracy("two", ["2"] * 10) == 1.0
    assert evaluate.vqa_accuracy("a dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(0.6)


def test_exact_and_choice():
    assert evaluate.exact_match("The table.", ["table"]) == 1.0
    assert evaluate.exact_match("tables", ["table"]) == 0.0
    assert evaluate.choice_match("B", ["B"]) == 1.0 and evaluate.choice_match("(B) red", ["B"]) == 1.0
    assert evaluate.choice_match("The answer is C.", ["B"]) == 0.0 and evaluate.choice_match("red", ["B"]) == 0.0


@pytest.mark.parametrize("reply,parsed", [("Yes", "yes"), ("Yes, there is a dog.", "yes"), ("No.", "no"),
                                          ("There is not a dog in the image.", "no"), ("no", "no"),
                                          ("I cannot tell. No", "yes"), ("Nope", "yes")])
def test_pope_yesno(reply, parsed):
    """POPE's own parse: only the first sentence counts, and only the words No / no / not mean no."""
    assert evaluate.pope_yesno(reply) == parsed
    assert evaluate.yesno_match(reply, [parsed]) == 1.0


def test_anls():
    assert evaluate.levenshtein("kitten", "sitting") == 3
    assert evaluate.anls("1989", ["1989"]) == 1.0
    assert evaluate.anls("19890", ["1989"]) == pytest.approx(0.8)  # 1 edit / 5 characters
    assert evaluate.anls("abcd", ["abxy"]) == 0.0  # NL = 0.5 is not < 0.5
    assert evaluate.anls("abcd", ["abcx"]) == pytest.approx(0.75)
    assert evaluate.anls(" ITC Limited ", ["itc limited", "ITC"]) == 1.0  # best over answers, case-blind
    assert evaluate.anls("itc", ["itc limited", "zzz"]) == 0.0  # 8 edits / 11: NL 0.73
