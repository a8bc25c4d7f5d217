"""Grading of untrusted model output: RL rewards (accuracy, format, efficient length) and benchmark scoring.

What it does
------------
* ``extract_answer``: the LAST ``\\boxed{...}`` / ``\\boxed {...}`` / ``\\fbox{...}`` of the response, found
  with a brace-matching scanner (nested braces work; escaped ``\\{ \\}`` are skipped; nesting deeper than
  ``MAX_BRACE_DEPTH`` or an unclosed last box gives no answer). Unless ``require_boxed``, it falls back to
  a final answer stated in the response's LAST sentence ("the answer is B", "Answer: 12"); an answer
  phrase followed by more reasoning, or a response cut off mid-reasoning, gives no answer (wrong).
* ``grade``: multiple choice (letters, letter sets, option text), letter golds without choices, then math
  equivalence. Cheap exact checks run first, in-process: normalised string match and exact rational
  comparison of plain numbers (``007 == 7``, ``1,000 == 1000``, ``1/2 == 0.5``, ``0.7 != 3/4``,
  ``100001 != 100000``; in the RL reward a decimal may stand for a non-terminating fraction when it has
  >= 3 significant digits and is that fraction rounded or truncated, a leniency of the reward only:
  ``grade(..., strict=True)``, which benchmark scoring (scoring.py) uses, rejects ``4.67`` for ``\\frac{14}{3}``
  as the MATH graders and math-verify do). When both sides are plain numbers this verdict is final.
  Everything else goes to math-verify (``parse``/``verify``), plus one guard of ours: when math-verify
  says two constant expressions are equal, their values must agree to 1e-60 relative when both are
  exact, 1e-5 when a float is involved (math-verify's absolute rounding and chopping otherwise equate
  ``1/3^61`` with ``1/3^60`` and ``\\sqrt{10^{40}+1}`` with ``10^{20}``).
* ``format_reward``, ``length_reward`` (paper Eq. 5-6), ``score_completions`` (the RL reward of a batch).

Departures from the released ReVisual-R1 code
---------------------------------------------
* Its boxed regex ``\\\\boxed{([^}]+)}`` stops at the first ``}`` (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1``);
  we match braces.
* Its fall-back compares only the alphabetic characters of answer and gold, so any numeric answer that
  reaches it counts as correct; ours only accepts an explicitly stated final answer in the last sentence,
  graded by the same rules as a boxed one, and RL rewards use no fall-back at all (``require_boxed``).

Project decisions where neither paper nor code says: ``%`` is read either as a unit or as x/100
(``50\\%`` == ``50``, ``50\\%`` == ``0.5``), but ``0.5`` is wrong for gold ``50``; a trailing unit
(``5 \\text{ cm}``, ``5 cm``) and degrees (``30^\\circ``) are dropped; an unclosed last box is no answer.

Hard time limit: math-verify runs in child processes with a wall-clock limit per comparison (verifier.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import threading
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from fractions import Fraction

import verifier as V

logger = logging.getLogger(__name__)

MAX_RESPONSE_CHARS = 20_000  # only the tail of a response is searched for the answer
MAX_ANSWER_CHARS = 1_000  # a longer extracted answer is wrong
MAX_BRACE_DEPTH = 64  # a deeper \boxed{...} is wrong

# ----------------------------------------------------------------------------------------------- extraction

_SPECIAL_TOKEN_RE = re.compile(r"<\|[a-z_]{1,30}\|>")


def _strip_special_tail(text: str) -> str:
    """Drop trailing special tokens such as <|im_end|> left in a decoded completion (linear time)."""
    end = len(text.rstrip())
    while text.endswith("|>", 0, end):
        start = text.rfind("<|", max(0, end - 40), end)
        if start < 0 or not _SPECIAL_TOKEN_RE.fullmatch(text, start, end):
            break
        end = start
        while end and text[end - 1].isspace():
            end -= 1
    return text[:end]


_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _match_brace(s: str, i: int) -> int | None:
    """Index of the '}' closing the '{' at s[i]; None if unclosed or nested deeper than MAX_BRACE_DEPTH."""
    depth, j, n = 0, i, len(s)
    while j < n:
        c = s[j]
        if c == "\\":
            j += 2  # skip escaped characters such as \{ and \}
            continue
        if c == "{":
            depth += 1
            if depth > MAX_BRACE_DEPTH:
                return None
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{..}/\\fbox{..} (or `\\boxed 5`); None when the last one is unclosed."""
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    j = m.end()
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        end = _match_brace(text, j)
        return None if end is None else text[j + 1 : end]
    tok = re.match(r"[^\s${}]+", text[j:]) if j > m.end() else None  # `\boxed 5`
    return tok.group(0) if tok else None


