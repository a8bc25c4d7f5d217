"""Benchmark evaluation: load the ten benchmarks of paper Table 2 from local copies, generate, grade, report.

    python eval.py --model DIR|tiny --bench LABEL=PATH[,LABEL=PATH...] --out_dir DIR [--samples K] [--blank_images]
    torchrun --nproc_per_node N eval.py ...                 (whole generation batches are sharded over ranks)
    python eval.py --score_only predictions.jsonl --out_dir DIR          (re-grade saved responses, no model)

Writes `out_dir/predictions.jsonl` (one line per item and sample, appended batch by batch: a rerun skips every
(bench, id, sample) already there), `out_dir/results.json`, `out_dir/results.md` and prints the table.
`evaluate_records` is the same generate-and-grade loop for in-training validation (no files, FSDP-safe).

The loaders (benchmarks.py) read what users download (a file, or a folder: `--split NAME` or
`--split LABEL=NAME,...` picks one split / config where a folder holds several) and the project's JSONL
records for any other label. Images are decoded once and cached as PNG under `out_dir/images/<bench>/`.
Scoring (scoring.py) follows each benchmark's own rule; its docstring cites the official code.

Per benchmark. Layouts: HF = the Hugging Face dataset repo's Parquet under its real names (and the same data
as a `save_to_disk` folder or `load_dataset` cache, read as Arrow), GH = the benchmark's GitHub release
(JSON + image folder), VK = VLMEvalKit's TSV (base64 images). n = the split size Table 2 used.

| bench | layouts read | prompt (user turn; our reasoning prompt in the system turn) | official metric (results key beside Table 2) | where ours departs | n |
|---|---|---|---|---|---|
| mathverse | HF `testmini.parquet` (`--split testmini`; `testmini_text_only` is the other config), VK `MathVerse_MINI.tsv` | `query_cot` (official CoT query), else `question` | GPT-extracted answer judged by GPT, overall accuracy (`accuracy`) and per version | rule-based: letters, letter sets ("A\\nC"), option text from "Choices:" in the question, math-verify for free form | 3,940 |
| mathvision | HF `data/test-*.parquet` (`--split test`; `testmini` = 304) | `question` + options A-E | GPT-extracted answer, accuracy (`accuracy`) | rule-based: letter or option value, math-verify | 3,040 |
| mathvista | HF `data/testmini-*.parquet` (`--split testmini`), GH `testmini.json` / `annot_testmini.json` | `query` (official: hint with answer type, precision, unit; lists the choices) | GPT extraction, then `int(float(x))` / `round(x, precision)` / option text, accuracy (`accuracy`) | extraction by rules (box or stated answer, value after units and constants); no edit-distance fall-back to the nearest option | 1,000 |
| wemath | HF `data/testmini-*.parquet` (one `option` string), VK `WeMath.tsv` (options in columns A-E) | `question` + "\\n" + `option` (lmms-eval) | four dimensions, Score (Strict) (`score_strict`; `score_loose` too) | letter / option text by rules, not "first letter after 'Answer'"; P = complete problems present (official: fixed 525) | 1,740 (525 problems) |
| logicvista | HF `lscpku/LogicVista` test, GH `data/dataset.json` (ids from keys, `imagename` in `images/`), VK `LogicVista.tsv` | `question` | GPT-extracted letters, sorted-set match, accuracy over all 448 (`accuracy`) | rules instead of the GPT extractor; option text counts when options are in the question; the blank row v1_382 is counted wrong (results: `blank_gold`) | 448 |
| dynamath | HF folder `data/sample1..10-*.parquet` (also `sample_variantN` files / folders), VK `DynaMath.tsv` (`qid`, `varid`) | `question` | JSON "short answer" (GPT fall-back); float within 1e-3, letter, text substring; worst case over 10 variants (`worst_case`) | answer from the box by rules; float tolerance on the evaluated value (2\\pi/3 counts); text answers by equivalence, not substring | 5,010 (501 x 10) |
| aime24 | HF `data/train-*.parquet`, JSONL | `problem` | mean accuracy over K samples (`accuracy`, K = 8) | | 30 |
| aime25 | `math-ai/aime25` JSONL, `opencompass/AIME2025` `aime2025-I.jsonl` + `-II.jsonl` (read together) | `problem` / `question` | mean accuracy over K samples (`accuracy`, K = 8) | | 30 |
| math500 | HF `test.jsonl` | `problem` | MATH equivalence (`accuracy`) | math-verify + exact rationals; a rounded decimal is wrong for a non-terminating fraction | 500 |
| gpqa | `gpqa_diamond.csv` (`--split gpqa_diamond` in the repo folder) | `Question` + the four answers shuffled into A-D (fixed seed) | letter match (`accuracy`) | letter or option text | 198 |

Decoding: greedy, K = 1, except aime24 / aime25: K = 8 samples at temperature 1.0, top-p 0.95 (accuracy is
the mean over samples; pass@K is reported too). Every `generate` call gets a complete generation config
(PITFALLS: the checkpoints' own generation_config.json sets top_k=1 and repetition_penalty=1.05).

How scoring departs from the released ReVisual-R1 evaluation
-------------------------------------------------------------
* The answer is the last `\\boxed{}` found by brace matching (the released regex `\\boxed{([^}]+)}` cuts
  `\\boxed{\\frac{1}{2}}`), or, without a box, a final answer stated in the response's last sentence
  (reward.grade with require_boxed=False). Its fall-back that compares only the alphabetic characters
  (so any numeric answer counted as correct) is gone: a response with no stated answer is wrong.
* Multiple choice grades the letter and the option text alike; options a question lists in its own text
  are parsed into choices for multiple-choice items only. Each benchmark's own rules (table above).
* Benchmark scoring is strict where the RL reward is lenient: a rounded decimal never stands for a
  non-terminating fraction (reward.grade(strict=True)).
* Truncated responses (no EOS within max_new_tokens) are graded as they are and counted per benchmark.
* results.md shows, per benchmark, the metric Table 2 reports (strict score for WeMath, worst case for
  DynaMath, mean over samples for AIME, accuracy elsewhere) and Table 2's number beside it only when the
  benchmark was evaluated in full (n equals the published size, no --limit).
* `--score_only` derives what the metrics need from ids and fields (DynaMath `<qid>_v<N>`, WeMath
  `<ID>_<key>`) and refuses, naming line and field, what it cannot (a DynaMath / MathVista numeric gold
  without its answer type or precision).
"""

