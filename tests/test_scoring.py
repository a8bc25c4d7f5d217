"""scoring.py: each benchmark's official rule on hand-graded responses where the official scorer and a naive
one (exact string / float match, our RL reward's leniency) disagree; WeMath's four dimensions computed by
hand; --score_only deriving what it can and refusing what it cannot."""

import json
import time

import fixtures_bench as F
import pytest

import data as D
import eval as E
import reward
import scoring as S

# ----------------------------------------------------------------------------------------------------------
# The value of an answer


@pytest.mark.parametrize(
    "text,value",
    [
        ("1.22 cm", 1.22),
        ("\\boxed{1.22\\text{ cm}}", 1.22),
        ("30^\\circ", 30.0),
        ("x = 3", 3.0),
        ("1,000", 1000.0),
        ("\\frac{2\\pi}{3}", 2 * 3.141592653589793 / 3),
        ("2\\pi/3", 2 * 3.141592653589793 / 3),
        ("π", 3.141592653589793),
        ("\\dfrac{14}{3}", 14 / 3),
        ("\\frac23", 2 / 3),
        ("3\\sqrt{2}", 3 * 2**0.5),
        ("\\sqrt[3]{27}", 3.0),
        ("2^{10}", 1024.0),
        ("2^-1", 0.5),
        ("-(1+2)\\times 3", -9.0),
        ("$\\left(\\frac{1}{2}\\right)$", 0.5),
    ],
)
def test_numeric_value_evaluates_the_answer(text, value):
    assert S.numeric_value(text) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize(
    "text",
    [
        "abc",
        "1.5.2",
        "\\frac{1}{0}",
        "10^{999}",
        "2^{2^{2^{2^{2}}}}",
        "(" * 300 + "1" + ")" * 300,
        "1" * 201,
        "__import__('os').system('x')",
        "\\sqrt{-4}",
        "A = B",
        "",
    ],
)
def test_numeric_value_refuses_what_is_not_a_bounded_number(text):
    t0 = time.perf_counter()
    assert S.numeric_value(text) is None
    assert time.perf_counter() - t0 < 0.1  # linear and bounded: no eval, no big integers


# ----------------------------------------------------------------------------------------------------------
# Per benchmark: (response, gold, choices, meta, official verdict); the comment says what a naive scorer does

