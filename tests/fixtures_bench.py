"""Tiny benchmark fixtures in the on-disk layouts users download, for tests/test_eval.py and test_scoring.py.

Each `write_<bench>(root)` writes a few items in one real layout (file names, column names and types, image
columns as stored: `{bytes, path}` structs of the Hugging Face Image feature, relative paths, base64 in a TSV)
and returns the path to pass as `--bench <bench>=PATH`; `WRITERS` maps a label to (writer, items, --split);
`write_all(root)` writes one layout per benchmark. Where each schema was read is cited beside its writer;
"(unverified)" marks what was not read from the files themselves.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature in Arrow


def png_bytes(size=(56, 56), color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def image_struct(size=(56, 56), color="red", name="x.png") -> dict:
    return {"bytes": png_bytes(size, color), "path": name}


def _table(rows: list[dict], types: dict[str, pa.DataType] | None) -> pa.Table:
    types = types or {}
    return pa.table({k: pa.array([r.get(k) for r in rows], type=types.get(k)) for k in rows[0]})


def write_parquet(path: str, rows: list[dict], types: dict[str, pa.DataType] | None = None) -> str:
    """Rows -> Parquet; image columns given in `types` as IMAGE_STRUCT (as the Hugging Face Image feature)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(_table(rows, types), path)
    return path


def write_arrow_stream(path: str, rows: list[dict], types: dict[str, pa.DataType] | None = None) -> str:
    """Rows -> an Arrow IPC stream, as `datasets` writes `save_to_disk` shards and its load_dataset cache."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = _table(rows, types)
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def write_jsonl(path: str, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def write_tsv(path: str, rows: list[dict]) -> str:
    """VLMEvalKit's TSV (pandas to_csv(sep='\\t')): `index` first, `image` a base64 string."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return path


def b64_png(size=(56, 56), color="red") -> str:
    return base64.b64encode(png_bytes(size, color)).decode()


def save_image(folder: str, name: str, size=(56, 56), color="red") -> str:
    os.makedirs(folder, exist_ok=True)
    Image.new("RGB", size, color).save(os.path.join(folder, name))
    return name


# ---------------------------------------------------------------------------------------------- MathVerse
# AI4Math/MathVerse (Hugging Face tree at 96641f2: testmini.parquet, testmini_text_only.parquet, testmini.json,
# testmini_text_only.json, images.zip at the root; 3,940 + 788 rows). Columns as BENCHMARK_FORMATS.md lists
# them (sample_index, problem_index, problem_version, question, image, answer, question_type, query_wo,
# query_cot, question_for_eval); the image column's Arrow type was not read (unverified: an Image struct).
# Golds in the forms the issue names: "(C)", "A\nC", "False".

MATHVERSE_ROWS = [
    ("Text Dominant", "multi-choice", "Find x.\nChoices:\nA:1\nB:3\nC:5\nD:7", "B"),
    ("Text Lite", "multi-choice", "Find the angle.\nChoices:\nA:30°\nB:45°\nC:60°\nD:90°", "(C)"),
    ("Vision Intensive", "free-form", "Find the length of AB.", "3"),
    (
        "Vision Dominant",
        "multi-choice",
        "Which are right angles?\nChoices:\nA:angle 1\nB:angle 2\nC:angle 3",
        "A\nC",
    ),
    ("Text Only", "free-form", "Is the triangle equilateral? Answer True or False.", "False"),
]


def _mathverse_rows(prefix: str = "") -> list[dict]:
    rows = []
    for i, (version, qtype, question, answer) in enumerate(MATHVERSE_ROWS):
        cot = "Please first conduct reasoning, and then answer the question"
        if qtype == "multi-choice":
            cot += " and provide the correct option letter"
        rows.append(
            {
                "sample_index": f"{prefix}{i + 1}",
                "problem_index": "1",
                "problem_version": version,
                "question": question,
                "image": None if version == "Text Only" else image_struct((56 + 28 * i, 56)),
                "answer": answer,
                "question_type": qtype,
                "metadata": {"split": "testmini"},
                "query_wo": question,
                "query_cot": f"{cot}.\nQuestion: {question}",
                "question_for_eval": question,
            }
        )
    return rows


