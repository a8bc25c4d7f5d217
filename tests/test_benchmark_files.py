"""benchmarks.py on every layout users download (fixtures_bench.py cites where each schema was read): each loads
with its images, ids and answers; folders of several splits ask for --split; options inside question text
become choices for multiple-choice items only."""

import json
import os
import subprocess
import sys

import fixtures_bench as F
import pytest
from PIL import Image

import benchmarks as B
import data as D
from conftest import ROOT

ALL_LAYOUTS = [(label, fn, n, split) for label, (fn, n, split) in F.WRITERS.items() if label in B.BENCHMARKS]
ALL_LAYOUTS += [(label.split("_")[0], fn, n, None) for label, (fn, n) in F.OTHER_LAYOUTS.items()]


@pytest.mark.parametrize(
    "bench,writer,n,split", ALL_LAYOUTS, ids=[f"{b}-{w.__name__}" for b, w, _, _ in ALL_LAYOUTS]
)
def test_every_layout_loads_images_ids_answers(tmp_path, bench, writer, n, split):
    recs = B.load_benchmark(bench, writer(str(tmp_path / "data")), str(tmp_path / "cache"), split=split)
    assert len(recs) == n and len({r.id for r in recs}) == n
    for r in recs:
        for p in r.images:
            with Image.open(p) as im:
                assert im.size[0] >= 56
    text_only = bench in ("aime24", "aime25", "math500", "gpqa")
    assert all(r.images for r in recs if not (text_only or r.meta.get("problem_version") == "Text Only"))
    assert all(r.answer for r in recs if bench != "logicvista")


def test_logicvista_release_ids_images_and_blank_row(tmp_path):
    recs = B.load_benchmark("logicvista", F.write_logicvista(str(tmp_path)), str(tmp_path / "c"))
    assert [r.id for r in recs] == ["v1_1", "v1_19", "v1_20", "v1_382"]  # ids from the {id: row} keys
    assert all(Image.open(r.images[0]).size == (70, 56) for r in recs)  # images from `imagename` in images/
    assert [r.answer for r in recs] == ["A, C", "C", "3", ""] and recs[3].problem == ""
    assert recs[1].choices == ["10", "12", "14", "16"] and recs[1].meta["options_in_problem"]
    assert recs[2].choices is None  # "Select from 1-5": digits, no letter options
    assert recs[0].meta["skill"] == ["inductive"]
    hf = B.load_benchmark("logicvista", F.write_logicvista_hf(str(tmp_path)), str(tmp_path / "c2"))
    tsv = B.load_benchmark("logicvista", F.write_logicvista_tsv(str(tmp_path)), str(tmp_path / "c3"))
    assert [r.answer for r in hf] == [r.answer for r in tsv] == [r.answer for r in recs]
    assert [r.id for r in hf] == ["0", "1", "2", "3"] and [r.id for r in tsv] == ["0", "1", "2", "3"]


def test_dynamath_hf_file_names_and_vlmevalkit_tsv_agree(tmp_path):
    hf = B.load_benchmark("dynamath", F.write_dynamath(str(tmp_path)), str(tmp_path / "c1"))
    tsv = B.load_benchmark("dynamath", F.write_dynamath_tsv(str(tmp_path)), str(tmp_path / "c2"))

    def key(recs):
        return sorted(
            (r.id, r.answer, r.meta["qid"], r.meta["variant"], tuple(r.choices or ())) for r in recs
        )

    assert key(hf) == key(tsv) and len(hf) == 20
    assert {r.meta["variant"] for r in hf} == set(range(1, 11))
    mc = next(r for r in hf if r.id == "2_v4")
    assert mc.choices == ["yes", "no"] and mc.meta["options_in_problem"]
    assert next(r for r in hf if r.id == "1_v4").choices is None  # a float item: no choices


