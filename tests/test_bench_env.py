"""bench/grpo_vs_trl.py's TRL environment sees exactly the running environment's packages, also when the
benchmark runs from a virtual environment (its TRL worker once died there with `No module named 'PIL'`: the old
`venv --system-site-packages` exposed the base interpreter's packages, not the running venv's)."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # two virtual environments, ~10 s


def test_trl_env_from_a_venv_sees_the_running_venvs_packages(tmp_path):
    # The user's venv: the base interpreter's packages (torch, PIL, ...) plus one that only this venv has.
    user = tmp_path / "user-venv"
    venv = [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(user)]
    subprocess.run(venv, check=True)
    user_py = str(user / "bin" / "python")
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    found = subprocess.run([user_py, "-c", where], capture_output=True, text=True, check=True)
    purelib = found.stdout.strip()
    with open(os.path.join(purelib, "only_in_user_venv.py"), "w") as f:
        f.write("WHERE = 'user venv'\n")
    probe = "import only_in_user_venv, PIL, torch; print(only_in_user_venv.WHERE)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode != 0  # premise

    # From inside the user's venv, build the benchmark's environment (nothing to install: no network needed).
    trl_env = tmp_path / "trl-env"
    build = (
        f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'bench')!r}); import grpo_vs_trl as g; "
        f"print(g.make_env({str(trl_env)!r}, []))"
    )
    r = subprocess.run([user_py, "-c", build], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    env_py = r.stdout.strip().splitlines()[-1]
    assert env_py == str(trl_env / "bin" / "python")
    r = subprocess.run([env_py, "-c", probe], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "user venv", r.stderr[-2000:]
    # and its own site-packages come first (where TRL is installed)
    order = "import sys, sysconfig; p = sysconfig.get_paths()['purelib']; "
    order += "print(sys.path.index(p) < sys.path.index(" + repr(purelib) + "))"
    first = subprocess.run([env_py, "-c", order], capture_output=True, text=True)
    assert first.stdout.strip() == "True", first.stderr
