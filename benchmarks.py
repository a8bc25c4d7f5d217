"""Benchmark files -> records: the ten benchmarks of paper Table 2 as users download them.

`load_benchmark(label, path, cache_dir, split=...)` reads, for a file or a folder (eval.py's docstring has
the table per benchmark):
* Hugging Face dataset repos: Parquet shards under their real names (`data/testmini-00000-of-00001-<hash>
  .parquet`, DynaMath's `data/sample3-00000-of-00001.parquet`, MathVerse's root `testmini.parquet`), image
  columns as `{bytes, path}` structs; `datasets` copies without `datasets` installed (Arrow IPC files of
  `save_to_disk` folders and of the `load_dataset` cache, read with pyarrow).
* GitHub releases: JSON `{id: row}` (ids from the keys) or lists, JSONL, CSV, with image paths relative to
  the file (or its `images/` folder: LogicVista's `imagename`).
* VLMEvalKit's TSV: `index`, a base64 `image` column (a short cell names the row whose image it shares).
A folder holding several splits or configs is an error naming them and `--split`; the same split in several
formats is read from the first of DATA_EXTS. Options a question lists in its own text (MathVerse, DynaMath,
LogicVista) become `choices` when the item is multiple choice. Images are decoded once and cached as PNG
under `cache_dir/<bench>/`. `blank_record_images` swaps every image for a white one of the same size. A bad
row is an error naming the file, the row and the field. Grading: scoring.py; generation: eval.py.
"""

from __future__ import annotations

import base64
import binascii
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
    "mathverse": Benchmark(3940, 53.6),
    "mathvision": Benchmark(3040, 48.8),
    "mathvista": Benchmark(1000, 73.1),
    "wemath": Benchmark(1740, 42.0, paper_metric="score_strict"),
    "logicvista": Benchmark(448, 52.3),
    "dynamath": Benchmark(5010, 27.5, paper_metric="worst_case"),
    "aime24": Benchmark(30, 53.3, samples=8),
    "aime25": Benchmark(30, 43.3, samples=8),
    "math500": Benchmark(500, 89.2),
    "gpqa": Benchmark(198, 47.5),
}
DATA_EXTS = (".parquet", ".arrow", ".tsv", ".jsonl", ".json", ".csv")  # the first wins for a split in several
_NOT_DATA = {"dataset_info", "dataset_dict", "state", "source", "readme"}  # metadata beside the data files


# ----------------------------------------------------------------------------------------------------------
# Reading tables and images


def _tsv_rows(path: str) -> Iterator[dict]:
    """VLMEvalKit's TSV (vlmeval/smp/file.py load, vlmeval/dataset/image_base.py): one row per item, the image
    base64-encoded in column `image`; a short `image` cell (<= 64 characters) is the `index` of the row whose
    image it shares (MathVerse's versions of a problem)."""
    csv.field_size_limit(1 << 30)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    by_index = {r.get("index"): r.get("image") for r in rows}
    for i, row in enumerate(rows):
        cell = row.get("image") or ""
        if 0 < len(cell) <= 64:
            if not by_index.get(cell) or len(by_index[cell]) <= 64:
                raise D.DataError(f"{path} row {i}: column 'image': {cell!r} names no row with an image")
            cell = by_index[cell]
        if cell.startswith("["):
            raise D.DataError(f"{path} row {i}: column 'image': several images per row are not supported")
        if cell:
            try:
                row["image"] = {"bytes": base64.b64decode(cell, validate=True), "path": None}
            except (binascii.Error, ValueError):
                raise D.DataError(f"{path} row {i}: column 'image': not base64") from None
        yield row


