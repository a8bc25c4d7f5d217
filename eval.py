"""Benchmark evaluation: load the ten benchmarks of paper Table 2 from local copies, generate, grade, report.

    python eval.py --model DIR|tiny --bench LABEL=PATH[,LABEL=PATH...] --out_dir DIR [--samples K] [--blank_images]
    torchrun --nproc_per_node N eval.py ...                 (whole generation batches are sharded over ranks)
    python eval.py --score_only predictions.jsonl --out_dir DIR          (re-grade saved responses, no model)

Writes `out_dir/predictions.jsonl` (one line per item and sample, appended batch by batch: a rerun skips every
(bench, id, sample) already there), `out_dir/results.json`, `out_dir/results.md` and prints the table.
`evaluate_records` is the same generate-and-grade loop for in-training validation (no files, FSDP-safe).

The loaders (benchmarks.py) read what users download: Parquet with embedded image structs, JSON / JSONL / CSV
with an image folder, a saved `datasets` folder, and the project's JSONL records for any other label. Images
are decoded once and cached as PNG under `out_dir/images/<bench>/`.

Decoding: greedy, K = 1, except aime24 / aime25: K = 8 samples at temperature 1.0, top-p 0.95 (accuracy is
the mean over samples; pass@K is reported too). Every `generate` call gets a complete generation config
(PITFALLS: the checkpoints' own generation_config.json sets top_k=1 and repetition_penalty=1.05).

How scoring departs from the released ReVisual-R1 evaluation
-------------------------------------------------------------
* The answer is the last `\\boxed{}` found by brace matching (the released regex `\\boxed{([^}]+)}` cuts
  `\\boxed{\\frac{1}{2}}`), or, without a box, a final answer stated in the response's last sentence
  (reward.grade with require_boxed=False). Its fall-back that compares only the alphabetic characters
  (so any numeric answer counted as correct) is gone: a response with no stated answer is wrong.
* Multiple choice grades the letter and the option text alike. Benchmark rules of their own authors:
  MathVista's gold is the option text and free-form floats are rounded to the item's `precision`;
  DynaMath floats are right within 1e-3 (absolute) and its worst case needs all variants right;
  LogicVista letter sets ("A, C") compare as sets; GPQA's options are shuffled into A-D per item with a
  fixed seed (gold = the letter).
* Truncated responses (no EOS within max_new_tokens) are graded as they are and counted per benchmark.
* Paper Table 2 numbers appear in results.md only beside a benchmark evaluated in full (n equals the
  published size, no --limit). Table 2's DynaMath number is compared with our worst-case accuracy
  (the base model's 12.6 fits no average-case figure); its WeMath metric is not stated (we show accuracy).
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from PIL import Image

import benchmarks as B
import data as D
import engine as E
import model as M
import reward
import sampling as S
from common import ConfigError, Dist, all_gather_objects, broadcast_object, init_distributed, main_guard


@dataclass
class EvalConfig:
    """python eval.py --model DIR|tiny --bench LABEL=PATH[,...] --out_dir DIR (see eval.py's docstring)."""

    model: str = "tiny"
    bench: str = ""  # LABEL=PATH[,LABEL=PATH...]; LABEL a benchmark name or any label for project JSONL
    out_dir: str = "out/eval"
    samples: int | None = None  # K per item; None = benchmark default (8 for aime24/aime25, else 1)
    temperature: float | None = None  # None: 1.0 when K > 1, else 0 (greedy)
    top_p: float | None = None  # None: 0.95 when sampling
    max_new_tokens: int = 4096
    batch_size: int = 16  # prompts per generate call (per rank)
    slots: int = 0  # engine decode slots per call (KV memory); 0: batch_size; fewer: continuous batching in a batch
    prompt: str | None = None  # None: the prompt recorded in the model's revisual.json, else paper Fig. 5
    placement: str | None = None  # system | user; None: as recorded, else system
    blank_images: bool = False  # replace every image by a white one of the same size
    limit: int | None = None  # first N items of each benchmark
    seed: int = 0  # GPQA option shuffle and sampling seeds
    score_only: str | None = None  # predictions.jsonl to re-grade without a model
    max_prompt_len: int | None = None  # a longer prompt is an error naming the item
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16


# ----------------------------------------------------------------------------------------------------------
# Grading and metrics


def _as_float(s: str | None) -> float | None:
    if s is None:
        return None
    t = re.sub(r"\\[,!]|\s|\$", "", s).rstrip(".")
    return float(t) if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", t) else None


def grade_row(bench: str, response: str, answer: str, choices: list[str] | None = None,
              meta: dict | None = None) -> tuple[str | None, bool]:  # fmt: skip
    """(extracted answer, correct) under the benchmark's rules (see the module docstring)."""
    meta = meta or {}
    extracted = reward.extract_answer(response)
    if extracted is None:
        return None, False
    value, gold = _as_float(extracted), _as_float(answer)
    if value is not None and gold is not None:
        if bench == "mathvista" and meta.get("answer_type") == "float" and meta.get("precision") is not None:
            return extracted, round(value, meta["precision"]) == round(gold, meta["precision"])
        if bench == "dynamath" and meta.get("answer_type") == "float":
            return extracted, abs(value - gold) <= 1e-3
    return extracted, reward.grade(response, answer, choices, require_boxed=False)


def _per_sample(rows: list[dict]) -> dict[int, dict[str, bool]]:
    out: dict[int, dict[str, bool]] = defaultdict(dict)
    for r in rows:
        out[r.get("sample", 0)][r["id"]] = bool(r["correct"])
    return out


def _pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _wemath_four_dim(rows: list[dict]) -> dict | None:
    """WeMath's four dimensions on sample 0, as fractions of its complete multi-step problems (rows sharing
    meta.group, keys "2steps_1", ..., "2steps_multi"): IK (a step wrong, the composite wrong), IG (every
    step right, the composite wrong), CM (all right), RM (a step wrong, the composite right), and the strict
    score 1 - IK - IG / 2 - RM."""
    groups: dict = defaultdict(dict)
    for r in rows:
        if r.get("sample", 0) == 0 and r["meta"].get("key"):
            groups[r["meta"].get("group")][r["meta"]["key"]] = bool(r["correct"])
    counts = dict.fromkeys(("IK", "IG", "CM", "RM"), 0)
    for keys in groups.values():
        multi = next((k for k in keys if k.endswith("steps_multi")), None)
        if multi and multi[0].isdigit() and len(keys) == int(multi[0]) + 1:  # complete (not cut by --limit)
            steps = all(v for k, v in keys.items() if k != multi)
            counts[("CM" if keys[multi] else "IG") if steps else ("RM" if keys[multi] else "IK")] += 1
    g = sum(counts.values())
    if not g:
        return None
    out = {k: c / g for k, c in counts.items()}
    return dict(out, groups=g, score_strict=1 - out["IK"] - out["IG"] / 2 - out["RM"])


def summarize(bench: str, rows: list[dict]) -> dict:
    """{"accuracy" (item mean of the sample mean), "n" (items), "truncated" (responses), extras per benchmark}."""
    by_item: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        by_item[r["id"]].append(bool(r["correct"]))
    item_acc = {i: sum(v) / len(v) for i, v in by_item.items()}
    out = {"accuracy": sum(item_acc.values()) / max(1, len(item_acc)), "n": len(by_item),
           "truncated": sum(bool(r.get("truncated")) for r in rows)}  # fmt: skip
    k = min((len(v) for v in by_item.values()), default=1)
    if k > 1:
        out["samples"] = k
        out[f"pass@{k}"] = sum(_pass_at_k(len(v), sum(v), k) for v in by_item.values()) / len(by_item)
    meta = {r["id"]: r.get("meta") or {} for r in rows}
    if bench == "mathverse":
        versions = defaultdict(list)
        for i, a in item_acc.items():
            versions[meta[i].get("problem_version", "?")].append(a)
        out["per_version"] = {v: {"accuracy": sum(a) / len(a), "n": len(a)} for v, a in sorted(versions.items())}
    elif bench == "dynamath":
        worst = []
        for hits in _per_sample(rows).values():
            qs = defaultdict(list)
            for i, ok in hits.items():
                qs[meta[i].get("qid", i)].append(ok)
            worst.append(sum(all(v) for v in qs.values()) / len(qs))
        out.update(average_case=out["accuracy"], worst_case=sum(worst) / len(worst),
                   questions=len({m.get("qid", i) for i, m in meta.items()}))  # fmt: skip
    elif bench == "wemath" and (four := _wemath_four_dim(rows)):
        out["four_dim"] = four
    return out


# ----------------------------------------------------------------------------------------------------------
# Generation


def prompt_length(record: D.Record, processor, prompt: str, placement: str) -> int:
    """Prompt tokens as encode_prompt makes them, from the image sizes alone (no pixel processing)."""
    tok, ip = processor.tokenizer, processor.image_processor
    text = tok.apply_chat_template(D.build_messages(record, prompt, placement), tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    for p in record.images:
        with Image.open(p) as im:
            w, h = im.size
        n += ip.get_number_of_image_patches(h, w, {}) // ip.merge_size**2 - 1
    return n


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Jobs sorted by prompt length (longest first, stable), cut into batches: little padding, and the same
    batches whatever the world size (rank r takes batches r, r + W, ...)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _generate_batch(hf, processor, jobs: list[tuple[D.Record, int]], gen_cfg, batch_seed: int, *, bench: str,
                    prompt: str, placement: str, max_prompt_len: int | None, slots: int = 0) -> list[dict]:  # fmt: skip
    tok = processor.tokenizer
    encoded: dict[int, D.EncodedPrompt] = {}
    for rec, _ in jobs:
        if id(rec) not in encoded:
            encoded[id(rec)] = D.encode_prompt(rec, processor, prompt, placement, max_prompt_len)
    batch = D.collate_prompts([encoded[id(rec)] for rec, _ in jobs], tok.pad_token_id, hf.config.image_token_id)
    param = next(hf.parameters())
    batch = {k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}
    devices = [param.device] if param.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():  # the caller's RNG stream is left alone
        torch.manual_seed(batch_seed)
        out = E.generate(hf, **batch, generation_config=gen_cfg, slots=slots)  # HF generate's output, engine.py
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
        rows.append(dict(row, meta=rec.meta, extracted=extracted, correct=correct, truncated=truncated,
                         num_tokens=len(ids)))  # fmt: skip
    return rows


def evaluate_records(model, processor, records: list[D.Record], *, prompt: str = D.REASONING_PROMPT,
                     placement: str = "system", max_new_tokens: int = 1024, batch_size: int = 8,
                     dist: Dist | None = None, temperature: float = 0.0, blank_images: bool = False,
                     top_p: float = 1.0, samples: int = 1, seed: int = 0, bench: str = "",
                     max_prompt_len: int | None = None, skip: Collection[tuple[str, int]] = (),
                     on_rows: Callable[[list[dict]], None] | None = None, progress: bool = False,
                     slots: int = 0) -> dict:  # fmt: skip
    """Generate `samples` responses per record and grade them (reward.grade, a stated final answer counts).

    `model` may be an HF model or a (possibly FSDP-sharded) model.Policy: every rank must call, with the same
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
    lengths = {id(r): prompt_length(r, processor, prompt, placement) for r in records}
    batches = plan_batches([lengths[id(r)] for r, _ in jobs], batch_size)
    gen_cfg = S.generation_config(processor.tokenizer, temperature, top_p, max_new_tokens)
    rows: list[dict] = []
    bar = None
    if progress and d.main and jobs:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=bench or "eval", unit="item", dynamic_ncols=True)
    with M.gathered_for_generation(model) as hf:
        for first in range(0, len(batches), d.world):
            b = first + d.rank
            local = []
            if b < len(batches):
                local = _generate_batch(hf, processor, [jobs[i] for i in batches[b]], gen_cfg,
                                        zlib.crc32(f"{seed}:{bench}:{b}".encode()), bench=bench, prompt=prompt,
                                        placement=placement, max_prompt_len=max_prompt_len, slots=slots)  # fmt: skip
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
    return dict(summarize(bench, rows), format=sum(reward.format_reward(r["response"]) for r in rows) / n,
                resp_len=sum(r["num_tokens"] for r in rows) / n, responses=rows)  # fmt: skip


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
    lines = ["| benchmark | n | accuracy % | truncated | paper metric (ours) % | ReVisual-R1-7B (Table 2) % |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for bench, r in results.items():
        spec = B.BENCHMARKS.get(bench)
        ours = paper = ""
        if spec and r["n"] == spec.size and not limited and spec.paper_metric in r:
            ours, paper = f"{100 * r[spec.paper_metric]:.1f} ({spec.paper_metric})", f"{spec.paper:.1f}"
        lines.append(f"| {bench} | {r['n']} | {100 * r['accuracy']:.1f} | {r['truncated']} | {ours} | {paper} |")
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
        r.setdefault("meta", {})
        r["extracted"], r["correct"] = grade_row(r["bench"], r["response"], str(r["answer"]), r.get("choices"),
                                                 r["meta"])  # fmt: skip
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


def _check_run(cfg: EvalConfig, prompt: str, placement: str) -> None:
    """Predictions of another model or decoding setup never mix into one out_dir."""
    run = {"model": cfg.model, "prompt": prompt, "placement": placement, "max_new_tokens": cfg.max_new_tokens,
           "temperature": cfg.temperature, "top_p": cfg.top_p, "blank_images": cfg.blank_images,
           "seed": cfg.seed}  # fmt: skip
    path = os.path.join(cfg.out_dir, "eval_config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = [k for k in run if old.get(k) != run[k]]
        if diff:
            raise ConfigError(f"{cfg.out_dir} holds predictions of another run ({', '.join(diff)} differ: "
                              f"{[old.get(k) for k in diff]} vs {[run[k] for k in diff]}); use a new out_dir")  # fmt: skip
    with open(path, "w") as f:
        json.dump(run, f, indent=2)


def main(cfg: EvalConfig) -> dict | None:
    if cfg.score_only:
        return score_only(cfg)
    benches = parse_bench(cfg.bench)
    d = init_distributed()
    dtype = getattr(torch, cfg.dtype) if cfg.dtype != "auto" else (torch.bfloat16 if d.device.type == "cuda"
                                                                   else torch.float32)  # fmt: skip
    recorded = M.read_training_metadata(cfg.model) if os.path.isdir(cfg.model) else {}
    prompt = cfg.prompt or recorded.get("prompt") or D.REASONING_PROMPT
    placement = cfg.placement or recorded.get("placement") or "system"
    pred_path = os.path.join(cfg.out_dir, "predictions.jsonl")
    done = None
    if d.main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        _check_run(cfg, prompt, placement)
        old = read_predictions(pred_path, repair=True) if os.path.exists(pred_path) else []
        done = {(r["bench"], r["id"], r.get("sample", 0)) for r in old}
    done = broadcast_object(done, d)
    loaded = [(label, B.load_benchmark(label, path, os.path.join(cfg.out_dir, "images"), cfg.limit, cfg.seed))
              for label, path in benches]  # fmt: skip
    model, processor = M.load_model(cfg.model, dtype=dtype, device=d.device)
    jobs = {}
    for label, records in loaded:
        k = cfg.samples or (B.BENCHMARKS[label].samples if label in B.BENCHMARKS else 1)
        temperature = cfg.temperature if cfg.temperature is not None else (1.0 if k > 1 else 0.0)
        top_p = cfg.top_p if cfg.top_p is not None else (0.95 if temperature > 0 else 1.0)
        if cfg.blank_images:
            records = B.blank_record_images(records, os.path.join(cfg.out_dir, "images_blank"))
        jobs[label] = {(r.id, s) for r in records for s in range(k)}
        evaluate_records(model, processor, records, prompt=prompt, placement=placement,
                         max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, dist=d, slots=cfg.slots,
                         temperature=temperature, top_p=top_p, samples=k, seed=cfg.seed, bench=label,
                         max_prompt_len=cfg.max_prompt_len, skip={(i, s) for b, i, s in done if b == label},
                         on_rows=lambda rows: _write_jsonl(pred_path, rows, "a"), progress=True)  # fmt: skip
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
