"""Where the CUDA path keeps compiled kernels: Triton's cache beside gguflm's own build of
the GEMV kernels ($GGUFLM_KERNEL_CACHE, default ~/.cache/gguflm/kernels), a value the
user set for TRITON_CACHE_DIR winning."""

from __future__ import annotations

import os
from pathlib import Path

import gguflm
from gguflm.model.config import ModelConfig
from gguflm.model.cuda import load_cuda
from gguflm.quant.cuda.build import kernel_cache_dir


def _load(path, device):
    f = gguflm.GGUFFile(path)
    return load_cuda(f, ModelConfig.from_gguf(f), 16, device)


def test_triton_cache_lives_under_the_gguflm_cache(tiny_model, device, monkeypatch, tmp_path):
    monkeypatch.delenv("GGUFLM_KERNEL_CACHE", raising=False)
    assert kernel_cache_dir() == Path.home() / ".cache" / "gguflm" / "kernels"
    monkeypatch.setenv("GGUFLM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    _load(tiny_model("Q4_0"), device)
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    _load(tiny_model("Q4_0"), device)
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")
