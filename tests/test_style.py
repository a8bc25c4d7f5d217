"""House style, checked like behaviour: ruff's lint rules and its formatter over every Python file of the
project, and no formatter escape comments (a line the formatter cannot lay out is a line to rewrite). ruff is
pinned in the README's test command (its formatter's style changes between releases)."""

import glob
import shutil
import subprocess

import pytest

from conftest import ROOT

FMT_SKIP = "# fmt" + ": skip"  # spelled in two parts, or this file would match itself


def _python_files() -> list[str]:
    """The project's Python files (the root, tests/, bench/), relative to the repository root."""
    found = [
        glob.glob("*.py", root_dir=ROOT),
        glob.glob("tests/*.py", root_dir=ROOT),
        glob.glob("bench/*.py", root_dir=ROOT),
    ]
    return sorted(p for group in found for p in group)


@pytest.fixture(scope="module")
def ruff() -> str:
    exe = shutil.which("ruff")
    if exe is None:
        pytest.fail(
            "ruff is not installed: the README's test command installs it (pip install ... ruff==0.17.6)"
        )
    return exe


def test_ruff_lint_is_clean(ruff: str) -> None:
    res = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_ruff_format_leaves_every_file_unchanged(ruff: str) -> None:
    res = subprocess.run(
        [ruff, "format", "--check", "--no-cache", *_python_files()], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_no_formatter_escapes() -> None:
    hits = []
    for path in _python_files():
        with open(f"{ROOT}/{path}", encoding="utf-8") as f:
            hits += [f"{path}:{i}" for i, line in enumerate(f, 1) if FMT_SKIP in line]
    assert not hits, f"{len(hits)} lines escape the formatter: {', '.join(hits[:20])}"


def test_every_config_field_has_help() -> None:
    """A field's --help is the comment that ends its line (common._field_help): a line the formatter has to wrap
    loses that comment, silently. Every field of every command's config must still have one."""
    from dataclasses import fields

    import ablate
    import common as C
    import eval as E
    import grpo_mm
    import grpo_text
    import sft
    import synth
    import viewer

    configs = [sft.SFTConfig, grpo_mm.GRPOConfig, grpo_text.GRPOTextConfig, E.EvalConfig, synth.SynthCommand]
    configs += [ablate.AblateConfig, viewer.ViewerConfig]
    missing = [
        f"{cls.__name__}.{f.name}"
        for cls in configs
        for f in fields(cls)
        if not C._field_help(cls).get(f.name)
    ]
    assert not missing, f"fields without a --help text: {missing}"
