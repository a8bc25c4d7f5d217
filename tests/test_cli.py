"""The command line every stage shares (CONTRACT: one parser, one help format): each config field survives
torchrun's own argument parser, and a field means the same thing with the same type in every stage."""

import dataclasses
import os
import sys
import typing

import pytest
from torch.distributed.run import get_args_parser

import common as C
import eval as E
import grpo_mm
import grpo_text
import sft
import synth
from conftest import ROOT, run_command

STAGES = {
    "sft.py": sft.SFTConfig,
    "grpo_mm.py": grpo_mm.GRPOConfig,
    "grpo_text.py": grpo_text.GRPOTextConfig,
    "eval.py": E.EvalConfig,
    "data.py synth": synth.SynthCommand,
}


def _torchrun_passes(script_args: list[str]) -> list[str] | None:
    """The script's arguments as torchrun hands them on, or None when torchrun's parser takes or rejects them."""
    try:
        args = get_args_parser().parse_args(["--nproc_per_node", "2", "stage.py", *script_args])
    except SystemExit:
        return None
    return args.training_script_args


def test_the_old_group_size_flag_is_what_torchrun_swallowed():
    assert _torchrun_passes(["--n=8"]) is None  # PITFALLS: prefix matching makes it ambiguous
    assert _torchrun_passes(["--group_size=8"]) == ["--group_size=8"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_config_field_passes_through_torchrun_untouched(stage, capsys):
    for f in dataclasses.fields(STAGES[stage]):
        for args in ([f"--{f.name}", "1"], [f"--{f.name}=1"], ["--config", "x.yaml", f"--{f.name}", "1"]):
            assert _torchrun_passes(args) == args, f"{stage}: torchrun's parser takes --{f.name} ({args})"
    capsys.readouterr()  # argparse's usage text for the rejected cases above


def test_shared_fields_mean_the_same_with_the_same_type_and_default():
    """Fields that several stages have: one type everywhere, and one default where the meaning is a default
    (model, data and out_dir name each stage's own files)."""
    same_default = "resume bf16 distributed dist_timeout_min seed prompt placement image_dir max_bad_steps"
    same_default = set((same_default + " wandb_project eval_data").split())
    seen: dict[str, dict] = {}
    for stage, cls in STAGES.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            seen.setdefault(f.name, {})[stage] = (hints[f.name], default)
    shared = {name: per for name, per in seen.items() if len(per) > 1}
    assert {"resume", "bf16", "distributed", "seed", "model", "out_dir", "max_new_tokens"} <= set(shared)
    for name, per in shared.items():
        types = {tp for tp, _ in per.values()}
        assert len(types) == 1, f"--{name} has types {per}"
        if name in same_default:
            assert len({repr(d) for _, d in per.values()}) == 1, f"--{name} has defaults {per}"
    train = [sft.SFTConfig(), grpo_mm.GRPOConfig(), grpo_text.GRPOTextConfig()]
    assert len({(c.resume, c.bf16, c.distributed, c.dist_timeout_min) for c in train}) == 1


@pytest.mark.parametrize("stage", list(STAGES))
def test_one_help_format(stage, capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_config(STAGES[stage], ["--help"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    fields = [ln for ln in lines if ln.startswith("  --")]
    assert len(fields) == len(dataclasses.fields(STAGES[stage]))
    hints = typing.get_type_hints(STAGES[stage])
    for f, line in zip(dataclasses.fields(STAGES[stage]), fields):
        name, tp, word = line.split()[:3]
        assert (name, tp, word) == (f"--{f.name}", C.type_name(hints[f.name]), "default"), line


def test_resume_is_decided_by_rank_zero(tmp_path, monkeypatch):
    """Every rank takes rank 0's checkpoint choice (here rank 1 sees none: a stale view of a shared disk)."""
    ckpt = tmp_path / "ckpt" / "step_000002"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    sent = {}

    def fake_broadcast(obj, d):  # what rank 0 would have sent
        sent["obj"] = obj
        return (str(ckpt), None)

    monkeypatch.setattr(C, "broadcast_object", fake_broadcast)
    rank1 = C.Dist(rank=1, world=2)
    assert C.resolve_resume("auto", str(tmp_path / "elsewhere"), rank1) == str(ckpt)
    assert sent["obj"] == (None, None)  # rank 1 did not decide
    monkeypatch.undo()
    rank0 = C.Dist()
    assert C.resolve_resume("auto", str(tmp_path), rank0) == str(ckpt)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        C.resolve_resume("true", str(tmp_path / "none"), rank0)
    assert C.resolve_resume("false", str(tmp_path), rank0) is None and not ckpt.exists()


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "configs"))))
def test_every_shipped_config_parses_and_validates(name):
    """configs/*.yaml load into their stage's config with the fields' own types, and pass its validation."""
    classes = {"sft": sft.SFTConfig, "grpo_mm": grpo_mm.GRPOConfig, "grpo_text": grpo_text.GRPOTextConfig}
    cls = classes[name.rsplit("_", 1)[0]]
    cfg = C.parse_config(cls, ["--config", os.path.join(ROOT, "configs", name), "--data=d.jsonl"])
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(cfg, f.name)
        expected = typing.get_origin(hints[f.name]) or hints[f.name]
        assert value is None or isinstance(value, expected), (f.name, value)
    if cls is sft.SFTConfig:
        sft.validate(cfg)
    else:
        grpo_mm.validate_config(cfg, world=8)


HANGING_STAGE = """
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, {root!r})
import common


@dataclass
class WaitConfig:
    seconds: float = 300.0  # how long to wait


def wait_for_the_other_rank(cfg):
    time.sleep(cfg.seconds)


common.main_guard(wait_for_the_other_rank, WaitConfig)
"""


@pytest.mark.slow
def test_a_stage_that_overruns_says_where_each_rank_waits(tmp_path):
    """A stage hung under torchrun: the tests' run_command sends SIGUSR1 to the ranks (not to torchrun), each
    rank's faulthandler (registered by common.main_guard) prints its Python stack, then everything is killed and
    the test fails with that stack."""
    script = tmp_path / "hang.py"
    script.write_text(HANGING_STAGE.format(root=ROOT))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    with pytest.raises(pytest.fail.Exception) as failure:
        run_command([*torchrun, str(script)], timeout=20)
    message = str(failure.value)
    assert message.startswith("timed out after 20 s")
    assert "wait_for_the_other_rank" in message  # where the ranks waited
    # each rank prints two frames of hang.py (its function, the module); the two ranks' lines may interleave
    assert message.count("hang.py") >= 1 + 2
