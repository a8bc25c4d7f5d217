"""Tiny benchmark fixtures in the on-disk shapes users download (BENCHMARK_FORMATS.md), for tests/test_eval.py.

Each `write_<bench>(root)` writes 2-4 items (DynaMath: 2 questions x 10 variant files) and returns the path to
pass as `--bench <bench>=PATH`; `write_all(root)` writes every one and returns {label: (path, n)}.
"""

from __future__ import annotations

import csv
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png_bytes(size=(56, 56), color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def image_struct(size=(56, 56), color="red", name="x.png") -> dict:
    return {"bytes": png_bytes(size, color), "path": name}


def write_parquet(path: str, rows: list[dict], types: dict[str, pa.DataType] | None = None) -> str:
    """Rows -> Parquet; image columns given in `types` as IMAGE_STRUCT (as the Hugging Face Image feature)."""
    types = types or {}
    cols = {k: pa.array([r.get(k) for r in rows], type=types.get(k)) for k in rows[0]}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return path


def write_jsonl(path: str, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def save_image(folder: str, name: str, size=(56, 56), color="red") -> str:
    os.makedirs(folder, exist_ok=True)
    Image.new("RGB", size, color).save(os.path.join(folder, name))
    return name


def write_mathverse(root: str) -> str:
    versions = ["Text Dominant", "Text Lite", "Vision Intensive", "Text Only"]
    rows = []
    for i, v in enumerate(versions):
        rows.append({"sample_index": str(i + 1), "problem_index": "1", "problem_version": v,
                     "question": f"Find x ({v}).", "answer": "B" if i % 2 else "3",
                     "image": None if v == "Text Only" else image_struct((56 + 28 * i, 56)),
                     "question_type": "multi-choice" if i % 2 else "free-form",
                     "query_wo": f"Find x ({v}).",
                     "query_cot": f"Please reason step by step. Find x ({v}). Choices: A: 1 B: 3"})  # fmt: skip
    return write_parquet(os.path.join(root, "mathverse", "testmini.parquet"), rows, {"image": IMAGE_STRUCT})


def write_mathvision(root: str) -> str:
    folder = os.path.join(root, "mathvision")
    rows = [{"id": str(i), "question": q, "options": opts, "image": f"images/{i}.jpg",
             "decoded_image": image_struct((84, 56), "blue"), "answer": a, "solution": "", "level": 2,
             "subject": "arithmetic"}
            for i, (q, opts, a) in enumerate([("<image1> How many?", ["1", "2", "3"], "B"),
                                              ("<image1> What is the area?", [], "12"),
                                              ("<image1> Which shape?", ["circle", "square"], "A")], 1)]  # fmt: skip
    return write_parquet(os.path.join(folder, "test.parquet"), rows, {"decoded_image": IMAGE_STRUCT})


MATHVISTA_ROWS = [
    {"pid": "1", "question": "Which is larger?", "choices": ["4.5", "3", "7"], "unit": None, "precision": None,
     "answer": "4.5", "question_type": "multi_choice", "answer_type": "text"},
    {"pid": "2", "question": "How many cubes?", "choices": None, "unit": None, "precision": None, "answer": "7",
     "question_type": "free_form", "answer_type": "integer"},
    {"pid": "3", "question": "What is the ratio?", "choices": None, "unit": None, "precision": 2.0,
     "answer": "1.45", "question_type": "free_form", "answer_type": "float"},
    {"pid": "4", "question": "What is the length?", "choices": None, "unit": "cm", "precision": 1.0,
     "answer": "2.5", "question_type": "free_form", "answer_type": "float"},
]  # fmt: skip


def write_mathvista(root: str) -> str:
    rows = [dict(r, image=f"images/{r['pid']}.jpg", decoded_image=image_struct((56, 84), "green"),
                 query=r["question"]) for r in MATHVISTA_ROWS]  # fmt: skip
    return write_parquet(os.path.join(root, "mathvista", "testmini.parquet"), rows,
                         {"decoded_image": IMAGE_STRUCT, "choices": pa.list_(pa.string()), "precision": pa.float64(),
                          "unit": pa.string()})  # fmt: skip


def write_mathvista_json(root: str) -> str:
    """The GitHub release's shape: testmini.json = {pid: row} with relative image paths."""
    folder = os.path.join(root, "mathvista_json")
    data = {r["pid"]: dict(r, image=f"images/{save_image(os.path.join(folder, 'images'), r['pid'] + '.jpg')}")
            for r in MATHVISTA_ROWS}  # fmt: skip
    with open(os.path.join(folder, "testmini.json"), "w") as f:
        json.dump(data, f)
    return os.path.join(folder, "testmini.json")


def write_wemath(root: str) -> str:
    rows = [{"ID": "1", "key": k, "question number": n, "knowledge concept": "Area", "question": f"Step {k}?",
             "option": "A. 3;B. 4;C. 5;D. 6", "answer": a, "image_path": image_struct((56, 56), "yellow")}
            for n, (k, a) in enumerate([("2steps_1", "A"), ("2steps_2", "C"), ("2steps_multi", "B")], 1)]  # fmt: skip
    rows.append({"ID": "2", "key": "1step", "question number": 4, "knowledge concept": "Angles",
                 "question": "Angle?", "option": "A. 30°;B. 60°", "answer": "B",
                 "image_path": image_struct((56, 56), "white")})  # fmt: skip
    return write_parquet(os.path.join(root, "wemath", "testmini.parquet"), rows, {"image_path": IMAGE_STRUCT})


def write_logicvista(root: str) -> str:
    folder = os.path.join(root, "logicvista")
    rows = [{"id": str(i), "question": q + " Options: A. x B. y C. z D. w", "answer": a,
             "image": f"images/{save_image(os.path.join(folder, 'images'), f'{i}.png', (70, 56))}", "skill": "spatial"}
            for i, (q, a) in enumerate([("Which two are the same?", "A, C"), ("Which is odd?", "B"),
                                        ("How many sides?", "4")])]  # fmt: skip
    return write_jsonl(os.path.join(folder, "test.jsonl"), rows)


def write_dynamath(root: str) -> str:
    folder = os.path.join(root, "dynamath")
    for v in range(1, 11):
        rows = [{"id": "1", "question": f"What is the slope? (variant {v})", "ground_truth": str(v * 0.5),
                 "answer_type": "float", "subject": "algebra", "knowledge_level": "high school",
                 "decoded_image": image_struct((56, 56 + 28 * (v % 2)), "purple")},
                {"id": "2", "question": f"Which graph? A. f B. g (variant {v})", "ground_truth": "A",
                 "answer_type": "multiple choice", "subject": "graph", "knowledge_level": "college",
                 "decoded_image": image_struct((56, 56), "orange")}]  # fmt: skip
        write_parquet(os.path.join(folder, f"sample_variant{v}.parquet"), rows, {"decoded_image": IMAGE_STRUCT})
    return folder


def write_aime24(root: str) -> str:
    rows = [{"id": 60, "problem": "Find the remainder when 2^10 is divided by 1000.", "solution": "...",
             "answer": "24", "url": "", "year": 2024},
            {"id": 61, "problem": "Compute 3 + 4.", "solution": "...", "answer": "7", "url": "", "year": 2024}]  # fmt: skip
    return write_jsonl(os.path.join(root, "aime24", "train.jsonl"), rows)


def write_aime25(root: str) -> str:
    rows = [{"question": "Compute 100 + 4.", "answer": 104}, {"question": "Compute 5 + 4.", "answer": 9}]
    return write_jsonl(os.path.join(root, "aime25", "aime2025.jsonl"), rows)


def write_math500(root: str) -> str:
    rows = [{"problem": p, "solution": "...", "answer": a, "subject": "Algebra", "level": 2,
             "unique_id": f"test/algebra/{i}.json"}
            for i, (p, a) in enumerate([("What is 1/2 as a fraction?", "\\frac{1}{2}"), ("Compute 6 * 7.", "42"),
                                        ("Simplify sqrt(8).", "2\\sqrt{2}")])]  # fmt: skip
    return write_jsonl(os.path.join(root, "math500", "test.jsonl"), rows)


GPQA_ROWS = [
    {"Record ID": "rec1", "Question": "Which particle is charged?", "Correct Answer": "electron",
     "Incorrect Answer 1": "neutron", "Incorrect Answer 2": "photon", "Incorrect Answer 3": "neutrino"},
    {"Record ID": "rec2", "Question": "What is 1.50 doubled?", "Correct Answer": "3.00",
     "Incorrect Answer 1": "1.50", "Incorrect Answer 2": "2.00", "Incorrect Answer 3": "4.50"},
    {"Record ID": "rec3", "Question": "Noble gas?", "Correct Answer": "argon", "Incorrect Answer 1": "sodium",
     "Incorrect Answer 2": "iron", "Incorrect Answer 3": "carbon"},
]  # fmt: skip


def write_gpqa(root: str) -> str:
    """The gated repository's shape: gpqa_diamond.csv with Question / Correct Answer / Incorrect Answer 1-3."""
    path = os.path.join(root, "gpqa", "gpqa_diamond.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(GPQA_ROWS[0]) + ["Subdomain"])
        w.writeheader()
        w.writerows(dict(r, Subdomain="Physics") for r in GPQA_ROWS)
    return path


def write_project(root: str) -> str:
    """Any other label: the project's JSONL records (CONTRACT: Data records)."""
    folder = os.path.join(root, "custom")
    rows = [{"id": "a", "problem": "What is 3 plus 4?", "answer": "7", "images": [save_image(folder, "a.png")]},
            {"id": "b", "problem": "Pick the even one.", "answer": "B", "choices": ["3", "4"]}]
    return write_jsonl(os.path.join(folder, "mm_test.jsonl"), rows)


WRITERS = {"mathverse": (write_mathverse, 4), "mathvision": (write_mathvision, 3),
           "mathvista": (write_mathvista, 4), "wemath": (write_wemath, 4), "logicvista": (write_logicvista, 3),
           "dynamath": (write_dynamath, 20), "aime24": (write_aime24, 2), "aime25": (write_aime25, 2),
           "math500": (write_math500, 3), "gpqa": (write_gpqa, 3), "custom": (write_project, 2)}  # fmt: skip


def write_all(root: str) -> dict[str, tuple[str, int]]:
    return {label: (fn(root), n) for label, (fn, n) in WRITERS.items()}
