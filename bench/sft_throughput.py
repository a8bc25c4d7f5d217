"""SFT throughput on CPU and the padding that length grouping saves.

Runs sft.train for a few optimizer steps on `tiny-qwen` (the tiny network with the real 151k Qwen2 vocabulary,
so lm_head's chunked log-probs cost what they would at full vocabulary), once with length-grouped micro-batches
and once without, on the synthetic task's SFT split (half the records with an image, as run.sh) or on --data.

    python bench/sft_throughput.py            # 30 steps each, global batch 16, micro-batch 8
    python bench/sft_throughput.py --quick    # 6 steps each
Prints the padding fraction of one epoch's micro-batches (static, from sft.epoch_order) and, per setting, the
measured tokens/s (non-padding prompt + solution tokens per second; the first step is left out as warm-up)
and the mean logged pad_frac; the last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="6 steps per setting instead of 30")
    ap.add_argument("--model", default="tiny-qwen")
    ap.add_argument("--data", default="", help="SFT JSONL (default: the synthetic task, 400 records)")
    ap.add_argument("--global_batch", type=int, default=16)
    ap.add_argument("--micro_batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import logging

    import torch

    import data as D
    import model as M
    import sft

    torch.set_num_threads(args.threads)
    steps = 6 if args.quick else 30
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if not data:
            import synth

            sizes = dict(n_sft=400, n_sft_test=0, n_mm_train=0, n_text_train=0, n_mm_test=0, n_text_test=0)
            synth.write_synth(tmp, synth.SynthConfig(seed=0, mm_share=0.5, **sizes))
            data = os.path.join(tmp, "sft.jsonl")

        # Static padding fraction over one epoch's micro-batches.
        base = sft.SFTConfig(
            model=args.model, data=data, global_batch=args.global_batch, micro_batch=args.micro_batch
        )
        _, processor = M.load_model(args.model)
        examples = sft.build_examples(D.load_records(data, require_solution=True), processor, base)
        lengths = [e.length for e in examples]
        static = {}
        for grouped in (True, False):
            order = sft.epoch_order(lengths, 0, 0, args.micro_batch, grouped)
            batches = [
                [lengths[i] for i in order[s : s + args.micro_batch]]
                for s in range(0, len(order), args.micro_batch)
            ]
            static[grouped] = 1.0 - sum(map(sum, batches)) / sum(len(b) * max(b) for b in batches)
        print(
            f"{len(examples)} records ({sum(e.prompt.pixel_values is not None for e in examples)} with images), "
            f"lengths {min(lengths)}..{max(lengths)} tokens; micro-batch {args.micro_batch}, global batch "
            f"{args.global_batch}, {args.threads} threads, model {args.model}"
        )
        print(f"padding fraction over an epoch: grouped {static[True]:.3f}, not grouped {static[False]:.3f}")

        logging.disable(logging.INFO)
        measured = {}
        for grouped in (True, False):
            out = os.path.join(tmp, f"run_{int(grouped)}")
            cfg = sft.SFTConfig(
                model=args.model,
                data=data,
                out_dir=out,
                max_steps=steps,
                lr=1e-3,
                global_batch=args.global_batch,
                micro_batch=args.micro_batch,
                group_by_length=grouped,
                save_every=0,
                eval_every=0,
                log_every=0,
                resume="false",
            )
            sft.train(cfg)
            with open(os.path.join(out, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f][1:]  # the first step is warm-up
            seconds = sum(r["seq_tokens"] / r["tokens_per_s"] for r in rows)
            measured[grouped] = {
                "tokens_per_s": sum(r["seq_tokens"] for r in rows) / seconds,
                "pad_frac": sum(r["pad_frac"] for r in rows) / len(rows),
            }
            name = "grouped" if grouped else "not grouped"
            print(
                f"{name:>12}: {measured[grouped]['tokens_per_s']:.0f} tokens/s, "
                f"pad_frac {measured[grouped]['pad_frac']:.3f} (steps 2..{steps})"
            )
    summary = {"model": args.model, "steps": steps, "micro_batch": args.micro_batch}
    summary.update(
        pad_frac_epoch_grouped=round(static[True], 4), pad_frac_epoch_ungrouped=round(static[False], 4)
    )
    summary.update(tokens_per_s_grouped=round(measured[True]["tokens_per_s"], 1))
    summary.update(tokens_per_s_ungrouped=round(measured[False]["tokens_per_s"], 1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