def write_mathverse(root: str) -> str:
    """The repository root: testmini.parquet beside testmini_text_only.parquet (pick one with --split)."""
    folder = os.path.join(root, "MathVerse")
    text_only = _mathverse_rows("t")[4:]
    write_parquet(os.path.join(folder, "testmini_text_only.parquet"), text_only, {"image": IMAGE_STRUCT})
    write_parquet(os.path.join(folder, "testmini.parquet"), _mathverse_rows(), {"image": IMAGE_STRUCT})
    return folder


def write_mathverse_tsv(root: str) -> str:
    """VLMEvalKit's MathVerse_MINI.tsv (vlmeval/dataset/image_vqa.py MathVerse: index, image, question, answer,
    query_cot, problem_version, question_type); a second version of a problem names the first row's index in
    its image cell (vlmeval/dataset/image_base.py load_data)."""
    rows = []
    for i, r in enumerate(_mathverse_rows()[:4]):
        image = b64_png((56, 56), "blue") if i == 0 else "1"
        rows.append(
            {
                "index": str(i + 1),
                "image": image,
                "question": r["question"],
                "answer": r["answer"],
                "query_cot": r["query_cot"],
                "problem_version": r["problem_version"],
                "question_type": r["question_type"],
            }
        )
    return write_tsv(os.path.join(root, "vlmeval", "MathVerse_MINI.tsv"), rows)


# --------------------------------------------------------------------------------------------- MathVision
# MathLLMs/MathVision (BENCHMARK_FORMATS.md: data/test-*.parquet 3,040 rows, data/testmini-*.parquet 304;
# id, question, options (list), image (path string), decoded_image (Image), answer, solution, level, subject).


MATHVISION_ITEMS = [
    ("<image1> How many?", ["1", "2", "3"], "B"),
    ("<image1> What is the area?", [], "12"),
    ("<image1> Which shape?", ["circle", "square"], "A"),
]


def write_mathvision(root: str) -> str:
    folder = os.path.join(root, "MathVision", "data")
    rows = [
        {
            "id": str(i),
            "question": q,
            "options": opts,
            "image": f"images/{i}.jpg",
            "decoded_image": image_struct((84, 56), "blue"),
            "answer": a,
            "solution": "",
            "level": 2,
            "subject": "arithmetic",
        }
        for i, (q, opts, a) in enumerate(MATHVISION_ITEMS, 1)
    ]
    types = {"decoded_image": IMAGE_STRUCT, "options": pa.list_(pa.string())}
    write_parquet(os.path.join(folder, "test-00000-of-00001-3532b8d3f1b4047a.parquet"), rows, types)
    write_parquet(os.path.join(folder, "testmini-00000-of-00001-f8ff70fcb2f29b1d.parquet"), rows[:1], types)
    return os.path.dirname(folder)


# ---------------------------------------------------------------------------------------------- MathVista
# AI4Math/MathVista (features read from its README as mirrored by SunnyLin/MathVista-Geo's commit: pid,
# question, image (string), decoded_image (Image), choices (list<string>), unit, precision (float64), answer,
# question_type, answer_type, metadata (struct), query; files data/testmini-00000-of-00001-<hash>.parquet,
# data/test-0000N-of-00002-<hash>.parquet, plus annot_testmini.json and source.json at the root).
# `query` is the official prompt: the question with its answer-type / precision hint and unit.

