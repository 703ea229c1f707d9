"""Fused element-wise kernels of the many-token (prefill) path, one launch each where
plain torch needs several:

    rms_norm_half   y = (x * rstd) * w, rstd = 1 / sqrt(mean(x^2) + eps)   x float32 -> float16
    add_rms_norm_half  x += r (the residual, in place), then rms_norm_half(x)
    silu_mul_half   y = silu(g) * u                                      float16 -> float16
    rope_prefill    rotate the q and k heads of a [T, (H + 2 Hkv) D] float16 QKV block at
                    positions p0 .. p0+T-1; q -> [T, H, D], k and v -> the cache rows
                    p0 .. p0+T-1 ([Hkv, n_ctx, D])

Arithmetic is float32 throughout; only the stores round. Rotation as in
:mod:`gguflm.kernels.triton.attention` (NORM pairs (2i, 2i+1), NEOX pairs (i, i + D/2)).
Twins: :func:`rms_norm_half_reference`, :func:`silu_mul_half_reference`,
:func:`rope_prefill_reference`, :func:`add_rms_norm_half_reference`.
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
def _add_rms_norm_half_kernel(X_ptr, R_ptr, W_ptr, Y_ptr, E, eps, BLOCK: tl.constexpr):
    """Row r: X[r] += R[r] (float32, in place), then Y[r] = (X[r] * rstd) * W in float16."""
    r = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK)
    mask = k < E
    x = tl.load(X_ptr + r * E + k, mask=mask, other=0.0) + tl.load(R_ptr + r * E + k, mask=mask, other=0.0).to(tl.float32)
    tl.store(X_ptr + r * E + k, x, mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / E + eps)
    w = tl.load(W_ptr + k, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y_ptr + r * E + k, ((x * rstd) * w).to(tl.float16), mask=mask)


def add_rms_norm_half(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x += r (x float32 [N, E] in place, r [N, E] any float dtype); returns float16
    RMSNorm(x) * w: the residual add fused with the norm that reads its result."""
    n, e = x.shape
    y = torch.empty(n, e, dtype=torch.float16, device=x.device)
    _add_rms_norm_half_kernel[(n,)](x, r, w, y, e, eps, BLOCK=triton.next_power_of_2(e), num_warps=4)
    return y


@triton.jit
def _silu_mul_half_kernel(G_ptr, U_ptr, Y_ptr, n, BLOCK: tl.constexpr):
    """Elements i .. i+BLOCK: Y = silu(G) * U, silu(g) = g * sigmoid(g)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    g = tl.load(G_ptr + i, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y_ptr + i, (g * tl.sigmoid(g) * u).to(tl.float16), mask=mask)


def silu_mul_half(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """g, u: float16 [N, F] (contiguous) -> float16 [N, F]."""
    y = torch.empty_like(g, dtype=torch.float16)
    n, block = g.numel(), 2048
    _silu_mul_half_kernel[(triton.cdiv(n, block),)](g, u, y, n, BLOCK=block, num_warps=4)
    return y


@triton.jit
def _rotated(x, cos, sin, NP: tl.constexpr, D: tl.constexpr, NEOX: tl.constexpr):
    """Heads x [NP, D] (float32, natural column order) rotated by cos/sin [1, D/2]."""
    if NEOX:
        x0, x1 = tl.split(tl.permute(tl.reshape(x, (NP, 2, D // 2)), (0, 2, 1)))
    else:
        x0, x1 = tl.split(tl.reshape(x, (NP, D // 2, 2)))
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    if NEOX:
        return tl.reshape(tl.permute(tl.join(y0, y1), (0, 2, 1)), (NP, D))
    else:
        return tl.reshape(tl.join(y0, y1), (NP, D))


@triton.jit
def _rope_prefill_kernel(QKV_ptr, COS_ptr, SIN_ptr, Q_ptr, K_ptr, V_ptr, p0, H, n_kv,
                         cache_head_stride, cache_pos_stride,
                         HP: tl.constexpr, KP: tl.constexpr, D: tl.constexpr, NEOX: tl.constexpr):
    """Program t: the H query heads of token t rotated into Q[t]; its Hkv key heads rotated
    into K[:, p0 + t] and its value heads copied into V[:, p0 + t]. Heads are loaded
    and stored as whole contiguous rows; the pairs are split in registers."""
    t = tl.program_id(0).to(tl.int64)
    pos = p0 + t
    row = QKV_ptr + t * ((H + 2 * n_kv) * D)
    d = tl.arange(0, D)[None, :]
    i = tl.arange(0, D // 2)[None, :]
    cos = tl.load(COS_ptr + pos * (D // 2) + i)
    sin = tl.load(SIN_ptr + pos * (D // 2) + i)
    hq = tl.arange(0, HP)[:, None]
    qmask = (hq < H) & (d >= 0)
    q = tl.load(row + hq * D + d, mask=qmask, other=0.0).to(tl.float32)
    tl.store(Q_ptr + (t * H + hq) * D + d, _rotated(q, cos, sin, HP, D, NEOX).to(tl.float16), mask=qmask)
    hk = tl.arange(0, KP)[:, None]
    kmask = (hk < n_kv) & (d >= 0)
    dst = hk * cache_head_stride + pos * cache_pos_stride + d
    k = tl.load(row + (H + hk) * D + d, mask=kmask, other=0.0).to(tl.float32)
    tl.store(K_ptr + dst, _rotated(k, cos, sin, KP, D, NEOX).to(K_ptr.dtype.element_ty), mask=kmask)
    v = tl.load(row + (H + n_kv + hk) * D + d, mask=kmask, other=0.0)
    tl.store(V_ptr + dst, v.to(V_ptr.dtype.element_ty), mask=kmask)


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
    _rope_prefill_kernel[(t,)](qkv, cos, sin, q, k_cache, v_cache, p0, n_head, n_kv,
                               k_cache.stride(0), k_cache.stride(1), HP=triton.next_power_of_2(n_head),
                               KP=triton.next_power_of_2(n_kv), D=d, NEOX=neox, num_warps=4)
    return q


# ---------------------------------------------------------------------------------------
# Plain-torch twins (float64)
# ---------------------------------------------------------------------------------------

def add_rms_norm_half_reference(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + r, its RMSNorm times w) in float64."""
    s = x.double() + r.double()
    return s, rms_norm_half_reference(s, w, eps)


def rms_norm_half_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


def silu_mul_half_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    g, u = g.double(), u.double()
    return g * torch.sigmoid(g) * u


def rope_prefill_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, p0: int,
                           n_head: int, n_kv: int, neox: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [T, H, D], k [Hkv, T, D], v [Hkv, T, D]) in float64."""
    from gguflm.kernels.triton.attention import rotate_reference

    t = qkv.shape[0]
    d = qkv.shape[1] // (n_head + 2 * n_kv)
    q, k, v = qkv.double().split((n_head * d, n_kv * d, n_kv * d), dim=1)
    c, s = cos[p0:p0 + t, None], sin[p0:p0 + t, None]                    # [T, 1, D/2]
    q = rotate_reference(q.view(t, n_head, d), c, s, neox)
    k = rotate_reference(k.view(t, n_kv, d), c, s, neox).transpose(0, 1)
    return q, k, v.view(t, n_kv, d).transpose(0, 1)