_ANCHOR_RE = re.compile(
    r"(?:\b(?:the\s+)?(?:final\s+|correct\s+)?(?:answer|option|choice)s?\s*(?:\*\*)?\s*(?:(?:is|are)\s*:?|:|=)"
    r"|\*\*\s*(?:final\s+)?answer\s*:?\s*\*\*\s*:?)\s*(?:\*\*)?",
    re.IGNORECASE,
)
_SENTENCE_BREAK_RE = re.compile(r"[.!?]\s+[A-Za-z]{2,}")
_CLAUSE_RE = re.compile(r",?\s+(?:because|since|as|which|where|so|given|from|by)\b", re.IGNORECASE)


def _final_statement(text: str) -> str | None:
    """Answer stated in the last sentence ("... the answer is B.", "Answer: 12"), else None."""
    tail = text[-4000:]
    matches = list(_ANCHOR_RE.finditer(tail))
    if not matches:
        return None
    rest = re.sub(r"</?answer>", "", tail[matches[-1].end() :]).strip()
    display = re.fullmatch(r"(\$\$|\\\[).*(\$\$|\\\])\.?", rest, re.S)
    if not rest or ("\n" in rest and not display):
        return None  # nothing stated, or more lines (reasoning) follow
    rest = " ".join(rest.split())
    body = re.sub(r"^(?:\(?[A-Z]\)|[A-Z]\.)\s*", "", rest)  # "B. Twelve" is one sentence
    if _SENTENCE_BREAK_RE.search(body):
        return None  # another sentence follows: the answer phrase was not the last sentence
    return _CLAUSE_RE.split(rest, maxsplit=1)[0].strip()  # "12 because 5+7=12" -> "12"


def extract_answer(response: str, require_boxed: bool = False) -> str | None:
    """The final answer of `response` (last box, or unless `require_boxed` a stated final answer)."""
    if not isinstance(response, str) or not response:
        return None
    text = _strip_special_tail(response[-MAX_RESPONSE_CHARS:])
    ans = _last_boxed(text)
    if ans is None and not require_boxed:
        ans = _final_statement(text)
    if ans is None:
        return None
    ans = ans.strip()
    return ans if ans and len(ans) <= MAX_ANSWER_CHARS else None


# ---------------------------------------------------------------------------------------------- normalising

_WRAP_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|boxed|fbox)\s*\{")
_UNIT_WORDS = (
    "cm|mm|km|m|kg|g|mg|s|sec|seconds|min|minutes|h|hours|units|unit|degrees|degree|inches|inch|in|"
    "feet|foot|ft|meters|metres|meter|cents|dollars|liters|l|ml|mph|sq|square|cubic"
)
_UNIT_RE = re.compile(
    r"(?<=[\d}).])\s*(?:\\(?:text|mathrm|mbox|textrm)\s*\{[^{}]*\}|\b(?:" + _UNIT_WORDS + r")\b)"
    r"(?:\s*\^\s*\{?[23]\}?)?\s*$"
)
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree\b|\\text\{\s*°\s*\}")


def _strip_wrappers(s: str) -> str:
    """Remove whole-answer wrappers: $..$, \\(..\\), **..**, \\text{..}, \\boxed{..}, a trailing period."""
    s = s.strip()
    for _ in range(20):
        before = s
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**")):
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
        m = _WRAP_CMD_RE.match(s)
        if m and _match_brace(s, m.end() - 1) == len(s) - 1:
            s = s[m.end() : -1].strip()
        s = s.rstrip(".").strip()
        if s == before:
            break
    return s


def _norm(s: str) -> tuple[str, bool]:
    """Canonical string for exact matching, and whether it carried a percent sign."""
    s = _strip_wrappers(s).replace("\\$", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])\.?", "", s)
    s = re.sub(r"\\(?:displaystyle|!|,|;|:| )|~", " ", s)
    s = _DEGREE_RE.sub("", s)
    pct = bool(re.search(r"\\?%\s*$", s))
    s = re.sub(r"\s*\\?%\s*$", "", s)
    s = _UNIT_RE.sub("", s)
    s = _strip_wrappers(s)
    return re.sub(r"\s+", "", s), pct