MV_FLOAT1 = {"answer_type": "float", "precision": 1}
MV_INT = {"answer_type": "integer"}
DM_FLOAT = {"answer_type": "float"}
DM_MC = {"answer_type": "multiple choice"}
CASES = [
    # MathVista (calculate_score.py): round(float, precision), int(float(x)), the gold is the option text
    ("mathvista", "\\boxed{1.22 cm}", "1.2", None, MV_FLOAT1, True),  # naive float("1.22 cm"): error, wrong
    ("mathvista", "\\boxed{1.24}", "1.2", None, MV_FLOAT1, True),  # naive exact: wrong
    ("mathvista", "\\boxed{1.3}", "1.2", None, MV_FLOAT1, False),
    ("mathvista", "\\boxed{7.9}", "7", None, MV_INT, True),  # int(float("7.9")) == 7; naive: wrong
    ("mathvista", "\\boxed{8}", "7", None, MV_INT, False),
    ("mathvista", "\\boxed{(A)}", "4.5", ["4.5", "3", "7"], {"answer_type": "text"}, True),
    ("mathvista", "\\boxed{B}", "4.5", ["4.5", "3", "7"], {"answer_type": "text"}, False),
    # DynaMath (DynaMath_auxeval): |x - gold| <= 1e-3 on the value; options inside the question
    ("dynamath", "\\boxed{\\frac{2\\pi}{3}}", "2.094", None, DM_FLOAT, True),  # naive float(): wrong
    ("dynamath", "\\boxed{2.0944}", "2.094", None, DM_FLOAT, True),
    ("dynamath", "\\boxed{2.1}", "2.094", None, DM_FLOAT, False),
    ("dynamath", "\\boxed{\\pi}", "3.142", None, DM_FLOAT, True),
    ("dynamath", "\\boxed{yes}", "A", ["yes", "no"], DM_MC, True),  # option text; naive letter match: wrong
    ("dynamath", "\\boxed{no}", "A", ["yes", "no"], DM_MC, False),
    # MathVerse: golds "(C)", "A\nC", "False"; options parsed from "Choices:\nA:..."
    ("mathverse", "\\boxed{C}", "(C)", ["30°", "45°", "60°", "90°"], {}, True),  # naive "C" != "(C)"
    ("mathverse", "\\boxed{60^\\circ}", "(C)", ["30°", "45°", "60°", "90°"], {}, True),
    ("mathverse", "\\boxed{A, C}", "A\nC", ["angle 1", "angle 2", "angle 3"], {}, True),  # naive: wrong
    ("mathverse", "\\boxed{A}", "A\nC", ["angle 1", "angle 2", "angle 3"], {}, False),
    ("mathverse", "\\boxed{\\text{False}}", "False", None, {}, True),
    ("mathverse", "\\boxed{True}", "False", None, {}, False),
    # LogicVista (normalize_logicvista_answer): sorted letter sets; option text; the blank row is wrong
    ("logicvista", "\\boxed{CA}", "A, C", None, {}, True),  # naive "CA" != "A, C"
    ("logicvista", "\\boxed{14}", "C", ["10", "12", "14", "16"], {}, True),  # option text; naive: wrong
    ("logicvista", "\\boxed{12}", "C", ["10", "12", "14", "16"], {}, False),
    ("logicvista", "\\boxed{}", "", None, {}, False),
    ("logicvista", "The answer is 3.", "3", None, {}, True),
    # MATH-500 (the MATH graders, math-verify): no rounded decimal for a non-terminating fraction
    ("math500", "\\boxed{4.67}", "\\frac{14}{3}", None, {}, False),  # our RL reward: right (lenient)
    ("math500", "\\boxed{4.666}", "\\frac{14}{3}", None, {}, False),
    ("math500", "\\boxed{\\frac{28}{6}}", "\\frac{14}{3}", None, {}, True),
    ("math500", "\\boxed{0.5}", "\\frac{1}{2}", None, {}, True),
]


@pytest.mark.parametrize("bench,response,gold,choices,meta,official", CASES)
def test_grade_row_follows_the_official_rule(bench, response, gold, choices, meta, official):
    assert S.grade_row(bench, response, gold, choices, meta)[1] is official


def test_rl_reward_keeps_its_documented_leniency():
    assert reward.grade("\\boxed{4.67}", "\\frac{14}{3}", require_boxed=True)  # reward.py docstring
    assert not reward.grade("\\boxed{4.67}", "\\frac{14}{3}", require_boxed=True, strict=True)


def test_options_inside_the_question_are_not_appended_twice():
    rec = D.Record(
        id="1",
        problem="Is it continuous? choice: (A) yes (B) no",
        answer="A",
        choices=["yes", "no"],
        meta={"options_in_problem": True},
    )
    text = D.build_messages(rec)[-1]["content"][-1]["text"]
    assert text == "Is it continuous? choice: (A) yes (B) no"
    rec.meta = {}
    assert D.build_messages(rec)[-1]["content"][-1]["text"].endswith("\nA. yes\nB. no")


# ----------------------------------------------------------------------------------------------------------
# Metrics


def _row(rid, correct, sample=0, **meta):
    return {"id": rid, "sample": sample, "correct": correct, "answer": "A", "meta": meta}


