"""Peak resident memory of forward + backward of a loss on per-token log-probs: chunked vs naive.

Each side runs in its own subprocess (so one side's allocations never count for the other) and reports the
peak RSS above its starting point (ru_maxrss is a high-water mark, so it is read in a fresh process).
The naive side builds the full (B, T, V) fp32 logits, log_softmax and its gradient: several 2.5 GB tensors at
B=4, T=1024, V=151,665. The chunked side is policy.token_logprobs (only chunk x V logits at a time).

    python bench/logprob_memory.py                 # B=4, T=1024, V=151665, H=96
    python bench/logprob_memory.py --quick         # B=2, T=256 (a CI-sized smoke run)
Last line: `peak memory chunked/naive: X` (goal X <= 0.25).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_side(side: str, b: int, t: int, v: int, h: int, chunk: int) -> dict:
    sys.path.insert(0, ROOT)
    import torch
    import torch.nn.functional as F

    import policy as P

    torch.manual_seed(0)
    hidden = torch.randn(b * t, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.02).requires_grad_()
    targets = torch.randint(0, v, (b * t,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB, high-water mark so far
    if side == "chunked":
        logp, _ = P.token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=chunk)
    else:
        logits = (hidden @ weight.T).float()  # (B*T, V) fp32
        logp = F.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    loss = -logp.mean()
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"side": side, "peak_mb": peak - base, "loss": float(loss), "grad_norm": float(hidden.grad.norm())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151665)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--side", choices=["chunked", "naive"])
    a = ap.parse_args()
    if a.quick:
        a.batch, a.seq = 2, 256
    if a.side:
        print(json.dumps(run_side(a.side, a.batch, a.seq, a.vocab, a.hidden, a.chunk)))
        return
    res = {}
    for side in ("chunked", "naive"):
        cmd = [sys.executable, __file__, "--side", side]
        for k in ("batch", "seq", "vocab", "hidden", "chunk"):
            cmd += [f"--{k}", str(getattr(a, k))]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res[side] = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{side:8s} peak {res[side]['peak_mb']:9.1f} MB  loss {res[side]['loss']:.6f}  "
            f"grad norm {res[side]['grad_norm']:.6f}"
        )
    assert abs(res["chunked"]["loss"] - res["naive"]["loss"]) < 1e-4, "the two sides disagree"
    print(f"B={a.batch} T={a.seq} V={a.vocab} H={a.hidden} chunk={a.chunk}")
    print(f"peak memory chunked/naive: {res['chunked']['peak_mb'] / res['naive']['peak_mb']:.3f}")


if __name__ == "__main__":
    main()
