"""Benchmark scoring: each benchmark's own grading rule and metrics, on untrusted model output.

`grade_row(bench, response, answer, choices, meta)` -> (extracted answer, correct); `summarize(bench, rows)`
-> the results.json entry of one benchmark; `complete_meta(bench, row, where)` fills, for `--score_only`,
what a benchmark's metrics need from ids and fields, and refuses (data.DataError) what it cannot derive.

Rules and where they come from (eval.py's docstring has the per-benchmark table):
* The answer is reward.extract_answer's (last `\\boxed{}` by brace matching, else a final answer stated in
  the last sentence); equivalence is reward.grade with `strict=True`: a rounded decimal never stands for a
  non-terminating fraction (`4.67` is wrong for `\\frac{14}{3}`, as the MATH graders and math-verify
  rule; the RL reward keeps that leniency, reward.py).
* Tolerances act on the VALUE of the extracted answer (`numeric_value`: units and degrees stripped by
  reward's normaliser, then `\\pi`, `\\frac`, `\\sqrt`, `^`, `*`, `/` evaluated by a small parser bounded
  in length, depth and exponent, never eval/exec), so `\\boxed{1.22 cm}` or `\\frac{2\\pi}{3}` count:
  - MathVista (lupantech/MathVista evaluation/calculate_score.py, normalize_extracted_answer): integer
    answers compare `int(float(x))` (truncation), float answers `round(x, precision)`; a multiple choice
    gold is the option text, a letter maps to it.
  - DynaMath (VLMEvalKit vlmeval/dataset/dynamath.py, DynaMath_auxeval): float answers are right within
    1e-3 absolute (its parser reads "2π" as 2*pi); worst case = a question right in all 10 variants.
* LogicVista (VLMEvalKit vlmeval/dataset/utils/logicvista.py): letter sets compare as sorted sets
  ("A, C" == "C, A"); the blank row v1_382 (empty question and answer) is kept in n and is wrong.
* WeMath (VLMEvalKit vlmeval/dataset/utils/wemath.py = lmms-eval wemath_utils.py, four-dimensional
  metrics over the 2- and 3-step problems): per problem IK (a step wrong, composite wrong), IG (all steps
  right, composite wrong), CM (strict: all steps right and the composite right; loose: any step right),
  RM (strict: a step wrong, composite right; loose: all steps wrong); IK, IG, CM as fractions of the
  problems, RM as RM / (CM + RM); Score = (P - IG / 2 - RM - IK) / P, strict and loose. The official code
  fixes P = 525 (testmini); ours counts the complete problems present (525 on the full split).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import data as D
import reward

MAX_NUMERIC_CHARS = 200  # a longer answer is not evaluated to a number
_MAX_DEPTH = 40
_MAX_EXPONENT = 64.0


# ----------------------------------------------------------------------------------------------------------
# The value of an answer: a bounded recursive-descent parser over normalised LaTeX (no eval, no sympy)


class _Parser:
    """expr := term (+|- term)*; term := unary ((*|/|implicit) unary)*; unary := (+|-) unary | power;
    power := atom (^ unary-atom)?; atom := number | \\pi | \\frac{}{} | \\sqrt[n]{} | (expr) | {expr}."""

    _NUM = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+\.?\d*|\.\d+")

    def __init__(self, text: str) -> None:
        self.s, self.i, self.depth = text, 0, 0

    def _peek(self, tok: str) -> bool:
        return self.s.startswith(tok, self.i)

    def _eat(self, *toks: str) -> str | None:
        for t in toks:
            if self._peek(t) and not (
                t[0] == "\\" and self.s[self.i + len(t) : self.i + len(t) + 1].isalpha()
            ):
                self.i += len(t)
                return t
        return None

    def parse(self) -> float | None:
        try:
            v = self._expr()
        except (ValueError, ZeroDivisionError, OverflowError):
            return None
        return v if self.i == len(self.s) and math.isfinite(v) else None

    def _expr(self) -> float:
        v = self._term()
        while op := self._eat("+", "-"):
            v = v + self._term() if op == "+" else v - self._term()
        return v

    def _term(self) -> float:
        v = self._unary()
        while True:
            if op := self._eat("*", "\\times", "\\cdot", "/", "\\div"):
                w = self._unary()
                v = v / w if op in ("/", "\\div") else v * w
            elif any(self._peek(t) for t in ("(", "{", "π", "\\pi", "\\frac", "\\sqrt")):
                v *= self._unary()  # implicit product: 2\pi, 3\sqrt{2}, (1+2)(3); never two numbers
            else:
                return v

    def _unary(self) -> float:
        if op := self._eat("-", "+"):
            return -self._unary() if op == "-" else self._unary()
        return self._power()

    def _power(self) -> float:
        base = self._atom()
        if self._eat("^"):
            sign = -1.0 if self._eat("-") else 1.0
            exp = sign * self._atom()
            if abs(exp) > _MAX_EXPONENT:
                raise ValueError("exponent too large")
            return math.pow(base, exp)
        return base

    def _group(self, left: str, right: str) -> float:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise ValueError("too deep")
        v = self._expr()
        if not self._eat(right):
            raise ValueError(f"expected {right}")
        self.depth -= 1
        return v

    def _arg(self) -> float:
        """A \\frac / \\sqrt argument: {expr} or a single digit / constant (`\\frac23`, `\\sqrt2`)."""
        if self._eat("{"):
            return self._group("{", "}")
        if self.i < len(self.s) and self.s[self.i].isdigit():
            self.i += 1
            return float(self.s[self.i - 1])
        return self._atom()

    def _atom(self) -> float:
        if self._eat("("):
            return self._group("(", ")")
        if self._eat("{"):
            return self._group("{", "}")
        if self._eat("\\pi", "π"):
            return math.pi
        if self._eat("\\frac"):
            num = self._arg()
            return num / self._arg()
        if self._eat("\\sqrt"):
            index = self._group("[", "]") if self._eat("[") else 2.0
            arg = self._arg()
            if arg < 0 or index == 0:
                raise ValueError("no real root")
            return arg ** (1.0 / index)
        m = self._NUM.match(self.s, self.i)
        if not m:
            raise ValueError(f"unexpected input at {self.i}")
        self.i = m.end()
        return float(m.group(0).replace(",", ""))


def numeric_value(text: str | None) -> float | None:
    """The value of a numeric answer (`1.22 cm` -> 1.22, `\\frac{2\\pi}{3}` -> 2.094..., `x = 3` -> 3),
    or None when it is not one. Linear in the text, at most MAX_NUMERIC_CHARS characters; never runs it."""
    if not text or len(text) > MAX_NUMERIC_CHARS:
        return None
    s, _ = reward._norm(text)  # wrappers, \left/\right, spacing, degrees, %, trailing units (reward.py)
    if "=" in s:  # "x=3", "AB=5": the value after the last "="
        lhs, _, s = s.rpartition("=")
        if not re.fullmatch(r"[A-Za-z]{1,3}(?:_\{?\w+\}?)?", lhs):
            return None
    return _Parser(s).parse() if s else None


# ----------------------------------------------------------------------------------------------------------
# Grading one response


def _strict(response: str, answer: str, choices: list[str] | None) -> bool:
    return reward.grade(response, answer, choices, require_boxed=False, strict=True)


def grade_row(
    bench: str, response: str, answer: str, choices: list[str] | None = None, meta: dict | None = None
) -> tuple[str | None, bool]:
    """(extracted answer, correct) under the benchmark's rules (module docstring)."""
    meta = meta or {}
    extracted = reward.extract_answer(response)
    if extracted is None or not str(answer).strip():
        return extracted, False  # no stated answer, or a blank gold (LogicVista v1_382): wrong
    atype = meta.get("answer_type")
    if bench == "mathvista" and not choices and atype in ("integer", "float"):
        value, gold = numeric_value(extracted), numeric_value(answer)
        if value is None or gold is None:
            return extracted, False
        if atype == "integer":  # calculate_score.py: str(int(float(extraction))) == answer
            return extracted, abs(value) < 1e18 and int(value) == int(gold)
        precision = int(meta.get("precision") or 0)  # str(round(float(extraction), precision)) == answer
        return extracted, round(value, precision) == round(gold, precision)
    if bench == "dynamath" and atype == "float":  # DynaMath_auxeval: |short answer - answer| <= 0.001
        value, gold = numeric_value(extracted), numeric_value(answer)
        return extracted, value is not None and gold is not None and abs(value - gold) <= 1e-3
    return extracted, _strict(response, answer, choices)


