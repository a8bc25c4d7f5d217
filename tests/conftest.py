"""Shared fixtures: the tiny model (built once per session) and a small synthetic data set."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
