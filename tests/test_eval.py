"""eval.py: every benchmark's loader on its real on-disk shape, end to end with the tiny model; scoring rules with
known answers (--score_only); resume without generating twice; bad input; generation config; 1 vs 2 ranks."""

import json
import os
import subprocess
import sys

import fixtures_bench as F
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import benchmarks as B
import data as D
import eval as E
import model as M
import policy as P
import sampling as S
from common import config_help, parse_config
from conftest import ROOT, make_image

MAX_NEW = 8


@pytest.fixture
def use_tiny(tiny, monkeypatch):
    """main() gets the session's tiny model instead of building one (the model is not modified)."""
    monkeypatch.setattr(M, "load_model", lambda *a, **k: tiny)
    return tiny


def _cfg(out_dir, bench: dict, **kw) -> E.EvalConfig:
    spec = ",".join(f"{label}={path}" for label, path in bench.items())
    fields = dict(model="tiny", bench=spec, out_dir=str(out_dir), max_new_tokens=MAX_NEW, batch_size=8)
    return E.EvalConfig(**{**fields, **kw})


PREDICTION_FIELDS = set("bench id sample response answer meta extracted correct truncated".split())


def _rows(out_dir) -> list[dict]:
    return E.read_predictions(os.path.join(out_dir, "predictions.jsonl"))


# ----------------------------------------------------------------------------------------------------------
# Every benchmark end to end


@pytest.fixture(scope="module")
def e2e(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    paths = F.write_all(str(root / "data"))
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M, "load_model", lambda *a, **k: tiny)
        results = E.main(_cfg(out, {label: p for label, (p, _) in paths.items()}, split=F.splits()))
    return paths, out, results


def test_every_benchmark_loads_and_runs_end_to_end(e2e):
    paths, out, results = e2e
    on_disk = json.load(open(out / "results.json"))
    assert on_disk == results and list(results) == list(paths)
    rows = _rows(out)
    for label, (_, n) in paths.items():
        r = results[label]
        k = 8 if label in ("aime24", "aime25") else 1
        mine = [row for row in rows if row["bench"] == label]
        assert r["n"] == n and len(mine) == n * k, label
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["truncated"] == sum(row["truncated"] for row in mine)
        assert all(set(row) >= PREDICTION_FIELDS for row in mine)
    assert len({(r["bench"], r["id"], r["sample"]) for r in rows}) == len(rows)
    assert set(results["mathverse"]["per_version"]) == {v for v, *_ in F.MATHVERSE_ROWS}
    assert {"average_case", "worst_case"} <= set(results["dynamath"])
    assert results["dynamath"]["questions"] == 2
    assert results["aime24"]["samples"] == 8 and "pass@8" in results["aime24"]
    assert results["wemath"]["four_dim"]["problems"] == 2 and "score_strict" in results["wemath"]
    assert results["logicvista"]["blank_gold"] == 1 and results["logicvista"]["n"] == 4  # v1_382 counted
    # images decoded into the cache; text-only items have none; multiple choice rows carry their choices
    assert len(os.listdir(out / "images" / "dynamath")) == 20
    mv = {r["id"]: r for r in rows if r["bench"] == "mathverse"}
    assert "choices" not in mv["3"] and mv["1"]["choices"] == ["1", "3", "5", "7"]
    assert mv["1"]["meta"]["problem_version"] == "Text Dominant"
    assert all(len(r["choices"]) == 4 and r["answer"] in "ABCD" for r in rows if r["bench"] == "gpqa")
    md = open(out / "results.md").read()
    assert "| gpqa | 3 |" in md and "47.5" not in md  # a partial benchmark never stands beside Table 2
    assert "| wemath | 8 |" in md and "(score_strict)" in md and "(worst_case)" in md
    assert "empty gold (LogicVista v1_382) are kept in n and counted wrong" in md