def test_dynamath_folder_with_sample_all_reads_the_variants(tmp_path):
    folder = F.write_dynamath(str(tmp_path))
    all_rows = [r for v in range(1, 11) for r in F._dynamath_rows(v)]
    sample_all = os.path.join(folder, "data", "sample_all-00000-of-00001.parquet")
    F.write_parquet(sample_all, all_rows, {"decoded_image": F.IMAGE_STRUCT})
    assert len(B.load_benchmark("dynamath", folder, str(tmp_path / "c"))) == 20


def test_vlmevalkit_tsv_image_references_and_wemath_option_columns(tmp_path):
    mv = B.load_benchmark("mathverse", F.write_mathverse_tsv(str(tmp_path)), str(tmp_path / "c1"))
    assert [Image.open(r.images[0]).getpixel((0, 0)) for r in mv] == [(0, 0, 255)] * 4  # rows 2-4 name row 1
    assert [r.id for r in mv] == ["1", "2", "3", "4"] and mv[1].answer == "(C)"
    tsv = B.load_benchmark("wemath", F.write_wemath_tsv(str(tmp_path)), str(tmp_path / "c2"))
    hf = B.load_benchmark("wemath", F.write_wemath(str(tmp_path)), str(tmp_path / "c3"))
    assert [(r.id, r.answer, r.choices, r.meta["group"]) for r in tsv] == [
        (r.id, r.answer, r.choices, r.meta["group"]) for r in hf
    ]


def test_bad_tsv_image_names_file_row_and_column(tmp_path):
    row = {"index": "0", "image": "not-base64!" * 10, "question": "q", "answer": "A"}
    path = F.write_tsv(str(tmp_path / "LogicVista.tsv"), [row])
    with pytest.raises(D.DataError, match=r"LogicVista.tsv row 0: column 'image': not base64"):
        B.load_benchmark("logicvista", path, str(tmp_path / "c"))
    row = {"index": "0", "image": "7", "question": "q", "answer": "A"}
    path = F.write_tsv(str(tmp_path / "x.tsv"), [row])
    with pytest.raises(D.DataError, match=r"x.tsv row 0: column 'image': '7' names no row"):
        B.load_benchmark("logicvista", path, str(tmp_path / "c"))


@pytest.mark.parametrize(
    "bench,writer,names",
    [
        ("mathverse", F.write_mathverse, "testmini, testmini_text_only"),
        ("mathvista", F.write_mathvista, "test, testmini"),
        ("mathvision", F.write_mathvision, "test, testmini"),
        ("gpqa", F.write_gpqa, "gpqa_diamond, gpqa_main"),
    ],
)
def test_folder_of_several_splits_names_them_and_the_flag(tmp_path, bench, writer, names):
    folder = writer(str(tmp_path))
    msg = rf"{bench}: .* holds several splits or configs \({names}\): pick one with --split {bench}="
    with pytest.raises(D.DataError, match=msg):
        B.load_benchmark(bench, folder, str(tmp_path / "c"))
    with pytest.raises(D.DataError, match=r"has no split 'dev' \(found: "):
        B.load_benchmark(bench, folder, str(tmp_path / "c"), split="dev")


def test_mathverse_text_only_config_and_split_files_preference(tmp_path):
    folder = F.write_mathverse(str(tmp_path))
    only = B.load_benchmark("mathverse", folder, str(tmp_path / "c"), split="testmini_text_only")
    assert [r.id for r in only] == ["t5"] and only[0].images == []
    mv = F.write_mathvista(str(tmp_path))  # annot_testmini.json (no images) beside the testmini Parquet
    with open(os.path.join(mv, "annot_testmini.json"), "w") as f:
        json.dump({r["pid"]: r for r in F.MATHVISTA_ROWS}, f)
    recs = B.load_benchmark("mathvista", mv, str(tmp_path / "c2"), split="testmini")
    assert len(recs) == 4 and all(len(r.images) == 1 for r in recs)  # the Parquet, with its images, wins