_HINT = "Hint: Please answer the question requiring {} and provide the final value, e.g., {}, at the end.\n"
MATHVISTA_ROWS = [
    {
        "pid": "1",
        "question": "Which is larger?",
        "choices": ["4.5", "3", "7"],
        "unit": None,
        "precision": None,
        "answer": "4.5",
        "question_type": "multi_choice",
        "answer_type": "text",
        "query": (
            "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the "
            "end.\nQuestion: Which is larger?\nChoices:\n(A) 4.5\n(B) 3\n(C) 7"
        ),
    },
    {
        "pid": "2",
        "question": "How many cubes?",
        "choices": None,
        "unit": None,
        "precision": None,
        "answer": "7",
        "question_type": "free_form",
        "answer_type": "integer",
        "query": _HINT.format("an integer answer", "1, 2, 3") + "Question: How many cubes?",
    },
    {
        "pid": "3",
        "question": "What is the ratio?",
        "choices": None,
        "unit": None,
        "precision": 2.0,
        "answer": "1.45",
        "question_type": "free_form",
        "answer_type": "float",
        "query": (
            _HINT.format("a floating-point number with two decimal places", "1.23, 1.34, 1.45")
            + "Question: What is the ratio?"
        ),
    },
    {
        "pid": "4",
        "question": "What is the length?",
        "choices": None,
        "unit": "cm",
        "precision": 1.0,
        "answer": "1.2",
        "question_type": "free_form",
        "answer_type": "float",
        "query": (
            _HINT.format("a floating-point number with one decimal place", "1.2, 1.3, 1.4")
            + "Question: What is the length? (Unit: cm)"
        ),
    },
]
_MATHVISTA_TYPES = {
    "decoded_image": IMAGE_STRUCT,
    "choices": pa.list_(pa.string()),
    "precision": pa.float64(),
    "unit": pa.string(),
}


def _mathvista_rows() -> list[dict]:
    return [
        dict(
            r,
            image=f"images/{r['pid']}.jpg",
            decoded_image=image_struct((56, 84), "green"),
            metadata={"language": "english", "img_width": 56, "img_height": 84},
        )
        for r in MATHVISTA_ROWS
    ]


def write_mathvista(root: str) -> str:
    """The Hugging Face repository: testmini and test shards in data/ (pick one with --split), annot json."""
    folder = os.path.join(root, "MathVista")
    rows = _mathvista_rows()
    testmini = os.path.join(folder, "data", "testmini-00000-of-00001-725687bf7a18d64b.parquet")
    test = os.path.join(folder, "data", "test-00000-of-00002-6b81bd7f7e2065e6.parquet")
    write_parquet(testmini, rows, _MATHVISTA_TYPES)
    write_parquet(test, [dict(r, pid=f"t{r['pid']}", answer="") for r in rows], _MATHVISTA_TYPES)
    with open(os.path.join(folder, "source.json"), "w") as f:
        json.dump({"1": "IQTest"}, f)
    return folder


def write_mathvista_json(root: str) -> str:
    """The GitHub release's shape: testmini.json = {pid: row} with relative image paths."""
    folder = os.path.join(root, "mathvista_json")
    data = {
        r["pid"]: dict(r, image=f"images/{save_image(os.path.join(folder, 'images'), r['pid'] + '.jpg')}")
        for r in MATHVISTA_ROWS
    }
    with open(os.path.join(folder, "testmini.json"), "w") as f:
        json.dump(data, f)
    return os.path.join(folder, "testmini.json")


def write_mathvista_saved(root: str) -> str:
    """A `datasets` save_to_disk folder (data-00000-of-00001.arrow, dataset_info.json, state.json)."""
    folder = os.path.join(root, "mathvista_saved")
    write_arrow_stream(os.path.join(folder, "data-00000-of-00001.arrow"), _mathvista_rows(), _MATHVISTA_TYPES)
    for name in ("dataset_info.json", "state.json"):
        with open(os.path.join(folder, name), "w") as f:
            json.dump({"_split": "testmini"}, f)
    return folder


# ------------------------------------------------------------------------------------------------- WeMath
# We-Math/We-Math, split testmini (lmms-eval lmms_eval/tasks/wemath/reasoning/utils.py reads ID, split,
# knowledge concept, question, option, answer, image_path (an Image), key, question number, knowledge concept
# description; the prompt is question + "\n" + option). File name data/testmini-*.parquet (unverified).
# One 2-step problem (steps right, composite wrong: IG), one 3-step problem (a step wrong, composite right:
# RM strict, CM loose), one 1-step item (outside the four dimensions).

