"""The fused CPU kernels against their oracles.

* ``dequantize_rows`` (the embedding lookup, and the tiles the prefill GEMM multiplies) is
  bit-identical to libggml's ``to_float`` — asked directly through llama-cpp-python's
  libggml, on random blocks and on every quantized tensor type of real files.
* ``qmatmul`` agrees with its plain-torch twin, the float64 product of the exactly
  dequantized weights, within the float32 accumulation bound ``K * 2**-24 * (|W| @ |x|)``,
  for odd shapes (row counts N that leave a partial panel of 4 weight rows), batch sizes M
  on every side of the kernel switches (row kernels for 1-2 rows, panels from 3, exact
  tiles into sgemm past ``fused_max_m()``) and register tiles of every height (M = 5, 7, 13,
  17: not multiples of the 6-row tile), and both code paths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gguflm.gguf.types import GGMLType, LAYOUTS
from gguflm.verify import ggml_oracle

TYPES = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
         GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]


def libggml(raw: np.ndarray, t: GGMLType, n_rows: int, row_len: int) -> np.ndarray:
    if not ggml_oracle.available():
        pytest.skip("libggml (llama-cpp-python) is the oracle; install .[dev]")
    return np.asarray(ggml_oracle.ggml_to_float(raw, t, n_rows * row_len), dtype=np.float32).reshape(n_rows, row_len)


def shapes(t: GGMLType) -> list[tuple[int, int]]:
    qk = LAYOUTS[t].block_size
    return [(1, qk), (37, 3 * qk), (19, 5 * qk), (130, 2 * qk)]  # (N rows, K)


def test_kernel_types_cover_the_plan(cpu_kernels):
    assert set(TYPES) == set(cpu_kernels.kernel_types())


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_dequantize_rows_is_libggml(t, cpu_kernels, code_path, random_weight):
    for i, (n, k) in enumerate(shapes(t)):
        raw = random_weight(t, n, k, seed=i)
        w = cpu_kernels.QuantWeight(raw, t, (k, n))
        rows = torch.tensor([n - 1, 0, n // 2, n - 1])                # any order, repeats
        got = cpu_kernels.dequantize_rows(w, rows).numpy()
        want = libggml(raw, t, n, k)[rows.numpy()]
        assert got.shape == (4, k)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_qmatmul_matches_float64_twin(t, cpu_kernels, code_path, random_weight):
    rng = torch.Generator().manual_seed(int(t))
    fused_max = int(cpu_kernels.ops().fused_max_m())
    for i, (n, k) in enumerate(shapes(t)):
        w = cpu_kernels.QuantWeight(random_weight(t, n, k, seed=10 + i), t, (k, n))
        dense = torch.from_numpy(libggml(w.raw.numpy(), t, n, k)).double()
        for m in sorted({1, 2, 3, 4, 5, 7, 13, 16, 17, 21, fused_max, fused_max + 1}):
            x = torch.randn(m, k, generator=rng) * 3
            y = cpu_kernels.qmatmul(x, w)
            want = cpu_kernels.qmatmul_reference(x, w)
            bound = k * 2.0**-24 * (x.double().abs() @ dense.abs().T) + 1e-30
            assert y.shape == (m, n) and y.dtype == torch.float32
            assert ((y.double() - want).abs() <= bound).all(), f"{t.name} {n}x{k} M={m}"


def test_qmatmul_keeps_leading_dims(cpu_kernels, random_weight):
    w = cpu_kernels.QuantWeight(random_weight(GGMLType.Q8_0, 6, 64), GGMLType.Q8_0, (64, 6))
    x = torch.randn(2, 3, 64)
    y = cpu_kernels.qmatmul(x, w)
    assert y.shape == (2, 3, 6)
    torch.testing.assert_close(y, cpu_kernels.qmatmul(x.reshape(6, 64), w).view(2, 3, 6))
    assert cpu_kernels.qmatmul(torch.empty(0, 64), w).shape == (0, 6)   # no rows: no crash


@pytest.mark.parametrize("quant", ["Q4_1", "Q4_K_M", "Q5_K_M", "Q8_0"])
def test_real_tensors(quant, cpu_kernels, smollm2_path, requantized):
    """Every kernel type used by SmolLM2's files, on its real tensors: rows bit-identical to
    libggml, products within the float32 bound of the float64 twin."""
    import gguflm

    f = gguflm.GGUFFile(smollm2_path if quant == "Q4_1" else requantized(quant))
    seen = set()
    for name, info in f.tensors.items():
        if info.ggml_type in seen or not cpu_kernels.supports(info.ggml_type) or len(info.shape) != 2:
            continue
        seen.add(info.ggml_type)
        k, n = info.shape
        n = min(n, 512)                                                 # the first rows suffice
        raw = np.ascontiguousarray(f.tensor_data(name)[:n * info.nbytes // info.shape[1]])
        w = cpu_kernels.QuantWeight(raw, info.ggml_type, (k, n))
        rows = torch.arange(0, n, 7)
        want_rows = libggml(raw, info.ggml_type, n, k)
        np.testing.assert_array_equal(cpu_kernels.dequantize_rows(w, rows).numpy().view(np.uint32),
                                      want_rows[rows.numpy()].view(np.uint32))
        for m in (1, 3, 16):                                            # a row kernel, panels
            x = torch.randn(m, k)
            bound = k * 2.0**-24 * (x.double().abs() @ torch.from_numpy(want_rows).double().abs().T)
            assert ((cpu_kernels.qmatmul(x, w).double() - cpu_kernels.qmatmul_reference(x, w)).abs() <= bound).all(), \
                f"{name} M={m}"
    assert seen


def test_bad_inputs_are_errors(cpu_kernels, random_weight):
    raw = random_weight(GGMLType.Q4_1, 4, 64)
    with pytest.raises(ValueError, match="needs 160 bytes"):
        cpu_kernels.QuantWeight(raw[:-1], GGMLType.Q4_1, (64, 4))
    with pytest.raises(ValueError, match="not a multiple of 32"):
        cpu_kernels.QuantWeight(raw, GGMLType.Q4_1, (48, 4))
    with pytest.raises(cpu_kernels.KernelsUnavailable, match="IQ4_NL"):
        cpu_kernels.QuantWeight(raw, GGMLType.IQ4_NL, (64, 4))
    w = cpu_kernels.QuantWeight(raw, GGMLType.Q4_1, (64, 4))
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels.dequantize_rows(w, torch.tensor([4]))
    with pytest.raises(RuntimeError, match="x must be"):
        cpu_kernels.ops().qmatmul(torch.randn(2, 32), w.raw, int(w.ggml_type), 4, 64)
