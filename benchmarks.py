"""Benchmark files -> records: the ten benchmarks of paper Table 2 as users download them.

`load_benchmark(label, path, cache_dir)` reads Parquet with embedded image structs, JSON / JSONL / CSV with an
image folder, a saved `datasets` folder (only with `datasets` installed), and the project's JSONL records for any
other label (BENCHMARK_FORMATS.md has each benchmark's columns). Images are decoded once and cached as PNG under
`cache_dir/<bench>/`. `blank_record_images` swaps every image for a white one of the same size (does the model
use the image?). A bad row is an error naming the file, the row and the field. Grading and generation: eval.py.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import random
import re
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

from PIL import Image

import data as D


@dataclass(frozen=True)
class Benchmark:
    size: int  # items of the split Table 2 used (DynaMath: 501 questions x 10 variants)
    paper: float  # ReVisual-R1-7B, paper Table 2 (percent)
    paper_metric: str = "accuracy"  # our results key that stands beside the paper's number
    samples: int = 1  # default K


BENCHMARKS = {
    "mathverse": Benchmark(3940, 53.6), "mathvision": Benchmark(3040, 48.8), "mathvista": Benchmark(1000, 73.1),
    "wemath": Benchmark(1740, 42.0), "logicvista": Benchmark(448, 52.3),
    "dynamath": Benchmark(5010, 27.5, paper_metric="worst_case"),
    "aime24": Benchmark(30, 53.3, samples=8), "aime25": Benchmark(30, 43.3, samples=8),
    "math500": Benchmark(500, 89.2), "gpqa": Benchmark(198, 47.5),
}  # fmt: skip
DATA_EXTS = (".parquet", ".jsonl", ".json", ".csv")


# ----------------------------------------------------------------------------------------------------------
# Reading tables and images


def _rows_of_file(path: str) -> Iterator[dict]:
    """Rows of one Parquet / JSONL / JSON / CSV file, streamed where the format allows."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
            yield from batch.to_pylist()
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise D.DataError(f"{path} row {i}: not valid JSON ({e.msg})") from None
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        if isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
            obj = list(obj.values())  # MathVista's testmini.json: {pid: row}
        if not isinstance(obj, list):
            raise D.DataError(f"{path}: expected a list of rows (or {{id: row}}), got {type(obj).__name__}")
        yield from obj
    elif path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            yield from csv.DictReader(f)  # every value stays a string (GPQA's "1.50" must not become 1.5)
    else:
        raise D.DataError(f"{path}: unsupported file type (expected one of {', '.join(DATA_EXTS)})")


def _data_files(folder: str) -> list[str]:
    return sorted(os.path.join(root, n) for root, _, names in os.walk(folder) for n in names if n.endswith(DATA_EXTS))


def _variant(file: str) -> int:
    m = re.search(r"variant[_-]?(\d+)", os.path.basename(file))
    return int(m.group(1)) if m else 0


def _table(bench: str, path: str) -> Iterator[tuple[str, dict, str]]:
    """(where, row, folder the row's relative image paths start from) for a file or a folder of files.
    DynaMath takes the folder of its variant files (sample_variant1 ... 10); its rows get `_variant`."""
    if any(os.path.isfile(os.path.join(path, n)) for n in ("state.json", "dataset_dict.json")):  # save_to_disk
        try:
            import datasets
        except ImportError:
            raise D.DataError(f"{bench}: {path} is a saved `datasets` folder: install `datasets` to read it, "
                              "or point --bench at its Parquet files") from None  # fmt: skip
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if len(ds) != 1:
                raise D.DataError(f"{bench}: {path} holds splits {list(ds)}: point --bench at one of them")
            ds = next(iter(ds.values()))
        for i, row in enumerate(ds):
            yield f"{bench}: {path} row {i}", row, path
        return
    if bench == "dynamath" and not os.path.isdir(path):
        raise D.DataError(f"dynamath: {path}: expected the folder of its variant files (sample_variant1..10)")
    if os.path.isdir(path):
        files = _data_files(path)
        if bench == "dynamath":
            files = sorted((f for f in files if _variant(f)), key=lambda f: (_variant(f), f))
        elif len({os.path.basename(f).split("-")[0].split(".")[0] for f in files}) > 1:
            raise D.DataError(f"{bench}: {path} holds several splits: point --bench at one file")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise D.DataError(f"{bench}: {path}: no such file or folder")
    if not files:
        raise D.DataError(f"{bench}: {path}: no {'/'.join(DATA_EXTS)} files here"
                          + (" named sample_variant<N>" if bench == "dynamath" else ""))  # fmt: skip
    for f in files:
        for i, row in enumerate(_rows_of_file(f)):
            if not isinstance(row, dict):
                raise D.DataError(f"{bench}: {f} row {i}: a row must be an object, got {type(row).__name__}")
            yield f"{bench}: {f} row {i}", dict(row, _variant=_variant(f)), os.path.dirname(os.path.abspath(f))


