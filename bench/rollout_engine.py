"""Rollout decode engines side by side on a long-tailed workload (issue 16): HF `generate`, today's decode loop
(`sampling.generate`, one call per `rollout_micro_batch` prompts x group_size rows, as grpo_mm did), and the
continuous-batching engine (`engine.generate`, all sequences queued, slots = rollout_micro_batch x group_size:
the same KV rows as one call of today's loop).

Workload: `tiny-qwen` (151k vocabulary), the synthetic task's prompts with images, `--prompts` x `--group_size`
sequences sampled at the rollout's settings (temperature 1, top_p 0.95, vision tokens suppressed). Completion
lengths are long-tailed and identical for every engine: each sequence's length is drawn once from a log-normal
(`--median`, `--sigma`), capped at max_new_tokens, and a logits hook (the same function for all three; HF gets
it as a LogitsProcessor) forces the end-of-turn token at that step and forbids it before.

Reported per engine: useful tokens/s (completion tokens up to and including the end of turn, over wall time),
slot utilisation (useful tokens / row-steps decoded: today's loop and HF decode every row of a call until
its longest row ends; the engine's row-steps are its slots x sampling steps), and the KV rows held. HF runs on
the first `--hf_prompts` prompts only (compared per useful token). Wall time and process CPU time are both
reported (one thread: CPU time is what a shared machine's other jobs do not inflate). The last line is a JSON
summary with the ratios.

    python bench/rollout_engine.py              # 32 prompts x 8, 192 tokens max, 8 prompts per call / 64 slots
    python bench/rollout_engine.py --quick      # 8 prompts x 4, 48 tokens max, 2 prompts per call / 8 slots
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def schedule(num: int, median: float, sigma: float, cap: int, seed: int) -> list[int]:
    """Per-sequence completion lengths: log-normal(log median, sigma), rounded up, in [1, cap]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(num, generator=g, dtype=torch.float64)
    return [min(cap, max(1, math.ceil(median * math.exp(sigma * float(x))))) for x in z]


