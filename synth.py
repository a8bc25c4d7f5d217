"""The built-in synthetic task: small arithmetic over digits and shapes drawn with PIL.

`python synth.py --out_dir DIR [--key=value ...]` (also `python data.py synth ...`) writes, offline and
byte-for-byte deterministic for a seed, the six CONTRACT splits: sft.jsonl and sft_test.jsonl (with a
`solution` trace), mm_train/mm_test (every record has one image) and text_train/text_test (text only),
with PNGs under DIR/images/ and image paths relative to DIR.

Images (`Scene`): a "number" image shows one number 0..max_answer in seven-segment strokes; a "pair" image
shows two digits 0..max_operand, left and right of a grey divider (each digit inside its own 28-px merged
vision token column at the default 84 px); a "shapes" image is a grid x grid board
(28 px cells at the default 84 px, one merged vision token each) holding red circles, blue squares,
green triangles or nothing. Every multimodal answer is computed from the scene, so it depends on the image.

Skills ("easy" = perception and simple sums; "hard" = two-step reasoning and comparisons):
  multimodal easy  read ("What number is shown?"), read_side (left/right digit), count, add_k (number+k),
                   add_pair (sum of the two digits)
  multimodal hard  two_step (number*m+k), pair_two_step (a*b+k), count_add (count+k), compare (larger digit)
  text easy        t_read_word ("Write seven in digits."), t_add, t_word_add ("seven plus three"), t_mul ("3 times 6")
  text hard        t_two_step ("4 times 2 plus 5"), t_word_two_step, t_compare ("Which is larger, 7 or 4?")
SFT splits are easy items (`sft_hard_share`, default 0; `sft_mm_hard_share` sets the image records' share
apart): text records teach the arithmetic and the trace format, multimodal records teach perception and
simple sums. The RL and test splits are dominated by hard items (`rl_hard_share`, `test_hard_share`), so RL
has headroom. Comparisons are multiple choice (up to the `mc_share` quota, then open-ended); the rest of the
quota is filled with other skills asked as multiple choice. Gold for multiple choice is the letter; `choices`
holds the option texts, the correct position is balanced over the letters and shuffled.

Multimodal share of SFT (`mm_share`): the default 0 is the paper's text-only cold start (CONTRACT). At this
scale a randomly initialised vision tower cannot learn to see from a 0/1 RL reward alone, so the built-in
pipeline (run.sh) passes `--mm_share 0.5` and teaches perception in the cold start.

Disjointness: a problem's identity is (problem text, scene content); a seeded hash of it puts every problem
in one bucket: "test" (mm_test, text_test), "sft_test" or "train" (sft, mm_train, text_train). Test splits
draw without replacement (no repeated problem); train splits cycle through their bucket. Numeric answers are
balanced per skill over its reachable values, so no answer dominates a split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw


@dataclass
class SynthConfig:
    seed: int = field(default=0, metadata={"help": "seed of every draw and of the split partition"})
    mm_share: float = field(
        default=0.0, metadata={"help": "share of image records in sft/sft_test (paper: 0)"}
    )
    n_sft: int = field(default=4000, metadata={"help": "records in sft.jsonl"})
    n_sft_test: int = field(default=200, metadata={"help": "records in sft_test.jsonl (held out, same mix)"})
    n_mm_train: int = field(default=3000, metadata={"help": "records in mm_train.jsonl"})
    n_text_train: int = field(default=3000, metadata={"help": "records in text_train.jsonl"})
    n_mm_test: int = field(default=500, metadata={"help": "records in mm_test.jsonl"})
    n_text_test: int = field(default=500, metadata={"help": "records in text_test.jsonl"})
    image_size: int = field(default=84, metadata={"help": "image side in pixels, a multiple of 28"})
    grid: int = field(default=3, metadata={"help": "shapes board is grid x grid cells (max count grid^2)"})
    max_operand: int = field(default=9, metadata={"help": "largest digit / addend / factor operand (<= 9)"})
    max_answer: int = field(default=20, metadata={"help": "every numeric answer and drawn number is <= this"})
    max_mult: int = field(default=5, metadata={"help": "largest multiplier m in 'times m plus k' items"})
    mc_share: float = field(default=0.2, metadata={"help": "share of multiple-choice items in every split"})
    n_choices: int = field(default=4, metadata={"help": "options per multiple-choice item"})
    sft_hard_share: float = field(default=0.0, metadata={"help": "share of hard items in sft/sft_test"})
    sft_mm_hard_share: float = field(
        default=-1.0,
        metadata={
            "help": "share of hard items among the image records of sft/sft_test (< 0: sft_hard_share)"
        },
    )
    rl_hard_share: float = field(default=0.7, metadata={"help": "share of hard items in mm_train/text_train"})
    test_hard_share: float = field(default=0.7, metadata={"help": "share of hard items in mm_test/text_test"})
    test_frac: float = field(default=0.3, metadata={"help": "share of the problem space held out for tests"})
    sft_test_frac: float = field(default=0.15, metadata={"help": "share held out for sft_test"})

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"synth: {msg}")

        need(self.seed >= 0, "seed must be >= 0")
        need(
            self.image_size >= 56 and self.image_size % 28 == 0, "image_size must be a multiple of 28, >= 56"
        )
        need(1 <= self.grid <= 6, "grid must be in 1..6")
        need(1 <= self.max_operand <= 9, "max_operand must be in 1..9 (pair images draw single digits)")
        need(self.max_operand <= self.max_answer <= 99, "max_answer must be in max_operand..99")
        need(self.max_mult >= 2, "max_mult must be >= 2")
        need(
            2 <= self.n_choices <= min(26, self.max_answer + 1),
            "n_choices must be in 2..min(26, max_answer+1)",
        )
        for name in ("mm_share", "mc_share", "sft_hard_share", "rl_hard_share", "test_hard_share"):
            need(0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1]")
        need(self.sft_mm_hard_share <= 1.0, "sft_mm_hard_share must be <= 1 (< 0: sft_hard_share)")
        need(
            self.test_frac > 0 and self.sft_test_frac > 0 and self.test_frac + self.sft_test_frac < 1,
            "test_frac and sft_test_frac must be > 0 with a sum < 1",
        )
        need(
            all(getattr(self, f.name) >= 0 for f in dataclasses.fields(self) if f.name.startswith("n_")),
            "split sizes must be >= 0",
        )


# split name -> (seed index, size field, multimodal share (None: mm_share), hard share field, bucket)
SPLITS = {
    "sft": (1, "n_sft", None, "sft_hard_share", "train"),
    "sft_test": (2, "n_sft_test", None, "sft_hard_share", "sft_test"),
    "mm_train": (3, "n_mm_train", 1.0, "rl_hard_share", "train"),
    "text_train": (4, "n_text_train", 0.0, "rl_hard_share", "train"),
    "mm_test": (5, "n_mm_test", 1.0, "test_hard_share", "test"),
    "text_test": (6, "n_text_test", 0.0, "test_hard_share", "test"),
}
SFT_SPLITS = ("sft", "sft_test")

_SKILL_META = {  # skill -> (scene kind or None for text, tier, parameter names)
    "read": ("number", "easy", ()),
    "read_side": ("pair", "easy", ("side",)),
    "count": ("shapes", "easy", ("shape",)),
    "add_k": ("number", "easy", ("k",)),
    "add_pair": ("pair", "easy", ()),
    "two_step": ("number", "hard", ("m", "k")),
    "pair_two_step": ("pair", "hard", ("k",)),
    "count_add": ("shapes", "hard", ("shape", "k")),
    "compare": ("pair", "hard", ()),
    "t_read_word": (None, "easy", ("a",)),
    "t_add": (None, "easy", ("a", "b")),
    "t_mul": (None, "easy", ("a", "b")),
    "t_word_add": (None, "easy", ("a", "b")),
    "t_two_step": (None, "hard", ("a", "b", "c")),
    "t_word_two_step": (None, "hard", ("a", "b", "c")),
    "t_compare": (None, "hard", ("a", "b")),
}
_SKILL_TEMPLATES = {  # skill -> problem templates
    "read": (
        "What number is shown in the image?",
        "Which number is drawn in the picture?",
        "Read the number in the image.",
        "What is the number in the picture?",
    ),
    "read_side": ("What is the {side} number in the image?", "Which number is drawn on the {side}?"),
    "count": ("How many {shape} are in the image?", "Count the {shape} in the picture."),
    "add_k": ("What is the number shown plus {k}?", "Add {k} to the number in the image."),
    "add_pair": ("Add the two numbers shown.", "What is the sum of the two numbers in the image?"),
    "two_step": (
        "Multiply the number shown by {m}, then add {k}.",
        "What is the number in the image times {m} plus {k}?",
    ),
    "pair_two_step": (
        "Multiply the two numbers shown, then add {k}.",
        "What is the product of the two numbers in the image plus {k}?",
    ),
    "count_add": (
        "Count the {shape} in the image, then add {k}.",
        "What is the number of {shape} in the picture plus {k}?",
    ),
    "compare": (
        "Which of the two numbers shown is larger?",
        "Which number in the image is bigger?",
        "Which is the larger of the two numbers in the picture?",
        "Of the two numbers shown, which one is greater?",
    ),
    "t_read_word": (
        "Write the number {wa} in digits.",
        "What number is {wa}?",
        "Which number is written as {wa}?",
        "Give the number {wa} as digits.",
        "Convert {wa} to a number.",
    ),
    "t_add": (
        "What is {a} plus {b}?",
        "Compute {a} + {b}.",
        "Add {a} and {b}.",
        "What is the sum of {a} and {b}?",
        "What do you get when you add {a} to {b}?",
    ),
    "t_mul": ("What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} * {b}."),
    "t_word_add": (
        "What is {wa} plus {wb}?",
        "Add {wa} and {wb}.",
        "What is the sum of {wa} and {wb}?",
        "Compute {wa} plus {wb}.",
    ),
    "t_two_step": ("What is {a} times {b} plus {c}?", "Multiply {a} by {b}, then add {c}."),
    "t_word_two_step": ("What is {wa} times {wb} plus {wc}?", "Multiply {wa} by {wb}, then add {wc}."),
    "t_compare": ("Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?"),
}
# skill -> (scene kind or None for text, tier, parameter names, problem templates)
SKILLS: dict[str, tuple[str | None, str, tuple[str, ...], tuple[str, ...]]] = {
    k: (*meta, _SKILL_TEMPLATES[k]) for k, meta in _SKILL_META.items()
}
MC_SUFFIX = " Choose the correct option."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SHAPES = ("", "circle", "square", "triangle")  # cell codes 1..3; 0 is an empty cell
SHAPE_COLORS = ("", (220, 40, 40), (40, 80, 220), (30, 150, 60))
INK, PAPER, RULE = (20, 20, 20), (255, 255, 255), (170, 170, 170)
SEGMENTS = ("abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg")
_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_word(n: int) -> str:
    return _ONES[n] if n < 20 else _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])


def plural(code: int, n: int | None = None) -> str:
    return SHAPES[code] if n == 1 else SHAPES[code] + "s"


@dataclass(frozen=True)
class Scene:
    """What an image shows. number: (n,); pair: (left, right); shapes: grid*grid cell codes, row-major."""

    kind: str
    values: tuple[int, ...]

    def key(self) -> str:
        return f"{self.kind}:{','.join(map(str, self.values))}"


@dataclass(frozen=True)
class Question:
    skill: str
    template: int
    params: tuple[int, ...]
    mc: bool = False
    choices: tuple[int, ...] = ()


@dataclass(frozen=True)
class Item:
    question: Question
    scene: Scene | None

    @property
    def value(self) -> int:
        return solve(self.question, self.scene)

    @property
    def answer(self) -> str:
        """The gold answer: the letter of the correct option for multiple choice, else the number."""
        q = self.question
        return LETTERS[q.choices.index(self.value)] if q.mc else str(self.value)


# ---------------------------------------------------------------------------------------------- semantics
_SOLVE = {  # skill -> answer from (params, scene values)
    "read": lambda p, v: v[0],
    "read_side": lambda p, v: v[p[0]],
    "count": lambda p, v: v.count(p[0]),
    "count_add": lambda p, v: v.count(p[0]) + p[1],
    "add_k": lambda p, v: v[0] + p[0],
    "add_pair": lambda p, v: v[0] + v[1],
    "two_step": lambda p, v: v[0] * p[0] + p[1],
    "pair_two_step": lambda p, v: v[0] * v[1] + p[0],
    "compare": lambda p, v: max(v),
    "t_read_word": lambda p, v: p[0],
    "t_add": lambda p, v: p[0] + p[1],
    "t_word_add": lambda p, v: p[0] + p[1],
    "t_mul": lambda p, v: p[0] * p[1],
    "t_two_step": lambda p, v: p[0] * p[1] + p[2],
    "t_word_two_step": lambda p, v: p[0] * p[1] + p[2],
    "t_compare": lambda p, v: max(p),
}


def solve(q: Question, scene: Scene | None) -> int:
    """The numeric answer of question q about scene (for multiple choice: the value of the correct option)."""
    return _SOLVE[q.skill](q.params, scene.values if scene else ())


def problem_text(q: Question) -> str:
    f: dict[str, object] = dict(zip(SKILLS[q.skill][2], q.params))
    for name in ("a", "b", "c"):
        if name in f:
            f["w" + name] = number_word(int(f[name]))  # type: ignore[arg-type]
    if "side" in f:
        f["side"] = ("left", "right")[int(f["side"])]  # type: ignore[arg-type]
    if "shape" in f:
        f["shape"] = plural(int(f["shape"]))  # type: ignore[arg-type]
    return SKILLS[q.skill][3][q.template].format(**f) + (MC_SUFFIX if q.mc else "")


def _shapes_desc(v: tuple[int, ...]) -> str:
    parts = [f"{v.count(c)} {plural(c, v.count(c))}" for c in (1, 2, 3)]
    return f"{parts[0]}, {parts[1]} and {parts[2]}"


def solution_text(q: Question, scene: Scene | None) -> str:
    """The SFT trace: `<think>short templated steps</think> The answer is \\boxed{gold}.`"""
    p, s, x = q.params, q.skill, solve(q, scene)
    v = scene.values if scene else ()
    sees = f"The image shows {v[0]} and {v[1]}." if scene and scene.kind == "pair" else ""
    if s == "read":
        body = f"The image shows {v[0]}."
    elif s == "read_side":
        body = f"{sees} The {('left', 'right')[p[0]]} number is {x}."
    elif s == "count":
        body = f"The image shows {_shapes_desc(v)}. There {'is' if x == 1 else 'are'} {x} {plural(p[0], x)}."
    elif s == "count_add":
        n = v.count(p[0])
        there = f"There {'is' if n == 1 else 'are'} {n} {plural(p[0], n)}."
        body = f"The image shows {_shapes_desc(v)}. {there} {n} + {p[1]} = {x}."
    elif s == "add_k":
        body = f"The image shows {v[0]}. {v[0]} + {p[0]} = {x}."
    elif s == "add_pair":
        body = f"{sees} {v[0]} + {v[1]} = {x}."
    elif s == "two_step":
        body = f"The image shows {v[0]}. {v[0]} * {p[0]} = {v[0] * p[0]}. {v[0] * p[0]} + {p[1]} = {x}."
    elif s == "pair_two_step":
        body = f"{sees} {v[0]} * {v[1]} = {v[0] * v[1]}. {v[0] * v[1]} + {p[0]} = {x}."
    elif s == "compare":
        body = f"{sees} {x} is larger than {min(v)}."
    elif s == "t_read_word":
        body = f"The number {number_word(p[0])} is {x}."
    elif s == "t_mul":
        body = f"{p[0]} * {p[1]} = {x}."
    elif s in ("t_add", "t_word_add"):
        words = (
            f"{number_word(p[0])} is {p[0]} and {number_word(p[1])} is {p[1]}. " if s == "t_word_add" else ""
        )
        body = f"{words}{p[0]} + {p[1]} = {x}."
    elif s in ("t_two_step", "t_word_two_step"):
        a, b, c = p
        words = (
            f"{number_word(a)} is {a}, {number_word(b)} is {b} and {number_word(c)} is {c}. "
            if s == "t_word_two_step"
            else ""
        )
        body = f"{words}{a} * {b} = {a * b}. {a * b} + {c} = {x}."
    elif s == "t_compare":
        body = f"{x} is larger than {min(p)}."
    else:
        raise ValueError(f"unknown skill {s!r}")
    gold = Item(q, scene).answer
    if q.mc:
        body += f" {x} is option {gold}."
    body = body.strip()
    return f"<think>{body[0].upper()}{body[1:]}</think> The answer is \\boxed{{{gold}}}."


def problem_key(q: Question, scene: Scene | None) -> str:
    """A problem's identity: its text and what its image shows. Asked open or as multiple choice (any
    options, any order) it is the same problem, so both forms always land in the same split bucket."""
    return f"{problem_text(dataclasses.replace(q, mc=False))}\x1f{scene.key() if scene else ''}"


# ---------------------------------------------------------------------------------------------- rendering
def _digit(d: ImageDraw.ImageDraw, digit: int, x: int, y: int, w: int, h: int, t: int) -> None:
    hm, ht = y + h // 2, t // 2
    boxes = {
        "a": (x, y, x + w, y + t),
        "b": (x + w - t, y, x + w, hm + ht),
        "c": (x + w - t, hm - ht, x + w, y + h),
        "d": (x, y + h - t, x + w, y + h),
        "e": (x, hm - ht, x + t, y + h),
        "f": (x, y, x + t, hm + ht),
        "g": (x, hm - ht, x + w, hm - ht + t),
    }
    for seg in SEGMENTS[digit]:
        x0, y0, x1, y1 = boxes[seg]
        d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=INK)


def render_image(scene: Scene, cfg: SynthConfig) -> Image.Image:
    """Draw a scene as an RGB image of cfg.image_size pixels square (deterministic)."""
    size = cfg.image_size
    img = Image.new("RGB", (size, size), PAPER)
    d = ImageDraw.Draw(img)
    t = max(2, size // 14)
    if scene.kind == "number":
        digits = [int(c) for c in str(scene.values[0])]
        w, h, gap = round(size * 0.28), round(size * 0.6), max(2, size // 14)
        x = (size - len(digits) * w - (len(digits) - 1) * gap) // 2
        for dg in digits:
            _digit(d, dg, x, (size - h) // 2, w, h, t)
            x += w + gap
    elif scene.kind == "pair":
        # Digits centred at 1/6 and 5/6 of the width: at 84 px each lies inside one 28-px merged vision token
        # column and the middle column holds only the divider. Centred at 1/4 and 3/4, both digits spilled into
        # the middle token; the tiny tower then learnt to read pairs in 4 cold starts of 12 (BENCHMARKS.md).
        w, h = round(size * 0.26), round(size * 0.56)
        for j, dg in enumerate(scene.values):
            _digit(d, dg, (size // 6 if j == 0 else 5 * size // 6) - w // 2, (size - h) // 2, w, h, t)
        d.line((size // 2, size // 6, size // 2, size - size // 6), fill=RULE, width=max(1, size // 42))
    elif scene.kind == "shapes":
        g = cfg.grid
        cell = size // g
        off, m = (size - cell * g) // 2, max(2, cell // 7)
        for idx, code in enumerate(scene.values):
            r, c = divmod(idx, g)
            x0, y0 = off + c * cell + m, off + r * cell + m
            x1, y1 = off + (c + 1) * cell - m - 1, off + (r + 1) * cell - m - 1
            if code == 1:
                d.ellipse((x0, y0, x1, y1), fill=SHAPE_COLORS[1])
            elif code == 2:
                d.rectangle((x0, y0, x1, y1), fill=SHAPE_COLORS[2])
            elif code == 3:
                d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=SHAPE_COLORS[3])
    else:
        raise ValueError(f"unknown scene kind {scene.kind!r}")
    return img


def random_scene(kind: str, rng: np.random.Generator, cfg: SynthConfig) -> Scene:
    """A uniformly random scene of a kind (used by tests to ask the same question about another image)."""
    if kind == "number":
        return Scene(kind, (int(rng.integers(0, cfg.max_answer + 1)),))
    if kind == "pair":
        return Scene(kind, tuple(int(x) for x in rng.integers(0, cfg.max_operand + 1, size=2)))
    return Scene(kind, tuple(int(x) for x in rng.integers(0, 4, size=cfg.grid**2)))


# ---------------------------------------------------------------------------------------------- problem space
def enumerate_space(skill: str, cfg: SynthConfig) -> list[Item]:
    """Every problem of a skill without a shapes image (those are sampled, see `sample_shapes_item`)."""
    A, M = cfg.max_answer, cfg.max_mult
    nums, digs, mults = range(A + 1), range(cfg.max_operand + 1), range(2, M + 1)
    pairs = [(a, b) for a in digs for b in digs]
    base: list[tuple[tuple[int, ...], Scene | None]] = {
        "read": [((), Scene("number", (n,))) for n in nums],
        "read_side": [((s,), Scene("pair", ab)) for s in (0, 1) for ab in pairs],
        "add_k": [((k,), Scene("number", (n,))) for n in nums for k in range(1, len(digs)) if n + k <= A],
        "add_pair": [((), Scene("pair", ab)) for ab in pairs if sum(ab) <= A],
        "two_step": [
            ((m, k), Scene("number", (n,))) for n in digs for m in mults for k in digs if n * m + k <= A
        ],
        "pair_two_step": [((k,), Scene("pair", (a, b))) for a, b in pairs for k in digs if a * b + k <= A],
        "compare": [((), Scene("pair", (a, b))) for a, b in pairs if a != b],
        "t_read_word": [((n,), None) for n in nums],
        "t_add": [((a, b), None) for a in nums for b in nums if a + b <= A],
        "t_mul": [(ab, None) for ab in pairs if ab[0] * ab[1] <= A],
        "t_two_step": [((a, b, c), None) for a in digs for b in mults for c in digs if a * b + c <= A],
        "t_compare": [((a, b), None) for a in nums for b in nums if a != b],
    }[{"t_word_add": "t_add", "t_word_two_step": "t_two_step"}.get(skill, skill)]
    return [Item(Question(skill, t, p), sc) for t in range(len(SKILLS[skill][3])) for p, sc in base]


def shapes_values(skill: str, cfg: SynthConfig) -> list[int]:
    cells = cfg.grid**2
    hi = min(cells + (cfg.max_operand if skill == "count_add" else 0), cfg.max_answer)
    return list(range(1 if skill == "count_add" else 0, hi + 1))


def sample_shapes_item(skill: str, value: int, mc: bool, rng: np.random.Generator, cfg: SynthConfig) -> Item:
    """A random shapes board and question (count / count_add) whose answer is `value`."""
    cells = cfg.grid**2
    shape = int(rng.integers(1, 4))
    if skill == "count_add":
        ks = [k for k in range(1, cfg.max_operand + 1) if 0 <= value - k <= cells]
        k = int(rng.choice(ks))
        n, params = value - k, (shape, k)
    else:
        n, params = value, (shape,)
    others = [c for c in range(4) if c != shape]
    board = rng.choice(others, size=cells)
    board[rng.permutation(cells)[:n]] = shape
    q = Question(skill, int(rng.integers(0, len(SKILLS[skill][3]))), params, mc)
    return Item(q, Scene("shapes", tuple(int(c) for c in board)))


def _bucket(key: str, cfg: SynthConfig) -> str:
    h = hashlib.blake2b(f"{cfg.seed}\x1e{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "big") / 2.0**64
    return "test" if u < cfg.test_frac else "sft_test" if u < cfg.test_frac + cfg.sft_test_frac else "train"


def _make_choices(
    x: int, pos: int, item: Item, rng: np.random.Generator, cfg: SynthConfig
) -> tuple[int, ...]:
    """n_choices distinct values: the other shown number for comparisons, then values from a random window
    around x (so x's rank among the options carries no signal), the correct one at `pos`."""
    q, A, k = item.question, cfg.max_answer, cfg.n_choices - 1
    vals = q.params if q.skill == "t_compare" else item.scene.values if q.skill == "compare" else ()
    lo = x - int(rng.integers(0, 2 * k + 1))
    window = [v for v in range(lo, lo + 2 * k + 1) if 0 <= v <= A and v != x]
    rest = [int(v) for v in rng.permutation(A + 1) if v != x]
    picked: list[int] = [min(vals)] if vals else []
    for v in [int(v) for v in rng.permutation(window)] + rest:
        if len(picked) < k and v not in picked:
            picked.append(v)
    picked = [int(v) for v in rng.permutation(picked)]
    return tuple(picked[:pos] + [x] + picked[pos:])


def _spread(names: list[str], n: int, rng: np.random.Generator) -> list[str]:
    base, extra = divmod(n, len(names))
    bonus = set(rng.permutation(len(names))[:extra].tolist())
    return [s for j, s in enumerate(names) for _ in range(base + (j in bonus))]


def build_splits(cfg: SynthConfig) -> dict[str, list[Item]]:
    """Every split as a list of Items (question + scene), in file order. Deterministic for cfg."""
    cfg.validate()
    pools: dict[tuple[str, str, bool], dict[int, list[Item]]] = defaultdict(lambda: defaultdict(list))
    for skill, (kind, _, _, _) in SKILLS.items():
        if kind != "shapes":
            for it in enumerate_space(skill, cfg):
                for mc in (False, True):
                    it2 = Item(dataclasses.replace(it.question, mc=mc), it.scene)
                    pools[(_bucket(problem_key(it2.question, it2.scene), cfg), skill, mc)][it2.value].append(
                        it2
                    )
    return {name: _build_split(name, cfg, pools) for name in SPLITS}


@dataclass
class _Draws:
    """The state of one split's draws: its bucket's pools (shuffled), and how often each value was used."""

    cfg: SynthConfig
    rng: np.random.Generator
    bucket: str
    pools: dict[tuple[str, bool], dict[int, list[Item]]]
    cursor: Counter = field(default_factory=Counter)
    per_skill: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    overall: dict[bool, Counter] = field(default_factory=lambda: defaultdict(Counter))
    seen: set[str] = field(default_factory=set)
    closed: set[tuple[str, bool, int]] = field(default_factory=set)

    def draw(self, skill: str, mc: bool, repeat: bool) -> Item | None:
        """An item of skill with the least-used value of this skill (ties: least used in the split, then
        random). Without `repeat`, only problems not drawn before in this split."""
        shapes = SKILLS[skill][0] == "shapes"
        by_value = self.pools.get((skill, mc), {})
        while True:
            if shapes:
                values = [v for v in shapes_values(skill, self.cfg) if (skill, mc, v) not in self.closed]
            else:
                values = [
                    v
                    for v, lst in by_value.items()
                    if len(lst) > (0 if repeat else self.cursor[(skill, mc, v)])
                ]
            if not values:
                return None
            values = [values[j] for j in self.rng.permutation(len(values))]
            v = min(values, key=lambda x: (self.per_skill[skill][x], self.overall[mc][x]))
            if shapes:
                for _ in range(200):
                    item = sample_shapes_item(skill, v, mc, self.rng, self.cfg)
                    key = problem_key(item.question, item.scene)
                    if _bucket(key, self.cfg) == self.bucket and (repeat or key not in self.seen):
                        break
                else:  # (nearly) every board with this answer is taken or belongs to another bucket
                    self.closed.add((skill, mc, v))
                    continue
                self.seen.add(key)
            else:
                lst, c = by_value[v], (skill, mc, v)
                item = lst[self.cursor[c] % len(lst)]
                self.cursor[c] += 1
                key = problem_key(item.question, item.scene)
                if (
                    not repeat and key in self.seen
                ):  # already drawn in its other form (open / multiple choice)
                    continue
                self.seen.add(key)
            self.per_skill[skill][v] += 1
            self.overall[mc][v] += 1
            return item


def _build_split(name: str, cfg: SynthConfig, pools: dict) -> list[Item]:
    seed_idx, size_field, mm, hard_field, bucket = SPLITS[name]
    rng = np.random.default_rng([cfg.seed, seed_idx])
    n, hard = getattr(cfg, size_field), getattr(cfg, hard_field)
    n_mm = round(n * (cfg.mm_share if mm is None else mm))
    slots: list[str] = []
    mm_hard = cfg.sft_mm_hard_share if name in SFT_SPLITS and cfg.sft_mm_hard_share >= 0 else hard
    for is_mm, count in ((True, n_mm), (False, n - n_mm)):
        n_hard = round(count * (mm_hard if is_mm else hard))
        for tier, k in (("hard", n_hard), ("easy", count - n_hard)):
            slots += _spread(
                [s for s, v in SKILLS.items() if (v[0] is not None) == is_mm and v[1] == tier], k, rng
            )
    slots = [slots[i] for i in rng.permutation(len(slots))]
    n_mc = round(n * cfg.mc_share)
    comp = [i for i, s in enumerate(slots) if s in ("compare", "t_compare")]
    other = [i for i, s in enumerate(slots) if s not in ("compare", "t_compare")]
    comp, other = (
        [comp[j] for j in rng.permutation(len(comp))],
        [other[j] for j in rng.permutation(len(other))],
    )
    mc_idx = set(comp[:n_mc]) | set(other[: max(0, n_mc - len(comp))])
    positions = iter(rng.permutation([j % cfg.n_choices for j in range(len(mc_idx))]).tolist())
    local = {
        (skill, mc): {v: [lst[i] for i in rng.permutation(len(lst))] for v, lst in sorted(by_value.items())}
        for (b, skill, mc), by_value in pools.items()
        if b == bucket
    }
    draws = _Draws(cfg, rng, bucket, local)
    items: list[Item] = []
    for i, skill in enumerate(slots):
        mc, item = i in mc_idx, None
        # Test splits never repeat a problem while the bucket has fresh ones: when a skill's share is used up,
        # another skill of the same kind and tier stands in; only then do problems repeat (still held out).
        kind, tier = SKILLS[skill][0], SKILLS[skill][1]
        alts = [
            s for s, v in SKILLS.items() if v[1] == tier and (v[0] is None) == (kind is None) and s != skill
        ]
        order = [skill] + [alts[j] for j in rng.permutation(len(alts))]
        for repeat in (False, True) if bucket != "train" else (True,):
            for sk in order if not repeat else [skill]:
                if item is None:
                    item = draws.draw(sk, mc, repeat)
        if item is None:
            raise ValueError(
                f"synth: split {name}: no problem of skill {skill} in its part of the problem space"
            )
        if mc:
            choices = _make_choices(item.value, next(positions), item, rng, cfg)
            item = Item(dataclasses.replace(item.question, choices=choices), item.scene)
        items.append(item)
    return items


# ---------------------------------------------------------------------------------------------- output
def make_record(item: Item, rid: str, images: list[str], with_solution: bool) -> dict:
    q = item.question
    rec: dict = {"id": rid, "problem": problem_text(q), "images": images, "answer": item.answer}
    if q.mc:
        rec["choices"] = [str(c) for c in q.choices]
    if with_solution:
        rec["solution"] = solution_text(q, item.scene)
    return rec


def write_synth(out_dir: str, cfg: SynthConfig) -> dict[str, int]:
    """Write the six splits and their PNGs under out_dir; returns {split: number of records}."""
    splits = build_splits(cfg)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    png: dict[Scene, bytes] = {}
    counts = {}
    for name, items in splits.items():
        lines = []
        for i, item in enumerate(items):
            rid = f"{name}_{i:06d}"
            images = []
            if item.scene is not None:
                if item.scene not in png:
                    buf = io.BytesIO()
                    render_image(item.scene, cfg).save(buf, format="PNG")
                    png[item.scene] = buf.getvalue()
                images = [f"images/{rid}.png"]
                with open(os.path.join(out_dir, images[0]), "wb") as f:
                    f.write(png[item.scene])
            lines.append(json.dumps(make_record(item, rid, images, name in SFT_SPLITS), ensure_ascii=False))
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(line + "\n" for line in lines))
        counts[name] = len(items)
    return counts