def test_split_names_of_real_files():
    cases = {
        "MathVista/data/testmini-00000-of-00001-725687bf7a18d64b.parquet": "testmini",
        "MathVista/annot_testmini.json": "testmini",
        "DynaMath_Sample/data/sample10-00000-of-00010.parquet": "sample10",
        "default/sample_variant3/0000.parquet": "sample_variant3",  # the parquet-converter branch
        "AI4Math___math_vista/default/0.0.0/abc/math_vista-testmini.arrow": "testmini",  # load_dataset cache
        "AI4Math___math_vista/default/0.0.0/abc/math_vista-test-00000-of-00002.arrow": "test",
        "saved/testmini/data-00000-of-00001.arrow": "testmini",  # save_to_disk DatasetDict
        "MathVerse/testmini_text_only.parquet": "testmini_text_only",
        "AIME2025/aime2025-II.jsonl": "aime2025-ii",
    }
    assert {p: B.split_name(p) for p in cases} == cases
    assert [B._variant(B.split_name(p)) for p in list(cases)[2:4]] == [10, 3]


def test_aime25_configs_i_and_ii_make_one_benchmark(tmp_path):
    recs = B.load_benchmark("aime25", F.write_aime25(str(tmp_path)), str(tmp_path / "c"))
    assert [(r.id, r.answer) for r in recs] == [("0", "104"), ("1", "9")]


@pytest.mark.parametrize(
    "text,options",
    [
        ("Find x.\nChoices:\nA:1\nB:3\nC:5\nD:7", ["1", "3", "5", "7"]),
        ("Is it continuous? choice: (A) yes (B) no", ["yes", "no"]),
        ("How many? Select answers from A-D. \n A) 10 B) 12 C) 14 D) 16", ["10", "12", "14", "16"]),
        (
            "What is the main object?\nOptions: A. teddy bear B. rabbit C. cat D. dog\nAnswer briefly.",
            ["teddy bear", "rabbit", "cat", "dog"],
        ),
        ("Which choices in the image (A-D) belong to the green category?", None),
        ("Point A. is above point C.", None),  # labels not in sequence A, B, ...
    ],
)
def test_options_in_text(text, options):
    assert B.options_in_text(text) == options


def test_datasets_cache_and_save_to_disk_folders_without_datasets(tmp_path):
    rows = F._mathvista_rows()
    cache = tmp_path / "AI4Math___math_vista" / "default" / "0.0.0" / "0123abcd"
    F.write_arrow_stream(str(cache / "math_vista-testmini.arrow"), rows, F._MATHVISTA_TYPES)
    F.write_arrow_stream(str(cache / "math_vista-test-00000-of-00002.arrow"), rows[:1], F._MATHVISTA_TYPES)
    # a .map() cache: skipped
    F.write_arrow_stream(str(cache / "cache-5f2a.arrow"), rows[:2], F._MATHVISTA_TYPES)
    (cache / "dataset_info.json").write_text("{}")
    with pytest.raises(D.DataError, match=r"several splits or configs \(test, testmini\)"):
        B.load_benchmark("mathvista", str(tmp_path / "AI4Math___math_vista"), str(tmp_path / "c"))
    recs = B.load_benchmark("mathvista", str(cache), str(tmp_path / "c"), split="testmini")
    assert [r.id for r in recs] == ["1", "2", "3", "4"] and all(len(r.images) == 1 for r in recs)
    saved = tmp_path / "saved"  # DatasetDict.save_to_disk: dataset_dict.json and one folder per split
    for split, part in (("testmini", rows), ("test", rows[:1])):
        F.write_arrow_stream(str(saved / split / "data-00000-of-00001.arrow"), part, F._MATHVISTA_TYPES)
        (saved / split / "state.json").write_text("{}")
    (saved / "dataset_dict.json").write_text('{"splits": ["testmini", "test"]}')
    assert len(B.load_benchmark("mathvista", str(saved), str(tmp_path / "c2"), split="testmini")) == 4


def test_cli_several_splits_is_one_clear_line(tmp_path):
    folder = F.write_mathverse(str(tmp_path))
    cmd = [sys.executable, "eval.py", "--bench", f"mathverse={folder}", "--out_dir", str(tmp_path / "o")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: mathverse: {folder} holds several splits or configs (testmini, testmini_text_only): pick one "
        "with --split mathverse=testmini (or point --bench at its file)"
    )
