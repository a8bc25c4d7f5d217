"""Loading a checkpoint for a sharded run: rank 0 reads it, the other ranks build on the meta device and receive
the weights into their FSDP2 shards (model.load_model(on_meta=...) + sharding.shard(from_rank0=True)).

The checkpoint is mid-size (about 300 MB: the real Qwen2 vocabulary and 24 wider decoder layers, random
weights), so the host-memory peaks are well above the interpreter's noise. Rank 1's peak resident memory above
its baseline (/proc VmHWM against VmRSS before the load) must stay within its own shard plus the largest single
tensor (the one in flight), +10%; the old way (every rank reads the whole checkpoint) needs the whole model.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import model as M
from conftest import ROOT, sized_tiny_config

pytestmark = pytest.mark.slow

WORKER = os.path.join(ROOT, "tests", "load_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mid_checkpoint(tmp_path_factory) -> str:
    from transformers import Qwen2_5_VLForConditionalGeneration

    tok = M.build_tokenizer("tiny-qwen")
    base = M.tiny_config(tok)
    layers = dict(intermediate_size=4096, num_hidden_layers=24, vocab_size=base.text_config.vocab_size)
    cfg = sized_tiny_config(base, 128, [4, 6, 6], **layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            cfg, attn_implementation="sdpa", dtype=torch.float32
        )
    out = str(tmp_path_factory.mktemp("mid") / "ckpt")
    M.save_model(
        model, M.build_processor(tok, M.build_image_processor(M.TINY_MIN_PIXELS, M.TINY_MAX_PIXELS)), out
    )
    return out


def load_peaks(ckpt: str, out: str, mode: str) -> list[dict]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd = [*torchrun, "--master_port", str(_free_port()), WORKER, ckpt, out, "--mode", mode]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    reports = []
    for rank in (0, 1):
        with open(f"{out}.{rank}") as f:
            reports.append(json.load(f))
    return reports


def test_rank0_load_fills_the_shards_and_bounds_rank1_memory(mid_checkpoint, tmp_path):
    reports = load_peaks(mid_checkpoint, str(tmp_path / "rank0"), "rank0")
    for rep in reports:
        assert rep["mismatched"] == [] and rep["buffers_ok"], rep
    r1 = reports[1]
    mb = 1 << 20
    grown = (r1["peak_kb"] - r1["base_kb"]) * 1024
    bound = 1.1 * (r1["shard_bytes"] + r1["largest_param_bytes"])
    print(
        f"rank 1 peak above baseline {grown / mb:.0f} MB; shard {r1['shard_bytes'] / mb:.0f} MB + largest tensor "
        f"{r1['largest_param_bytes'] / mb:.0f} MB (+10%: {bound / mb:.0f} MB); model {r1['model_bytes'] / mb:.0f} MB; "
        f"rank 0 peak above baseline {(reports[0]['peak_kb'] - reports[0]['base_kb']) / 1024:.0f} MB"
    )
    assert r1["model_bytes"] > 250 * mb and r1["largest_param_bytes"] < r1["model_bytes"] / 3  # the premise
    assert grown <= bound, (grown / mb, bound / mb)