# ----------------------------------------------------------------------------------------------------------
# Metrics


def _pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


_WEMATH_KEY = re.compile(r"([23])steps_(\d+|multi)")


def wemath_four_dim(rows: list[dict]) -> dict | None:
    """WeMath's four dimensions and scores on sample 0 over its complete 2- and 3-step problems (rows sharing
    meta.group, meta.key "2steps_1", ..., "2steps_multi"); formulas in the module docstring."""
    groups: dict = defaultdict(dict)
    for r in rows:
        key = (r.get("meta") or {}).get("key", "")
        if r.get("sample", 0) == 0 and _WEMATH_KEY.fullmatch(key):
            groups[r["meta"].get("group")][key] = bool(r["correct"])
    c = dict.fromkeys(("IK", "IG", "CM_strict", "CM_loose", "RM_strict", "RM_loose"), 0)
    for keys in groups.values():
        n = int(next(iter(keys))[0])
        steps = [keys.get(f"{n}steps_{i}") for i in range(1, n + 1)]
        multi = keys.get(f"{n}steps_multi")
        if multi is None or None in steps or len(keys) != n + 1:
            continue  # incomplete (cut by --limit): the official merge would leave NaN
        if multi:
            c["CM_strict" if all(steps) else "RM_strict"] += 1
            c["CM_loose" if any(steps) else "RM_loose"] += 1
        else:
            c["IG" if all(steps) else "IK"] += 1
    p = c["IK"] + c["IG"] + c["CM_strict"] + c["RM_strict"]
    if not p:
        return None
    out = {"problems": p, "counts": c, "IK": c["IK"] / p, "IG": c["IG"] / p}
    out.update(CM_strict=c["CM_strict"] / p, CM_loose=c["CM_loose"] / p)
    for v in ("strict", "loose"):
        rm, cm = c[f"RM_{v}"], c[f"CM_{v}"]
        out[f"RM_{v}"] = rm / (cm + rm) if cm + rm else 0.0  # official: RM / (CM + RM)
        out[f"score_{v}"] = (p - 0.5 * c["IG"] - rm - c["IK"]) / p
    return out


