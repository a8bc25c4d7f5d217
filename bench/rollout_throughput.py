"""Rollout throughput of our generation path against plain `model.generate`, and what the zero-advantage filter and
PAD skip, measured from a run.

1. Throughput (completion tokens/s) at the rollout's settings (temperature 1, top_p 0.95, vision tokens
   suppressed; every completion forced to its full length so all sides generate the same tokens), on the
   synthetic task's prompts with images, `--prompts` prompts x `--group_size` samples:
     hf         model.generate on the n-times repeated prompts (what grpo_mm.rollout does today)
     ours       sampling.generate on the same repeated prompts (our decode loop and exact top-p sampler)
     ours_group sampling.generate with each prompt once and num_return_sequences=n (one prefill per group)
   Alternating, median of --repeats (>= 5); ratios are of medians of per-round ratios.
2. Skips: grpo_mm.train runs a few steps from a briefly SFT-trained tiny model (so that rewards vary) with
   pad_mode "filter" and "paper", and its rollouts.jsonl gives, per step, the share of sequences left out of
   the update and the share of completion tokens left out (the training work actually saved).

    python bench/rollout_throughput.py            # tiny and tiny-qwen, 4 x 8 x 64 tokens; 12 GRPO steps per mode
    python bench/rollout_throughput.py --quick    # 2 x 4 x 16 tokens; 4 GRPO steps per mode
Last line: a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def throughput(kind: str, data: str, a) -> dict:
    import torch

    import data as D
    import model as M
    import sampling as S

    hf, processor = M.load_model(kind, seed=0)
    hf.eval()
    tok = processor.tokenizer
    enc = [D.encode_prompt(r, processor) for r in D.load_records(data)[: a.prompts]]
    gc = S.generation_config(tok, 1.0, 0.95, a.max_new_tokens)
    gc.min_new_tokens = a.max_new_tokens
    repeated = D.collate_prompts(
        [e for e in enc for _ in range(a.group_size)], tok.pad_token_id, hf.config.image_token_id
    )
    once = D.collate_prompts(enc, tok.pad_token_id, hf.config.image_token_id)
    sides = {
        "hf": lambda: hf.generate(**repeated, generation_config=gc, synced_gpus=False),
        "ours": lambda: S.generate(hf, **repeated, generation_config=gc),
        "ours_group": lambda: S.generate(hf, **once, generation_config=gc, num_return_sequences=a.group_size),
    }
    tokens = a.prompts * a.group_size * a.max_new_tokens
    times: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    for r in range(a.repeats + 1):  # round 0 is warm-up
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            torch.manual_seed(r)
            t = time.perf_counter()
            out = sides[name]()
            dt = time.perf_counter() - t
            assert out.shape[1] - repeated["input_ids"].shape[1] == a.max_new_tokens
            if r:
                times[name].append(dt)
    res = {"model": kind, "sequences": a.prompts * a.group_size, "new_tokens": a.max_new_tokens}
    for name in names:
        res[f"{name}_tokens_per_s"] = tokens / statistics.median(times[name])
    for name in ("ours", "ours_group"):
        res[f"{name}_speedup"] = statistics.median(h / o for h, o in zip(times["hf"], times[name]))
    print(
        f"{kind}: {tokens} completion tokens per call; tokens/s: hf {res['hf_tokens_per_s']:.0f}, ours "
        f"{res['ours_tokens_per_s']:.0f} (x{res['ours_speedup']:.2f}), ours_group {res['ours_group_tokens_per_s']:.0f}"
        f" (x{res['ours_group_speedup']:.2f}); median of {a.repeats}",
        flush=True,
    )
    return res


def skips(tmp: str, a) -> dict:
    import logging

    import grpo_mm as G
    import sft
    import synth

    logging.disable(logging.INFO)
    os.environ["TQDM_DISABLE"] = "1"  # the training loops' progress bars
    data_dir = os.path.join(tmp, "synth")
    sizes = dict(n_sft=800, n_sft_test=0, n_mm_train=200, n_text_train=0, n_mm_test=0, n_text_test=0)
    synth.write_synth(data_dir, synth.SynthConfig(seed=0, mm_share=0.5, **sizes))
    sft_dir = os.path.join(tmp, "sft")
    schedule = dict(max_steps=a.sft_steps, lr=1e-2, global_batch=8, micro_batch=8)
    quiet = dict(save_every=0, eval_every=0, log_every=0)
    sft_data = os.path.join(data_dir, "sft.jsonl")
    sft.train(sft.SFTConfig(model="tiny", data=sft_data, out_dir=sft_dir, **schedule, **quiet))
    out = {}
    for mode in ("filter", "paper"):
        run = os.path.join(tmp, f"grpo_{mode}")
        cfg = G.GRPOConfig(
            model=os.path.join(sft_dir, "final"),
            data=os.path.join(data_dir, "mm_train.jsonl"),
            out_dir=run,
            max_steps=a.grpo_steps,
            save_every=10**6,
            rollout_batch=8,
            group_size=8,
            rollout_micro_batch=8,
            max_new_tokens=64,
            mini_batch=64,
            micro_batch=32,
            pad_mode=mode,
            resume=False,
        )
        G.train(cfg)
        with open(os.path.join(run, "rollouts.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        steps = sorted({r["step"] for r in rows})
        seq_drop, tok_drop = [], []
        for s in steps:
            rs = [r for r in rows if r["step"] == s]
            seq_drop.append(sum(not r["kept"] for r in rs) / len(rs))
            dropped = sum(r["num_tokens"] for r in rs if not r["kept"])
            tok_drop.append(dropped / max(1, sum(r["num_tokens"] for r in rs)))
        out[mode] = {
            "steps": len(steps),
            "sequences_dropped": statistics.mean(seq_drop),
            "tokens_dropped": statistics.mean(tok_drop),
            "mean_tokens_dropped_seq": _mean([r["num_tokens"] for r in rows if not r["kept"]]),
            "mean_tokens_kept_seq": _mean([r["num_tokens"] for r in rows if r["kept"]]),
        }
        o = out[mode]
        print(
            f"pad_mode={mode}: over {o['steps']} steps, {o['sequences_dropped']:.3f} of the sequences and "
            f"{o['tokens_dropped']:.3f} of the completion tokens left out of the update (mean length dropped "
            f"{o['mean_tokens_dropped_seq']:.1f} vs kept {o['mean_tokens_kept_seq']:.1f} tokens)",
            flush=True,
        )
    return out


def _mean(xs: list) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="tiny,tiny-qwen")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sft_steps", type=int, default=200)
    ap.add_argument("--grpo_steps", type=int, default=12)
    ap.add_argument("--skip", choices=["", "throughput", "skips"], default="", help="leave one part out")
    a = ap.parse_args()
    if a.quick:
        a.prompts, a.group_size, a.max_new_tokens, a.grpo_steps, a.sft_steps = 2, 4, 16, 4, 100
    a.repeats = max(5, a.repeats)
    import torch

    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = {"threads": a.threads, "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        if a.skip != "throughput":
            import synth

            empty = dict(n_sft=0, n_sft_test=0, n_text_train=0, n_mm_test=0, n_text_test=0)
            synth.write_synth(os.path.join(tmp, "mm"), synth.SynthConfig(seed=0, n_mm_train=8, **empty))
            data = os.path.join(tmp, "mm", "mm_train.jsonl")
            summary["throughput"] = [throughput(k, data, a) for k in a.models.split(",")]
        if a.skip != "skips":
            summary["skips"] = skips(tmp, a)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