def _col(row: dict, where: str, *names: str, required: bool = True):
    """The first of `names` present with a non-empty value (alternatives for unverified columns)."""
    for n in names:
        v = row.get(n)
        if v is not None and not (isinstance(v, str) and not v.strip()):
            return v
    if required:
        alts = " or ".join(repr(n) for n in names)
        state = "is empty" if any(n in row for n in names) else f"is missing (columns: {', '.join(map(str, row))})"
        raise D.DataError(f"{where}: column {alts} {state}")
    return None


def _text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _write_png(im: Image.Image, path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"  # atomic: ranks writing the same cache never see half a file
    im.save(tmp, format="PNG")
    os.replace(tmp, path)


def _cache_image(value, where: str, column: str, base: str, dest: str) -> str:
    """Decode an image cell (struct {bytes, path}, raw bytes, a relative path, or a PIL image) into `dest`."""
    if os.path.exists(dest):
        return dest
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):  # relative to the data file's folder or its parent
        found = [p for p in (os.path.join(base, value), os.path.join(os.path.dirname(base), value)) if os.path.isfile(p)]
        if not found:
            raise D.DataError(f"{where}: column '{column}': image file not found: {value} (looked in {base})")
        value = found[0]
    elif isinstance(value, (bytes, bytearray)):
        value = io.BytesIO(value)
    elif not isinstance(value, Image.Image):
        raise D.DataError(f"{where}: column '{column}': not an image ({type(value).__name__})")
    try:
        im = value if isinstance(value, Image.Image) else Image.open(value)
        im.load()
        im = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise D.DataError(f"{where}: column '{column}': cannot decode image: {e}") from None
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    _write_png(im, dest)
    return dest


