"""Fused element-wise kernels of the many-token (prefill) path, one launch each where
plain torch needs several:

    rms_norm_half   y = (x * rstd) * w, rstd = 1 / sqrt(mean(x^2) + eps)   x float32 -> float16
    add_rms_norm_half  x += r, or x += RMSNorm(r) * p (a post norm, Gemma), in place; then
                    rms_norm_half(x) when a weight w is given
    gated_act       y = act(g) * u, act = SiLU or GELU-tanh           float16/32 -> dtype of out
    head_rms_norm_  RMSNorm over each q and k head of a [N, (H + 2 Hkv) D] QKV block, in place
    rope_prefill    rotate the q and k heads of a [T, (H + 2 Hkv) D] float16 QKV block at
                    positions p0 .. p0+T-1; q -> [T, H, D], k and v -> the cache rows
                    p0 .. p0+T-1 ([Hkv, n_ctx, D])

Arithmetic is float32 throughout; only the stores round. Rotation as in
:mod:`gguflm.kernels.triton.attention` (NORM pairs (2i, 2i+1), NEOX pairs (i, i + D/2)).
Twins: :func:`rms_norm_half_reference`, :func:`gated_act_reference`,
:func:`rope_prefill_reference`, :func:`add_rms_norm_half_reference`,
:func:`head_rms_norm_reference`.
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
def _add_rms_norm_half_kernel(X_ptr, R_ptr, P_ptr, W_ptr, Y_ptr, E, eps, BLOCK: tl.constexpr,
                              POST: tl.constexpr, NORM: tl.constexpr):
    """Row r: X[r] += R[r] (POST: += RMSNorm(R[r]) * P), float32 in place; NORM: then
    Y[r] = (X[r] * rstd) * W in float16."""
    r = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK)
    mask = k < E
    a = tl.load(R_ptr + r * E + k, mask=mask, other=0.0).to(tl.float32)
    if POST:
        a = (a * (1.0 / tl.sqrt(tl.sum(a * a, axis=0) / E + eps))) * tl.load(P_ptr + k, mask=mask, other=0.0)
    x = tl.load(X_ptr + r * E + k, mask=mask, other=0.0) + a
    tl.store(X_ptr + r * E + k, x, mask=mask)
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / E + eps)
        w = tl.load(W_ptr + k, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y_ptr + r * E + k, ((x * rstd) * w).to(tl.float16), mask=mask)


def add_rms_norm_half(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor | None, eps: float,
                      post: torch.Tensor | None = None) -> torch.Tensor | None:
    """x += r, or x += RMSNorm(r) * post (x float32 [N, E] in place, r [N, E] any float
    dtype); returns float16 RMSNorm(x) * w (None when w is None): the residual add fused
    with the norm that reads its result."""
    n, e = x.shape
    y = torch.empty(n, e, dtype=torch.float16, device=x.device) if w is not None else x
    _add_rms_norm_half_kernel[(n,)](x, r, post if post is not None else x, w if w is not None else x, y, e, eps,
                                    BLOCK=triton.next_power_of_2(e), POST=post is not None, NORM=w is not None,
                                    num_warps=4)
    return y if w is not None else None


@triton.jit
def _gated_act_kernel(G_ptr, U_ptr, Y_ptr, n, BLOCK: tl.constexpr, GELU: tl.constexpr):
    """Elements i .. i+BLOCK: Y = act(G) * U; silu(g) = g sigmoid(g), gelu_tanh(g) =
    0.5 g (1 + tanh(z)) = g sigmoid(2 z), z = sqrt(2/pi) (g + 0.044715 g^3)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    g = tl.load(G_ptr + i, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U_ptr + i, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        s = tl.sigmoid(2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g))
    else:
        s = tl.sigmoid(g)
    tl.store(Y_ptr + i, (g * s * u).to(Y_ptr.dtype.element_ty), mask=mask)


def gated_act(g: torch.Tensor, u: torch.Tensor, gelu: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """act(g) * u, act GELU-tanh (``gelu``) or SiLU: g, u [N, F] or [F] (contiguous, float16
    or float32) -> ``out`` (default: float16 [N, F])."""
    y = torch.empty_like(g, dtype=torch.float16) if out is None else out
    n, block = g.numel(), 2048
    _gated_act_kernel[(triton.cdiv(n, block),)](g, u, y, n, BLOCK=block, GELU=gelu, num_warps=4)
    return y


@triton.jit
def _head_rms_norm_kernel(QKV_ptr, WQ_ptr, WK_ptr, row_stride, H, n_kv, eps,
                          HP: tl.constexpr, D: tl.constexpr):
    """Row r: each of its H query heads times rstd(head) * WQ, each of its Hkv key heads
    times rstd(head) * WK (in place, float32 arithmetic)."""
    r = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, HP)[:, None]
    d = tl.arange(0, D)[None, :]
    live = (h < H + n_kv) & (d >= 0)
    ptr = QKV_ptr + r * row_stride + h * D + d
    x = tl.load(ptr, mask=live, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    wq = tl.load(WQ_ptr + d + h * 0, mask=live & (h < H), other=0.0)
    wk = tl.load(WK_ptr + d + h * 0, mask=live & (h >= H), other=0.0)
    tl.store(ptr, ((x * rstd[:, None]) * (wq + wk)).to(QKV_ptr.dtype.element_ty), mask=live)


def head_rms_norm_(qkv: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, n_head: int, n_kv: int,
                   eps: float) -> torch.Tensor:
    """Qwen3 / Gemma 3's q and k norms: qkv [N, (H + 2 Hkv) D] or [(H + 2 Hkv) D] (float16
    or float32, contiguous rows), each q head RMSNormed times wq [D], each k head times wk,
    in place (v untouched)."""
    d = wq.numel()
    rows = qkv.view(-1, (n_head + 2 * n_kv) * d)
    if rows.stride(1) != 1 or d & (d - 1):
        raise ValueError(f"contiguous rows and a power-of-two head size expected (head size {d})")
    _head_rms_norm_kernel[(rows.shape[0],)](rows, wq, wk, rows.stride(0), n_head, n_kv, eps,
                                            HP=triton.next_power_of_2(n_head + n_kv), D=d, num_warps=4)
    return qkv


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

def add_rms_norm_half_reference(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float,
                                post: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + r or x + RMSNorm(r) * post, its RMSNorm times w) in float64."""
    s = x.double() + (r.double() if post is None else rms_norm_half_reference(r, post, eps))
    return s, rms_norm_half_reference(s, w, eps)


def rms_norm_half_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


def gated_act_reference(g: torch.Tensor, u: torch.Tensor, gelu: bool) -> torch.Tensor:
    g, u = g.double(), u.double()
    act = torch.nn.functional.gelu(g, approximate="tanh") if gelu else g * torch.sigmoid(g)
    return act * u


def head_rms_norm_reference(qkv: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, n_head: int,
                            n_kv: int, eps: float) -> torch.Tensor:
    """[N, (H + 2 Hkv) D] float64 with the q and k heads normed."""
    d = wq.numel()
    x = qkv.double().reshape(qkv.shape[0], n_head + 2 * n_kv, d).clone()
    x[:, :n_head] = rms_norm_half_reference(x[:, :n_head], wq, eps)
    x[:, n_head:n_head + n_kv] = rms_norm_half_reference(x[:, n_head:n_head + n_kv], wk, eps)
    return x.reshape(qkv.shape[0], -1)


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