@dataclass(frozen=True)
class _Num:
    value: Fraction
    decimal: bool  # written as a decimal with a fractional part
    places: int = 0  # digits after the point
    sig: int = 0  # significant digits


_DEC = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+"
_NUM_RE = re.compile(rf"([+-]?)({_DEC})")
_FRAC_RE = re.compile(
    rf"([+-]?)(?:\\frac\{{([+-]?(?:{_DEC}))\}}\{{([+-]?(?:{_DEC}))\}}|\\frac(\d)(\d)|({_DEC})/({_DEC}))"
)


def _dec(text: str) -> _Num:
    t = text.replace(",", "")
    whole, _, frac = t.partition(".")
    digits = (whole + frac).lstrip("0")
    return _Num(Fraction(t if t != "." else "0"), bool(frac), len(frac), len(digits))


def _to_number(s: str) -> _Num | None:
    """Exact value of a plain number: integer, decimal, a/b, \\frac{a}{b}; None for anything else."""
    if len(s) > 200:
        return None
    m = _NUM_RE.fullmatch(s)
    if m:
        n = _dec(m.group(2))
        return _Num(-n.value, n.decimal, n.places, n.sig) if m.group(1) == "-" else n
    m = _FRAC_RE.fullmatch(s)
    if not m:
        return None
    sign, *parts = m.groups()
    a, b = [p for p in parts if p is not None]
    den = Fraction(b.replace(",", ""))
    if den == 0:
        return None
    val = Fraction(a.replace(",", "")) / den
    return _Num(-val if sign == "-" else val, False)


def _terminates(q: Fraction) -> bool:
    d = q.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _num_equal(a: _Num, b: _Num, strict: bool = False) -> bool:
    """Exact equality; unless `strict`, also a rounded/truncated decimal (>= 3 significant digits) for a
    non-terminating fraction (the RL reward's leniency; benchmark scoring passes strict=True)."""
    if a.value == b.value:
        return True
    if strict:
        return False
    for d, q in ((a, b), (b, a)):  # a rounded/truncated decimal standing for a non-terminating fraction
        if d.decimal and not q.decimal and not _terminates(q.value) and d.sig >= 3:
            if abs(d.value - q.value) < Fraction(1, 10**d.places):
                return True
    return False


_ASSIGN_RE = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?=([^=]+)")


def _math_equal(answer: str, gold: str, timeout: float, strict: bool = False) -> bool:
    a, a_pct = _norm(answer)
    g, g_pct = _norm(gold)
    if not a or not g:
        return False
    if a == g:
        return True
    lhs = _ASSIGN_RE.fullmatch(a) if "=" not in g else None  # "x=3" for gold "3"
    a_num = _to_number(lhs.group(1) if lhs else a)
    g_num = _to_number(g)
    if a_num is not None and g_num is not None:  # both plain numbers: exact verdict, no math-verify
        pairs = [(a_num, g_num)]
        if a_pct:
            pairs.append((_Num(a_num.value / 100, False), g_num))
        if g_pct:
            pairs.append((a_num, _Num(g_num.value / 100, False)))
        return any(_num_equal(x, y, strict) for x, y in pairs)
    return V.equal(_clean_for_mv(gold), _clean_for_mv(answer), float(timeout))


def _clean_for_mv(s: str) -> str:
    s = _strip_wrappers(s).replace("\\$", "")
    return s if "$" in s else f"${s}$"


# ------------------------------------------------------------------------------------------ multiple choice

_PAREN_LETTER_RE = re.compile(r"[(\[]([A-Za-z])[)\]](?P<rest>.*)", re.S)
_BARE_LETTER_RE = re.compile(r"([A-Z])(?:[.:)](?P<rest>.*))?", re.S)
_LETTER_SEP_RE = re.compile(r"\s*(?:,|;|&|\band\b|\\text\{\s*and\s*\}|\s)\s*")


