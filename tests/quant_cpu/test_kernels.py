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


def _awkward_rows(k: int, gen: torch.Generator) -> torch.Tensor:
    """Activation rows that stress an integer encoding of x: outliers beside tiny values,
    zeros, subnormals, all-negative, huge and tiny groups, powers of two at the rounding
    edges."""
    rows = [torch.randn(k, generator=gen) * 3]
    x = torch.randn(k, generator=gen) * 1e-3
    x[::37] = 1e4 * torch.sign(torch.randn(x[::37].shape, generator=gen))  # outliers
    rows.append(x)
    x = torch.randn(k, generator=gen)
    x[: k // 2] = 0.0                                                    # zero groups
    rows.append(x)
    rows.append(torch.full((k,), 1e-41) * torch.randint(-3, 4, (k,), generator=gen))  # subnormals only
    rows.append(-torch.rand(k, generator=gen) - 0.5)                    # all negative
    x = torch.randn(k, generator=gen) * 2.0 ** torch.randint(-60, 60, (k // 32, 1), generator=gen).repeat(1, 32).reshape(-1)
    rows.append(x)                                                      # group scales far apart
    x = torch.ones(k) * (1 - 2.0**-24)                                   # just below a power of two: rounds up to 2^E
    x[1::2] = -(2.0**-30)
    rows.append(x)
    rows.append(torch.zeros(k))
    return torch.stack(rows).float()


@pytest.fixture(params=["vnni", "float"])
def vnni_path(request, cpu_kernels):
    """The AVX-512 path with the VNNI row kernels on, and off."""
    if not cpu_kernels.simd_available() or (request.param == "vnni" and not cpu_kernels.vnni_available()):
        pytest.skip("this CPU has no AVX-512 (VNNI)")
    old_simd, old = cpu_kernels.use_simd(True), cpu_kernels.use_vnni(request.param == "vnni")
    yield request.param
    cpu_kernels.use_vnni(old)
    cpu_kernels.use_simd(old_simd)


@pytest.mark.parametrize("t", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q4_0], ids=lambda t: t.name)
def test_row_kernels_on_awkward_x(t, cpu_kernels, vnni_path, random_weight):
    """1-2 activation rows (the row kernels; Q4_K takes the VNNI kernel where the CPU has it)
    on awkward activations: within the float32 bound of the float64 product of libggml's
    dequantized weights."""
    gen = torch.Generator().manual_seed(7)
    for i, (n, k) in enumerate([(37, 3 * 256), (9, 2048)]):
        w = cpu_kernels.QuantWeight(random_weight(t, n, k, seed=40 + i), t, (k, n))
        dense = torch.from_numpy(libggml(w.raw.numpy(), t, n, k)).double()
        xs = _awkward_rows(k, gen)
        for x in [xs[j:j + 1] for j in range(len(xs))] + [xs[j:j + 2] for j in range(0, len(xs), 2)]:
            y = cpu_kernels.qmatmul(x, w)
            want = x.double() @ dense.T
            bound = k * 2.0**-24 * (x.double().abs() @ dense.abs().T) + 1e-30
            assert ((y.double() - want).abs() <= bound).all(), f"{t.name} {n}x{k} M={len(x)} {vnni_path}"


def test_vnni_kernel_runs_and_falls_back_on_non_finite_x(cpu_kernels, random_weight):
    """The VNNI switch really changes the Q4_K row kernel (its sums round differently), and
    an activation row with inf or NaN gives what the float kernel gives (IEEE: not finite)."""
    if not cpu_kernels.vnni_available():
        pytest.skip("this CPU has no AVX-512 VNNI")
    t, n, k = GGMLType.Q4_K, 64, 1024
    w = cpu_kernels.QuantWeight(random_weight(t, n, k, seed=3), t, (k, n))
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(1))
    bad = x.clone()
    bad[0, 5], bad[1, 700] = float("inf"), float("nan")
    old_simd, old = cpu_kernels.use_simd(True), cpu_kernels.use_vnni(True)
    try:
        on, on_bad = cpu_kernels.qmatmul(x, w), cpu_kernels.qmatmul(bad, w)
        cpu_kernels.use_vnni(False)
        off, off_bad = cpu_kernels.qmatmul(x, w), cpu_kernels.qmatmul(bad, w)
    finally:
        cpu_kernels.use_vnni(old)
        cpu_kernels.use_simd(old_simd)
    assert not torch.equal(on, off)
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)
    assert torch.equal(on_bad.isnan(), off_bad.isnan()) and torch.equal(on_bad.isinf(), off_bad.isinf())
    assert torch.equal(on_bad.nan_to_num(), off_bad.nan_to_num())