def _rows_of_file(path: str) -> Iterator[dict]:
    """Rows of one Parquet / Arrow / TSV / JSONL / JSON / CSV file, streamed where the format allows."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
            yield from batch.to_pylist()
    elif path.endswith(".arrow"):  # datasets' save_to_disk folders and load_dataset cache: Arrow IPC streams
        import pyarrow as pa

        with pa.memory_map(path) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                for k in range(reader.num_record_batches):
                    yield from reader.get_batch(k).to_pylist()
                return
            for batch in reader:
                yield from batch.to_pylist()
    elif path.endswith(".tsv"):
        yield from _tsv_rows(path)
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
            obj = [dict(v, _key=k) for k, v in obj.items()]  # {id: row} (MathVista, LogicVista releases)
        if not isinstance(obj, list):
            raise D.DataError(f"{path}: expected a list of rows (or {{id: row}}), got {type(obj).__name__}")
        yield from obj
    elif path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            yield from csv.DictReader(f)  # every value stays a string (GPQA's "1.50" must not become 1.5)
    else:
        raise D.DataError(f"{path}: unsupported file type (expected one of {', '.join(DATA_EXTS)})")


def _data_files(folder: str) -> list[str]:
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # e.g. huggingface-cli's .cache/
        for n in names:
            stem = os.path.splitext(n)[0].lower()
            if n.endswith(DATA_EXTS) and stem not in _NOT_DATA and not n.startswith("cache-"):
                out.append(os.path.join(root, n))
    return sorted(out)


def split_name(file: str) -> str:
    """The split (or config) a data file belongs to: Hugging Face shards `data/testmini-00000-of-00001-<hash>
    .parquet` -> testmini, `annot_testmini.json` -> testmini, a load_dataset cache `<builder>-<split>.arrow`
    -> split, save_to_disk `<split>/data-00000-of-00001.arrow` and parquet-converter `<split>/0000.parquet`
    -> the folder's name, anything else its stem (`gpqa_diamond.csv`, `testmini_text_only.parquet`)."""
    stem = re.sub(r"-\d{5}-of-\d{5}.*$", "", os.path.splitext(os.path.basename(file))[0].lower())
    if stem == "data" or stem.isdigit():
        stem = os.path.basename(os.path.dirname(file)).lower()
    elif file.endswith(".arrow") and "-" in stem:
        stem = stem.split("-", 1)[1]
    return re.sub(r"^annot_", "", stem)


def _variant(name: str) -> int:
    """DynaMath's variant of a split name: sample3 (DynaMath/DynaMath_Sample files), sample_variant3 (its
    split names, mirrors, the parquet-converter folders); 0 for anything else (sample_all)."""
    m = re.fullmatch(r"sample_?(?:variant)?_?(\d+)|variant_?(\d+)", name)
    return int(m.group(1) or m.group(2)) if m else 0


def _pick(bench: str, path: str, files: list[str], split: str | None) -> list[tuple[str, int]]:
    """(file, DynaMath variant) to read from a folder's data files: one split, or a clear error."""
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(split_name(f), []).append(f)
    for key, fs in groups.items():  # the same split in several formats: the first of DATA_EXTS wins
        best = min(DATA_EXTS.index(os.path.splitext(f)[1]) for f in fs)
        groups[key] = [f for f in fs if f.endswith(DATA_EXTS[best])]
    if bench == "dynamath" and not split and any(_variant(k) for k in groups):
        picked = [(f, _variant(k)) for k, fs in groups.items() if _variant(k) for f in fs]
        return sorted(picked, key=lambda fv: (fv[1], fv[0]))
    if split:
        if split.lower() not in groups:
            raise D.DataError(f"{bench}: {path} has no split {split!r} (found: {', '.join(sorted(groups))})")
        return [(f, 0) for f in groups[split.lower()]]
    # opencompass/AIME2025: I + II = 30
    if bench == "aime25" and set(groups) == {"aime2025-i", "aime2025-ii"}:
        return [(f, 0) for k in sorted(groups) for f in groups[k]]
    if len(groups) > 1:
        names = sorted(groups)
        raise D.DataError(
            f"{bench}: {path} holds several splits or configs ({', '.join(names)}): pick one with "
            f"--split {bench}={names[0]} (or point --bench at its file)"
        )
    return [(f, 0) for fs in groups.values() for f in fs]


def _table(bench: str, path: str, split: str | None = None) -> Iterator[tuple[str, dict, str]]:
    """(where, row, folder the row's relative image paths start from) for a file or a folder of files.
    DynaMath's rows get `_variant` (from its file names, or its TSV's varid column)."""
    if os.path.isdir(path):
        files = _data_files(path)
        if not files:
            raise D.DataError(f"{bench}: {path}: no {'/'.join(DATA_EXTS)} files here")
        picked = _pick(bench, path, files, split)
    elif os.path.isfile(path):
        picked = [(path, 0)]
    else:
        raise D.DataError(f"{bench}: {path}: no such file or folder")
    for f, variant in picked:
        for i, row in enumerate(_rows_of_file(f)):
            if not isinstance(row, dict):
                raise D.DataError(f"{bench}: {f} row {i}: a row must be an object, got {type(row).__name__}")
            where = f"{bench}: {f} row {i}"
            if bench == "dynamath":
                v = variant or _variant(split_name(f)) or row.get("varid")
                if not v:
                    raise D.DataError(
                        f"{where}: no variant: expected DynaMath's folder of sample1..10 files, a "
                        "sample_variant<N> file, or VLMEvalKit's DynaMath.tsv (column 'varid')"
                    )
                row = dict(row, _variant=int(v))
            yield where, row, os.path.dirname(os.path.abspath(f))