WEMATH_ITEMS = [
    ("1", "2steps_1", "A. 3;B. 4;C. 5;D. 6", "A"),
    ("1", "2steps_2", "A. 3;B. 4;C. 5;D. 6", "C"),
    ("1", "2steps_multi", "A. 3;B. 4;C. 5;D. 6", "B"),
    ("2", "3steps_1", "A. 1;B. 2", "A"),
    ("2", "3steps_2", "A. 1;B. 2", "B"),
    ("2", "3steps_3", "A. 1;B. 2", "A"),
    ("2", "3steps_multi", "A. 1;B. 2", "B"),
    ("3", "1step", "A. 30°;B. 60°", "B"),
]


def _wemath_rows() -> list[dict]:
    return [
        {
            "ID": i,
            "split": "testmini",
            "knowledge concept": "Area",
            "question": f"Step {k}?",
            "option": o,
            "answer": a,
            "image_path": image_struct((56, 56), "yellow"),
            "key": k,
            "question number": n,
            "knowledge concept description": "...",
        }
        for n, (i, k, o, a) in enumerate(WEMATH_ITEMS, 1)
    ]


def write_wemath(root: str) -> str:
    path = os.path.join(root, "We-Math", "data", "testmini-00000-of-00001.parquet")
    return write_parquet(path, _wemath_rows(), {"image_path": IMAGE_STRUCT})


def write_wemath_tsv(root: str) -> str:
    """VLMEvalKit's WeMath.tsv (vlmeval/dataset/image_mcq.py WeMath: an MCQ TSV, options in columns A, B, ...,
    its evaluation reads ID, key, answer; vlmeval/dataset/utils/wemath.py)."""
    rows = []
    for n, r in enumerate(_wemath_rows()):
        opts = {c: "" for c in "ABCD"}
        for part in r["option"].split(";"):
            opts[part[0]] = part[2:].strip()
        rows.append(
            {
                "index": str(n),
                "image": b64_png((56, 56), "yellow"),
                "question": r["question"],
                **opts,
                "answer": r["answer"],
                "ID": r["ID"],
                "key": r["key"],
                "knowledge concept": "Area",
            }
        )
    return write_tsv(os.path.join(root, "vlmeval", "WeMath.tsv"), rows)


# --------------------------------------------------------------------------------------------- LogicVista
# GitHub release (Yijia-Xiao/LogicVista data/dataset.json, read): {"v1_0": {"imagename": "v1_0.png",
# "question", "answer" ("C", "A, C", "3"), "reasoning", "skill": [...], "capability": [...], ...}}, images in
# data/images/. Hugging Face lscpku/LogicVista split test (lmms-eval lmms_eval/tasks/logicvista: question,
# image (an Image), answer). VLMEvalKit LogicVista.tsv (vlmeval/dataset/utils/logicvista.py: question,
# answer, skill). Row v1_382 has an empty question and answer: kept and counted wrong.

LOGICVISTA_ROWS = [
    ("v1_1", "Which choices in the image (A-D) belong to the green category?", "A, C"),
    (
        "v1_19",
        "How many triangles will be in the 6th shape? Select answers from A-D. \n A) 10 B) 12 C) 14 D) 16",
        "C",
    ),
    ("v1_20", "Which is the correct answer according to the image? Select from 1-5", "3"),
    ("v1_382", "", ""),
]


def write_logicvista(root: str) -> str:
    """The GitHub release: data/dataset.json ({id: row}, `imagename`) with data/images/."""
    folder = os.path.join(root, "LogicVista", "data")
    data = {
        rid: {
            "imagename": save_image(os.path.join(folder, "images"), f"{rid}.png", (70, 56)),
            "question": q,
            "answer": a,
            "reasoning": "",
            "skill": ["inductive"],
            "capability": ["diagram"],
        }
        for rid, q, a in LOGICVISTA_ROWS
    }
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(data, f, indent=4)
    return os.path.join(folder, "dataset.json")


def write_logicvista_hf(root: str) -> str:
    rows = [
        {"question": q, "image": image_struct((70, 56), "gray"), "answer": a} for _, q, a in LOGICVISTA_ROWS
    ]
    path = os.path.join(root, "lscpku_LogicVista", "data", "test-00000-of-00001.parquet")
    return write_parquet(path, rows, {"image": IMAGE_STRUCT})