def _parse_letters(s: str, n_valid: int, sorted_concat_only: bool = False) -> frozenset[str] | None:
    """Letter set stated by `s`: "B", "(B)", "B. 12", "(B) 12", "A, C", "A and C", "AC"; else None."""
    t = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", _strip_wrappers(s))  # \text{B}: 12
    t = _strip_wrappers(re.sub(r"^(?:options?|choices?|answer)\s*[:：]?\s*", "", t, flags=re.I))
    parts = [p for p in _LETTER_SEP_RE.split(t) if p]
    letters: set[str] | None = None
    if len(parts) >= 2 and all(re.fullmatch(r"\(?[A-Z]\)?", p) for p in parts):
        letters = {p.strip("()") for p in parts}
    elif re.fullmatch(r"[A-Z]{2,26}", t):
        if len(set(t)) == len(t) and (not sorted_concat_only or list(t) == sorted(t)):
            letters = set(t)
    elif m := _PAREN_LETTER_RE.fullmatch(t):
        letters = {m.group(1).upper()}
    elif m := _BARE_LETTER_RE.fullmatch(t):
        letters = {m.group(1)}
    elif n_valid < 26 and re.fullmatch(r"[a-z]", t):  # with choices, `\boxed{b}` means option B
        letters = {t.upper()}
    if not letters or any(ord(c) - 65 >= n_valid for c in letters):
        return None
    return frozenset(letters)


def _gold_letters(gold: str) -> frozenset[str] | None:
    """Without choices: a gold made only of letters A-E ("B", "A, C", sorted "AC") is compared as a set."""
    t = _strip_wrappers(gold)
    if not re.fullmatch(r"[\sA-E(),;&]+|.*\band\b.*", t) or re.search(r"[.:]", t):
        return None
    return _parse_letters(t, 5, sorted_concat_only=True)


def _option_text(choice: str, idx: int) -> str:
    letter = chr(65 + idx)
    return re.sub(rf"^\s*(?:\({letter}\)|{letter}[.:)])\s*", "", str(choice))


def _options_matching(text: str, options: list[str], strict: bool = False) -> frozenset[str]:
    """Letters of the options whose text equals `text` (normalised string or exact number)."""
    t, _ = _norm(text)
    t_num = _to_number(t)
    hits = set()
    for i, opt in enumerate(options):
        o, _ = _norm(opt)
        if not o:
            continue
        o_num = _to_number(o)
        if o.lower() == t.lower() or (
            t_num is not None and o_num is not None and _num_equal(t_num, o_num, strict)
        ):
            hits.add(chr(65 + i))
    return frozenset(hits)


def _grade_choice(answer: str, gold: str, choices: list[str], timeout: float, strict: bool = False) -> bool:
    options = [_option_text(c, i) for i, c in enumerate(choices)]
    n = min(len(options), 26)
    gold_set = _options_matching(gold, options, strict) or _parse_letters(gold, n)
    if not gold_set:
        return _math_equal(answer, gold, timeout, strict)  # gold is neither a letter nor an option: free form
    stated = _parse_letters(answer, n) or _options_matching(answer, options, strict)
    if stated:
        return stated == gold_set
    if len(gold_set) == 1:  # e.g. `\sqrt2` for option `\sqrt{2}`: math equivalence with the gold option
        return _math_equal(answer, options[ord(next(iter(gold_set))) - 65], timeout, strict)
    return False


# --------------------------------------------------------------------------------------------------- grade


def grade(
    response: str,
    gold: str,
    choices: list[str] | None = None,
    require_boxed: bool = False,
    timeout: float = 5.0,
    strict: bool = False,
) -> bool:
    """Whether the final answer of `response` matches `gold`. Never runs the text; returns within
    about `timeout` seconds (plus a one-off child start-up). Empty gold or answer is never correct.
    `strict` (benchmark scoring): no rounded decimal stands for a non-terminating fraction."""
    if gold is None or isinstance(gold, bool):
        return False
    gold = str(gold).strip()
    if not gold or len(gold) > 10 * MAX_ANSWER_CHARS:
        return False
    answer = extract_answer(response, require_boxed)
    if answer is None:
        return False
    try:
        if choices:
            return _grade_choice(answer, gold, list(choices), timeout, strict)
        gold_set = _gold_letters(gold)
        if gold_set is not None:
            stated = _parse_letters(answer, 26)
            return stated == gold_set if stated else _math_equal(answer, gold, timeout, strict)
        return _math_equal(answer, gold, timeout, strict)
    except V.GraderUnavailable:
        raise
    except Exception:  # untrusted text must never crash a training run
        logger.debug("grading error", exc_info=True)
        return False


