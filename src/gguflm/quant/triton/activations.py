"""Fused element-wise kernels of the many-token (prefill) path, one launch each where
plain torch needs several:

    rms_norm_half   y = (x * rstd) * w, rstd = 1 / sqrt(mean(x^2) + eps)   x float32 -> float16
    silu_mul_half   y = silu(g) * u for gu = [g | u] (float16 rows)       -> float16
    rope_prefill    rotate the q and k heads of a [T, (H + 2 Hkv) D] float16 QKV block at
                    positions p0 .. p0+T-1; q -> [T, H, D], k and v -> the cache rows
                    p0 .. p0+T-1 ([Hkv, n_ctx, D])

Arithmetic is float32 throughout; only the stores round. Rotation as in
:mod:`gguflm.quant.triton.attention` (NORM pairs (2i, 2i+1), NEOX pairs (i, i + D/2)).
Twins: :func:`rms_norm_half_reference`, :func:`silu_mul_half_reference`,
:func:`rope_prefill_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_half_kernel(X_ptr, W_ptr, Y_ptr, E, eps, BLOCK: tl.constexpr):
    """Row r: Y[r] = (X[r] * rstd) * W in float16."""
    r = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK)
    mask = k < E
    x = tl.load(X_ptr + r * E + k, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / E + eps)
    w = tl.load(W_ptr + k, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y_ptr + r * E + k, ((x * rstd) * w).to(tl.float16), mask=mask)


def rms_norm_half(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x: float32 [N, E] (contiguous), w: [E] -> float16 [N, E]."""
    n, e = x.shape
    y = torch.empty(n, e, dtype=torch.float16, device=x.device)
    _rms_norm_half_kernel[(n,)](x, w, y, e, eps, BLOCK=triton.next_power_of_2(e), num_warps=4)
    return y


@triton.jit
def _silu_mul_half_kernel(GU_ptr, Y_ptr, F, BLOCK: tl.constexpr):
    """Row r, columns c0 .. c0+BLOCK: Y[r, c] = silu(G[r, c]) * U[r, c], G = GU[r, :F], U = GU[r, F:]."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < F
    g = tl.load(GU_ptr + r * 2 * F + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU_ptr + r * 2 * F + F + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y_ptr + r * F + c, (g * tl.sigmoid(g) * u).to(tl.float16), mask=mask)


def silu_mul_half(gu: torch.Tensor) -> torch.Tensor:
    """gu: float16 [N, 2F] = [gate | up] -> float16 [N, F]."""
    n, f2 = gu.shape
    f = f2 // 2
    y = torch.empty(n, f, dtype=torch.float16, device=gu.device)
    block = 1024
    _silu_mul_half_kernel[(n, triton.cdiv(f, block))](gu, y, f, BLOCK=block, num_warps=4)
    return y


@triton.jit
def _rope_prefill_kernel(QKV_ptr, COS_ptr, SIN_ptr, Q_ptr, K_ptr, V_ptr, p0, H, n_kv,
                         cache_head_stride, cache_pos_stride, D: tl.constexpr, NEOX: tl.constexpr):
    """Program (t, h): h < H rotates query head h of token t into Q[t, h]; H <= h < H + Hkv
    rotates key head h - H into K[h - H, p0 + t] and copies value head h - H into V."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    pos = p0 + t
    i = tl.arange(0, D // 2)
    if NEOX:
        i0, i1 = i, i + D // 2
    else:
        i0, i1 = 2 * i, 2 * i + 1
    width = (H + 2 * n_kv) * D
    row = QKV_ptr + t.to(tl.int64) * width
    cos = tl.load(COS_ptr + pos * (D // 2) + i)
    sin = tl.load(SIN_ptr + pos * (D // 2) + i)
    x0 = tl.load(row + h * D + i0).to(tl.float32)
    x1 = tl.load(row + h * D + i1).to(tl.float32)
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    if h < H:
        q = Q_ptr + (t.to(tl.int64) * H + h) * D
        tl.store(q + i0, y0.to(tl.float16))
        tl.store(q + i1, y1.to(tl.float16))
    else:
        hk = h - H
        dst = hk * cache_head_stride + pos.to(tl.int64) * cache_pos_stride
        tl.store(K_ptr + dst + i0, y0.to(K_ptr.dtype.element_ty))
        tl.store(K_ptr + dst + i1, y1.to(K_ptr.dtype.element_ty))
        d = tl.arange(0, D)
        v = tl.load(row + (H + n_kv + hk) * D + d)
        tl.store(V_ptr + dst + d, v.to(V_ptr.dtype.element_ty))


def rope_prefill(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, p0: int, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, n_head: int, neox: bool) -> torch.Tensor:
    """qkv: float16 [T, (H + 2 Hkv) D] of tokens at positions p0 .. p0+T-1; k/v_cache:
    [Hkv, n_ctx, D] of one sequence (written in place) -> rotated q, float16 [T, H, D]."""
    t = qkv.shape[0]
    n_kv, n_ctx, d = k_cache.shape
    if p0 + t > n_ctx:
        raise ValueError(f"positions {p0}..{p0 + t - 1} exceed the cache of {n_ctx}")
    if k_cache.stride(2) != 1 or k_cache.stride() != v_cache.stride() or not qkv.is_contiguous():
        raise ValueError("contiguous rows expected")
    q = torch.empty(t, n_head, d, dtype=torch.float16, device=qkv.device)
    _rope_prefill_kernel[(t, n_head + n_kv)](qkv, cos, sin, q, k_cache, v_cache, p0, n_head, n_kv,
                                             k_cache.stride(0), k_cache.stride(1), D=d, NEOX=neox, num_warps=1)
    return q


# ---------------------------------------------------------------------------------------
# Plain-torch twins (float64)
# ---------------------------------------------------------------------------------------

def rms_norm_half_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


def silu_mul_half_reference(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.double().chunk(2, dim=-1)
    return g * torch.sigmoid(g) * u


def rope_prefill_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, p0: int,
                           n_head: int, n_kv: int, neox: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [T, H, D], k [Hkv, T, D], v [Hkv, T, D]) in float64."""
    from gguflm.quant.triton.attention import rotate_reference

    t = qkv.shape[0]
    d = qkv.shape[1] // (n_head + 2 * n_kv)
    q, k, v = qkv.double().split((n_head * d, n_kv * d, n_kv * d), dim=1)
    c, s = cos[p0:p0 + t, None], sin[p0:p0 + t, None]                    # [T, 1, D/2]
    q = rotate_reference(q.view(t, n_head, d), c, s, neox)
    k = rotate_reference(k.view(t, n_kv, d), c, s, neox).transpose(0, 1)
    return q, k, v.view(t, n_kv, d).transpose(0, 1)