def write_logicvista_tsv(root: str) -> str:
    rows = [
        {"index": str(i), "image": b64_png((70, 56)), "question": q, "answer": a, "skill": "inductive"}
        for i, (_, q, a) in enumerate(LOGICVISTA_ROWS)
    ]
    return write_tsv(os.path.join(root, "vlmeval", "LogicVista.tsv"), rows)


# ----------------------------------------------------------------------------------------------- DynaMath
# DynaMath/DynaMath_Sample (its README at 5370736: split sample_variantN stored as data/sampleN-*; features
# id, question, image (string), decoded_image (Image), ground_truth, answer_type ("multiple choice", "float",
# "text"), subject, knowledge_level). File names as the issue lists them: sample1-00000-of-00001.parquet ...
# sample10-00000-of-00010.parquet. VLMEvalKit DynaMath.tsv (vlmeval/dataset/dynamath.py: index, image,
# question, answer, answer_type, qid, varid, subject, knowledge_level). Question 1: a float gold whose
# answer a model writes symbolically (2*pi/3 = 2.094); question 2: options inside the question text.


def _dynamath_rows(v: int) -> list[dict]:
    return [
        {
            "id": "1",
            "question": f"What is the angle in radians? (variant {v})",
            "image": f"images/{v}_1.png",
            "decoded_image": image_struct((56, 56 + 28 * (v % 2)), "purple"),
            "ground_truth": "2.094" if v == 1 else str(v * 0.5),
            "answer_type": "float",
            "subject": "algebra",
            "knowledge_level": "high school",
        },
        {
            "id": "2",
            "question": f"Is the function continuous at x = {v}? choice: (A) yes (B) no",
            "image": f"images/{v}_2.png",
            "decoded_image": image_struct((56, 56), "orange"),
            "ground_truth": "A",
            "answer_type": "multiple choice",
            "subject": "graph",
            "knowledge_level": "college",
        },
    ]


def write_dynamath(root: str) -> str:
    folder = os.path.join(root, "DynaMath_Sample", "data")
    for v in range(1, 11):
        path = os.path.join(folder, f"sample{v}-00000-of-{v:05d}.parquet")
        write_parquet(path, _dynamath_rows(v), {"decoded_image": IMAGE_STRUCT})
    return os.path.dirname(folder)


def write_dynamath_tsv(root: str) -> str:
    rows = [
        {
            "index": str(n),
            "image": b64_png(),
            "question": r["question"],
            "answer": r["ground_truth"],
            "answer_type": r["answer_type"],
            "qid": r["id"],
            "varid": str(v),
            "subject": r["subject"],
            "knowledge_level": r["knowledge_level"],
        }
        for n, (v, r) in enumerate((v, r) for v in range(1, 11) for r in _dynamath_rows(v))
    ]
    return write_tsv(os.path.join(root, "vlmeval", "DynaMath.tsv"), rows)


# ---------------------------------------------------------------------------------------- text benchmarks
# HuggingFaceH4/aime_2024: data/train-00000-of-00001.parquet (id int64, problem, solution, answer, url, year).
# opencompass/AIME2025: aime2025-I.jsonl and aime2025-II.jsonl, {question, answer} (unverified), together 30.
# HuggingFaceH4/MATH-500: test.jsonl (problem, solution, answer, subject, level, unique_id).
# Idavidrein/gpqa (gated): gpqa_diamond.csv beside gpqa_main.csv, gpqa_extended.csv (pick one with --split).


def write_aime24(root: str) -> str:
    rows = [
        {
            "id": 60,
            "problem": "Find the remainder when 2^10 is divided by 1000.",
            "solution": "...",
            "answer": "24",
            "url": "",
            "year": 2024,
        },
        {"id": 61, "problem": "Compute 3 + 4.", "solution": "...", "answer": "7", "url": "", "year": 2024},
    ]
    return write_parquet(os.path.join(root, "aime_2024", "data", "train-00000-of-00001.parquet"), rows)


def write_aime25(root: str) -> str:
    folder = os.path.join(root, "AIME2025")
    write_jsonl(os.path.join(folder, "aime2025-I.jsonl"), [{"question": "Compute 100 + 4.", "answer": "104"}])
    write_jsonl(os.path.join(folder, "aime2025-II.jsonl"), [{"question": "Compute 5 + 4.", "answer": "9"}])
    return folder


