"""Shared fixtures: the tiny model (built once per session) and a small synthetic data set."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _descendants(pid: int) -> list[int]:
    """`pid`'s children, their children, ... (from /proc/PID/stat's ppid; torchrun starts each rank in a session
    of its own, so neither the session nor the process group finds them)."""
    parent = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent[int(entry)] = int(
                    f.read().rsplit(")", 1)[1].split()[1]
                )  # after "(comm)": state ppid ...
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def run_command(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs), except on timeout: every
    process started by the command but torchrun's launcher gets SIGUSR1 first (a stage prints its threads' Python
    stacks: common.main_guard), then all of them are killed and the test fails with the end of stderr, so a hang
    in CI says where each rank waited."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pids = [proc.pid, *_descendants(proc.pid)]
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"torch.distributed.run" not in f.read():
                        os.kill(pid, signal.SIGUSR1)
            except (OSError, ProcessLookupError):
                pass
        time.sleep(3)  # the stacks reach stderr
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\nstderr (end):\n{err[-12000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def sized_tiny_config(base, width: int, mrope_section: list[int], **text):
    """`base` (model.tiny_config: the tiny model's special ids) resized: a `width`-wide text decoder with the given
    `text` fields over model.TINY_TEXT, rope theta 1e6 with `mrope_section`, the vision merger's output `width` wide,
    embeddings untied. For tests that need a model larger than `tiny` but of the same family and vocabulary."""
    from transformers import Qwen2_5_VLConfig

    import model as M

    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section}
    ids = {k: getattr(base.text_config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    text_config = dict(M.TINY_TEXT, hidden_size=width, tie_word_embeddings=False, rope_parameters=rope, **ids)
    text_config.update(text)
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    vision = dict(M.TINY_VISION, out_hidden_size=width)
    kw = {k: getattr(base, k) for k in names}
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision, tie_word_embeddings=False, **kw)


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of the built-in `tiny` model, seed 0. Tests must not modify the model in place."""
    import model as M

    m, p = M.load_model("tiny", seed=0)
    return m.eval(), p


@pytest.fixture(scope="session")
def tiny_qwen():
    import model as M

    m, p = M.load_model("tiny-qwen", seed=0)
    return m.eval(), p


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synthetic data set (all six splits) written once per session."""
    import synth

    out = tmp_path_factory.mktemp("synth")
    cfg = synth.SynthConfig(seed=0)
    for name in list(vars(cfg)):
        if name.startswith("n_") and isinstance(getattr(cfg, name), int):
            setattr(cfg, name, min(getattr(cfg, name), 60))
    synth.write_synth(str(out), cfg)
    return str(out)


def make_image(path, size=(56, 56), color="red"):
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture(scope="session")
def sft_tiny(tmp_path_factory):
    """The tiny model after 300 cold-start SFT steps (configs/sft_tiny.yaml's settings) on the synthetic task's
    text-only SFT split (synth's default, the paper's text-only cold start): (out_dir, data_dir); the model is
    out_dir/final. About a minute on 2 idle cores."""
    import sft
    import synth

    data_dir = str(tmp_path_factory.mktemp("sft_synth"))
    sizes = dict(n_sft=1600, n_sft_test=100, n_mm_train=0, n_text_train=0, n_mm_test=0, n_text_test=0)
    synth.write_synth(data_dir, synth.SynthConfig(seed=0, **sizes))
    out = str(tmp_path_factory.mktemp("sft_tiny"))
    cfg = sft.SFTConfig(
        model="tiny",
        data=os.path.join(data_dir, "sft.jsonl"),
        eval_data=os.path.join(data_dir, "sft_test.jsonl"),
        out_dir=out,
        max_steps=300,
        lr=1e-2,
        global_batch=32,
        micro_batch=16,
        save_every=0,
        eval_every=0,
        log_every=0,
    )
    sft.train(cfg)
    return out, data_dir
