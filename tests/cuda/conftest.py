"""Fixtures of the CUDA-path tests. Without a GPU the Triton kernels run in Triton's
interpreter on the CPU (TRITON_INTERPRET=1, set here before any kernel module is
imported), on small shapes, the model's many-token matmuls there through torch
(GGUFLM_MATMUL=cublas) unless a test asks for the fused GEMM; tests marked ``cuda`` need
the real device.

Oracles: libggml's own dequantizers (``gguflm.verify.ggml_oracle``), float64
recomputations of each formula, and the float64 reference forward pass
(``gguflm.verify.reference``) on models quantized by llama.cpp's own quantizer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # the model's many-token matmuls: dequantization + torch matmul (the fused GEMM, the
    # GPU's default, costs minutes per model test in the interpreter); tests/cuda/test_gemm.py
    # and the tests that need the GEMM through the model set GGUFLM_MATMUL=gemm themselves
    os.environ.setdefault("GGUFLM_MATMUL", "cublas")

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("GGUFLM_TEST_CACHE", Path.home() / ".cache" / "gguflm-tests"))
ON_GPU = torch.cuda.is_available()


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernels run: the GPU, or the CPU through the Triton interpreter."""
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(scope="session")
def oracle():
    """libggml's to_float: ``oracle(raw uint8, ggml_type, n_elements) -> float32 array``."""
    from gguflm.verify import ggml_oracle

    if not ggml_oracle.available():
        pytest.skip("libggml (llama-cpp-python) is not available: it is the oracle here")
    return ggml_oracle.ggml_to_float


@pytest.fixture(scope="session")
def random_blocks():
    """``random_blocks(ggml_type, n, seed) -> (n, type_size) uint8``: random bytes in every
    field, except F16 fields, which hold finite N(0, 0.02) values (any bit pattern of
    the integer fields is a valid block)."""
    from gguflm.gguf.types import LAYOUTS

    def make(ggml_type, n: int, seed: int = 0) -> np.ndarray:
        lay = LAYOUTS[ggml_type]
        rng = np.random.default_rng(seed)
        b = rng.integers(0, 256, size=(n, lay.type_size), dtype=np.uint8)
        for f in lay.fields:
            if f.dtype == "<f2":
                off = lay.offsets[f.name]
                v = (rng.standard_normal((n, f.count)) * 0.02).astype(np.float16)
                b[:, off:off + f.nbytes] = v.view(np.uint8).reshape(n, -1)
        return b

    return make



@pytest.fixture(scope="session")
def packed_weight(random_blocks, oracle, device):
    """``packed_weight(ggml_type, n_rows, blocks_per_row, seed) -> (w, ref)``: a random
    :class:`~gguflm.quant.triton.planes.PackedWeight` of ``n_rows`` rows on ``device`` and
    libggml's value of it (``to_float``) as float64 ``[n_rows, n_cols]``."""
    from gguflm.gguf.types import LAYOUTS
    from gguflm.quant.triton.planes import PackedWeight

    def make(ggml_type, n_rows: int, blocks_per_row: int, seed: int = 0):
        raw = random_blocks(ggml_type, n_rows * blocks_per_row, seed)
        n_cols = blocks_per_row * LAYOUTS[ggml_type].block_size
        w = PackedWeight.from_raw(raw, ggml_type, (n_cols, n_rows), device)
        ref = torch.from_numpy(oracle(raw.reshape(-1), ggml_type, n_rows * n_cols)).double().view(n_rows, n_cols)
        return w, ref

    return make

def _make_tiny(dst: Path, vocab: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_tinyllama.py"), str(dst), "--vocab", str(vocab),
                    "--layers", "2", "--width", "256", "--ffn", "768", "--heads", "4", "--kv-heads", "2",
                    "--ctx", "256", "--vocab-size", "512", "--dtype", "f32"],
                   check=True, capture_output=True)


@pytest.fixture(scope="session")
def tiny_model(shared_dir, llama_quantize):
    """``tiny_model("Q4_K_M") -> path``: a 2-layer, 256-wide Llama with random weights
    (benchmarks/make_tinyllama.py), quantized by llama.cpp's own quantizer; cached."""
    pytest.importorskip("gguf")
    vocab = shared_dir / "vocab" / "ggml-vocab-llama-spm.gguf"
    src = CACHE / "tiny-llama-2x256-f32.gguf"

    def make(ftype: str) -> Path:
        dst = CACHE / f"tiny-llama-2x256.{ftype}.gguf"
        if dst.exists():
            return dst
        if not src.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            tmp = src.with_suffix(".tmp")
            _make_tiny(tmp, vocab)
            tmp.rename(src)
        return llama_quantize(src, ftype, dst)

    return make