MATH500_ITEMS = [
    ("What is 1/2 as a fraction?", "\\frac{1}{2}"),
    ("Compute 6 * 7.", "42"),
    ("Simplify sqrt(8).", "2\\sqrt{2}"),
    ("Divide 14 by 3.", "\\frac{14}{3}"),
]


def write_math500(root: str) -> str:
    rows = [
        {
            "problem": p,
            "solution": "...",
            "answer": a,
            "subject": "Algebra",
            "level": 2,
            "unique_id": f"test/algebra/{i}.json",
        }
        for i, (p, a) in enumerate(MATH500_ITEMS)
    ]
    return write_jsonl(os.path.join(root, "MATH-500", "test.jsonl"), rows)


GPQA_ROWS = [
    {
        "Record ID": "rec1",
        "Question": "Which particle is charged?",
        "Correct Answer": "electron",
        "Incorrect Answer 1": "neutron",
        "Incorrect Answer 2": "photon",
        "Incorrect Answer 3": "neutrino",
    },
    {
        "Record ID": "rec2",
        "Question": "What is 1.50 doubled?",
        "Correct Answer": "3.00",
        "Incorrect Answer 1": "1.50",
        "Incorrect Answer 2": "2.00",
        "Incorrect Answer 3": "4.50",
    },
    {
        "Record ID": "rec3",
        "Question": "Noble gas?",
        "Correct Answer": "argon",
        "Incorrect Answer 1": "sodium",
        "Incorrect Answer 2": "iron",
        "Incorrect Answer 3": "carbon",
    },
]


def write_gpqa(root: str) -> str:
    """The gated repository's shape: gpqa_diamond.csv beside gpqa_main.csv."""
    folder = os.path.join(root, "gpqa")
    os.makedirs(folder, exist_ok=True)
    for name, rows in (("gpqa_diamond.csv", GPQA_ROWS), ("gpqa_main.csv", GPQA_ROWS[:1])):
        with open(os.path.join(folder, name), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(GPQA_ROWS[0]) + ["Subdomain"])
            w.writeheader()
            w.writerows(dict(r, Subdomain="Physics") for r in rows)
    return folder


def write_project(root: str) -> str:
    """Any other label: the project's JSONL records (CONTRACT: Data records)."""
    folder = os.path.join(root, "custom")
    rows = [
        {"id": "a", "problem": "What is 3 plus 4?", "answer": "7", "images": [save_image(folder, "a.png")]},
        {"id": "b", "problem": "Pick the even one.", "answer": "B", "choices": ["3", "4"]},
    ]
    return write_jsonl(os.path.join(folder, "mm_test.jsonl"), rows)


# label -> (writer, items, --split for a folder holding several)
WRITERS = {
    "mathverse": (write_mathverse, 5, "testmini"),
    "mathvision": (write_mathvision, 3, "test"),
    "mathvista": (write_mathvista, 4, "testmini"),
    "wemath": (write_wemath, 8, None),
    "logicvista": (write_logicvista, 4, None),
    "dynamath": (write_dynamath, 20, None),
    "aime24": (write_aime24, 2, None),
    "aime25": (write_aime25, 2, None),
    "math500": (write_math500, 4, None),
    "gpqa": (write_gpqa, 3, "gpqa_diamond"),
    "custom": (write_project, 2, None),
}

# other layouts of the same benchmarks: label -> (writer, items)
OTHER_LAYOUTS = {
    "mathverse": (write_mathverse_tsv, 4),
    "mathvista": (write_mathvista_json, 4),
    "mathvista_saved": (write_mathvista_saved, 4),
    "wemath": (write_wemath_tsv, 8),
    "logicvista": (write_logicvista_hf, 4),
    "logicvista_tsv": (write_logicvista_tsv, 4),
    "dynamath": (write_dynamath_tsv, 20),
}


def write_all(root: str) -> dict[str, tuple[str, int]]:
    return {label: (fn(root), n) for label, (fn, n, _) in WRITERS.items()}


def splits() -> str:
    """The --split value for write_all's folders."""
    return ",".join(f"{label}={s}" for label, (_, _, s) in WRITERS.items() if s)
