"""Decode attention over a static KV cache, with positions (and cache slots) read on the
device (so one captured CUDA graph serves every step), RoPE and the cache write fused in.

Input: for each of B rows (one new token of one sequence each), the fused QKV projection
``qkv[b] = [q (H*D) | k (Hkv*D) | v (Hkv*D)]`` (float32 or float16), its position
``pos[b]`` and, for a cache of several slots, its slot ``slot[b]`` (``slot < 0`` or
``pos < 0``: a padding row, which writes nothing to the cache and gets zeros). Rotation
of pair ``(x0, x1)`` at angle ``theta[pos, i]``: ``(x0 cos - x1 sin, x0 sin + x1 cos)``,
pairs ``(2i, 2i+1)`` (NORM, llama) or ``(i, i + D/2)`` (NEOX); cos and sin are tables
[n_ctx, D/2] that already carry any attention factor. The rotated key and the value go
to ``K[slot, h, pos]``, ``V[slot, h, pos]``.

For query head ``h`` (KV head ``h // (H/Hkv)``) and the cached positions ``lo .. pos``
(``lo = 0``, or ``max(0, pos + 1 - window)`` for a sliding window: llama.cpp masks keys
with ``pos - p >= window``), ``out[b, h] = softmax(q[h] K^T * scale) V`` with float32 scores and accumulation. The
positions are cut into ``n_splits`` ranges handled in parallel (flash-decoding); each
program keeps a running max and sum for the query heads of one KV head of one row, and
a second kernel merges the ranges: ``out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s``.
The program whose range holds ``pos`` writes the new key and value first (a CTA barrier
makes them visible to its own reads); no other program reads that position: one launch,
rows in distinct slots. Rows that share a slot (``shared_slots``: a prompt chunk, several
consecutive positions of one sequence in one step, beside other sequences' rows) read keys
that other rows of the same step write, so the writes are a launch of their own before the
attention (a row at position p then reads positions 0..p of its slot, written by earlier
steps or by this one). The attention of a row is the same arithmetic either way, in an
order fixed by its position, ``n_splits`` and ``block_s`` alone: a token's output does not
depend on the rows beside it, nor on how its prompt was cut into steps.

A paged cache (``table``): the cache's first dimension counts blocks of ``block_size``
positions, and a row's position p lies in block ``table[slot, p // block_size]`` (vLLM's
PagedAttention layout; :class:`gguflm.model.kv_cache.KVCache`).

Twins: :func:`decode_attention_reference`, :func:`rotate_reference` (float64 torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(ptr, COS_ptr, SIN_ptr, pos, rows, ROWS: tl.constexpr, D: tl.constexpr, NEOX: tl.constexpr):
    """Heads ``rows`` [ROWS] (D floats each at ptr + row * D), rotated at ``pos``:
    float32 [ROWS, D] in natural column order."""
    i = tl.arange(0, D // 2)
    if NEOX:
        i0, i1 = i, i + D // 2
    else:
        i0, i1 = 2 * i, 2 * i + 1
    cos = tl.load(COS_ptr + pos * (D // 2) + i)[None, :]
    sin = tl.load(SIN_ptr + pos * (D // 2) + i)[None, :]
    x0 = tl.load(ptr + rows[:, None] * D + i0[None, :])
    x1 = tl.load(ptr + rows[:, None] * D + i1[None, :])
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    if NEOX:
        return tl.reshape(tl.permute(tl.join(y0, y1), (0, 2, 1)), (ROWS, D))
    else:
        return tl.reshape(tl.join(y0, y1), (ROWS, D))


@triton.jit
def _store_kv(qkv, COS_ptr, SIN_ptr, K_ptr, V_ptr, TABLE_ptr, hk, pos, slot, H, n_kv, cache_slot_stride,
              cache_head_stride, cache_pos_stride, table_row_stride, page, D: tl.constexpr, NEOX: tl.constexpr,
              PAGED: tl.constexpr):
    """KV head ``hk`` of the row at ``qkv``: its key rotated at ``pos`` and its value, stored
    at position ``pos`` of ``slot`` (a live row: slot >= 0, pos >= 0)."""
    d = tl.arange(0, D)
    if PAGED:
        table = TABLE_ptr + slot.to(tl.int64) * table_row_stride
        at = (tl.load(table + pos // page).to(tl.int64) * cache_slot_stride + hk * cache_head_stride
              + (pos % page) * cache_pos_stride)
    else:
        at = slot.to(tl.int64) * cache_slot_stride + hk * cache_head_stride + pos * cache_pos_stride
    k_new = _rotate(qkv + H * D, COS_ptr, SIN_ptr, pos, hk + tl.arange(0, 1), 1, D, NEOX)
    tl.store(K_ptr + at + d[None, :], k_new.to(K_ptr.dtype.element_ty))
    v_new = tl.load(qkv + (H + n_kv + hk) * D + d)
    tl.store(V_ptr + at + d, v_new.to(V_ptr.dtype.element_ty))


@triton.jit
def _row_pos_slot(POS_ptr, SLOT_ptr, b, SLOTS: tl.constexpr):
    """Row b's position and cache slot (slot 0 without SLOTS; either < 0: a padding row)."""
    pos = tl.load(POS_ptr + b).to(tl.int32)
    if SLOTS:
        slot = tl.load(SLOT_ptr + b).to(tl.int32)
    else:
        slot = pos * 0
    return pos, slot