def test_wemath_four_dimensions_by_hand():
    # problem 1 (2 steps): steps right, composite wrong -> IG
    # problem 2 (3 steps): step 2 wrong, composite right -> RM strict, CM loose (a step right)
    # problem 3 (2 steps): both steps wrong, composite right -> RM strict and RM loose
    # item 4: one-step, outside the four dimensions
    steps = [
        ("1", "2steps_1", True),
        ("1", "2steps_2", True),
        ("1", "2steps_multi", False),
        ("2", "3steps_1", True),
        ("2", "3steps_2", False),
        ("2", "3steps_3", True),
        ("2", "3steps_multi", True),
        ("3", "2steps_1", False),
        ("3", "2steps_2", False),
        ("3", "2steps_multi", True),
        ("4", "1step", True),
    ]
    rows = [_row(f"{g}_{k}", ok, group=g, key=k) for g, k, ok in steps]
    res = S.summarize("wemath", rows)
    four = res["four_dim"]
    assert four["problems"] == 3
    assert four["counts"] == {"IK": 0, "IG": 1, "CM_strict": 0, "CM_loose": 1, "RM_strict": 2, "RM_loose": 1}
    assert four["IG"] == 1 / 3 and four["IK"] == 0 and four["CM_loose"] == 1 / 3
    assert four["RM_strict"] == 2 / 2 and four["RM_loose"] == 1 / 2  # official RM / (CM + RM)
    assert res["score_strict"] == pytest.approx((3 - 0.5 * 1 - 2 - 0) / 3)  # 0.1667
    assert res["score_loose"] == pytest.approx((3 - 0.5 * 1 - 1 - 0) / 3)  # 0.5
    assert res["accuracy"] == 7 / 11  # per-question accuracy: what the paper does NOT report
    del rows[4]  # an incomplete problem (cut by --limit) is left out, as the official merge leaves NaN
    assert S.summarize("wemath", rows)["four_dim"]["problems"] == 2


def test_dynamath_worst_case_needs_every_variant():
    rows = [
        _row("1_v1", True, qid="1"),
        _row("1_v2", False, qid="1"),
        _row("2_v1", True, qid="2"),
        _row("2_v2", True, qid="2"),
    ]
    res = S.summarize("dynamath", rows)
    assert res["average_case"] == 3 / 4 and res["worst_case"] == 1 / 2 and res["questions"] == 2


# ----------------------------------------------------------------------------------------------------------
# --score_only: derived from ids and fields, or refused


def _score(tmp_path, rows):
    src = tmp_path / "saved.jsonl"
    F.write_jsonl(str(src), rows)
    return E.main(E.EvalConfig(score_only=str(src), out_dir=str(tmp_path / "o")))


def _saved(bench, rid, response, answer, **kw):
    return dict(bench=bench, id=rid, response=response, answer=answer, **kw)


def test_score_only_derives_dynamath_and_wemath_from_ids(tmp_path):
    rows = [
        _saved("dynamath", f"{q}_v{v}", "\\boxed{A}", "B" if (q, v) == ("7", 2) else "A")
        for q in ("7", "8")
        for v in (1, 2)
    ]
    rows += [
        dict(bench="wemath", id=f"12_{k}", response="\\boxed{A}", answer=a)
        for k, a in (("2steps_1", "A"), ("2steps_2", "A"), ("2steps_multi", "B"))
    ]
    res = _score(tmp_path, rows)
    assert res["dynamath"]["worst_case"] == 1 / 2
    assert res["dynamath"]["average_case"] == 3 / 4  # not 3/4 twice
    assert res["wemath"]["four_dim"]["counts"]["IG"] == 1 and res["wemath"]["score_strict"] == 0.5
    assert "score_strict" in json.load(open(tmp_path / "o" / "results.json"))["wemath"]


@pytest.mark.parametrize(
    "row,match",
    [
        (_saved("dynamath", "3_v1", "\\boxed{2.0}", "2.0004"), "meta.answer_type is missing"),
        (_saved("dynamath", "3", "\\boxed{A}", "A"), "meta.qid is missing"),
        (_saved("wemath", "12", "\\boxed{A}", "A"), "meta.key is missing"),
        (_saved("mathvista", "5", "\\boxed{1.2}", "1.2"), "meta.answer_type is missing"),
        (
            _saved("mathvista", "5", "\\boxed{1.2}", "1.2", meta={"answer_type": "float"}),
            "meta.precision is missing",
        ),
    ],
)
def test_score_only_refuses_what_it_cannot_compute(tmp_path, row, match):
    with pytest.raises(D.DataError, match=rf"saved.jsonl:1: {row['bench']}: .*{match}"):
        _score(tmp_path, [row])
