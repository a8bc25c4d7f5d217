"""Run under torchrun by tests/test_load.py: load a saved checkpoint into FSDP2 shards the way the stages do
(`model.load_model(on_meta=rank != 0)` + `sharding.shard(from_rank0=True)`), or the old way (`--mode every_rank`:
each rank reads the whole checkpoint, then shards), and report each rank's host-memory peak and whether its
parameters equal the checkpoint.

    torchrun --nproc_per_node 2 tests/load_worker.py CKPT OUT.json [--mode rank0|every_rank]
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
import policy as P  # noqa: E402
import sharding as SH  # noqa: E402


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> None:
    ckpt, out, mode = sys.argv[1], sys.argv[2], (sys.argv[4] if len(sys.argv) > 4 else "rank0")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dist.barrier()
    base = status_kb("VmRSS")
    hf = M.load_weights(ckpt, on_meta=mode == "rank0" and rank != 0)
    policy = P.Policy(hf)
    SH.shard(policy, from_rank0=mode == "rank0")
    peak = status_kb("VmHWM")
    dist.barrier()
    local = [p.to_local() if hasattr(p, "to_local") else p for p in policy.parameters()]
    shard_bytes = sum(t.numel() * t.element_size() for t in local)
    from safetensors.torch import load_file

    saved = load_file(os.path.join(ckpt, "model.safetensors"))
    mismatched = []
    for name, p in policy.named_parameters():  # full_tensor is a collective: the same order on every rank
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        key = name.removeprefix("model.")
        # saved in the checkpoints' published key layout: model.layers.*, visual.* (transformers converts)
        legacy = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        want = saved.get(key, saved.get(legacy))
        if want is None or not torch.equal(full.detach().cpu(), want):
            mismatched.append(name)
    buffers_ok = all(torch.isfinite(b).all() for b in policy.buffers())
    largest = max(t.numel() * t.element_size() for t in saved.values())
    with open(f"{out}.{rank}", "w") as f:
        json.dump(
            {
                "rank": rank,
                "mode": mode,
                "base_kb": base,
                "peak_kb": peak,
                "shard_bytes": shard_bytes,
                "largest_param_bytes": largest,
                "model_bytes": sum(t.numel() * t.element_size() for t in saved.values()),
                "mismatched": mismatched,
                "buffers_ok": bool(buffers_ok),
            },
            f,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