def tokenizer_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """n representative texts (problem, options rendered "A. 12" as data.py does, solution) of every skill."""
    cfg = SynthConfig(seed=seed)
    rng = np.random.default_rng([seed, 99])
    spaces = {s: enumerate_space(s, cfg) for s, v in SKILLS.items() if v[0] != "shapes"}
    names = list(SKILLS)
    out = []
    for i in range(n):
        skill, mc = names[i % len(names)], bool(rng.random() < 0.3)
        if skill in spaces:
            base = spaces[skill][int(rng.integers(0, len(spaces[skill])))]
            item = Item(dataclasses.replace(base.question, mc=mc), base.scene)
        else:
            item = sample_shapes_item(skill, int(rng.choice(shapes_values(skill, cfg))), mc, rng, cfg)
        if mc:
            choices = _make_choices(item.value, int(rng.integers(0, cfg.n_choices)), item, rng, cfg)
            item = Item(dataclasses.replace(item.question, choices=choices), item.scene)
        text = problem_text(item.question)
        text += "".join(f"\n{LETTERS[j]}. {c}" for j, c in enumerate(item.question.choices))
        out.append(text + "\n" + solution_text(item.question, item.scene))
    return out


# ---------------------------------------------------------------------------------------------- command line
@dataclass
class SynthCommand(SynthConfig):
    """python data.py synth --out_dir DIR [--key=value ...]: write the built-in synthetic task (CONTRACT)."""

    out_dir: str = field(
        default="", metadata={"help": "folder for the six JSONL splits and images/ (required)"}
    )


def main(argv: list[str] | None = None) -> None:
    import common as C

    try:
        args = C.parse_config(SynthCommand, argv)
        if not args.out_dir:
            raise C.ConfigError("--out_dir is required")
    except C.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    cfg = SynthConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)})
    t0 = time.time()
    try:
        counts = write_synth(args.out_dir, cfg)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"synth: wrote {counts} to {args.out_dir} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