def test_aime_samples_differ_and_greedy_benchmarks_take_one(e2e):
    _, out, _ = e2e
    rows = _rows(out)
    aime = [r["response"] for r in rows if r["bench"] == "aime24" and r["id"] == "60"]
    assert len(aime) == 8 and len(set(aime)) > 1  # sampled at T=1 despite the checkpoint's top_k=1 trap
    assert {r["sample"] for r in rows if r["bench"] == "math500"} == {0}


# ----------------------------------------------------------------------------------------------------------
# Loader quirks


def test_mathvista_parquet_and_json_agree_gold_is_option_text(tmp_path):
    root = F.write_mathvista(str(tmp_path))
    a = B.load_benchmark("mathvista", root, str(tmp_path / "c1"), split="testmini")
    b = B.load_benchmark("mathvista", F.write_mathvista_json(str(tmp_path)), str(tmp_path / "c2"))
    c = B.load_benchmark("mathvista", F.write_mathvista_saved(str(tmp_path)), str(tmp_path / "c3"))
    for recs in (a, b, c):
        assert [r.problem for r in recs] == [r["query"] for r in F.MATHVISTA_ROWS]  # the official prompt
        mc = recs[0]
        assert mc.choices == ["4.5", "3", "7"] and mc.answer == "4.5"
        assert recs[2].meta["precision"] == 2 and recs[2].meta["answer_type"] == "float"
        assert "precision" not in recs[1].meta and recs[1].choices is None
        assert all(len(r.images) == 1 and os.path.isfile(r.images[0]) for r in recs)
    assert [r.id for r in a] == [r.id for r in b] == [r.id for r in c] == ["1", "2", "3", "4"]
    assert Image.open(a[0].images[0]).size == (56, 84)  # decoded_image (the struct) wins over the path column


def test_wemath_one_string_options_and_group_ids(tmp_path):
    recs = B.load_benchmark("wemath", F.write_wemath(str(tmp_path)), str(tmp_path / "c"))
    assert [r.id for r in recs] == [f"{i}_{k}" for i, k, _, _ in F.WEMATH_ITEMS]
    assert recs[0].choices == ["3", "4", "5", "6"] and recs[7].choices == ["30°", "60°"]
    assert recs[2].meta == {
        "group": "1",
        "key": "2steps_multi",
        "knowledge concept": "Area",
        "options_in_problem": True,
    }
    assert recs[0].problem == "Step 2steps_1?\nA. 3;B. 4;C. 5;D. 6"  # lmms-eval: question + "\n" + option
    assert B._wemath_options("A. x; y;B. (B) z", "w") == ["x; y", "(B) z"]
    with pytest.raises(D.DataError, match="column 'option'"):
        B._wemath_options("A) 1 / B) 2", "wemath: f row 3")


def test_dynamath_folder_of_variants(tmp_path):
    recs = B.load_benchmark("dynamath", F.write_dynamath(str(tmp_path)), str(tmp_path / "c"))
    assert len(recs) == 20 and recs[0].id == "1_v1" and recs[-1].id == "2_v10"
    assert recs[-1].meta["variant"] == 10 and recs[-1].meta["qid"] == "2" and recs[0].answer == "2.094"
    sample3 = os.path.join(tmp_path, "DynaMath_Sample", "data", "sample3-00000-of-00003.parquet")
    one = B.load_benchmark("dynamath", sample3, str(tmp_path / "c1"))
    assert [r.id for r in one] == ["1_v3", "2_v3"]  # a single variant file keeps its variant
    types = {"decoded_image": F.IMAGE_STRUCT}
    bad = F.write_parquet(str(tmp_path / "dyn" / "test.parquet"), F._dynamath_rows(1), types)
    with pytest.raises(D.DataError, match="no variant"):
        B.load_benchmark("dynamath", bad, str(tmp_path))