from __future__ import annotations

import json
import os
import zlib
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

import benchmarks as B
import data as D
import engine as E
import model as M
import reward
import sampling as S
import sharding as SH
from common import ConfigError, Dist, all_gather_objects, broadcast_object, init_distributed, main_guard
from scoring import complete_meta, grade_row, summarize


@dataclass
class EvalConfig:
    """python eval.py --model DIR|tiny --bench LABEL=PATH[,...] --out_dir DIR (see eval.py's docstring)."""

    model: str = "tiny"  # HF checkpoint directory (a stage's final/), or tiny / tiny-qwen
    bench: str = ""  # LABEL=PATH[,LABEL=PATH...]; LABEL a benchmark name or any label for project JSONL
    out_dir: str = "out/eval"  # predictions.jsonl, results.json, results.md
    samples: int | None = None  # K per item; None = benchmark default (8 for aime24/aime25, else 1)
    temperature: float = -1.0  # < 0: the benchmark's default (1.0 when K > 1, else 0 = greedy)
    top_p: float = -1.0  # < 0: 0.95 when sampling, else 1
    max_new_tokens: int = 4096  # generation budget per answer, in tokens
    batch_size: int = 16  # prompts per generate call (per rank)
    slots: int = 0  # engine decode slots per call (KV memory); 0: batch_size; fewer: continuous batching
    prompt: str = ""  # "" = the prompt recorded in the model's revisual.json (else the paper's Fig. 5 prompt)
    placement: str = ""  # system | user; "" = as the checkpoint recorded (else system)
    blank_images: bool = False  # replace every image by a white one of the same size
    limit: int | None = None  # first N items of each benchmark
    seed: int = 0  # GPQA option shuffle and sampling seeds
    score_only: str | None = None  # predictions.jsonl to re-grade without a model
    max_prompt_len: int = 0  # a longer prompt is an error naming the item (0 = no limit)
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    dist_timeout_min: int = 180  # collective timeout (minutes)
    min_pixels: int = 0  # images resized to at least this many pixels (0: the checkpoint's own bound)
    max_pixels: int = 0  # and at most this many: max_pixels / 784 tokens per image (0: the checkpoint's own)
    split: str = ""  # a folder's split/config: NAME for every bench, or LABEL=NAME[,...] ("" = the only one)