def forced_end(lengths, end_id: int, eos_ids: list[int]):
    """hook(seq, step, logits): sequence `seq` samples `end_id` at new-token step lengths[seq] - 1 and no
    end-of-turn token before. Past its end a row's logits are left as the model made them (end-of-turn banned),
    as in a real rollout, where a loop that keeps decoding a finished row samples from a full distribution (an
    earlier version forced every step past the end too, which let the decode loop's top-p check skip those
    rows: x2.1 instead of x3.4 per CPU second, BENCHMARKS.md)."""
    import torch

    target = torch.tensor(lengths)

    def hook(seq, step, logits):
        end = step == target[seq] - 1
        logits[:, eos_ids] = -float("inf")
        logits[end] = -float("inf")
        logits[end, end_id] = 0.0
        return logits

    return hook


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="tiny-qwen")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group_size", type=int, default=8)
    ap.add_argument(
        "--micro_batch", type=int, default=8, help="prompts per call of today's loop; slots = this x n"
    )
    ap.add_argument("--max_new_tokens", type=int, default=192)
    ap.add_argument("--median", type=float, default=40.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--hf_prompts", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.quick:
        a.prompts, a.group_size, a.micro_batch, a.max_new_tokens, a.median, a.hf_prompts = 8, 4, 2, 48, 10, 2
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    import data as D
    import engine as E
    import model as M
    import sampling as S
    import synth

    torch.set_num_threads(a.threads)
    n = a.group_size
    with tempfile.TemporaryDirectory() as tmp:
        empty = dict(n_sft=0, n_sft_test=0, n_text_train=0, n_mm_test=0, n_text_test=0)
        synth.write_synth(tmp, synth.SynthConfig(seed=a.seed, n_mm_train=a.prompts, **empty))
        hf, processor = M.load_model(a.model, seed=0)
        enc = [
            D.encode_prompt(r, processor)
            for r in D.load_records(os.path.join(tmp, "mm_train.jsonl"))[: a.prompts]
        ]
    hf.eval()
    tok = processor.tokenizer
    gc = S.generation_config(tok, 1.0, 0.95, a.max_new_tokens)
    eos_ids = list(gc.eos_token_id)
    lengths = schedule(len(enc) * n, a.median, a.sigma, a.max_new_tokens, a.seed)
    hook = forced_end(lengths, tok.convert_tokens_to_ids("<|im_end|>"), eos_ids)
    useful_all = sum(lengths)
    slots = a.micro_batch * n

    def collate(prompts):
        return D.collate_prompts(prompts, tok.pad_token_id, hf.config.image_token_id)

    def check(out, width, first_seq):
        new = out[:, width:].tolist()
        got = [len(S.split_completion(r, set(eos_ids))[0]) for r in new]
        assert got == lengths[first_seq : first_seq + len(new)], "an engine ignored the length schedule"
        return len(new[0]) if new else 0

    def run_loop(use_hf: bool, num_prompts: int) -> dict:
        row_steps, t0, c0 = 0, time.perf_counter(), time.process_time()
        for s in range(0, num_prompts, a.micro_batch):
            chunk = enc[s : min(num_prompts, s + a.micro_batch)]
            batch = collate(chunk)
            offset = s * n

            def local(seq, step, logits, offset=offset):
                return hook(seq + offset, step, logits)

            if use_hf:  # the literal HF path: prompts expanded n times, HF's own sampler
                rep = collate([e for e in chunk for _ in range(n)])
                width = rep["input_ids"].shape[1]

                class Forced(LogitsProcessor):
                    def __init__(self, width):
                        self.width = width

                    def __call__(self, input_ids, scores):
                        b = input_ids.shape[0]
                        return local(
                            torch.arange(b), torch.full((b,), input_ids.shape[1] - self.width), scores
                        )

                out = hf.generate(
                    **rep, generation_config=gc, logits_processor=LogitsProcessorList([Forced(width)])
                )
            else:
                width = batch["input_ids"].shape[1]
                out = S.generate(hf, **batch, generation_config=gc, num_return_sequences=n, logits_hook=local)
            row_steps += check(out, width, offset) * len(chunk) * n
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        useful = sum(lengths[: num_prompts * n])
        return dict(
            seconds=dt,
            cpu_seconds=cpu,
            useful_tokens=useful,
            tokens_per_s=useful / dt,
            tokens_per_cpu_s=useful / cpu,
            utilisation=useful / row_steps,
            kv_rows=min(a.micro_batch, num_prompts) * n,
            sequences=num_prompts * n,
        )

    def run_engine() -> dict:
        batch = collate(enc)
        st: dict = {}
        t0, c0 = time.perf_counter(), time.process_time()
        out = E.generate(
            hf, **batch, generation_config=gc, num_return_sequences=n, slots=slots, logits_hook=hook, stats=st
        )
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        check(out, batch["input_ids"].shape[1], 0)
        return dict(
            seconds=dt,
            cpu_seconds=cpu,
            useful_tokens=useful_all,
            tokens_per_s=useful_all / dt,
            tokens_per_cpu_s=useful_all / cpu,
            utilisation=useful_all / (st["slots"] * st["steps"]),
            kv_rows=st["slots"],
            sequences=len(enc) * n,
            kv_mib=st["kv_bytes"] / 2**20,
            decoder_row_steps=st["row_steps"],
            steps=st["steps"],
            prefills=st["prefills"],
        )

    ls = sorted(lengths)
    print(
        f"{a.model}: {len(enc)} prompts x {n} = {len(lengths)} sequences, {slots} slots / rows per call, "
        f"lengths mean {sum(ls) / len(ls):.1f} median {ls[len(ls) // 2]} p90 {ls[int(0.9 * len(ls))]} max {ls[-1]} "
        f"(cap {a.max_new_tokens}), {a.threads} thread(s)",
        flush=True,
    )
    torch.manual_seed(a.seed)
    warm = dict(generation_config=gc, num_return_sequences=2, logits_hook=hook)  # warm-up
    E.generate(hf, **collate(enc[:1]), **warm, slots=2)
    S.generate(hf, **collate(enc[:1]), **warm)
    res = {}
    for name, fn in (
        ("engine", run_engine),
        ("loop", lambda: run_loop(False, len(enc))),
        ("hf", lambda: run_loop(True, min(a.hf_prompts, len(enc)))),
    ):
        torch.manual_seed(a.seed)
        res[name] = fn()
        r = res[name]
        print(
            f"{name:6s}: {r['sequences']} sequences, {r['useful_tokens']} useful tokens in {r['seconds']:.1f} s wall "
            f"({r['cpu_seconds']:.1f} s CPU) = {r['tokens_per_s']:.1f} tokens/s ({r['tokens_per_cpu_s']:.1f} per CPU "
            f"second), slot utilisation {r['utilisation']:.2f}, {r['kv_rows']} KV rows",
            flush=True,
        )
    summary = dict(
        res,
        date=time.strftime("%Y-%m-%d"),
        threads=a.threads,
        model=a.model,
        prompts=len(enc),
        group_size=n,
        max_new_tokens=a.max_new_tokens,
        engine_vs_loop=res["engine"]["tokens_per_s"] / res["loop"]["tokens_per_s"],
        engine_vs_hf=res["engine"]["tokens_per_s"] / res["hf"]["tokens_per_s"],
        engine_vs_loop_cpu=res["engine"]["tokens_per_cpu_s"] / res["loop"]["tokens_per_cpu_s"],
        engine_vs_hf_cpu=res["engine"]["tokens_per_cpu_s"] / res["hf"]["tokens_per_cpu_s"],
    )
    print(
        f"engine {res['engine']['tokens_per_s']:.1f} useful tokens/s: x{summary['engine_vs_loop']:.2f} today's loop "
        f"({res['loop']['tokens_per_s']:.1f}), x{summary['engine_vs_hf']:.2f} HF generate "
        f"({res['hf']['tokens_per_s']:.1f}); per CPU second x{summary['engine_vs_loop_cpu']:.2f} and "
        f"x{summary['engine_vs_hf_cpu']:.2f}"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