def test_mathverse_prefers_query_cot_else_question(tmp_path):
    path = os.path.join(F.write_mathverse(str(tmp_path)), "testmini.parquet")
    recs = B.load_benchmark("mathverse", path, str(tmp_path / "c"))
    assert recs[0].problem.startswith("Please first conduct reasoning") and recs[4].images == []
    pq.write_table(pq.read_table(path).drop(["query_cot"]), path)
    recs = B.load_benchmark("mathverse", path, str(tmp_path / "c"))
    assert recs[0].problem == "Find x.\nChoices:\nA:1\nB:3\nC:5\nD:7"


def test_gpqa_shuffle_is_fixed_and_gold_is_the_letter(tmp_path):
    path = os.path.join(F.write_gpqa(str(tmp_path)), "gpqa_diamond.csv")
    a = B.load_benchmark("gpqa", path, str(tmp_path), seed=0)
    b = B.load_benchmark("gpqa", path, str(tmp_path), seed=0)
    c = B.load_benchmark("gpqa", path, str(tmp_path), seed=1)
    assert [r.choices for r in a] == [r.choices for r in b]
    assert [r.choices for r in a] != [r.choices for r in c]
    for rec, row in zip(a, F.GPQA_ROWS):
        assert rec.choices[ord(rec.answer) - 65] == row["Correct Answer"]
        assert sorted(rec.choices) == sorted(v for k, v in row.items() if "Answer" in k)
    assert "1.50" in a[1].choices  # CSV values stay strings


def test_aime_math500_logicvista_columns(tmp_path):
    a25 = B.load_benchmark("aime25", F.write_aime25(str(tmp_path)), str(tmp_path))
    want = [("0", "Compute 100 + 4.", "104"), ("1", "Compute 5 + 4.", "9")]
    assert [(r.id, r.problem, r.answer) for r in a25] == want
    m5 = B.load_benchmark("math500", F.write_math500(str(tmp_path)), str(tmp_path), limit=2)
    assert [r.id for r in m5] == ["test/algebra/0.json", "test/algebra/1.json"]
    assert m5[0].answer == "\\frac{1}{2}"
    lv = F.write_jsonl(str(tmp_path / "lv" / "t.jsonl"), [{"id": 1, "question": "q", "answer": "a, c"}])
    assert B.load_benchmark("logicvista", lv, str(tmp_path))[0].answer == "A, C"


def test_project_jsonl_for_any_other_label(tmp_path):
    recs = B.load_benchmark("my_split", F.write_project(str(tmp_path)), str(tmp_path / "c"))
    assert [r.id for r in recs] == ["a", "b"] and recs[1].choices == ["3", "4"] and len(recs[0].images) == 1


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear error naming benchmark, row and column


def test_unknown_benchmark_name_for_non_jsonl(tmp_path):
    path = F.write_mathvista(str(tmp_path))
    with pytest.raises(D.DataError, match="mathvistaa: unknown benchmark name"):
        B.load_benchmark("mathvistaa", path, str(tmp_path))


def test_missing_column_names_bench_row_and_column(tmp_path):
    rows = [dict(r, decoded_image=F.image_struct()) for r in F.MATHVISTA_ROWS]
    for r in rows:
        del r["question"], r["query"]
    path = F.write_parquet(str(tmp_path / "mv.parquet"), rows, {"decoded_image": F.IMAGE_STRUCT})
    with pytest.raises(
        D.DataError, match=r"mathvista: .*mv.parquet row 0: column 'query' or 'question' is missing"
    ):
        B.load_benchmark("mathvista", path, str(tmp_path))
    aime = F.write_jsonl(str(tmp_path / "a.jsonl"), [{"prompt": "x", "answer": "1"}])
    with pytest.raises(D.DataError, match="column 'problem' or 'question' is missing"):
        B.load_benchmark("aime25", aime, str(tmp_path))