# ----------------------------------------------------------------------------------------------------------
# Generation


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Jobs sorted by prompt length (longest first, stable), cut into batches: little padding, and the same
    batches whatever the world size (rank r takes batches r, r + W, ...)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _generate_batch(
    hf,
    processor,
    jobs: list[tuple[D.Record, int]],
    gen_cfg,
    batch_seed: int,
    *,
    bench: str,
    prompt: str,
    placement: str,
    max_prompt_len: int | None,
    slots: int = 0,
) -> list[dict]:
    tok = processor.tokenizer
    encoded: dict[int, D.EncodedPrompt] = {}
    for rec, _ in jobs:
        if id(rec) not in encoded:
            encoded[id(rec)] = D.encode_prompt(rec, processor, prompt, placement, max_prompt_len)
    encs = [encoded[id(rec)] for rec, _ in jobs]
    batch = D.collate_prompts(encs, tok.pad_token_id, hf.config.image_token_id)
    param = next(hf.parameters())
    batch = {
        k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else v.dtype)
        for k, v in batch.items()
    }
    devices = [param.device] if param.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():  # the caller's RNG stream is left alone
        torch.manual_seed(batch_seed)
        out = E.generate(hf, **batch, generation_config=gen_cfg, slots=slots)  # HF generate's, engine.py
    new = out[:, batch["input_ids"].shape[1] :].tolist()
    eos = set(gen_cfg.eos_token_id)
    rows = []
    for (rec, sample), ids in zip(jobs, new):
        ids, truncated = S.split_completion(ids, eos)
        response = tok.decode(ids if truncated else ids[:-1], skip_special_tokens=False)
        extracted, correct = grade_row(bench, response, rec.answer, rec.choices, rec.meta)
        row = {"bench": bench, "id": rec.id, "sample": sample, "response": response, "answer": rec.answer}
        if rec.choices:
            row["choices"] = rec.choices
        graded = dict(extracted=extracted, correct=correct, truncated=truncated, num_tokens=len(ids))
        rows.append(dict(row, meta=rec.meta, **graded))
    return rows


def evaluate_records(
    model,
    processor,
    records: list[D.Record],
    *,
    prompt: str = D.REASONING_PROMPT,
    placement: str = "system",
    max_new_tokens: int = 1024,
    batch_size: int = 8,
    dist: Dist | None = None,
    temperature: float = 0.0,
    blank_images: bool = False,
    top_p: float = 1.0,
    samples: int = 1,
    seed: int = 0,
    bench: str = "",
    max_prompt_len: int | None = None,
    skip: Collection[tuple[str, int]] = (),
    on_rows: Callable[[list[dict]], None] | None = None,
    progress: bool = False,
    slots: int = 0,
) -> dict:
    """Generate `samples` responses per record and grade them (reward.grade, a stated final answer counts).

    `model` may be an HF model or a (possibly FSDP-sharded) policy.Policy: every rank must call, with the same
    records. Whole batches are sharded over ranks and the rows gathered on every rank. Returns
    {"accuracy", "format", "resp_len" (mean completion tokens incl. EOS), "truncated", "n" (items),
    "responses": the rows (dicts with id, sample, response, extracted, correct, truncated, num_tokens)}.
    `skip` holds (id, sample) pairs already done; `on_rows` gets each round's rows on rank 0.
    Each batch decodes with engine.py over `slots` decode slots (0: one per row of the batch).
    """
    d = dist or Dist()
    if blank_images:
        records = B.blank_record_images(records)
    jobs = [(r, s) for r in records for s in range(samples) if (r.id, s) not in skip]
    lengths = {id(r): D.prompt_length(r, processor, prompt, placement) for r in records}
    batches = plan_batches([lengths[id(r)] for r, _ in jobs], batch_size)
    gen_cfg = S.generation_config(processor.tokenizer, temperature, top_p, max_new_tokens)
    kw = dict(bench=bench, prompt=prompt, placement=placement, max_prompt_len=max_prompt_len, slots=slots)
    rows: list[dict] = []
    bar = None
    if progress and d.main and jobs:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=bench or "eval", unit="item", dynamic_ncols=True)
    with SH.gathered_for_generation(model) as hf:
        for first in range(0, len(batches), d.world):
            b = first + d.rank
            local = []
            if b < len(batches):
                batch_jobs = [jobs[i] for i in batches[b]]
                batch_seed = zlib.crc32(f"{seed}:{bench}:{b}".encode())
                local = _generate_batch(hf, processor, batch_jobs, gen_cfg, batch_seed, **kw)
            new = [row for part in all_gather_objects(local, d) for row in part]
            if on_rows is not None and d.main:
                on_rows(new)
            rows += new
            if bar is not None:
                bar.update(len(new))
                bar.set_postfix(acc=f"{sum(r['correct'] for r in rows) / len(rows):.1%}")
    if bar is not None:
        bar.close()
    rows.sort(key=lambda r: (r["id"], r["sample"]))
    n = max(1, len(rows))
    fmt = sum(reward.format_reward(r["response"]) for r in rows) / n
    resp_len = sum(r["num_tokens"] for r in rows) / n
    return dict(summarize(bench, rows), format=fmt, resp_len=resp_len, responses=rows)


