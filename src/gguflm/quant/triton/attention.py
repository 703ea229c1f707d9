"""Batch-1 decode attention over a static KV cache, with the position read on the device
(so one captured CUDA graph serves every step).

``rope_kv``: the fused QKV projection's output ``qkv = [q (H*D) | k (Hkv*D) | v (Hkv*D)]``
(float32) is rotated and split: ``q`` -> float32 [H, D]; ``k``, ``v`` -> the cache at
position ``pos`` (``K[h, pos, :]``, ``V[h, pos, :]``, the cache's dtype). Rotation of pair
``(x0, x1)`` at angle ``theta[pos, i]``: ``(x0 cos - x1 sin, x0 sin + x1 cos)``, pairs
``(2i, 2i+1)`` (NORM, llama) or ``(i, i + D/2)`` (NEOX); cos and sin are tables
[n_ctx, D/2] that already carry any attention factor.

``decode_attention``: for query head ``h`` (KV head ``h // (H/Hkv)``) and the ``n = pos+1``
cached positions, ``out[h] = softmax(q[h] K^T * scale) V`` with float32 scores and
accumulation. The positions are cut into ``n_splits`` ranges handled in parallel
(flash-decoding); each program keeps a running max and sum for the query heads of one KV
head, and a second kernel merges the ranges: ``out = sum_s e^(m_s - M) acc_s / sum_s
e^(m_s - M) l_s``.

Twins: :func:`rope_kv_reference`, :func:`decode_attention_reference` (float64 torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kv_kernel(QKV_ptr, COS_ptr, SIN_ptr, POS_ptr, Q_ptr, K_ptr, V_ptr,
                    H, cache_head_stride, cache_pos_stride,
                    D: tl.constexpr, NEOX: tl.constexpr):
    """Program h < H rotates query head h; H <= h < H + Hkv rotates key head h - H and
    stores it with value head h - H into the cache at the device position."""
    h = tl.program_id(0)
    pos = tl.load(POS_ptr)
    i = tl.arange(0, D // 2)
    if NEOX:
        i0, i1 = i, i + D // 2
    else:
        i0, i1 = 2 * i, 2 * i + 1
    cos = tl.load(COS_ptr + pos * (D // 2) + i)
    sin = tl.load(SIN_ptr + pos * (D // 2) + i)
    x0 = tl.load(QKV_ptr + h * D + i0)
    x1 = tl.load(QKV_ptr + h * D + i1)
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    if h < H:
        tl.store(Q_ptr + h * D + i0, y0)
        tl.store(Q_ptr + h * D + i1, y1)
    else:
        hk = h - H
        n_kv = tl.num_programs(0) - H
        dst = hk * cache_head_stride + pos * cache_pos_stride
        tl.store(K_ptr + dst + i0, y0.to(K_ptr.dtype.element_ty))
        tl.store(K_ptr + dst + i1, y1.to(K_ptr.dtype.element_ty))
        v_src = QKV_ptr + (H + n_kv + hk) * D
        d = tl.arange(0, D)
        tl.store(V_ptr + dst + d, tl.load(v_src + d).to(V_ptr.dtype.element_ty))


def rope_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
            q_out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            n_head: int, neox: bool) -> None:
    """qkv: float32 [(H + 2 Hkv) D]; cos/sin: float32 [n_ctx, D/2]; pos: int32 [1] (device);
    q_out: float32 [H, D]; k_cache/v_cache: [Hkv, n_ctx, D] (one layer, one sequence)."""
    n_kv, _, d = k_cache.shape
    if k_cache.stride(2) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("k and v caches must share strides with contiguous rows")
    _rope_kv_kernel[(n_head + n_kv,)](qkv, cos, sin, pos, q_out, k_cache, v_cache, n_head,
                                      k_cache.stride(0), k_cache.stride(1), D=d, NEOX=neox, num_warps=1)


@triton.jit
def _attn_split_kernel(Q_ptr, K_ptr, V_ptr, POS_ptr, M_ptr, L_ptr, ACC_ptr,
                       cache_head_stride, cache_pos_stride, scale,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                       BLOCK_S: tl.constexpr, N_SPLITS: tl.constexpr):
    """Program (kv head hk, split s): query heads hk*G .. hk*G+G-1 (padded to GP rows)
    over positions [s*L, min((s+1)*L, n)), L = ceil(n / N_SPLITS) rounded up to BLOCK_S.
    Writes running max M, sum L and unnormalised ACC per (head, split)."""
    hk = tl.program_id(0)
    s = tl.program_id(1)
    n = tl.load(POS_ptr) + 1
    per = tl.cdiv(tl.cdiv(n, N_SPLITS), BLOCK_S) * BLOCK_S
    start = s * per
    end = tl.minimum(start + per, n)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    gmask = g < G
    q = tl.load(Q_ptr + (hk * G + g)[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)
    q = (q * scale).to(K_ptr.dtype.element_ty)                                   # [GP, D]
    m = tl.full([GP], float("-inf"), dtype=tl.float32)
    l = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    base = hk * cache_head_stride
    for p0 in range(start, end, BLOCK_S):
        p = p0 + tl.arange(0, BLOCK_S)
        pmask = p < end
        kv_off = base + p[:, None] * cache_pos_stride + d[None, :]
        k = tl.load(K_ptr + kv_off, mask=pmask[:, None], other=0.0)             # [BLOCK_S, D]
        v = tl.load(V_ptr + kv_off, mask=pmask[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k))                                          # [GP, BLOCK_S]
        scores = tl.where(pmask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        pexp = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(pexp, axis=1)
        acc = acc * alpha[:, None] + tl.dot(pexp.to(v.dtype), v)
        m = m_new
    row = (hk * G + g) * N_SPLITS + s
    tl.store(M_ptr + row, m, mask=gmask)
    tl.store(L_ptr + row, l, mask=gmask)
    tl.store(ACC_ptr + row[:, None] * D + d[None, :], acc, mask=gmask[:, None])


@triton.jit
def _attn_merge_kernel(M_ptr, L_ptr, ACC_ptr, O_ptr, D: tl.constexpr, N_SPLITS: tl.constexpr):
    """Program h: out[h] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s (empty splits
    have m_s = -inf and weigh nothing)."""
    h = tl.program_id(0)
    s = tl.arange(0, N_SPLITS)
    d = tl.arange(0, D)
    m = tl.load(M_ptr + h * N_SPLITS + s)
    l = tl.load(L_ptr + h * N_SPLITS + s)
    acc = tl.load(ACC_ptr + (h * N_SPLITS + s)[:, None] * D + d[None, :])
    m_all = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(O_ptr + h * D + d, out)


class AttentionWorkspace:
    """Scratch for :func:`decode_attention`: per (head, split) max, sum and accumulator."""

    def __init__(self, n_head: int, head_dim: int, n_splits: int, device: torch.device | str):
        if n_splits & (n_splits - 1):
            raise ValueError("n_splits must be a power of two")
        self.n_splits = n_splits
        self.m = torch.empty(n_head * n_splits, dtype=torch.float32, device=device)
        self.l = torch.empty_like(self.m)
        self.acc = torch.empty(n_head * n_splits, head_dim, dtype=torch.float32, device=device)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     out: torch.Tensor, ws: AttentionWorkspace, scale: float, block_s: int = 32) -> torch.Tensor:
    """q: float32 [H, D]; k_cache/v_cache: [Hkv, n_ctx, D] float16/bfloat16 holding positions
    0..pos; pos: int32 [1] on the device -> out float32 [H, D]."""
    n_head, d = q.shape
    n_kv = k_cache.shape[0]
    if n_head % n_kv or d & (d - 1) or d < 16:
        raise ValueError(f"unsupported attention shape: {n_head} heads, {n_kv} KV heads, head size {d}")
    g = n_head // n_kv
    gp = max(16, triton.next_power_of_2(g))
    _attn_split_kernel[(n_kv, ws.n_splits)](
        q, k_cache, v_cache, pos, ws.m, ws.l, ws.acc, k_cache.stride(0), k_cache.stride(1), scale,
        G=g, GP=gp, D=d, BLOCK_S=block_s, N_SPLITS=ws.n_splits, num_warps=4)
    _attn_merge_kernel[(n_head,)](ws.m, ws.l, ws.acc, out, D=d, N_SPLITS=ws.n_splits, num_warps=1)
    return out


# ---------------------------------------------------------------------------------------
# Plain-torch twins (float64)
# ---------------------------------------------------------------------------------------

def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """Rotate heads x: [..., D] by cos/sin: [D/2] (float64)."""
    x, cos, sin = x.double(), cos.double(), sin.double()
    half = x.shape[-1] // 2
    x0, x1 = (x[..., :half], x[..., half:]) if neox else (x[..., 0::2], x[..., 1::2])
    y0, y1 = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    return torch.cat((y0, y1), -1) if neox else torch.stack((y0, y1), -1).flatten(-2)


def rope_kv_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int,
                      n_head: int, n_kv: int, head_dim: int, neox: bool) -> tuple[torch.Tensor, ...]:
    """(q [H, D], k [Hkv, D], v [Hkv, D]) in float64: what :func:`rope_kv` writes."""
    q, k, v = qkv.double().split((n_head * head_dim, n_kv * head_dim, n_kv * head_dim))
    return (rotate_reference(q.view(n_head, head_dim), cos[pos], sin[pos], neox),
            rotate_reference(k.view(n_kv, head_dim), cos[pos], sin[pos], neox),
            v.view(n_kv, head_dim))


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [H, D]; k, v: [Hkv, n, D] (the valid positions) -> [H, D] float64."""
    g = q.shape[0] // k.shape[0]
    k = k.double().repeat_interleave(g, 0)
    v = v.double().repeat_interleave(g, 0)
    p = torch.softmax(torch.einsum("hd,hnd->hn", q.double() * scale, k), dim=-1)
    return torch.einsum("hn,hnd->hd", p, v)