def summarize(bench: str, rows: list[dict]) -> dict:
    """{"accuracy" (item mean of the sample mean), "n" (items), "truncated" (responses), extras per benchmark}."""
    by_item: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        by_item[r["id"]].append(bool(r["correct"]))
    item_acc = {i: sum(v) / len(v) for i, v in by_item.items()}
    out = {"accuracy": sum(item_acc.values()) / max(1, len(item_acc)), "n": len(by_item)}
    out["truncated"] = sum(bool(r.get("truncated")) for r in rows)
    k = min((len(v) for v in by_item.values()), default=1)
    if k > 1:
        out["samples"] = k
        out[f"pass@{k}"] = sum(_pass_at_k(len(v), sum(v), k) for v in by_item.values()) / len(by_item)
    meta = {r["id"]: r.get("meta") or {} for r in rows}
    blank = sum(1 for r in rows if r.get("sample", 0) == 0 and not str(r.get("answer", "")).strip())
    if blank:
        out["blank_gold"] = blank  # kept in n and counted wrong (LogicVista v1_382)
    if bench == "mathverse" and all("problem_version" in m for m in meta.values()):
        versions = defaultdict(list)
        for i, a in item_acc.items():
            versions[meta[i]["problem_version"]].append(a)
        out["per_version"] = {
            v: {"accuracy": sum(a) / len(a), "n": len(a)} for v, a in sorted(versions.items())
        }
    elif bench == "dynamath":
        worst = []
        for s in sorted({r.get("sample", 0) for r in rows}):
            qs = defaultdict(list)
            for r in rows:
                if r.get("sample", 0) == s:
                    qs[meta[r["id"]]["qid"]].append(bool(r["correct"]))
            worst.append(sum(all(v) for v in qs.values()) / len(qs))
        out.update(average_case=out["accuracy"], worst_case=sum(worst) / len(worst))
        out["questions"] = len({m["qid"] for m in meta.values()})
    elif bench == "wemath" and (four := wemath_four_dim(rows)):
        out.update(score_strict=four["score_strict"], score_loose=four["score_loose"], four_dim=four)
    return out


# ----------------------------------------------------------------------------------------------------------
# --score_only: what the metrics need, derived from ids and fields, or a clear refusal


def _is_number(s: str) -> bool:
    return bool(re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)", s.strip()))


def complete_meta(bench: str, row: dict, where: str) -> dict:
    """`row["meta"]` completed from the id and the gold where the benchmark's metric needs it (DynaMath qid /
    variant from "<qid>_v<N>", WeMath group / key from "<ID>_<key>"); DataError where it cannot be."""
    meta = dict(row.get("meta") or {})
    rid, gold = str(row["id"]), str(row["answer"]).strip()
    if bench == "dynamath":
        m = re.fullmatch(r"(.+)_v(\d+)", rid)
        if "qid" not in meta:
            if not m:
                raise D.DataError(
                    f"{where}: dynamath: meta.qid is missing and id {rid!r} is not '<qid>_v<variant>': "
                    "the worst-case accuracy needs the question of every variant"
                )
            meta.update(qid=m.group(1), variant=int(m.group(2)))
        if "answer_type" not in meta:
            if re.fullmatch(r"[A-E]", gold):
                meta["answer_type"] = "multiple choice"
            elif _is_number(gold):
                raise D.DataError(
                    f"{where}: dynamath: meta.answer_type is missing and gold {gold!r} is numeric: DynaMath's "
                    "1e-3 tolerance applies to answer_type 'float' only; re-grade the predictions.jsonl "
                    "eval.py wrote (it keeps meta)"
                )
    elif bench == "wemath" and "key" not in meta:
        m = re.fullmatch(r"(.+)_(\dsteps?(?:_(?:\d+|multi))?)", rid)
        if not m:
            raise D.DataError(
                f"{where}: wemath: meta.key is missing and id {rid!r} is not '<ID>_<key>' (e.g. 12_2steps_1): "
                "the four-dimensional score needs both"
            )
        meta.update(group=m.group(1), key=m.group(2))
    elif bench == "mathvista" and not row.get("choices") and _is_number(gold):
        atype = meta.get("answer_type")
        if atype not in ("integer", "float", "text", "list") or (
            atype == "float" and meta.get("precision") is None
        ):
            missing = "meta.precision" if atype == "float" else "meta.answer_type"
            raise D.DataError(
                f"{where}: mathvista: gold {gold!r} is numeric but {missing} is missing: MathVista rounds "
                "floats to the item's precision and truncates integers"
            )
    return meta