def _col(row: dict, where: str, *names: str, required: bool = True):
    """The first of `names` present with a non-empty value (alternatives for unverified columns)."""
    for n in names:
        v = row.get(n)
        if v is not None and not (isinstance(v, str) and not v.strip()):
            return v
    if required:
        alts = " or ".join(repr(n) for n in names)
        present = any(n in row for n in names)
        state = "is empty" if present else f"is missing (columns: {', '.join(map(str, row))})"
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
    if isinstance(value, str):  # relative to the data file's folder, its parent, or its images/ (LogicVista)
        places = (base, os.path.dirname(base), os.path.join(base, "images"))
        found = [p for p in (os.path.join(b, value) for b in places) if os.path.isfile(p)]
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


# An option label inside a question: "(A) yes" (DynaMath), "A:1" after "Choices:" (MathVerse), "A) 10" and
# "A. teddy bear" (LogicVista), at the start of a line or after a space.
_OPTION_MARK = re.compile(r"(?:^|(?<=\s))(?:\(([A-H])\)|([A-H])\s?[.:：)])(?=\s*\S)", re.M)


def options_in_text(text: str) -> list[str] | None:
    """The options a question lists in its own text, in order: the last run of labels A, B, C, ... (at least
    two); each option runs to the next label, the last to the end of its line. None when there is none."""
    runs: list[list[re.Match]] = []
    for m in _OPTION_MARK.finditer(text):
        letter = m.group(1) or m.group(2)
        if letter == "A":
            runs.append([m])
        elif runs and ord(letter) - 65 == len(runs[-1]) and m.start() > runs[-1][-1].end():
            runs[-1].append(m)
    runs = [r for r in runs if len(r) >= 2]
    if not runs:
        return None
    marks = runs[-1]
    ends = [m.start() for m in marks[1:]] + [text.find("\n", marks[-1].end()) % (len(text) + 1)]
    options = [text[m.end() : e].strip().rstrip(";,").strip() for m, e in zip(marks, ends)]
    return options if all(options) else None


def _image_cell(row: dict, *names: str) -> tuple[object, str]:
    for n in names:
        v = row.get(n)
        if isinstance(v, dict) and not (v.get("bytes") or v.get("path")):
            continue  # an empty struct (e.g. MathVerse text-only versions)
        if v is not None and v != "" and v != []:
            return v, n
    return None, ""


# Columns per benchmark, over every layout read (Hugging Face Parquet / Arrow, the GitHub release JSON,
# VLMEvalKit's TSV with `index` and a base64 `image`): ids, problem, gold, image (the first non-empty of the
# alternatives wins), and what the metrics keep in `meta`. Quirks in _row_fields.
COLUMNS = {
    "mathverse": (
        ("sample_index", "index"),
        ("query_cot", "question"),
        ("answer",),
        ("image", "decoded_image"),
        ("problem_version", "question_type", "problem_index"),
    ),
    "mathvision": (
        ("id", "index"),
        ("question",),
        ("answer",),
        ("decoded_image", "image"),
        ("level", "subject"),
    ),
    "mathvista": (
        ("pid", "_key", "index"),
        ("query", "question"),
        ("answer",),
        ("decoded_image", "image"),
        ("question_type", "answer_type", "precision", "unit"),
    ),
    "wemath": (
        ("ID",),
        ("question",),
        ("answer",),
        ("image_path", "image", "decoded_image"),
        ("key", "knowledge concept"),
    ),
    "logicvista": (
        ("id", "_key", "index"),
        ("question",),
        ("answer",),
        ("image", "imagename", "decoded_image"),
        ("skill",),
    ),
    "dynamath": (
        ("id", "qid"),
        ("question",),
        ("ground_truth", "answer"),
        ("decoded_image", "image"),
        ("answer_type", "subject", "knowledge_level"),
    ),
    "aime24": (("id",), ("problem", "question"), ("answer",), (), ()),
    "aime25": (("id",), ("problem", "question"), ("answer",), (), ()),
    "math500": (("unique_id", "id"), ("problem",), ("answer",), (), ("subject", "level")),
    "gpqa": (("Record ID",), ("Question",), ("Correct Answer",), (), ("Subdomain",)),
}


