"""The `gguflm` command on hostile or mistaken input (issue 16 item 5): one line on stderr,
a non-zero exit, no traceback, no hang. Each case runs the real command in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gguflm.cli import options


def gguflm_cli(*args, stdin: bytes = b"", timeout: float = 120) -> subprocess.CompletedProcess:
    """Arguments may be bytes (invalid UTF-8 in argv, as a shell passes it)."""
    argv = [sys.executable, "-m", "gguflm", *(a if isinstance(a, bytes) else str(a) for a in args)]
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)


def assert_one_line(r: subprocess.CompletedProcess, *fragments: str) -> str:
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode != 0, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model(smollm2_path) -> Path:
    return smollm2_path


def test_tokenize_invalid_utf8_argument(model):
    assert_one_line(gguflm_cli("tokenize", "-m", model, b"\xff\xfe"),
                    "gguflm tokenize: error:", "TEXT is not valid UTF-8", r"\xff\xfe")


def test_tokenize_invalid_utf8_stdin(model):
    assert_one_line(gguflm_cli("tokenize", "-m", model, stdin=b"ok \xff"), "standard input is not UTF-8 text")


def test_run_invalid_utf8_prompt(model):
    assert_one_line(gguflm_cli("run", "-m", model, "-p", b"abc\xff"), "-p/--prompt is not valid UTF-8", r"abc\xff")


def test_run_huge_seed(model):
    assert_one_line(gguflm_cli("run", "-m", model, "-p", "hi", "--seed", 1180591620717411303424), "--seed")


@pytest.mark.parametrize("flag", ["-c", "--ctx-size"])
def test_run_context_beyond_the_limit(model, flag):
    assert_one_line(gguflm_cli("run", "-m", model, "-p", "hi", flag, 20000000), "-c 20000000")


def test_run_context_beyond_memory(model):
    """-c 10000000: the KV cache is estimated against the memory available, before allocating."""
    import gguflm
    from gguflm.model.config import ModelConfig

    cfg = ModelConfig.from_gguf(gguflm.GGUFFile(model))
    need = 2 * cfg.n_layer * cfg.n_head_kv * cfg.head_dim * 4 * 10_000_000
    avail = options.available_memory("cpu")
    if avail is None or avail > need:
        pytest.skip(f"this machine has more than the {need / 2**30:.0f} GiB such a cache needs")
    assert_one_line(gguflm_cli("run", "-m", model, "-p", "hi", "-c", 10000000), "KV cache needs", "smaller -c")


def test_run_min_p_out_of_range(model):
    assert_one_line(gguflm_cli("run", "-m", model, "-p", "hi", "--min-p", 5, "--temp", 1), "min_p must lie in [0, 1]")


@pytest.mark.parametrize("flag", ["-t", "--threads"])
def test_run_too_many_threads(model, flag):
    assert_one_line(gguflm_cli("run", "-m", model, "-p", "hi", flag, 100000), "--threads 100000")


@pytest.mark.parametrize("cmd", ["inspect", "run"])
def test_symlink_loop(tmp_path, cmd):
    loop = tmp_path / "loop.gguf"
    loop.symlink_to(loop)
    args = [cmd, loop] if cmd == "inspect" else [cmd, "-m", loop, "-p", "hi"]
    assert_one_line(gguflm_cli(*args), str(loop), "symbolic links")


def test_inspect_sysfs_file():
    path = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not Path(path).exists():
        pytest.skip(f"{path} does not exist here")
    assert_one_line(gguflm_cli("inspect", path), path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_inspect_named_pipe_does_not_block(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    assert_one_line(gguflm_cli("inspect", fifo, timeout=60), "not a regular file")


def test_perplexity_binary_text(model, tmp_path):
    binary = tmp_path / "text.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    assert_one_line(gguflm_cli("perplexity", "-m", model, "-f", binary), "is not UTF-8 text", str(binary))


def test_run_prompt_file_binary(model, tmp_path):
    binary = tmp_path / "prompt.bin"
    binary.write_bytes(b"hello \xc3\x28")
    assert_one_line(gguflm_cli("run", "-m", model, "-f", binary), "is not UTF-8 text", "offset 6")