# ----------------------------------------------------------------------------------------------------------
# Files: predictions, results, the table


def read_predictions(path: str, repair: bool = False) -> list[dict]:
    """Rows of a predictions file; a line cut by an interrupt is dropped (and, with `repair`, removed)."""
    rows, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in filter(str.strip, f):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    if bad and repair:
        _write_jsonl(path, rows)
    return rows


def _write_jsonl(path: str, rows: list[dict], mode: str = "w") -> None:
    """mode "w": atomic rewrite; "a": append (one batch's rows, so an interrupt loses at most that batch)."""
    tmp = path + ".tmp" if mode == "w" else path
    with open(tmp, mode, encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    if tmp != path:
        os.replace(tmp, path)


def write_results(results: dict, out_dir: str, limited: bool) -> str:
    """results.json and results.md; returns the markdown table (Table 2 beside complete benchmarks only)."""
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = [
        "| benchmark | n | accuracy % | truncated | paper metric (ours) % | ReVisual-R1-7B (Table 2) % |",
        "|---|---|---|---|---|---|",
    ]
    for bench, r in results.items():
        spec = B.BENCHMARKS.get(bench)
        ours = paper = ""
        if spec and spec.paper_metric in r:  # Table 2's metric: strict score, worst case, mean over samples
            ours = f"{100 * r[spec.paper_metric]:.1f} ({spec.paper_metric})"
            if r["n"] == spec.size and not limited:
                paper = f"{spec.paper:.1f}"
        lines.append(
            f"| {bench} | {r['n']} | {100 * r['accuracy']:.1f} | {r['truncated']} | {ours} | {paper} |"
        )
    if any(r.get("blank_gold") for r in results.values()):
        lines.append("\nItems with an empty gold (LogicVista v1_382) are kept in n and counted wrong.")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table)
    return table


def score_only(cfg: EvalConfig) -> dict:
    """Re-grade a predictions file (only bench, id, response, answer required) and write the results."""
    if not os.path.isfile(cfg.score_only):
        raise D.DataError(f"{cfg.score_only}: predictions file not found")
    rows = read_predictions(cfg.score_only)
    by_bench: dict[str, list[dict]] = defaultdict(list)
    for i, r in enumerate(rows, 1):
        for key in ("bench", "id", "response", "answer"):
            if key not in r:
                raise D.DataError(f"{cfg.score_only}:{i}: field '{key}' is missing")
        r.setdefault("sample", 0)
        r["meta"] = complete_meta(r["bench"], r, f"{cfg.score_only}:{i}")
        r["extracted"], r["correct"] = grade_row(
            r["bench"], r["response"], str(r["answer"]), r.get("choices"), r["meta"]
        )
        by_bench[r["bench"]].append(r)
    os.makedirs(cfg.out_dir, exist_ok=True)
    _write_jsonl(os.path.join(cfg.out_dir, "predictions.jsonl"), rows)
    results = {b: summarize(b, rs) for b, rs in by_bench.items()}
    print(write_results(results, cfg.out_dir, limited=False))
    return results


def parse_bench(spec: str) -> list[tuple[str, str]]:
    pairs = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        label, sep, path = part.partition("=")
        if not sep or not label or not path:
            raise ConfigError(f"--bench: expected LABEL=PATH, got {part!r}")
        if label in {lb for lb, _ in pairs}:
            raise ConfigError(f"--bench: label {label!r} given twice")
        pairs.append((label, path))
    if not pairs:
        raise ConfigError("--bench is required (LABEL=PATH[,LABEL=PATH...]) unless --score_only is given")
    return pairs


def parse_split(spec: str | None, labels: list[str]) -> dict[str, str]:
    """--split NAME (every benchmark) or LABEL=NAME[,LABEL=NAME...] -> {label: split}."""
    if not spec:
        return {}
    if "=" not in spec:
        return dict.fromkeys(labels, spec.strip())
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        label, sep, name = part.partition("=")
        if not sep or label not in labels or not name:
            raise ConfigError(f"--split: expected LABEL=NAME with LABEL one of {labels}, got {part!r}")
        out[label] = name
    return out


