"""Tests for reward.py: answer extraction, grading (hand-written, adversarial, time limits, threads and
processes), format / length rewards and the combined RL reward."""

import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

import verifier
from reward import (
    RewardConfig,
    extract_answer,
    format_reward,
    get_grader_pool,
    grade,
    length_reward,
    score_completions,
)


def B(s: str) -> str:
    return "<think>some reasoning</think> Therefore the result is \\boxed{" + s + "}."


@pytest.fixture(scope="module", autouse=True)
def _warm():
    verifier.warmup(wait=True)  # child start-up is not what the timing tests measure


# ------------------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    "response, expected",
    [
        (r"so \boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces (the released regex gives \frac{1)
        (r"\boxed{\frac{\sqrt{3}}{2}} done", r"\frac{\sqrt{3}}{2}"),
        (r"first \boxed{3}, then \boxed{4}", "4"),  # the LAST box
        (r"spaced \boxed {7}", "7"),
        (r"\fbox{8}", "8"),
        (r"\boxed 5 is it", "5"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces are not structure
        (r"\boxed{\boxed{9}}", "9"),
        (r"\boxed{3} ... so finally \boxed{\frac{1", None),  # last box cut off: no answer
        (r"\boxed{}", None),
        (r"\boxed{   }", None),
        ("The answer is B.", "B."),
        ("Answer: 12", "12"),
        ("**Answer:** 12", "12"),
        ("The final answer is $\\frac{1}{2}$.", "$\\frac{1}{2}$."),
        ("So the answer is 12 because 5+7=12", "12"),
        ("The answer is 5. But wait, let me check this again", None),  # more reasoning follows
        ("The answer is 5.\n\nHmm, actually", None),
        ("Let me compute 5 + 7 =", None),  # cut off mid-reasoning
        ("The answer is", None),
        ("", None),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_extract_require_boxed_and_caps():
    assert extract_answer("The answer is 12", require_boxed=True) is None
    assert extract_answer(r"The answer is \boxed{12}", require_boxed=True) == "12"
    assert extract_answer(r"\boxed{" + "1" * 1001 + "}") is None  # answer over MAX_ANSWER_CHARS
    deep = r"\boxed{" + "{" * 300 + "1" + "}" * 300 + "}"
    assert extract_answer(deep) is None  # nesting deeper than MAX_BRACE_DEPTH
    early = r"\boxed{1}" + " filler" * 5000  # the box lies outside the last 20k chars
    assert extract_answer(early, require_boxed=True) is None


# ---------------------------------------------------------------------------------------------------- grading

CASES = [
    # (response, gold, choices, expected)  -- numbers
    (B("7"), "7", None, True),
    (B("007"), "7", None, True),
    (B("7"), "007", None, True),
    (B("1,000"), "1000", None, True),
    (B("1000"), "1,000", None, True),
    (B("100001"), "100000", None, False),
    (B("99999999999999999999"), "100000000000000000000", None, False),
    (B(r"\frac{1}{2}"), "0.5", None, True),
    (B("0.5"), r"\frac12", None, True),
    (B("1/2"), "0.5", None, True),
    (B("0.7"), r"\frac{3}{4}", None, False),
    (B("0.75"), "3/4", None, True),
    (B(r"\dfrac{3}{4}"), r"\frac34", None, True),
    (B(r"\tfrac{3}{4}"), "0.75", None, True),
    (B(r"-\frac{1}{2}"), "-0.5", None, True),
    (B(r"\frac{-1}{2}"), r"-\frac12", None, True),
    (B("1/2"), "-1/2", None, False),
    (B("3.0"), "3", None, True),
    (B("3.01"), "3", None, False),
    (B("0.333"), r"\frac13", None, True),  # rounded decimal of a non-terminating fraction
    (B("0.33"), r"\frac13", None, False),  # too few digits
    (B("0.0000001"), "0", None, False),
    (B(r"\frac{1}{3^{61}}"), r"\frac{1}{3^{60}}", None, False),  # math-verify alone says equal
    (B(r"1.2\times 10^{-29}"), r"\frac{1}{3^{60}}", None, False),
    (B("50\\%"), "50", None, True),
    (B("50"), "50\\%", None, True),
    (B("0.5"), "50", None, False),
    (B("0.5"), "50\\%", None, True),
    (B(r"30^\circ"), "30", None, True),
    (B(r"30^{\circ}"), "30", None, True),
    (B(r"5 \text{ cm}"), "5", None, True),
    (B(r"12 \mathrm{cm}^2"), "12", None, True),
    (B("12"), r"12 \text{ cm}", None, True),
    (B(r"\$5"), "5", None, True),
    (B("x = 3"), "3", None, True),
    (B(r"2^{10}"), "1024", None, True),
    (B(r"\frac{\sqrt{3}}{3}"), "0.577350", None, True),
    # expressions, intervals, sets, tuples
    (B("(x+1)^2"), "x^2+2x+1", None, True),
    (B("x^2+2x+2"), "(x+1)^2", None, False),
    (B(r"3\sqrt{2}"), r"\sqrt{18}", None, True),
    (B(r"\frac{\sqrt{3}}{2}"), r"\frac{\sqrt3}{2}", None, True),
    (B(r"\left( 1, 2 \right)"), "(1,2)", None, True),
    (B("(1,2]"), "[1,2]", None, False),
    (B("(1,2]"), "(1,2]", None, True),
    (B(r"1 \le x < 2"), "[1,2)", None, True),
    (B(r"\{2,1\}"), r"\{1,2\}", None, True),
    (B("(2,1)"), "(1,2)", None, False),
    (B(r"2\pi"), r"2\pi", None, True),
    (B("6.28"), r"2\pi", None, False),
    (B("y = 2x + 1"), "y=2x+1", None, True),
    (B(r"\text{Monday}"), "Monday", None, True),
    (B(r"5 \text{ or } 7"), "5", None, False),
    (B("5, 7"), "5", None, False),
    (B(r"\pm 5"), "5", None, False),
    # multiple choice
    (B("B"), "B", ["1", "2", "3"], True),
    (B("(B)"), "B", ["1", "2", "3"], True),
    (B(r"\text{(B)}"), "B", ["1", "2", "3"], True),
    (B("B. 12"), "12", ["10", "12", "14"], True),  # letter with text, gold is the option text
    (B("12"), "B", ["10", "12", "14"], True),  # option text, gold is the letter
    (B("14"), "B", ["10", "12", "14"], False),
    (B("C"), "B", ["10", "12", "14"], False),
    (B("D"), "C", ["10", "12", "14"], False),  # no option D
    (B("B"), "2.5", ["1.5", "2.5"], True),
    (B(r"\sqrt2"), "B", ["1", r"\sqrt{2}", "2"], True),  # math equivalence with the gold option
    (B("A, C"), "A, C", ["1", "2", "3"], True),
    (B("AC"), "A, C", ["1", "2", "3"], True),
    (B("C, A"), "A,C", ["1", "2", "3"], True),
    (B("A and C"), "A, C", ["1", "2", "3"], True),
    (B("A"), "A, C", ["1", "2", "3"], False),
    (B("A, B, C"), "A, C", ["1", "2", "3"], False),
    (B("B"), "B", ["A. 1", "B. 2"], True),  # options carrying their own letter prefix
    (B("2"), "B", ["A. 1", "B. 2"], True),
    # letters without choices
    (B("C"), "C", None, True),
    (B("(C)"), "C", None, True),
    (B("D"), "C", None, False),
    (B("12"), "C", None, False),
    (B("A, C"), "A, C", None, True),
    (B("A, B, C, D"), "A", None, False),
    (B("A or B"), "A", None, False),
    (B(r"\overline{CD}"), "C", None, False),
    # more math-verify cases (with our guard)
    (B(r"\frac{\sqrt{2}}{2}"), r"\frac{1}{\sqrt{2}}", None, True),
    (B(r"\sin^2 x + \cos^2 x"), "1", None, True),
    (B(r"\binom{5}{2}"), "10", None, True),
    (B(r"2^{100}"), "1267650600228229401496703205376", None, True),
    (B(r"2^{100}"), "1267650600228229401496703205377", None, False),
    (B(r"10^{-30}"), "0", None, False),
    (B(r"\pi/2"), "1.570796", None, True),
    # fall-back to a stated final answer
    ("The answer is B.", "B", ["x", "y"], True),
    ("Answer: 12", "12", None, True),
    ("The final answer is $\\frac{1}{2}$.", "0.5", None, True),
    ("So the answer is 5 because 5+7=12", "12", None, False),
    ("So the answer is 12 because 5+7=12", "12", None, True),
    ("The answers are A and C.", "A, C", None, True),
    ("The correct answer is (C) 45°.", "C", ["30°", "40°", "45°"], True),
    ("Answer: 12</answer><|im_end|>", "12", None, True),
]


@pytest.mark.parametrize("response, gold, choices, expected", CASES)
def test_grade(response, gold, choices, expected):
    assert grade(response, gold, choices, timeout=5.0) is expected


@pytest.mark.parametrize(
    "response, gold",
    [
        (B("5"), ""),  # empty gold
        (B("5"), "   "),
        (B(""), "0"),  # empty box
        (B("  "), "0"),
        ("The answer is 5. But wait, let me re-check: 5 + 2 = 7 so it is 7", "5"),  # mid-text "answer is"
        ("Let me compute 12 / 4 = ", "3"),  # truncated mid-reasoning
        (B("5"), None),
        (None, "5"),
    ],
)
def test_grade_never_correct(response, gold):
    assert grade(response, gold) is False
    assert grade(response, gold, require_boxed=True) is False


def test_require_boxed():
    assert grade("The answer is 12", "12") is True
    assert grade("The answer is 12", "12", require_boxed=True) is False
    assert grade(r"<think>x</think>\boxed{12}", "12", require_boxed=True) is True


def test_released_code_failures_fixed():
    # the released regex \\boxed{([^}]+)} reads \frac{1 here; we match braces
    assert grade(r"\boxed{\frac{1}{2}}", r"\frac{1}{2}") is True
    assert grade(r"\boxed{\frac{1}{3}}", r"\frac{1}{2}") is False
    # the released fall-back compared alphabetic characters only: any number matched any number
    assert grade("The answer is 41", "42") is False


# --------------------------------------------------------------------------------------------- adversarial


ADVERSARIAL = {
    "power tower": (B(r"10^{10^{10}}"), "1"),  # math-verify hangs on it; the hard limit answers
    "python power tower": (B("10**10**10"), "1"),
    "factorial": (B(r"(10^{10})!"), "2"),
    "300 nested braces": (B("{" * 300 + "1" + "}" * 300), "1"),
    "5000-term sum": (B("+".join(str(i) for i in range(1, 5001))), "12502500"),  # over the answer cap
    "5000-term stated sum": ("The answer is " + "+".join(f"x^{i}" for i in range(5000)), "1"),
    "40-term sum": (B("+".join(f"x^{{{i}}}" for i in range(40))), "x"),  # under the cap
    "1M open braces": ("{" * 1_000_000, "7"),
    "200k open boxes": (r"\boxed{" * 200_000, "7"),
    "1M spaces": (" " * 1_000_000, "7"),
    "answer then spaces": ("Answer: 7" + " " * 5000 + "x", "7"),
    "50k special tokens": ("<|im_end|>" * 50_000, "7"),
    "999-digit near miss": (B("9" * 999), "9" * 998 + "8"),
    "exact near miss": (B(r"\sqrt{10^{40}+1}"), "10^{20}"),  # math-verify's chop calls it equal
}


@pytest.mark.parametrize("response, gold", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_adversarial_returns_in_time(response, gold):
    verifier.warmup(wait=True)  # a child killed by the previous case is replaced: start-up is not timed
    t = time.monotonic()
    assert grade(response, gold, timeout=1.0) is False
    assert time.monotonic() - t < 2.5


def test_power_tower_default_timeout():
    verifier.warmup(wait=True)
    t = time.monotonic()
    assert grade(B(r"10^{10^{10^{10}}}"), "2") is False
    assert time.monotonic() - t <= 6.0


def test_huge_response():
    assert grade("blah " * 400_000 + B("7"), "7") is True
    assert grade(B("9" * 999), "9" * 999) is True


def test_time_limit_holds_and_grader_recovers():
    verifier.warmup(wait=True)
    t = time.monotonic()
    assert grade(B(r"(10^{12})! + 1"), "3", timeout=0.3) is False
    assert time.monotonic() - t < 1.5
    assert grade(B("(z+2)^2"), "z^2+4z+4") is True  # a fresh child took over


def test_grade_from_threads():
    results: dict[str, bool] = {}

    def work(key, response, gold, timeout):
        results[key] = grade(response, gold, timeout=timeout)

    threads = [
        threading.Thread(target=work, args=("sym", B("(y+1)^2"), "y^2+2y+1", 5.0)),
        threading.Thread(target=work, args=("wrong", B("(y+1)^3"), "y^2+2y+1", 5.0)),
        threading.Thread(target=work, args=("slow", B(r"(10^{11})!"), "2", 0.5)),
    ]
    verifier.warmup(len(threads), wait=True)  # one child per thread, started before the clock
    t = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == {"sym": True, "wrong": False, "slow": False}
    assert time.monotonic() - t < 3.0


def test_grade_inside_daemonic_pool_worker():
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(grade, (B("(w+1)^2"), "w^2+2w+1")) is True


# ------------------------------------------------------------------------------------------ format, length


@pytest.mark.parametrize(
    "completion, expected",
    [
        (r"<think>reasoning</think> The answer is \boxed{5}.", 1.0),
        (r"<think>reasoning</think>\boxed{5}<|im_end|>", 1.0),
        ("  <think>\nreasoning\n</think>\n\nSo \\boxed{\\frac{1}{2}}", 1.0),
        (r"<think>reasoning</think> The answer is 5.", 0.0),  # no box
        (r"<think>reasoning \boxed{5}</think> The answer is 5.", 0.0),  # box only inside think
        (r"<think>  </think> \boxed{5}", 0.0),  # empty think
        (r"reasoning</think> \boxed{5}", 0.0),  # no opening tag
        (r"Sure! <think>reasoning</think> \boxed{5}", 0.0),  # think not first
        (r"<think>a</think><think>b</think> \boxed{5}", 0.0),  # two think blocks
        (r"<think>reasoning that was cut off \boxed{5", 0.0),  # truncated
        (r"<think>reasoning</think> \boxed{}", 0.0),  # empty box
        (r"\boxed{5}", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected


@pytest.mark.parametrize(
    "tokens, budget, expected",
    [
        (4000, 4096, 0.98),  # 0.005 * 96 + 0.5
        (4096, 4096, 0.5),
        (4195, 4096, 0.005),
        (4196, 4096, 0.0),
        (5000, 4096, 0.0),  # clipped at 0
        (3996, 4096, 1.0),
        (3000, 4096, 1.0),  # clipped at 1
        (0, 4096, 1.0),
        (100, 200, 1.0),
    ],
)
def test_length_reward(tokens, budget, expected):
    assert length_reward(tokens, budget) == pytest.approx(expected, abs=1e-12)


def test_length_reward_custom_alpha_delta():
    assert length_reward(90, 100, alpha=0.01, delta=0.2) == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------- batch reward

BATCH = [
    # completion, gold, choices, tokens, expected {acc, format, len}
    (r"<think>r</think> \boxed{5}", "5", None, 4000, (1.0, 1.0, 0.98)),
    (r"<think>r</think> \boxed{6}", "5", None, 5000, (0.0, 1.0, 0.0)),
    (r"<think>r</think> The answer is 5.", "5", None, 3000, (0.0, 0.0, 1.0)),  # unboxed: no accuracy
    (r"\boxed{B}", "12", ["10", "12"], 4096, (1.0, 0.0, 0.5)),
    (r"<think>r</think> \boxed{(v+1)^2}", "v^2+2v+1", None, 4100, (1.0, 1.0, 0.48)),
    (r"<think>truncated reasoning \boxed{5", "5", None, 8192, (0.0, 0.0, 0.0)),
]


def _expected(cfg, acc, fmt, ln):
    return cfg.w_acc * acc + cfg.w_fmt * fmt + cfg.w_len * ln


def test_score_completions_by_hand():
    cfg = RewardConfig()
    out = score_completions(*[list(col) for col in list(zip(*BATCH))[:4]], cfg)
    for row, (*_, (acc, fmt, ln)) in zip(out, BATCH):
        assert set(row) == {"reward", "acc", "format", "len_reward"}
        assert (row["acc"], row["format"]) == (acc, fmt)
        assert row["len_reward"] == pytest.approx(ln)
        assert row["reward"] == pytest.approx(_expected(cfg, acc, fmt, ln))
    assert out[0]["reward"] == pytest.approx(0.8 + 0.1 + 0.098)
    assert out[1]["reward"] == pytest.approx(0.1)


def test_score_completions_weights_and_lengths():
    cfg = RewardConfig(w_acc=1.0, w_fmt=0.0, w_len=0.5, len_budget=100)
    (row,) = score_completions([r"<think>r</think>\boxed{5}"], ["5"], [None], [98], cfg)
    assert row["len_reward"] == pytest.approx(0.51)
    assert row["reward"] == pytest.approx(1.0 + 0.5 * 0.51)
    with pytest.raises(ValueError):
        score_completions(["a", "b"], ["1"], [None, None], [1, 2], cfg)


def test_score_completions_pool_matches_serial():
    cfg = RewardConfig()
    cols = [list(col) * 3 for col in list(zip(*BATCH))[:4]]
    serial = score_completions(*cols, cfg)
    pool = get_grader_pool(2)
    assert get_grader_pool(2) is pool  # reused
    assert score_completions(*cols, cfg, pool=pool) == serial
    assert score_completions(*cols, RewardConfig(grade_workers=2)) == serial
    # grade() itself inside a ProcessPoolExecutor (spawn) worker
    assert isinstance(pool, ProcessPoolExecutor)
    assert pool.submit(grade, B("(u+1)^2"), "u^2+2u+1").result(timeout=60) is True
    assert pool.submit(grade, B(r"10^{10^{10}}"), "1", None, False, 0.5).result(timeout=60) is False
