"""A missing optional dependency is one line naming the pip command, not a traceback:
the CLI runs in a subprocess in which the module cannot be imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCKED_RUN = ("import sys\n"
               "for name in sys.argv[1].split(','):\n"
               "    sys.modules[name] = None  # `import name` raises ModuleNotFoundError\n"
               "from gguflm.cli import main\n"
               "sys.exit(main(sys.argv[2:]))\n")


@pytest.mark.parametrize("blocked", ["fastapi", "uvicorn", "anyio"])
def test_serve_without_the_server_extra_is_one_line(blocked):
    r = subprocess.run([sys.executable, "-c", BLOCKED_RUN, blocked, "serve", "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == ["gguflm serve needs the server extra: pip install 'gguflm[server]'"]
    assert r.stdout == ""


def test_serve_replicas_without_the_ray_extra_is_one_line(smollm2_path):
    r = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "ray", "serve", "-m", str(smollm2_path), "--replicas", "2",
                        "--port", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == ["gguflm serve needs the ray extra: pip install 'gguflm[ray]'"]
    assert r.stdout == ""


def test_serve_tensor_parallel_that_does_not_divide_is_one_line(smollm2_path):
    r = subprocess.run([sys.executable, "-m", "gguflm", "serve", "-m", str(smollm2_path), "--tensor-parallel", "2",
                        "--port", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == [
        "gguflm serve: error: tensor parallel 2 needs the query and key/value head counts to be multiples of 2: "
        "this model has 9 query heads and 3 key/value heads (possible sizes: 1, 3)"]