def _safe_name(rid: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", rid)[:80]
    return safe if safe == rid else f"{safe}-{zlib.crc32(rid.encode()):08x}"


# ----------------------------------------------------------------------------------------------------------
# Benchmarks: one row -> (id, problem, answer, choices, meta, image cell and its column)

_WEMATH_OPTION = re.compile(r"(?:^|[;；])\s*([A-H])\s*[.．:：、]\s*")


def _wemath_options(text: str, where: str) -> list[str]:
    """WeMath's one-string options "A. 3;B. 4;C. 5" -> ["3", "4", "5"]."""
    marks = list(_WEMATH_OPTION.finditer(text))
    letters = [m.group(1) for m in marks]
    if len(marks) < 2 or letters != [chr(65 + i) for i in range(len(marks))]:
        raise D.DataError(f"{where}: column 'option': cannot read options A, B, ... from {text[:120]!r}")
    ends = [m.start() for m in marks[1:]] + [len(text)]
    return [text[m.end() : e].strip() for m, e in zip(marks, ends)]


def _image_cell(row: dict, *names: str) -> tuple[object, str]:
    for n in names:
        v = row.get(n)
        if isinstance(v, dict) and not (v.get("bytes") or v.get("path")):
            continue  # an empty struct (e.g. MathVerse text-only versions)
        if v is not None and v != "" and v != []:
            return v, n
    return None, ""


# Columns per benchmark: ids, problem, gold, image (the first non-empty of the alternatives wins; unverified
# names come with their known alternatives), and what the metrics keep in `meta`. Quirks in _row_fields.
COLUMNS = {
    "mathverse": (("sample_index",), ("query_cot", "question"), ("answer",), ("image", "decoded_image"),
                  ("problem_version", "question_type", "problem_index")),
    "mathvision": (("id",), ("question",), ("answer",), ("decoded_image", "image"), ("level", "subject")),
    "mathvista": (("pid",), ("question",), ("answer",), ("decoded_image", "image"),
                  ("question_type", "answer_type", "precision", "unit")),
    "wemath": (("ID",), ("question",), ("answer",), ("image_path", "image", "decoded_image"),
               ("key", "knowledge concept")),
    "logicvista": (("id",), ("question",), ("answer",), ("image", "decoded_image"), ("skill",)),
    "dynamath": (("id", "qid"), ("question",), ("ground_truth", "answer"), ("decoded_image", "image"),
                 ("answer_type", "subject")),
    "aime24": (("id",), ("problem", "question"), ("answer",), (), ()),
    "aime25": (("id",), ("problem", "question"), ("answer",), (), ()),
    "math500": (("unique_id", "id"), ("problem",), ("answer",), (), ("subject", "level")),
    "gpqa": (("Record ID",), ("Question",), ("Correct Answer",), (), ("Subdomain",)),
}  # fmt: skip


def _row_fields(bench: str, row: dict, where: str, index: int, seed: int) -> tuple:
    """(id, problem, answer, choices, meta, image cell, image column) of one benchmark row."""
    ids, problems, answers, images, keep = COLUMNS[bench]
    rid = _col(row, where, *ids, required=bench == "dynamath")
    rid = _text(index if rid is None else rid)
    problem, answer = _text(_col(row, where, *problems)), _text(_col(row, where, *answers))
    meta = {k: row[k] for k in keep if row.get(k) is not None}
    choices = None
    if bench in ("mathvision", "mathvista"):  # a list column; empty = free form
        choices = [_text(c) for c in row.get("options" if bench == "mathvision" else "choices") or []] or None
        if meta.get("precision") is not None:
            meta["precision"] = int(meta["precision"]) if meta["precision"] == meta["precision"] else None  # NaN
    elif bench == "wemath":  # one string "A. 3;B. 4"; items of a multi-step problem share their ID
        choices = _wemath_options(_text(_col(row, where, "option", "options")), where)
        answer, meta["group"] = answer.upper(), rid
        rid = f"{rid}_{meta['key']}" if "key" in meta else rid
    elif bench == "logicvista" and re.fullmatch(r"[a-hA-H](\s*,\s*[a-hA-H])*", answer):
        answer = answer.upper()
    elif bench == "dynamath":
        meta.update(qid=rid, variant=row["_variant"])
        rid = f"{rid}_v{row['_variant']}"
    elif bench == "gpqa":  # four options shuffled into A-D, fixed per item whatever the row order
        options = [answer] + [_text(_col(row, where, f"Incorrect Answer {i}")) for i in (1, 2, 3)]
        order = random.Random(f"gpqa:{seed}:{rid}").sample(range(4), 4)
        choices, answer = [options[i] for i in order], chr(65 + order.index(0))
    return rid, problem, answer, choices, meta, *_image_cell(row, *images)


def load_benchmark(label: str, path: str, cache_dir: str, limit: int | None = None, seed: int = 0) -> list[D.Record]:
    """Records of one benchmark (images decoded into `cache_dir/<label>/`). A label that is not a benchmark
    name reads the project's JSONL records. Bad input raises data.DataError naming bench, row and column."""
    if label not in BENCHMARKS:
        if not path.endswith(".jsonl"):
            raise D.DataError(f"{label}: unknown benchmark name for {path} (known: {', '.join(BENCHMARKS)}; any "
                              "other label takes a .jsonl file in the project's record format)")  # fmt: skip
        return D.load_records(path, limit=limit)
    records, seen = [], {}
    for index, (where, row, base) in enumerate(islice(_table(label, path), limit)):
        rid, problem, answer, choices, meta, cell, column = _row_fields(label, row, where, index, seed)
        if rid in seen:
            raise D.DataError(f"{where}: id {rid!r} appears twice (first at {seen[rid]})")
        seen[rid] = where
        images = []
        if cell is not None:
            dest = os.path.join(cache_dir, label, _safe_name(rid) + ".png")
            images = [_cache_image(cell, where, column, base, dest)]
        meta = {k: v for k, v in meta.items() if v is not None}
        records.append(D.Record(id=rid, problem=problem, answer=answer, images=images, choices=choices,
                                source=where, meta=meta))  # fmt: skip
    if not records:
        raise D.DataError(f"{label}: {path}: no rows")
    return records


_BLANK_DIR: list[str] = []


def blank_record_images(records: list[D.Record], cache_dir: str | None = None) -> list[D.Record]:
    """Copies of `records` whose images are white images of the same sizes (one file per size)."""
    if cache_dir is None:
        if not _BLANK_DIR:
            _BLANK_DIR.append(tempfile.mkdtemp(prefix="eval_blank_"))
        cache_dir = _BLANK_DIR[0]
    os.makedirs(cache_dir, exist_ok=True)
    out = []
    for rec in records:
        paths = []
        for p in rec.images:
            w, h = D.open_image(p, rec.source).size
            dest = os.path.join(cache_dir, f"blank_{w}x{h}.png")
            if not os.path.exists(dest):
                _write_png(Image.new("RGB", (w, h), "white"), dest)
            paths.append(dest)
        out.append(dataclasses.replace(rec, images=paths))
    return out
