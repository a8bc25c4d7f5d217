"""The pipeline's report: one table, `summary.json` and a plot of the training curves (run.sh calls it).

    python report.py OUT_DIR

Reads OUT_DIR/eval/<stage>/predictions.jsonl (held-out mm and text splits, greedy),
OUT_DIR/eval/<stage>_blank/predictions.jsonl (the multimodal split with every image blanked),
OUT_DIR/<stage>/metrics.jsonl (training curves) and OUT_DIR/stage_seconds.tsv (wall time per stage).
Writes OUT_DIR/summary.json (CONTRACT: accuracies and rates are fractions in [0, 1]) and OUT_DIR/curves.png.
"""

from __future__ import annotations

import json
import os
import sys

from reward import format_reward

STAGES = ("base", "sft", "grpo_mm", "grpo_text")


def read_jsonl(path: str) -> list[dict]:
    """The rows of a jsonl file ([] when it does not exist yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _acc(rows: list[dict], bench: str) -> float:
    sel = [r for r in rows if r["bench"] == bench]
    return sum(bool(r["correct"]) for r in sel) / len(sel) if sel else float("nan")


def stage_summary(out_dir: str, stage: str, seconds: float) -> dict:
    rows = read_jsonl(os.path.join(out_dir, "eval", stage, "predictions.jsonl"))
    blank = read_jsonl(os.path.join(out_dir, "eval", f"{stage}_blank", "predictions.jsonl"))
    n = max(1, len(rows))
    return {
        "stage": stage,
        "mm_acc": _acc(rows, "mm"),
        "mm_acc_blank": _acc(blank, "mm"),
        "text_acc": _acc(rows, "text"),
        "format": sum(format_reward(r["response"]) for r in rows) / n,  # over both test splits
        "resp_len": sum(r.get("num_tokens", 0) for r in rows) / n,
        "seconds": round(seconds, 1),
    }


def read_seconds(out_dir: str) -> dict[str, float]:
    path = os.path.join(out_dir, "stage_seconds.tsv")
    out: dict[str, float] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                name, sec = line.split()
                out[name] = out.get(name, 0.0) + float(sec)
    return out


def table(stages: list[dict]) -> str:
    head = f"{'stage':<10} {'mm acc':>7} {'mm blank':>9} {'text acc':>9} {'format':>7} {'resp len':>9} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for s in stages:
        lines.append(
            f"{s['stage']:<10} {s['mm_acc']:>7.3f} {s['mm_acc_blank']:>9.3f} {s['text_acc']:>9.3f} "
            f"{s['format']:>7.3f} {s['resp_len']:>9.1f} {s['seconds']:>8.1f}"
        )
    return "\n".join(lines)


def plot(out_dir: str, path: str) -> None:
    """Reward, accuracy, zero-advantage fraction, PAD kept and response length per step of each RL stage
    (and the SFT loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("reward", "reward"),
        ("acc", "train accuracy"),
        ("zero_adv_frac", "zero-advantage fraction"),
        ("pad_kept", "PAD kept (sequences)"),
        ("resp_len", "response length (tokens)"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, title) in zip(axes.flat, panels):
        for stage in ("grpo_mm", "grpo_text"):
            rows = read_jsonl(os.path.join(out_dir, stage, "metrics.jsonl"))
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=stage)
        ax.set_title(title)
        ax.set_xlabel("rollout step")
        ax.legend()
    sft = read_jsonl(os.path.join(out_dir, "sft", "metrics.jsonl"))
    ax = axes.flat[-1]
    if sft:
        ax.plot([r["step"] for r in sft], [r["loss"] for r in sft], label="train")
        ev = [r for r in sft if r.get("eval_loss") is not None]
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held out")
        ax.legend()
    ax.set_title("SFT loss per token")
    ax.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(out_dir: str) -> dict:
    seconds = read_seconds(out_dir)
    done = [s for s in STAGES if os.path.exists(os.path.join(out_dir, "eval", s, "predictions.jsonl"))]
    stages = [stage_summary(out_dir, s, seconds.get(s, 0.0)) for s in done]
    summary = {"stages": stages, "seconds": round(sum(seconds.values()), 1)}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot(out_dir, os.path.join(out_dir, "curves.png"))
    print(table(stages))
    print(f"total {summary['seconds']:.0f} s; summary: {out_dir}/summary.json; curves: {out_dir}/curves.png")
    return summary


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/pipeline")
