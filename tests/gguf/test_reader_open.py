"""The reader opens only regular files (issue 16 item 5): a named pipe, a device, a symlink
loop, a directory or a file that cannot be memory-mapped is a GGUFError naming the file,
at once (a pipe never blocks the open)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import gguflm


def _open_in_thread(path: Path) -> BaseException | None:
    """GGUFFile(path)'s exception; fails the test if the open blocks for 10 s."""
    out: list[BaseException | None] = []

    def target():
        try:
            gguflm.GGUFFile(path)
            out.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(10)
    assert out, f"GGUFFile({path}) blocked"
    return out[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_named_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    e = _open_in_thread(fifo)
    assert isinstance(e, gguflm.GGUFError) and "not a regular file" in str(e) and str(fifo) in str(e)


def test_symlink_loop(tmp_path):
    loop = tmp_path / "loop.gguf"
    loop.symlink_to(loop)
    e = _open_in_thread(loop)
    assert isinstance(e, gguflm.GGUFError) and "symbolic links" in str(e) and str(loop) in str(e)


@pytest.mark.parametrize("path", ["/dev/null", "/sys/kernel/mm/transparent_hugepage/enabled"])
def test_device_and_unmappable_files(path):
    if not Path(path).exists():
        pytest.skip(f"{path} does not exist here")
    e = _open_in_thread(Path(path))
    assert isinstance(e, gguflm.GGUFError) and path in str(e)


def test_directory_and_missing_file_unchanged(tmp_path):
    assert isinstance(_open_in_thread(tmp_path), gguflm.GGUFError)
    assert isinstance(_open_in_thread(tmp_path / "missing.gguf"), FileNotFoundError)
