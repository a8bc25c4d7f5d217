"""Padding-free (packed) against padded training micro-batches on a long-tailed length mix (issue 17).

The update's forward + backward (policy.Policy's chunked fp32 log-probs, the token-mean loss) over the same
sequences, two ways:
  padded: micro-batches of `--micro_batch` sequences in a random order (what the GRPO update does with its
          shuffled kept sequences, and SFT without length grouping), right-padded to the longest;
  packed: data.pack_by_tokens (first-fit decreasing) into micro-batches of at most `budget` tokens, each run
          packed (policy.Policy.pack: one row with no padding, attention sequence by sequence through
          policy.varlen_sdpa_attention); budget = the largest whose micro-batches hold no more token slots than
          the padded path's largest (rows x width), so both paths hold about the same activations at their peak.
Peak memory is measured in bytes too: the process's peak resident set (VmHWM, reset before each pass through
/proc/self/clear_refs) above its resident set at the pass's start, with MALLOC_MMAP_THRESHOLD_=65536 (set by
re-running the script) so that freed large tensors go back to the OS and the peak is the pass's own.
Sequences: prompts of the synthetic task (half with an image) + completions of log-normal length (median
`--median` tokens, sigma `--spread`, clipped to [8, --max_completion]): a few long ones among many short ones, as RL completions
and reasoning traces are. The two paths alternate `--repeats` times; the medians are reported.

    python bench/pack_throughput.py                 # tiny-qwen (151k vocabulary), 48 sequences, 3 repeats
    python bench/pack_throughput.py --model tiny    # the 768-token vocabulary: the decoder dominates
Prints per path: micro-batches, padding fraction (padding slots / computed slots), peak token slots of one
micro-batch, peak memory of a pass (MiB above its start, the largest over the runs), seconds per pass (wall;
the process's CPU seconds beside them, less sensitive to other jobs on a shared machine), tokens/s (real
prompt + completion tokens per wall second); then the packed path's budget fill; the last lines are the
tokens/s ratio packed / padded (and the same by CPU time, and by each path's fastest run: other jobs only add
time, so the fastest run is the nearest to an idle machine) and the peak-memory ratio; then where the time goes:
the log-prob pass over the target tokens (ChunkedLogProbs' forward and backward, timed inside the passes; the
same work on both paths) and the rest (vision tower, decoder, loss), which is all that packing can shorten.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# Policy's forward arguments, in order, as the collate functions name them
POLICY_INPUTS = (
    "input_ids",
    "attention_mask",
    "target_mask",
    "pixel_values",
    "image_grid_thw",
    "mm_token_type_ids",
)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def time_logprobs(fn: type) -> list[float]:
    """Wrap the autograd Function `fn` (policy.ChunkedLogProbs) so that the wall seconds of its forward and backward
    add up in the returned one-element list."""
    total = [0.0]
    forward, backward = fn.forward, fn.backward

    def timed(inner):
        def run(ctx, *args):
            t0 = time.perf_counter()
            try:
                return inner(ctx, *args)
            finally:
                total[0] += time.perf_counter() - t0

        return staticmethod(run)

    fn.forward, fn.backward = timed(forward), timed(backward)
    return total


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536" and os.path.exists("/proc/self/clear_refs"):
        os.execve(
            sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        )
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-qwen")
    ap.add_argument("--n", type=int, default=48, help="sequences")
    ap.add_argument("--micro_batch", type=int, default=8, help="sequences per padded micro-batch")
    ap.add_argument("--median", type=int, default=64, help="median completion length (tokens)")
    ap.add_argument("--spread", type=float, default=1.2, help="sigma of the log-normal completion lengths")
    ap.add_argument("--max_completion", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import math

    import torch

    import data as D
    import model as M
    import policy as P
    import synth

    torch.set_num_threads(args.threads)
    logprob_s = time_logprobs(P.ChunkedLogProbs)
    model, processor = M.load_model(args.model, seed=args.seed)
    policy = P.Policy(model).train()
    tok = processor.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        only_train = dict(n_sft=0, n_sft_test=0, n_mm_test=0, n_text_test=0)
        n_mm = args.n // 2
        cfg = synth.SynthConfig(seed=args.seed, n_mm_train=n_mm, n_text_train=args.n - n_mm, **only_train)
        synth.write_synth(tmp, cfg)
        records = [*D.load_records(f"{tmp}/mm_train.jsonl"), *D.load_records(f"{tmp}/text_train.jsonl")]
        # pixels processed here, while the files exist
        prompts = [D.encode_prompt(r, processor) for r in records]
    g = torch.Generator().manual_seed(args.seed)
    n_plain = min(tok.convert_tokens_to_ids(t) for t in M.SPECIAL_TOKENS)  # ids below are ordinary BPE tokens
    log_normal = torch.randn(len(prompts), generator=g).mul(args.spread).exp().mul(args.median)
    lengths_c = log_normal.clamp(8, args.max_completion).long().tolist()
    completions = [torch.randint(0, n_plain, (n,), generator=g).tolist() for n in lengths_c]
    order = torch.randperm(len(prompts), generator=g).tolist()  # the update's shuffled order
    lengths = [len(p.input_ids) + len(c) for p, c in zip(prompts, completions)]
    real = sum(lengths)

    widen = None if P.use_varlen_attention(model) else D.MAX_WIDEN  # one row per micro-batch with varlen

    def slots(mb: list[int], pack: bool) -> int:  # token slots one micro-batch computes (its rows x width)
        ls = [lengths[i] for i in mb]
        return D.packed_slots(ls, widen) if pack else len(ls) * max(ls)

    padded = [order[s : s + args.micro_batch] for s in range(0, len(order), args.micro_batch)]
    slots_padded = [slots(mb, False) for mb in padded]
    # the largest budget whose packed micro-batches hold no more token slots than the padded path's largest
    budget = max(slots_padded)
    while max(slots(b, True) for b in D.pack_by_tokens(lengths, budget)) > max(slots_padded):
        budget -= 16
    packed = D.pack_by_tokens(lengths, budget)
    slots_packed = [slots(b, True) for b in packed]
    plans = {"padded": (padded, False, slots_padded), "packed": (packed, True, slots_packed)}
    targets = sum(len(c) for c in completions)

    def one_pass(micro_batches, pack: bool) -> tuple[float, float, float, float]:
        """(wall seconds, CPU seconds of the process, peak MiB above the pass's start, wall seconds of the
        log-prob pass over the targets: ChunkedLogProbs' forward and backward)"""
        policy.pack = pack
        gc.collect()
        if os.path.exists("/proc/self/clear_refs"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
        start_kib = _status_kib("VmRSS")
        logprob_s[0] = 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        for mb in micro_batches:
            seqs = [prompts[i] for i in mb], [completions[i] for i in mb]
            b = D.collate_sequences(*seqs, tok.pad_token_id, model.config.image_token_id)
            logp, _ = policy(*(b[k] for k in POLICY_INPUTS))
            (-(logp * b["target_mask"]).sum() / targets).backward()  # the token mean over the whole set
        sec, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak_mib = (_status_kib("VmHWM") - start_kib) / 1024
        model.zero_grad(set_to_none=True)
        return sec, cpu, peak_mib, logprob_s[0]

    with_image = sum(p.pixel_values is not None for p in prompts)
    print(f"model {args.model}, {len(prompts)} sequences ({with_image} with an image), {real} tokens")
    median_c = statistics.median(lengths_c)
    print(f"completions {min(lengths_c)}..{max(lengths_c)} tokens (median {median_c:.0f}), ", end="")
    print(f"sequences {min(lengths)}..{max(lengths)}; {args.threads} threads")
    one_pass(packed[:1], True)  # warm-up (allocator, first-call costs)
    one_pass(padded[:1], False)
    times, cpus, peaks, lps = ({k: [] for k in plans} for _ in range(4))
    for _ in range(args.repeats):
        for name, (mbs, pack, _) in plans.items():
            sec, cpu, mib, lp = one_pass(mbs, pack)
            times[name].append(sec)
            cpus[name].append(cpu)
            peaks[name].append(mib)
            lps[name].append(lp)
    result = {}
    for name, (mbs, _, slots) in plans.items():
        sec = statistics.median(times[name])
        result[name] = {
            "micro_batches": len(mbs),
            "pad_frac": 1 - real / sum(slots),
            "peak_slots": max(slots),
            "peak_mib": max(peaks[name]),
            "s": sec,
            "tokens_per_s": real / sec,
            "cpu_s": statistics.median(cpus[name]),
            "best_s": min(times[name]),
            "logprob_s": statistics.median(lps[name]),
            "slots": sum(slots),
        }
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        cpu_runs = ", ".join(f"{t:.2f}" for t in cpus[name])
        print(
            f"{name:>7}: {len(mbs):3d} micro-batches, padding fraction {result[name]['pad_frac']:.3f}, peak "
            f"{max(slots)} token slots, peak {max(peaks[name]):.0f} MiB, {sec:.2f} s per pass (runs {runs}; "
            f"CPU s {cpu_runs}), {real / sec:.0f} tokens/s"
        )

    def rows(b: list[int]) -> str:
        ls = [lengths[i] for i in b]
        n = len(D.pack_rows(ls, widen))
        return f"{n}x{D.packed_slots(ls, widen) // n} ({sum(ls)} tokens)"

    layout = [rows(b) for b in packed]
    print(f"packed rows per micro-batch (rows x width): {', '.join(layout)}")
    fill = real / (len(packed) * budget)
    at_best = math.ceil(real / budget)
    print(f"packed micro-batches: budget {budget} tokens, filled {fill:.3f} on average ", end="")
    print(f"({at_best} at best, {len(packed)} used)")
    pad, pk = result["padded"], result["packed"]
    flat = {f"{k}_{m}": round(v, 4) for k in result for m, v in result[k].items()}
    print(json.dumps({"model": args.model, "n": len(prompts), "budget": budget, **flat}))
    ratio = pk["tokens_per_s"] / pad["tokens_per_s"]
    by_cpu, by_best = pad["cpu_s"] / pk["cpu_s"], pad["best_s"] / pk["best_s"]
    print(f"tokens/s packed / padded: {ratio:.2f} (by CPU time: {by_cpu:.2f}; ", end="")
    print(f"by each path's fastest run: {by_best:.2f})")
    print(f"peak memory packed / padded: {pk['peak_mib'] / pad['peak_mib']:.2f}")
    # Where the time goes. The log-prob pass (lm_head over the target tokens, fp32, forward + backward) costs the
    # same on both paths: packing only removes the rest's padding, so the ratio it can reach is at most
    # (padded rest + log-prob) / (packed rest + log-prob).
    rest_pad, rest_pk = pad["s"] - pad["logprob_s"], pk["s"] - pk["logprob_s"]
    share = pk["logprob_s"] / pk["s"]
    print(
        f"log-prob pass over the {targets} target tokens: padded {pad['logprob_s']:.2f} s, packed "
        f"{pk['logprob_s']:.2f} s ({share:.0%} of a packed pass)"
    )
    print(
        f"the rest (vision tower, decoder, loss): padded {rest_pad:.2f} s, packed {rest_pk:.2f} s: "
        f"{rest_pad / rest_pk:.2f}x for {pad['slots'] / pk['slots']:.2f}x the token slots"
    )


if __name__ == "__main__":
    main()