def _row_fields(bench: str, row: dict, where: str, index: int, seed: int) -> tuple:
    """(id, problem, answer, choices, meta, image cell, image column) of one benchmark row."""
    ids, problems, answers, images, keep = COLUMNS[bench]
    rid = _col(row, where, *ids, required=bench == "dynamath")
    rid = _text(index if rid is None else rid)
    if bench == "logicvista":  # v1_382 has an empty question and answer: kept (n = 448), graded wrong
        for names in (problems, answers):
            if not any(n in row for n in names):
                _col(row, where, *names)  # a missing column is still an error
        problem = _text(_col(row, where, *problems, required=False) or "")
        answer = _text(_col(row, where, *answers, required=False) or "")
    else:
        problem, answer = _text(_col(row, where, *problems)), _text(_col(row, where, *answers))
    meta = {k: row[k] for k in keep if row.get(k) is not None}
    choices = None
    if bench in ("mathvision", "mathvista"):  # a list column; empty = free form
        choices = [_text(c) for c in row.get("options" if bench == "mathvision" else "choices") or []] or None
        if meta.get("precision") is not None:
            p = meta["precision"]
            meta["precision"] = int(p) if p == p else None  # NaN != NaN: None
        if bench == "mathvista" and row.get("query"):
            meta["options_in_problem"] = True  # the official `query` prompt lists the choices itself
    elif bench == "wemath":  # HF: one string "A. 3;B. 4"; VLMEvalKit TSV: columns A, B, ...
        if row.get("option"):
            choices = _wemath_options(_text(row["option"]), where)
            problem = f"{problem}\n{_text(row['option'])}"  # lmms-eval prompt
            meta["options_in_problem"] = True
        else:
            choices = [_text(row[c]) for c in "ABCDEFGH" if row.get(c) not in (None, "")]
            if len(choices) < 2:
                _col(row, where, "option")
        answer, meta["group"] = answer.upper(), rid
        rid = f"{rid}_{meta['key']}" if "key" in meta else rid
    elif bench == "mathverse" and meta.get("question_type") == "multi-choice":
        choices = options_in_text(_text(row.get("question") or problem))
        meta["options_in_problem"] = True
    elif bench == "logicvista" and re.fullmatch(r"[a-hA-H](\s*,\s*[a-hA-H])*", answer):
        answer = answer.upper()
        choices = options_in_text(problem)
        meta["options_in_problem"] = True
    elif bench == "dynamath":
        rid = _text(row.get("qid") or rid)
        meta.update(qid=rid, variant=row["_variant"])
        rid = f"{rid}_v{row['_variant']}"
        if meta.get("answer_type") == "multiple choice":
            choices, meta["options_in_problem"] = options_in_text(problem), True
    elif bench == "gpqa":  # four options shuffled into A-D, fixed per item whatever the row order
        options = [answer] + [_text(_col(row, where, f"Incorrect Answer {i}")) for i in (1, 2, 3)]
        order = random.Random(f"gpqa:{seed}:{rid}").sample(range(4), 4)
        choices, answer = [options[i] for i in order], chr(65 + order.index(0))
    return rid, problem, answer, choices, meta, *_image_cell(row, *images)


def load_benchmark(
    label: str, path: str, cache_dir: str, limit: int | None = None, seed: int = 0, split: str | None = None
) -> list[D.Record]:
    """Records of one benchmark (images decoded into `cache_dir/<label>/`). A label that is not a benchmark
    name reads the project's JSONL records. `split` picks one split / config of a folder holding several.
    Bad input raises data.DataError naming bench, file, row and column."""
    if label not in BENCHMARKS:
        if not path.endswith(".jsonl"):
            raise D.DataError(
                f"{label}: unknown benchmark name for {path} (known: {', '.join(BENCHMARKS)}; any "
                "other label takes a .jsonl file in the project's record format)"
            )
        return D.load_records(path, limit=limit)
    records, seen = [], {}
    for index, (where, row, base) in enumerate(islice(_table(label, path, split), limit)):
        rid, problem, answer, choices, meta, cell, column = _row_fields(label, row, where, index, seed)
        if rid in seen:
            raise D.DataError(f"{where}: id {rid!r} appears twice (first at {seen[rid]})")
        seen[rid] = where
        images = []
        if cell is not None:
            dest = os.path.join(cache_dir, label, _safe_name(rid) + ".png")
            images = [_cache_image(cell, where, column, base, dest)]
        meta = {k: v for k, v in meta.items() if v is not None}
        record = D.Record(
            id=rid, problem=problem, answer=answer, images=images, choices=choices, source=where, meta=meta
        )
        records.append(record)
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