# ------------------------------------------------------------------------------------- format and length

_THINK_RE = re.compile(r"\s*<think>(.*)</think>(.*)", re.S)


def format_reward(response: str) -> float:
    """1.0 if the whole completion is `<think> non-empty </think>` then an answer with a non-empty
    `\\boxed{...}`, exactly one think block, nothing but whitespace before it; else 0.0. A prompt that
    pre-fills "<think>" must prepend it to the completion before calling this."""
    if not isinstance(response, str):
        return 0.0
    text = _strip_special_tail(response)
    if text.count("<think>") != 1 or text.count("</think>") != 1:
        return 0.0
    m = _THINK_RE.fullmatch(text)
    if not m or not m.group(1).strip():
        return 0.0
    boxed = _last_boxed(m.group(2)[-MAX_RESPONSE_CHARS:])
    return 1.0 if boxed is not None and boxed.strip() else 0.0


def length_reward(num_tokens: int, budget: int, alpha: float = 0.005, delta: float = 0.5) -> float:
    """Efficient-length reward, paper Eq. 5-6: R_raw = alpha * (L_budget - L_y) + delta,
    R_len = clip(R_raw, 0, 1), with L_y = completion length in tokens."""
    return min(1.0, max(0.0, alpha * (budget - num_tokens) + delta))


# ------------------------------------------------------------------------------------------- batch reward


@dataclass
class RewardConfig:
    """Weights and settings of the RL reward (project defaults, PAPER.md "Reward")."""

    w_acc: float = 0.8
    w_fmt: float = 0.1
    w_len: float = 0.1
    len_budget: int = 4096
    len_alpha: float = 0.005
    len_delta: float = 0.5
    grade_workers: int = 1  # > 1: grade batches over get_grader_pool(grade_workers)
    grade_timeout: float = 5.0  # seconds per math-verify comparison


_pools: dict[int, ProcessPoolExecutor] = {}
_pools_lock = threading.Lock()


def get_grader_pool(workers: int) -> ProcessPoolExecutor:
    """A reused process pool (spawn context) of `workers` graders, one per worker count."""
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=V.warmup
            )
            _pools[workers] = pool
        return pool


def _drop_pool(pool: Executor) -> None:
    with _pools_lock:
        ours = [k for k, p in _pools.items() if p is pool]
        for k in ours:
            del _pools[k]
    if ours:  # a caller's own pool is left to the caller
        pool.shutdown(wait=False, cancel_futures=True)


def _acc(completion: str, gold: str, choices: list[str] | None, timeout: float) -> float:
    return 1.0 if grade(completion, gold, choices, require_boxed=True, timeout=timeout) else 0.0


def score_completions(
    completions: list[str],
    golds: list[str],
    choices: list[list[str] | None],
    num_tokens: list[int],
    cfg: RewardConfig,
    pool: Executor | None = None,
) -> list[dict]:
    """Per completion {"reward", "acc", "format", "len_reward"}; reward = w_acc*acc + w_fmt*format +
    w_len*len_reward, acc from grade(..., require_boxed=True). Truncated completions are graded as they are."""
    n = len(completions)
    if not (len(golds) == len(choices) == len(num_tokens) == n):
        raise ValueError("completions, golds, choices and num_tokens must have the same length")
    timeouts = [cfg.grade_timeout] * n
    if pool is None and cfg.grade_workers > 1 and n > 1:
        pool = get_grader_pool(cfg.grade_workers)
    accs: list[float] | None = None
    if pool is not None and n > 1:
        try:
            accs = list(pool.map(_acc, completions, golds, choices, timeouts, chunksize=max(1, n // 16)))
        except BrokenProcessPool:
            logger.warning("grader pool broke; grading this batch serially")
            _drop_pool(pool)
    if accs is None:
        accs = [_acc(*args) for args in zip(completions, golds, choices, timeouts)]
    out = []
    for completion, acc, toks in zip(completions, accs, num_tokens):
        fmt = format_reward(completion)
        ln = length_reward(toks, cfg.len_budget, cfg.len_alpha, cfg.len_delta)
        total = cfg.w_acc * acc + cfg.w_fmt * fmt + cfg.w_len * ln
        out.append({"reward": total, "acc": acc, "format": fmt, "len_reward": ln})
    return out