def _check_run(cfg: EvalConfig, prompt: str, placement: str) -> None:
    """Predictions of another model or decoding setup never mix into one out_dir."""
    run = {
        "model": cfg.model,
        "prompt": prompt,
        "placement": placement,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "blank_images": cfg.blank_images,
        "seed": cfg.seed,
    }
    path = os.path.join(cfg.out_dir, "eval_config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = [k for k in run if old.get(k) != run[k]]
        if diff:
            raise ConfigError(
                f"{cfg.out_dir} holds predictions of another run ({', '.join(diff)} differ: "
                f"{[old.get(k) for k in diff]} vs {[run[k] for k in diff]}); use a new out_dir"
            )
    with open(path, "w") as f:
        json.dump(run, f, indent=2)


def validate_config(cfg: EvalConfig) -> None:
    """One clear line naming the field, before any model is loaded."""
    for name in ("batch_size", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.slots < 0:
        raise ConfigError(f"--slots must be >= 0 (0: batch_size), got {cfg.slots}")
    if cfg.samples is not None and cfg.samples < 1 or cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"--samples and --limit must be >= 1 when given, got {cfg.samples}, {cfg.limit}")
    if cfg.placement not in ("", *D.PLACEMENTS):
        raise ConfigError(f"--placement must be one of {', '.join(D.PLACEMENTS)}; got {cfg.placement!r}")


def main(cfg: EvalConfig) -> dict | None:
    validate_config(cfg)
    if cfg.score_only:
        return score_only(cfg)
    benches = parse_bench(cfg.bench)
    d = init_distributed(timeout_min=cfg.dist_timeout_min)
    auto = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    dtype = getattr(torch, cfg.dtype) if cfg.dtype != "auto" else auto
    prompt, placement = M.recorded_prompt(cfg.model, cfg.prompt, cfg.placement)
    pred_path = os.path.join(cfg.out_dir, "predictions.jsonl")
    done = None
    if d.main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        _check_run(cfg, prompt, placement)
        old = read_predictions(pred_path, repair=True) if os.path.exists(pred_path) else []
        done = {(r["bench"], r["id"], r.get("sample", 0)) for r in old}
    done = broadcast_object(done, d)
    splits = parse_split(cfg.split, [label for label, _ in benches])
    images = os.path.join(cfg.out_dir, "images")
    loaded = [(lb, B.load_benchmark(lb, p, images, cfg.limit, cfg.seed, splits.get(lb))) for lb, p in benches]
    # Every rank generates with a whole copy; a checkpoint is read by rank 0 alone and broadcast into the
    # other ranks' copies on their devices (one host copy per node, not one per rank).
    from_rank0 = d.on and os.path.isdir(cfg.model)
    model = SH.place_replica(
        M.load_weights(cfg.model, dtype, seed=0, on_meta=from_rank0 and not d.main), d.device, from_rank0
    )
    processor = M.load_processor(cfg.model)
    M.set_pixel_bounds(processor, cfg.min_pixels, cfg.max_pixels)
    # evaluate_records' arguments shared by every bench
    kw = dict(prompt=prompt, placement=placement, dist=d, slots=cfg.slots, seed=cfg.seed, progress=True)
    kw.update(max_new_tokens=cfg.max_new_tokens, max_prompt_len=cfg.max_prompt_len or None)
    kw.update(batch_size=cfg.batch_size, on_rows=lambda rows: _write_jsonl(pred_path, rows, "a"))
    jobs = {}
    for label, records in loaded:
        k = cfg.samples or (B.BENCHMARKS[label].samples if label in B.BENCHMARKS else 1)
        temperature = cfg.temperature if cfg.temperature >= 0 else (1.0 if k > 1 else 0.0)
        top_p = cfg.top_p if cfg.top_p >= 0 else (0.95 if temperature > 0 else 1.0)
        if cfg.blank_images:
            records = B.blank_record_images(records, os.path.join(cfg.out_dir, "images_blank"))
        jobs[label] = {(r.id, s) for r in records for s in range(k)}
        skip = {(i, s) for b, i, s in done if b == label}
        sample_kw = dict(temperature=temperature, top_p=top_p, samples=k)
        evaluate_records(model, processor, records, bench=label, skip=skip, **sample_kw, **kw)
    if not d.main:
        return None
    rows = read_predictions(pred_path)
    results = {}
    for label, keys in jobs.items():
        mine = {(r["id"], r.get("sample", 0)): r for r in rows if r["bench"] == label}
        results[label] = summarize(label, [mine[key] for key in sorted(keys)])
    print(write_results(results, cfg.out_dir, limited=cfg.limit is not None))
    return results


if __name__ == "__main__":
    main_guard(main, EvalConfig)