def test_undecodable_image_bytes_name_row_and_column(tmp_path):
    rows = [dict(r, decoded_image=F.image_struct()) for r in F.MATHVISTA_ROWS]
    rows[1]["decoded_image"] = {"bytes": b"\x89PNG not really", "path": "2.png"}
    path = F.write_parquet(str(tmp_path / "mv.parquet"), rows, {"decoded_image": F.IMAGE_STRUCT})
    with pytest.raises(
        D.DataError, match=r"mathvista: .* row 1: column 'decoded_image': cannot decode image"
    ):
        B.load_benchmark("mathvista", path, str(tmp_path / "c"))


def test_cli_bad_input_exits_with_one_line_and_help_lists_fields(tmp_path):
    path = F.write_mathvista(str(tmp_path))
    cmd = [sys.executable, "eval.py", "--bench", f"foo={path}", "--out_dir", str(tmp_path / "o")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: foo: unknown benchmark name"), r.stderr[-2000:]
    cfg = parse_config(E.EvalConfig, ["--blank_images", "--bench", "a=b.jsonl", "--samples", "4"])
    assert cfg.blank_images and cfg.bench == "a=b.jsonl" and cfg.samples == 4  # a bare flag, as in CONTRACT
    text = config_help(E.EvalConfig)
    names = ("samples", "blank_images", "score_only", "limit", "max_prompt_len", "split")
    assert all(f"--{name}" in text for name in names)


# ----------------------------------------------------------------------------------------------------------
# Scoring with known answers (--score_only)


def _pred(bench, rid, response, answer, sample=0, **kw):
    return dict(bench=bench, id=rid, sample=sample, response=response, answer=answer, **kw)


SCORED = [
    # MathVista: gold is the option text; a letter or the text grade; floats rounded to `precision`
    _pred("mathvista", "1", "\\boxed{A}", "4.5", choices=["4.5", "3", "7"], meta={"answer_type": "text"}),
    _pred(
        "mathvista", "2", "so \\boxed{4.5}", "4.5", choices=["4.5", "3", "7"], meta={"answer_type": "text"}
    ),
    _pred("mathvista", "3", "\\boxed{B}", "4.5", choices=["4.5", "3", "7"], meta={"answer_type": "text"}),
    _pred("mathvista", "4", "\\boxed{1.4512}", "1.45", meta={"answer_type": "float", "precision": 2}),
    _pred("mathvista", "5", "\\boxed{1.46}", "1.45", meta={"answer_type": "float", "precision": 2}),
    # LogicVista: letter sets
    _pred("logicvista", "1", "\\boxed{C, A}", "A, C"),
    _pred("logicvista", "2", "\\boxed{AC}", "A, C"),
    _pred("logicvista", "3", "\\boxed{A}", "A, C"),
    _pred("logicvista", "4", "\\boxed{A, B, C}", "A, C"),
    # MATH-500: LaTeX equivalence, nested braces, a stated (unboxed) final answer; near misses
    _pred("math500", "1", "\\boxed{0.5}", "\\frac{1}{2}"),
    _pred("math500", "2", "<think>x</think> \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    _pred("math500", "3", "Thus the answer is \\frac{1}{2}.", "\\frac{1}{2}"),
    _pred("math500", "4", "\\boxed{0.51}", "\\frac{1}{2}"),
    _pred("math500", "5", "\\boxed{\\frac{1}{3}}", "\\frac{1}{2}"),
    _pred("math500", "6", "The answer is 1/2, but let me check again whether", "\\frac{1}{2}"),
    # GPQA: the letter or the option text
    _pred("gpqa", "1", "\\boxed{C}", "C", choices=["sodium", "iron", "argon", "carbon"]),
    _pred("gpqa", "2", "\\boxed{argon}", "C", choices=["sodium", "iron", "argon", "carbon"]),
    _pred("gpqa", "3", "\\boxed{D}", "C", choices=["sodium", "iron", "argon", "carbon"]),
    # DynaMath: floats within 1e-3; worst case needs every variant of a question right
    _pred("dynamath", "1_v1", "\\boxed{3.1416}", "3.14159", meta={"qid": "1", "answer_type": "float"}),
    _pred("dynamath", "1_v2", "\\boxed{2.002}", "2.0", meta={"qid": "1", "answer_type": "float"}),
    _pred("dynamath", "2_v1", "\\boxed{A}", "A", meta={"qid": "2", "answer_type": "multiple choice"}),
    _pred("dynamath", "2_v2", "The answer is A", "A", meta={"qid": "2", "answer_type": "multiple choice"}),
    # MathVerse: per problem_version
    _pred("mathverse", "1", "\\boxed{B}", "B", meta={"problem_version": "Text Lite"}),
    _pred("mathverse", "2", "\\boxed{3}", "3", meta={"problem_version": "Text Dominant"}),
    _pred("mathverse", "3", "\\boxed{4}", "3", meta={"problem_version": "Text Dominant"}),
]
# WeMath: a two-step group with both steps right and the composite wrong (inadequate generalization)
SCORED += [
    _pred("wemath", f"1_{key}", response, gold, choices=["3", "4"], meta={"group": "1", "key": key})
    for key, response, gold in [
        ("2steps_1", "\\boxed{A}", "A"),
        ("2steps_2", "\\boxed{4}", "B"),
        ("2steps_multi", "\\boxed{A}", "B"),
    ]
]
# AIME: K = 4 samples per item; leading zeros; near misses; no stated answer
SCORED += [
    _pred("aime24", "7", r, "7", sample=s)
    for s, r in enumerate(["\\boxed{007}", "\\boxed{70}", "\\boxed{7.5}", "I think it is 7 or so"])
]
SCORED += [
    _pred("aime24", "24", r, "24", sample=s)
    for s, r in enumerate(["\\boxed{240}", "\\boxed{23}", "\\boxed{24.1}", "\\boxed{2 4 0}"])
]


def test_score_only_reproduces_known_accuracies(tmp_path):
    src = tmp_path / "saved.jsonl"
    F.write_jsonl(str(src), SCORED)
    res = E.main(E.EvalConfig(score_only=str(src), out_dir=str(tmp_path / "o")))
    assert res["mathvista"]["accuracy"] == 3 / 5
    assert res["logicvista"]["accuracy"] == 2 / 4
    assert res["math500"]["accuracy"] == 3 / 6
    assert res["gpqa"]["accuracy"] == 2 / 3
    assert res["dynamath"]["accuracy"] == 3 / 4 and res["dynamath"]["worst_case"] == 1 / 2
    assert res["mathverse"]["accuracy"] == 2 / 3
    assert res["mathverse"]["per_version"] == {
        "Text Dominant": {"accuracy": 0.5, "n": 2},
        "Text Lite": {"accuracy": 1.0, "n": 1},
    }
    assert res["wemath"]["accuracy"] == 2 / 3 and res["wemath"]["four_dim"]["IG"] == 1.0
    assert res["aime24"] == {"accuracy": (1 / 4 + 0) / 2, "n": 2, "truncated": 0, "samples": 4, "pass@4": 0.5}
    assert json.load(open(tmp_path / "o" / "results.json")) == res
    rows = {(r["bench"], r["id"], r["sample"]): r for r in _rows(tmp_path / "o")}
    assert rows[("aime24", "7", 0)]["extracted"] == "007" and rows[("aime24", "7", 0)]["correct"]
    assert not rows[("math500", "6", 0)]["correct"] and not rows[("math500", "4", 0)]["correct"]


def test_paper_numbers_only_for_complete_benchmarks(tmp_path):
    for n, shown in ((30, True), (29, False)):
        src = tmp_path / f"p{n}.jsonl"
        rows = [_pred("aime24", str(i), "\\boxed{1}", "1", sample=s) for i in range(n) for s in range(2)]
        F.write_jsonl(str(src), rows)
        E.main(E.EvalConfig(score_only=str(src), out_dir=str(tmp_path / f"o{n}")))
        assert ("53.3" in open(tmp_path / f"o{n}" / "results.md").read()) == shown


# ----------------------------------------------------------------------------------------------------------
# Resume: nothing generated twice


_GENERATE_BATCH = E._generate_batch


class Interrupted(Exception):
    pass


def _count_generated(monkeypatch, fail_after: int | None = None) -> list[int]:
    """Count the jobs sent to generate (and optionally die after `fail_after` batches, like a killed run)."""
    calls: list[int] = []

    def counting(hf, processor, jobs, *a, **k):
        if fail_after is not None and len(calls) >= fail_after:
            raise Interrupted
        calls.append(len(jobs))
        return _GENERATE_BATCH(hf, processor, jobs, *a, **k)

    monkeypatch.setattr(E, "_generate_batch", counting)
    return calls


def test_limit_then_full_run_generates_only_the_rest(use_tiny, tmp_path, monkeypatch):
    bench = {"math500": F.write_math500(str(tmp_path)), "custom": F.write_project(str(tmp_path))}
    calls = _count_generated(monkeypatch)
    res = E.main(_cfg(tmp_path / "o", bench, limit=2))
    assert sum(calls) == 4 and res["math500"]["n"] == 2
    calls.clear()
    res = E.main(_cfg(tmp_path / "o", bench))
    assert sum(calls) == 2 and res["math500"]["n"] == 4 and res["custom"]["n"] == 2
    rows = _rows(tmp_path / "o")
    assert len(rows) == 6 == len({(r["bench"], r["id"], r["sample"]) for r in rows})
    with pytest.raises(E.ConfigError, match="max_new_tokens"):  # another decoding setup never mixes in
        E.main(_cfg(tmp_path / "o", bench, max_new_tokens=4))


def test_interrupted_run_resumes_without_regenerating(use_tiny, tmp_path, monkeypatch):
    bench = {"math500": F.write_math500(str(tmp_path)), "gpqa": F.write_gpqa(str(tmp_path))}
    cfg = _cfg(tmp_path / "o", bench, batch_size=1, split="gpqa=gpqa_diamond")
    _count_generated(monkeypatch, fail_after=2)
    with pytest.raises(Interrupted):
        E.main(cfg)
    assert len(_rows(tmp_path / "o")) == 2  # appended batch by batch
    with open(tmp_path / "o" / "predictions.jsonl", "a") as f:
        f.write('{"bench": "math500", "id": "test/alg')  # a line cut by the kill
    calls = _count_generated(monkeypatch)
    res = E.main(cfg)
    assert sum(calls) == 5 and res["math500"]["n"] == 4 and res["gpqa"]["n"] == 3
    rows = _rows(tmp_path / "o")
    assert len(rows) == 7 == len({(r["bench"], r["id"], r["sample"]) for r in rows})


# ----------------------------------------------------------------------------------------------------------
# Generation: complete config, EOS / truncation, batching and sharding, blank images, the in-loop API


def test_every_generate_call_gets_a_complete_config(tiny, monkeypatch):
    m, p = tiny
    seen = []
    real = m.generate

    def spy(**kw):
        out = real(**kw)
        seen.append((kw, out[:, kw["input_ids"].shape[1] :]))
        return out

    monkeypatch.setattr(m, "generate", spy)
    rec = D.Record(id="q", problem="What is 3 plus 4?", answer="7")
    res = E.evaluate_records(
        m, p, [rec], max_new_tokens=MAX_NEW, batch_size=4, samples=4, temperature=1.0, top_p=0.95
    )
    assert len({r["response"] for r in res["responses"]}) > 1  # the trap's top_k=1 would make them identical
    E.evaluate_records(m, p, [rec], max_new_tokens=MAX_NEW, batch_size=4)
    vision = set(S.vision_special_ids(p.tokenizer))
    eos = {p.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    for (kw, new), sampled in zip(seen, (True, False)):
        gc = kw["generation_config"]
        assert gc.do_sample == sampled and gc.top_k == 0 and gc.repetition_penalty == 1.0
        assert (
            gc.temperature == 1.0 and gc.top_p == (0.95 if sampled else 1.0) and gc.max_new_tokens == MAX_NEW
        )
        assert set(gc.eos_token_id) == eos and gc.pad_token_id == p.tokenizer.pad_token_id
        assert set(gc.suppress_tokens) == vision and not vision & set(new.flatten().tolist())
        assert kw["synced_gpus"] is False


def test_split_completion_marks_truncation():
    eos = {9, 10}
    assert S.split_completion([1, 2, 9, 10, 10], eos) == ([1, 2, 9], False)
    assert S.split_completion([1, 2, 3], eos) == ([1, 2, 3], True)
    assert S.split_completion([10], eos) == ([10], False)


def test_batches_sorted_by_length_and_same_for_any_world_size():
    lengths = [5, 9, 1, 9, 3, 7, 2]
    batches = E.plan_batches(lengths, 2)
    assert batches == [[1, 3], [5, 0], [4, 6], [2]]
    for world in (2, 3):  # rank r takes batches r, r + W, ...: together exactly the same batches
        shards = [batches[r::world] for r in range(world)]
        assert sorted(b for s in shards for b in s) == sorted(batches)


def test_prompt_length_matches_encode_prompt(tiny, tmp_path):
    m, p = tiny
    imgs = [make_image(str(tmp_path / "a.png"), (56, 84)), make_image(str(tmp_path / "b.png"), (140, 56))]
    for rec in (
        D.Record(id="1", problem="Add them.", answer="1", images=imgs),
        D.Record(id="2", problem="Which?", answer="A", choices=["x", "y"]),
    ):
        for placement in ("system", "user"):
            n = len(D.encode_prompt(rec, p, D.REASONING_PROMPT, placement).input_ids)
            assert D.prompt_length(rec, p, D.REASONING_PROMPT, placement) == n


def test_blank_images_keep_sizes(tiny, tmp_path):
    a = make_image(str(tmp_path / "a.png"), (56, 84), "red")
    b = make_image(str(tmp_path / "b.png"), (84, 56), "blue")
    recs = [D.Record(id="1", problem="How many?", answer="1", images=[a, b], source="t:1")]
    blank = B.blank_record_images(recs, str(tmp_path / "blank"))
    assert recs[0].images == [a, b]
    for path, size in zip(blank[0].images, [(56, 84), (84, 56)]):
        im = Image.open(path)
        assert im.size == size and im.convert("L").getextrema() == (255, 255)
    res = E.evaluate_records(*tiny, recs, max_new_tokens=MAX_NEW, batch_size=2, blank_images=True)
    assert res["n"] == 1


def test_evaluate_records_for_in_loop_validation(tiny, tmp_path):
    m, p = tiny
    img = make_image(str(tmp_path / "a.png"))
    recs = [
        D.Record(id="1", problem="How many shapes?", answer="3", images=[img], source="t:1"),
        D.Record(id="2", problem="What is 3 plus 4?", answer="7", source="t:2"),
        D.Record(id="3", problem="Pick one.", answer="A", choices=["x", "y"], source="t:3"),
    ]
    policy = P.Policy(m)
    policy.train()
    try:
        kw = dict(prompt=D.REASONING_PROMPT, placement="user", max_new_tokens=MAX_NEW)
        res = E.evaluate_records(policy, p, recs, **kw, batch_size=2, dist=None, temperature=0.0)
        assert policy.training  # gathered_for_generation restores the mode
    finally:
        m.eval()
    assert {"accuracy", "format", "resp_len", "truncated", "n", "responses"} <= set(res)
    assert res["n"] == 3 and len(res["responses"]) == 3 and 1 <= res["resp_len"] <= MAX_NEW
    assert 0.0 <= res["format"] <= 1.0 and res["truncated"] == sum(r["truncated"] for r in res["responses"])
    again = E.evaluate_records(
        m, p, recs, prompt=D.REASONING_PROMPT, placement="user", max_new_tokens=MAX_NEW, batch_size=3
    )
    assert [r["response"] for r in again["responses"]] == [r["response"] for r in res["responses"]]


# ----------------------------------------------------------------------------------------------------------
# Distributed: greedy predictions are the same with 1 and 2 processes


def _train_tiny(out_dir: str, steps: int = 50) -> None:
    """A briefly trained tiny checkpoint (plain torch, cross-entropy on templated sums), so greedy decoding
    has clear winners instead of a random model's near-ties."""
    torch.manual_seed(0)
    m, p = M.load_model("tiny", seed=0)
    pairs = [(3, 4), (2, 5), (6, 1), (8, 3), (5, 5), (9, 2), (7, 7), (4, 1)]
    recs = []
    for i, (a, b) in enumerate(pairs):
        solution = f"<think>{a} + {b} = {a + b}.</think> The answer is \\boxed{{{a + b}}}."
        recs.append(
            D.Record(id=str(i), problem=f"What is {a} plus {b}?", answer=str(a + b), solution=solution)
        )
    batch = D.collate_sft([D.encode_prompt(r, p) for r in recs], p.tokenizer, m.config.image_token_id)
    keep = ("input_ids", "attention_mask", "labels", "mm_token_type_ids")
    batch = {k: v for k, v in batch.items() if k in keep}
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    m.train()
    for _ in range(steps):
        loss = m(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    M.save_model(m.eval(), p, out_dir, metadata={"prompt": D.REASONING_PROMPT, "placement": "system"})


@pytest.fixture
def trained_tiny(request, tmp_path) -> str:
    """conftest's shared SFT checkpoint when there is one (session-scoped), else 50 plain-torch steps here."""
    try:
        return os.path.join(request.getfixturevalue("sft_tiny")[0], "final")
    except pytest.FixtureLookupError:
        _train_tiny(str(tmp_path / "ckpt"))
        return str(tmp_path / "ckpt")


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_same_greedy_predictions(trained_tiny, tmp_path):
    ckpt = trained_tiny
    paths = {
        "math500": F.write_math500(str(tmp_path)),
        "mathvista": F.write_mathvista(str(tmp_path)),
        "custom": F.write_project(str(tmp_path)),
    }
    bench = ",".join(f"{k}={v}" for k, v in paths.items())
    args = ["eval.py", "--model", ckpt, "--bench", bench, "--max_new_tokens", "24", "--batch_size", "2"]
    args += ["--split", "mathvista=testmini"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    outs = {}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    for name, launcher in (("one", [sys.executable]), ("two", torchrun)):
        out = str(tmp_path / name)
        cmd = launcher + args + ["--out_dir", out]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = {(x["bench"], x["id"], x["sample"]): x for x in _rows(out)}
    assert len(outs["one"]) == 10 and outs["one"].keys() == outs["two"].keys()
    for key, row in outs["one"].items():
        assert outs["two"][key]["response"] == row["response"], key
    assert any(not r["truncated"] for r in outs["one"].values())  # the trained model stops on its own
    one, two = (json.load(open(tmp_path / name / "results.json")) for name in ("one", "two"))
    assert one == two


def test_split_flag_for_every_or_one_benchmark():
    assert E.parse_split("testmini", ["mathverse", "mathvista"]) == {
        "mathverse": "testmini",
        "mathvista": "testmini",
    }
    assert E.parse_split("gpqa=gpqa_diamond,mathvista=testmini", ["gpqa", "mathvista", "x"]) == {
        "gpqa": "gpqa_diamond",
        "mathvista": "testmini",
    }
    assert E.parse_split(None, ["gpqa"]) == {}
    msg = r"--split: expected LABEL=NAME with LABEL one of \['gpqa'\], got 'gqpa=x'"
    with pytest.raises(E.ConfigError, match=msg):
        E.parse_split("gqpa=x", ["gpqa"])