@triton.jit
def _kv_write_kernel(QKV_ptr, COS_ptr, SIN_ptr, K_ptr, V_ptr, POS_ptr, SLOT_ptr, TABLE_ptr,
                     H, n_kv, qkv_row_stride, cache_slot_stride, cache_head_stride, cache_pos_stride,
                     table_row_stride, page, D: tl.constexpr, NEOX: tl.constexpr, SLOTS: tl.constexpr,
                     PAGED: tl.constexpr):
    """Program (kv head hk, row b): the row's rotated key and value of head hk into the
    cache (nothing for a padding row)."""
    hk = tl.program_id(0)
    b = tl.program_id(1)
    pos, slot = _row_pos_slot(POS_ptr, SLOT_ptr, b, SLOTS)
    if (pos >= 0) & (slot >= 0):
        _store_kv(QKV_ptr + b * qkv_row_stride, COS_ptr, SIN_ptr, K_ptr, V_ptr, TABLE_ptr, hk, pos, slot, H, n_kv,
                  cache_slot_stride, cache_head_stride, cache_pos_stride, table_row_stride, page, D, NEOX, PAGED)


@triton.jit
def _attn_split_kernel(QKV_ptr, COS_ptr, SIN_ptr, K_ptr, V_ptr, POS_ptr, SLOT_ptr, TABLE_ptr, M_ptr, L_ptr, ACC_ptr,
                       H, n_kv, qkv_row_stride, cache_slot_stride, cache_head_stride, cache_pos_stride, scale,
                       window, table_row_stride, page, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                       BLOCK_S: tl.constexpr, N_SPLITS: tl.constexpr, NEOX: tl.constexpr, SLOTS: tl.constexpr,
                       PAGED: tl.constexpr, WRITE: tl.constexpr):
    """Program (kv head hk, split s, row b): query heads hk*G .. hk*G+G-1 (padded to GP)
    of row b over positions [lo + s*L, min(lo + (s+1)*L, n)), L = ceil((n - lo) / N_SPLITS)
    rounded up to BLOCK_S (lo > 0 only under a sliding ``window`` > 0). Writes running max M, sum L and unnormalised ACC per (row, head, split).
    PAGED: position p of the row's slot lies in cache block TABLE[slot, p // page], row
    p % page (the cache's first dimension counts blocks, cache_slot_stride is a block's).
    WRITE: the program whose range holds pos first stores the row's key and value (else
    :func:`_kv_write_kernel` did, in a launch before this one)."""
    hk = tl.program_id(0)
    s = tl.program_id(1)
    b = tl.program_id(2)
    pos, slot = _row_pos_slot(POS_ptr, SLOT_ptr, b, SLOTS)
    live = (pos >= 0) & (slot >= 0)
    pos = tl.maximum(pos, 0)
    n = tl.where(live, pos + 1, 0)
    lo = tl.where(window > 0, tl.maximum(n - window, 0), 0)
    per = tl.maximum(tl.cdiv(tl.cdiv(n - lo, N_SPLITS), BLOCK_S) * BLOCK_S, BLOCK_S)
    start = lo + s * per
    end = tl.minimum(start + per, n)
    d = tl.arange(0, D)
    qkv = QKV_ptr + b * qkv_row_stride
    if PAGED:
        table = TABLE_ptr + tl.maximum(slot, 0).to(tl.int64) * table_row_stride
        base = hk * cache_head_stride
    else:
        base = tl.maximum(slot, 0).to(tl.int64) * cache_slot_stride + hk * cache_head_stride
    if WRITE:
        if live & (s == (pos - lo) // per):                      # this range holds pos: store k, v first
            _store_kv(qkv, COS_ptr, SIN_ptr, K_ptr, V_ptr, TABLE_ptr, hk, pos, slot, H, n_kv, cache_slot_stride,
                      cache_head_stride, cache_pos_stride, table_row_stride, page, D, NEOX, PAGED)
            tl.debug_barrier()
    g = tl.arange(0, GP)
    gmask = g < G
    q = _rotate(qkv, COS_ptr, SIN_ptr, pos, hk * G + tl.minimum(g, G - 1), GP, D, NEOX)
    q = (q * scale).to(K_ptr.dtype.element_ty)                                   # [GP, D]
    m = tl.full([GP], float("-inf"), dtype=tl.float32)
    l = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_S):
        p = p0 + tl.arange(0, BLOCK_S)
        pmask = p < end
        if PAGED:  # each key's block from the table
            blk = tl.load(table + p // page, mask=pmask, other=0).to(tl.int64)
            kv_off = base + (blk * cache_slot_stride + (p % page) * cache_pos_stride)[:, None] + d[None, :]
        else:
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
    row = ((b * H) + hk * G + g) * N_SPLITS + s
    tl.store(M_ptr + row, m, mask=gmask)
    tl.store(L_ptr + row, l, mask=gmask)
    tl.store(ACC_ptr + row[:, None] * D + d[None, :], acc, mask=gmask[:, None])


@triton.jit
def _attn_merge_kernel(M_ptr, L_ptr, ACC_ptr, O_ptr, D: tl.constexpr, N_SPLITS: tl.constexpr):
    """Program b * H + h: out[b, h] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s
    (empty splits have m_s = -inf and weigh nothing; a padding row, all empty, gets 0)."""
    h = tl.program_id(0)
    s = tl.arange(0, N_SPLITS)
    d = tl.arange(0, D)
    m = tl.load(M_ptr + h * N_SPLITS + s)
    l = tl.load(L_ptr + h * N_SPLITS + s)
    acc = tl.load(ACC_ptr + (h * N_SPLITS + s)[:, None] * D + d[None, :])
    m_all = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))
    den = tl.sum(l * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(O_ptr + h * D + d, out)


class AttentionWorkspace:
    """Scratch for :func:`decode_attention`: per (row, head, split) max, sum and accumulator."""

    def __init__(self, n_head: int, head_dim: int, n_splits: int, device: torch.device | str, n_rows: int = 1):
        if n_splits & (n_splits - 1):
            raise ValueError("n_splits must be a power of two")
        self.n_splits, self.n_rows = n_splits, n_rows
        self.m = torch.empty(n_rows * n_head * n_splits, dtype=torch.float32, device=device)
        self.l = torch.empty_like(self.m)
        self.acc = torch.empty(n_rows * n_head * n_splits, head_dim, dtype=torch.float32, device=device)


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor, ws: AttentionWorkspace,
                     scale: float, neox: bool, block_s: int = 32, slots: torch.Tensor | None = None,
                     window: int = 0, table: torch.Tensor | None = None, shared_slots: bool = False) -> torch.Tensor:
    """One sequence: qkv [(H + 2 Hkv) D] (float32/16) of the new token, pos int32 [1],
    k_cache/v_cache [Hkv, n_ctx, D] holding positions 0..pos-1 (position pos is written
    here) -> out [H, D]. B rows: qkv [B, (H + 2 Hkv) D], pos [B], ``slots`` int [B] and
    caches [n_slots, Hkv, n_ctx, D] -> out [B, H, D]. cos/sin: float32 [n_ctx, D/2];
    caches float16/bfloat16/float32 with contiguous rows; out float32 or float16.
    ``window`` > 0: only the last ``window`` positions are attended (sliding window).
    ``table`` int [n_slots, blocks per slot] (with ``slots``): a paged cache
    (:class:`gguflm.model.kv_cache.KVCache`), caches [n_blocks, Hkv, block_size, D],
    position p of slot s in block ``table[s, p // block_size]``, row ``p % block_size``.
    ``shared_slots``: rows may share a slot (a prompt chunk: consecutive positions of one
    sequence, in any order among the rows): every row's key and value are stored first, in
    a launch of their own, then the attention launch reads each row's positions from the
    cache, those stored by this call included. A row's result is the same either way (the
    same arithmetic, the same cached keys), whichever rows share its call."""
    if table is not None and (slots is None or table.dim() != 2):
        raise ValueError("a block table needs slots and is [n_slots, blocks per slot]")
    if slots is None:
        k_cache, v_cache = k_cache[None], v_cache[None]
    n_rows = pos.numel()
    _, n_kv, _, d = k_cache.shape
    n_head = out.shape[-2]
    if n_head % n_kv or d & (d - 1) or d < 16 or qkv.numel() != n_rows * (n_head + 2 * n_kv) * d:
        raise ValueError(f"unsupported attention shape: {n_head} heads, {n_kv} KV heads, head size {d}")
    if k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride() or qkv.stride(-1) != 1:
        raise ValueError("k and v caches must share strides with contiguous rows")
    if n_rows > ws.n_rows or out.numel() != n_rows * n_head * d:
        raise ValueError(f"{n_rows} rows do not fit the workspace ({ws.n_rows}) or the output")
    g = n_head // n_kv
    gp = max(16, triton.next_power_of_2(g))
    row_stride = qkv.stride(0) if qkv.dim() == 2 else 0
    slot_arg, table_arg = slots if slots is not None else pos, table if table is not None else pos
    strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    table_stride, page = table.stride(0) if table is not None else 0, k_cache.shape[2]
    if shared_slots:
        _kv_write_kernel[(n_kv, n_rows)](
            qkv, cos, sin, k_cache, v_cache, pos, slot_arg, table_arg, n_head, n_kv, row_stride, *strides,
            table_stride, page, D=d, NEOX=neox, SLOTS=slots is not None, PAGED=table is not None, num_warps=1)
    _attn_split_kernel[(n_kv, ws.n_splits, n_rows)](
        qkv, cos, sin, k_cache, v_cache, pos, slot_arg, table_arg, ws.m, ws.l, ws.acc,
        n_head, n_kv, row_stride, *strides, scale, window, table_stride, page,
        G=g, GP=gp, D=d, BLOCK_S=block_s, N_SPLITS=ws.n_splits, NEOX=neox, SLOTS=slots is not None,
        PAGED=table is not None, WRITE=not shared_slots, num_warps=4)
    _attn_merge_kernel[(n_rows * n_head,)](ws.m, ws.l, ws.acc, out, D=d, N_SPLITS=ws.n_splits, num_warps=1)
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


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [H, D]; k, v: [Hkv, n, D] (the valid positions) -> [H, D] float64."""
    g = q.shape[0] // k.shape[0]
    k = k.double().repeat_interleave(g, 0)
    v = v.double().repeat_interleave(g, 0)
    p = torch.softmax(torch.einsum("hd,hnd->hn", q.double() * scale, k), dim=-1)
    return torch.einsum("hn,hnd->hd", p, v)
