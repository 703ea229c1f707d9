"""The Triton kernels against outside oracles: libggml's dequantizers for every block
decoder (through the fused GEMV and the tile dequantizer), float64 recomputations for
RMSNorm, SwiGLU, RoPE and attention. Odd row counts and block counts that are not a
multiple of the kernels' step exercise the masked edges."""

from __future__ import annotations

import pytest
import torch

from gguflm.gguf.types import LAYOUTS, GGMLType
from gguflm.kernels.triton import attention as A
from gguflm.quant.triton.codecs import CODECS, codec
from gguflm.quant.triton.dequant import dequantize_into, dequantize_reference
from gguflm.quant.triton.gemv import GemvConfig, gemv, gemv_reference, gemv_swiglu, gemv_swiglu_reference
from gguflm.quant.triton.planes import pack_planes, unpack_planes

FUSED = sorted(CODECS)  # every registered block decoder


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b).abs().max() / b.abs().max())


def test_registry_covers_the_decode_types():
    assert set(CODECS) == {GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.Q2_K,
                           GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.IQ4_NL, GGMLType.IQ4_XS}
    assert codec(GGMLType.F16) is None and codec(GGMLType.IQ2_XXS) is None and codec(9999) is None


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.IQ4_XS])
def test_planes_hold_the_file_bytes(random_blocks, t):
    raw = torch.from_numpy(random_blocks(t, 12, seed=3))
    planes = pack_planes(raw, LAYOUTS[t])
    assert planes.numel() == raw.numel()
    assert torch.equal(unpack_planes(planes, LAYOUTS[t]), raw)
    # the d field of block 5 sits where the docstring says: n * offset(d) + 5 * size(d)
    lay = LAYOUTS[t]
    off, size = lay.offsets["d"], lay.field("d").nbytes
    assert torch.equal(planes[12 * off + 5 * size:12 * off + 6 * size], raw[5, off:off + size])


@pytest.mark.parametrize("t", FUSED, ids=lambda t: t.name)
def test_gemv_matches_libggml(packed_weight, device, t):
    # 3 blocks per row with 2 per step: a ragged last step; 37 rows over 8-row programs
    w, ref = packed_weight(t, 37, 3, seed=int(t))
    gen = torch.Generator().manual_seed(int(t))
    x = torch.randn(w.n_cols, generator=gen)
    y = gemv(w, x.to(device), config=GemvConfig(block_n=8, bb=2, num_warps=4))
    assert _rel(y, ref @ x.double()) < 1e-5
    assert _rel(gemv_reference(w, x.to(device)), ref @ x.double()) < 1e-12          # the twin, same oracle


@pytest.mark.parametrize("t", [GGMLType.Q4_K, GGMLType.Q8_0, GGMLType.Q6_K], ids=lambda t: t.name)
def test_gemv_norm_and_residual(packed_weight, device, t):
    w, ref = packed_weight(t, 21, 4, seed=7)
    gen = torch.Generator().manual_seed(7)
    x, nw, r = (torch.randn(n, generator=gen) for n in (w.n_cols, w.n_cols, w.n_rows))
    eps = 1e-5
    y = gemv(w, x.to(device), norm_weight=nw.to(device), eps=eps, residual=r.to(device))
    xd = x.double()
    want = r.double() + ref @ (xd / torch.sqrt((xd * xd).mean() + eps) * nw.double())
    assert _rel(y, want) < 1e-5
    # in place: the residual buffer is the output
    out = r.to(device).clone()
    gemv(w, x.to(device), out, norm_weight=nw.to(device), eps=eps, residual=out)
    assert _rel(out, want) < 1e-5


@pytest.mark.parametrize("t", [GGMLType.Q4_K, GGMLType.Q4_0], ids=lambda t: t.name)
def test_gemv_swiglu(packed_weight, device, t):
    wg, g_ref = packed_weight(t, 19, 2, seed=11)
    wu, u_ref = packed_weight(t, 19, 2, seed=12)
    gen = torch.Generator().manual_seed(5)
    x, nw = torch.randn(wg.n_cols, generator=gen), torch.randn(wg.n_cols, generator=gen)
    y = gemv_swiglu(wg, wu, x.to(device), norm_weight=nw.to(device), eps=1e-6)
    xd = x.double() / torch.sqrt((x.double() ** 2).mean() + 1e-6) * nw.double()
    g, u = g_ref @ xd, u_ref @ xd
    assert _rel(y, g * torch.sigmoid(g) * u) < 1e-5
    twin = gemv_swiglu_reference(wg, wu, x.to(device), norm_weight=nw.to(device), eps=1e-6)
    assert _rel(twin, g * torch.sigmoid(g) * u) < 1e-12


@pytest.mark.parametrize("t", FUSED, ids=lambda t: t.name)
def test_dequantize_is_libggml_rounded_to_half(packed_weight, device, t):
    w, ref = packed_weight(t, 9, 3, seed=100 + int(t))
    out = torch.full((w.n_rows, w.n_cols), float("nan"), dtype=torch.float16, device=device)
    dequantize_into(w, out, block_n=4)
    assert torch.equal(out.cpu(), ref.float().half())
    assert torch.equal(dequantize_reference(w, torch.float16).cpu(), ref.float().half())


def test_gather_rows_is_an_embedding_lookup(packed_weight, device):
    w, ref = packed_weight(GGMLType.Q6_K, 30, 2, seed=1)
    ids = torch.tensor([29, 0, 7, 7, 13], dtype=torch.int32)
    out = torch.full((5, w.n_cols), float("nan"), dtype=torch.float32, device=device)
    dequantize_into(w, out, rows=ids.to(device), block_n=4)
    assert torch.equal(out.cpu(), ref[ids.long()].float())


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("pos", [0, 16, 39])
def test_decode_attention_rotates_stores_and_attends(device, neox, pos):
    H, Hkv, D, n_ctx = 6, 2, 32, 40
    gen = torch.Generator().manual_seed(pos + 100 * neox)
    qkv = torch.randn((H + 2 * Hkv) * D, generator=gen)
    theta = torch.rand(n_ctx, D // 2, generator=gen) * 3
    cos, sin = torch.cos(theta), torch.sin(theta)
    k_cache = torch.randn(Hkv, n_ctx, D, generator=gen).half()       # positions < pos: earlier tokens
    v_cache = torch.randn(Hkv, n_ctx, D, generator=gen).half()
    kd, vd = k_cache.clone().to(device), v_cache.clone().to(device)
    ws = A.AttentionWorkspace(H, D, 4, device)
    out = torch.full((H, D), float("nan"), device=device)
    A.decode_attention(qkv.to(device), cos.to(device), sin.to(device),
                       torch.tensor([pos], dtype=torch.int32, device=device), kd, vd, out, ws, D ** -0.5, neox,
                       block_s=16)
    q, k, v = qkv.double().split((H * D, Hkv * D, Hkv * D))
    rq = A.rotate_reference(q.view(H, D), cos[pos], sin[pos], neox)
    rk = A.rotate_reference(k.view(Hkv, D), cos[pos], sin[pos], neox)
    assert (kd[:, pos].cpu().double() - rk).abs().max() < 2e-3          # float16 cache
    assert (vd[:, pos].cpu().double() - v.view(Hkv, D)).abs().max() < 2e-3
    others = [p for p in range(n_ctx) if p != pos]
    assert torch.equal(kd[:, others].cpu(), k_cache[:, others]) and torch.equal(vd[:, others].cpu(), v_cache[:, others])
    ref = A.decode_attention_reference(rq, kd[:, :pos + 1].cpu(), vd[:, :pos + 1].cpu(), D ** -0.5)
    assert _rel(out, ref) < 4e-3                                        # float16 q, scores and weights


@pytest.mark.parametrize("pos", [5, 21, 39])
def test_decode_attention_sliding_window(device, pos):
    """A window of 7: the row attends positions pos-6 .. pos only (llama.cpp masks keys
    with pos - p >= window), whichever split holds them."""
    H, Hkv, D, n_ctx, window = 4, 1, 16, 40, 7
    gen = torch.Generator().manual_seed(pos)
    qkv = torch.randn((H + 2 * Hkv) * D, generator=gen)
    theta = torch.rand(n_ctx, D // 2, generator=gen) * 3
    cos, sin = torch.cos(theta), torch.sin(theta)
    kd = torch.randn(Hkv, n_ctx, D, generator=gen).half().to(device)
    vd = torch.randn(Hkv, n_ctx, D, generator=gen).half().to(device)
    out = torch.full((H, D), float("nan"), device=device)
    A.decode_attention(qkv.to(device), cos.to(device), sin.to(device),
                       torch.tensor([pos], dtype=torch.int32, device=device), kd, vd, out,
                       A.AttentionWorkspace(H, D, 4, device), D ** -0.5, True, block_s=16, window=window)
    rq = A.rotate_reference(qkv[:H * D].view(H, D), cos[pos], sin[pos], True)
    lo = max(0, pos + 1 - window)
    ref = A.decode_attention_reference(rq, kd[:, lo:pos + 1].cpu(), vd[:, lo:pos + 1].cpu(), D ** -0.5)
    assert _rel(out, ref) < 4e-3


def test_batched_decode_attention_uses_each_rows_slot_and_position(device):
    """Rows in different cache slots at different positions, one padding row (slot -1):
    each row equals the float64 attention over its own slot; the padding row writes
    nothing and gets zeros; float16 QKV input, float16 output."""
    H, Hkv, D, n_ctx, n_slots = 4, 2, 16, 48, 3
    gen = torch.Generator().manual_seed(7)
    rows = [(2, 37), (0, 0), (-1, 5), (1, 20)]                             # (slot, position)
    qkv = torch.randn(len(rows), (H + 2 * Hkv) * D, generator=gen).half()
    theta = torch.rand(n_ctx, D // 2, generator=gen) * 3
    cos, sin = torch.cos(theta), torch.sin(theta)
    k_cache = torch.randn(n_slots, Hkv, n_ctx, D, generator=gen).half()
    v_cache = torch.randn(n_slots, Hkv, n_ctx, D, generator=gen).half()
    kd, vd = k_cache.clone().to(device), v_cache.clone().to(device)
    ws = A.AttentionWorkspace(H, D, 4, device, n_rows=len(rows))
    out = torch.full((len(rows), H, D), float("nan"), dtype=torch.float16, device=device)
    slots = torch.tensor([s for s, _ in rows], dtype=torch.int32, device=device)
    pos = torch.tensor([p for _, p in rows], dtype=torch.int32, device=device)
    A.decode_attention(qkv.to(device), cos.to(device), sin.to(device), pos, kd, vd, out, ws, D ** -0.5, False,
                       block_s=16, slots=slots)
    written = set()
    for b, (slot, p) in enumerate(rows):
        if slot < 0:
            assert torch.equal(out[b].cpu(), torch.zeros(H, D, dtype=torch.float16))
            continue
        written.add((slot, p))
        q, k, v = qkv[b].double().split((H * D, Hkv * D, Hkv * D))
        rq = A.rotate_reference(q.view(H, D), cos[p], sin[p], False)
        rk = A.rotate_reference(k.view(Hkv, D), cos[p], sin[p], False)
        assert (kd[slot, :, p].cpu().double() - rk).abs().max() < 2e-3
        assert (vd[slot, :, p].cpu().double() - v.view(Hkv, D)).abs().max() < 2e-3
        ref = A.decode_attention_reference(rq, kd[slot, :, :p + 1].cpu(), vd[slot, :, :p + 1].cpu(), D ** -0.5)
        assert _rel(out[b].float(), ref) < 4e-3
    for slot in range(n_slots):                                            # nothing else was touched
        others = [p for p in range(n_ctx) if (slot, p) not in written]
        assert torch.equal(kd[slot][:, others].cpu(), k_cache[slot][:, others])
        assert torch.equal(vd[slot][:, others].cpu(), v_cache[slot][:, others])


def test_rms_norm_half(device):
    from gguflm.kernels.triton.activations import rms_norm_half, rms_norm_half_reference

    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 300, generator=gen) * 3, torch.randn(300, generator=gen)
    y = rms_norm_half(x.to(device), w.to(device), 1e-5)
    assert y.dtype == torch.float16
    assert _rel(y, rms_norm_half_reference(x, w, 1e-5)) < 1e-3               # one float16 rounding


@pytest.mark.parametrize("gelu", [False, True])
def test_gated_act(device, gelu):
    """SiLU and GELU-tanh gating (torch's gelu(approximate="tanh") is the twin): float16
    in and out (the many-row path), float32 in and out (the one-row path)."""
    from gguflm.kernels.triton.activations import gated_act, gated_act_reference

    gen = torch.Generator().manual_seed(4)
    g, u = ((torch.randn(3, 1500, generator=gen) * 4) for _ in range(2))
    want = gated_act_reference(g, u, gelu)
    assert _rel(gated_act(g.half().to(device), u.half().to(device), gelu), want) < 2e-3
    out = torch.empty(1500, device=device)
    assert _rel(gated_act(g[0].to(device), u[0].to(device), gelu, out=out), want[0]) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_head_rms_norm_normalizes_q_and_k_heads_only(device, dtype):
    from gguflm.kernels.triton.activations import head_rms_norm_, head_rms_norm_reference

    H, Hkv, D = 6, 2, 32
    gen = torch.Generator().manual_seed(5)
    qkv = (torch.randn(3, (H + 2 * Hkv) * D, generator=gen) * 3).to(dtype)
    wq, wk = torch.randn(D, generator=gen), torch.randn(D, generator=gen)
    got = head_rms_norm_(qkv.clone().to(device), wq.to(device), wk.to(device), H, Hkv, 1e-6)
    want = head_rms_norm_reference(qkv, wq, wk, H, Hkv, 1e-6)
    assert _rel(got, want) < (2e-3 if dtype == torch.float16 else 1e-6)
    assert torch.equal(got[:, (H + Hkv) * D:].cpu(), qkv[:, (H + Hkv) * D:])            # v untouched


@pytest.mark.parametrize("neox", [False, True])
def test_rope_prefill_writes_q_and_the_cache_rows(device, neox):
    from gguflm.kernels.triton.activations import rope_prefill, rope_prefill_reference

    T, H, Hkv, D, n_ctx, p0 = 5, 6, 2, 32, 20, 7
    gen = torch.Generator().manual_seed(9)
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=gen).half()
    theta = torch.rand(n_ctx, D // 2, generator=gen) * 3
    cos, sin = torch.cos(theta), torch.sin(theta)
    k_cache = torch.zeros(Hkv, n_ctx, D, dtype=torch.float16, device=device)
    v_cache = torch.zeros_like(k_cache)
    q = rope_prefill(qkv.to(device), cos.to(device), sin.to(device), p0, k_cache, v_cache, H, neox)
    rq, rk, rv = rope_prefill_reference(qkv, cos, sin, p0, H, Hkv, neox)
    assert (q.cpu().double() - rq).abs().max() < 4e-3
    assert (k_cache[:, p0:p0 + T].cpu().double() - rk).abs().max() < 4e-3
    assert torch.equal(v_cache[:, p0:p0 + T].cpu().double(), rv)
    assert not k_cache[:, :p0].any() and not k_cache[:, p0 + T:].any()


def test_add_rms_norm_half(device):
    from gguflm.kernels.triton.activations import add_rms_norm_half, add_rms_norm_half_reference

    gen = torch.Generator().manual_seed(8)
    x, r, w = torch.randn(4, 300, generator=gen), torch.randn(4, 300, generator=gen).half(), torch.randn(300, generator=gen)
    xd = x.clone().to(device)
    y = add_rms_norm_half(xd, r.to(device), w.to(device), 1e-6)
    want_x, want_y = add_rms_norm_half_reference(x, r, w, 1e-6)
    assert _rel(xd, want_x) < 1e-6 and _rel(y, want_y) < 1e-3


def test_add_rms_norm_half_with_a_post_norm(device):
    """Gemma's post norm: x += RMSNorm(r) * p, then the next norm (or none)."""
    from gguflm.kernels.triton.activations import add_rms_norm_half, add_rms_norm_half_reference

    gen = torch.Generator().manual_seed(6)
    x, r = torch.randn(4, 640, generator=gen), (torch.randn(4, 640, generator=gen) * 5).half()
    w, p = torch.randn(640, generator=gen), torch.randn(640, generator=gen)
    want_x, want_y = add_rms_norm_half_reference(x, r, w, 1e-6, post=p)
    xd = x.clone().to(device)
    y = add_rms_norm_half(xd, r.to(device), w.to(device), 1e-6, post=p.to(device))
    assert _rel(xd, want_x) < 1e-6 and _rel(y, want_y) < 1e-3
    xd = x.clone().to(device)
    assert add_rms_norm_half(xd, r.to(device), None, 1e-6, post=p.to(device)) is None
    assert _rel(xd, want_x) < 1e-6


@pytest.mark.parametrize("window", [0, 9])
def test_paged_decode_attention_equals_contiguous(device, window):
    """The same rows through a paged cache (blocks of 8 positions in a shuffled order, as
    the block pool hands them out) and through one contiguous slot each: the same outputs
    to the bit and the new keys/values in the blocks the table names (the contiguous run
    is checked against float64 above)."""
    H, Hkv, D, n_ctx, n_slots, bs = 4, 2, 16, 48, 3, 8
    per = n_ctx // bs
    gen = torch.Generator().manual_seed(11)
    rows = [(2, 37), (0, 0), (-1, 5), (1, 20)]                             # (slot, position)
    qkv = torch.randn(len(rows), (H + 2 * Hkv) * D, generator=gen).half()
    theta = torch.rand(n_ctx, D // 2, generator=gen) * 3
    cos, sin = torch.cos(theta), torch.sin(theta)
    k_flat = torch.randn(n_slots, Hkv, n_ctx, D, generator=gen).half()
    v_flat = torch.randn(n_slots, Hkv, n_ctx, D, generator=gen).half()
    order = torch.randperm(n_slots * per + 5, generator=gen)[:n_slots * per]  # a pool with spare blocks
    table = order.view(n_slots, per).to(torch.int32)
    k_pool = torch.zeros(n_slots * per + 5, Hkv, bs, D).half()
    v_pool = torch.zeros_like(k_pool)
    for s in range(n_slots):
        for i in range(per):
            k_pool[table[s, i]] = k_flat[s, :, i * bs:(i + 1) * bs]
            v_pool[table[s, i]] = v_flat[s, :, i * bs:(i + 1) * bs]
    slots = torch.tensor([s for s, _ in rows], dtype=torch.int32, device=device)
    pos = torch.tensor([p for _, p in rows], dtype=torch.int32, device=device)
    outs = []
    for k, v, tab in ((k_flat, v_flat, None), (k_pool, v_pool, table)):
        kd, vd = k.clone().to(device), v.clone().to(device)
        out = torch.full((len(rows), H, D), float("nan"), dtype=torch.float16, device=device)
        A.decode_attention(qkv.to(device), cos.to(device), sin.to(device), pos, kd, vd, out,
                           A.AttentionWorkspace(H, D, 4, device, n_rows=len(rows)), D ** -0.5, False,
                           block_s=16, slots=slots, window=window, table=None if tab is None else tab.to(device))
        outs.append((out.cpu(), kd.cpu(), vd.cpu()))
    (out_f, kf, vf), (out_p, kp, vp) = outs
    assert torch.equal(out_f, out_p)
    for slot, p in rows:
        if slot >= 0:
            blk = int(table[slot, p // bs])
            assert torch.equal(kp[blk, :, p % bs], kf[slot, :, p]) and torch.equal(vp[blk, :, p % bs], vf[slot, :, p])


def _run_attention_calls(device, calls, qkv, cos, sin, k, v, table, window, n_splits=4):
    """Run ``calls`` (each a list of (slot, position, qkv row) rows and whether rows share
    slots) in turn on copies of the caches ``k``, ``v``: {(slot, position): output} and the caches."""
    H, D = 4, 16
    kd, vd = k.clone().to(device), v.clone().to(device)
    outs = {}
    for rows, shared in calls:
        n = len(rows)
        out = torch.full((n, H, D), float("nan"), dtype=torch.float16, device=device)
        slots = torch.tensor([s for s, _, _ in rows], dtype=torch.int32, device=device)
        pos = torch.tensor([p for _, p, _ in rows], dtype=torch.int32, device=device)
        x = qkv[[i for _, _, i in rows]].to(device)
        A.decode_attention(x, cos.to(device), sin.to(device), pos, kd, vd, out,
                           A.AttentionWorkspace(H, D, n_splits, device, n_rows=n), D ** -0.5, False, block_s=16,
                           slots=slots, window=window, table=None if table is None else table.to(device),
                           shared_slots=shared)
        for b, (s, p, _) in enumerate(rows):
            if s >= 0:
                outs[(s, p)] = out[b].cpu()
            else:
                assert torch.equal(out[b].cpu(), torch.zeros(H, D, dtype=torch.float16))
    return outs, kd.cpu(), vd.cpu()


@pytest.mark.parametrize("window", [0, 9])
def test_prompt_chunk_rows_equal_one_token_per_step(device, window):
    """A prompt of 21 tokens (slot 1, positions 14..34 after a cached head; split ranges of
    16 positions, so its rows cross ranges) as rows of ONE call in a shuffled order beside
    two other slots' decode rows and a padding row (``shared_slots``: the keys/values are
    stored in a launch before the attention, which then reads keys of rows of the same
    call), in chunks of 5, 1 and 15 (reversed) with other company, and one token per call
    through the one-launch path: every token's output and the whole cache the same to the
    bit; through a paged cache (blocks of 8 in a shuffled order) too; and each token
    against the float64 attention over its slot's positions."""
    H, Hkv, D, n_ctx, n_slots, bs = 4, 2, 16, 48, 3, 8
    gen = torch.Generator().manual_seed(13 + window)
    prompt = [(1, p) for p in range(14, 35)]
    others = [(0, 40), (2, 3)]
    rows = prompt + others
    qkv = torch.randn(len(rows), (H + 2 * Hkv) * D, generator=gen).half()
    index = {r: i for i, r in enumerate(rows)}
    theta = torch.rand(n_ctx, D // 2, generator=gen) * 3
    cos, sin = torch.cos(theta), torch.sin(theta)
    k = torch.randn(n_slots, Hkv, n_ctx, D, generator=gen).half()
    v = torch.randn(n_slots, Hkv, n_ctx, D, generator=gen).half()

    def call(rs, shared=True):
        return [(s, p, index.get((s, p), 0)) for s, p in rs], shared

    mixed = [prompt[i] for i in torch.randperm(len(prompt), generator=gen).tolist()]
    schedules = {
        "one call": [call(mixed[:9] + [others[0], (-1, 7)] + mixed[9:] + [others[1]])],
        "chunks": [call([others[1]] + prompt[:5]), call(prompt[5:6]), call(prompt[6:][::-1] + [others[0]])],
        "one per call": [call([r], shared=False) for r in rows],
    }
    runs = {name: _run_attention_calls(device, calls, qkv, cos, sin, k, v, None, window)
            for name, calls in schedules.items()}
    want, kf, vf = runs["one per call"]
    assert set(want) == set(rows)
    for name, (outs, kd, vd) in runs.items():
        assert all(torch.equal(outs[r], want[r]) for r in rows), name
        assert torch.equal(kd, kf) and torch.equal(vd, vf), name
    # paged: the same calls through a block table
    per = n_ctx // bs
    table = torch.randperm(n_slots * per + 3, generator=gen)[:n_slots * per].view(n_slots, per).to(torch.int32)
    k_pool, v_pool = torch.zeros(n_slots * per + 3, Hkv, bs, D).half(), torch.zeros(n_slots * per + 3, Hkv, bs, D).half()
    for s in range(n_slots):
        for i in range(per):
            k_pool[table[s, i]], v_pool[table[s, i]] = k[s, :, i * bs:(i + 1) * bs], v[s, :, i * bs:(i + 1) * bs]
    for name in ("one call", "chunks"):
        outs, kp, vp = _run_attention_calls(device, schedules[name], qkv, cos, sin, k_pool, v_pool, table, window)
        assert all(torch.equal(outs[r], want[r]) for r in rows), name
        for s, p in rows:
            blk = int(table[s, p // bs])
            assert torch.equal(kp[blk, :, p % bs], kf[s, :, p]) and torch.equal(vp[blk, :, p % bs], vf[s, :, p])
    # float64: the stored keys/values, and each row's attention over its slot
    for s, p in rows:
        q, kn, vn = qkv[index[(s, p)]].double().split((H * D, Hkv * D, Hkv * D))
        assert (kf[s, :, p].double() - A.rotate_reference(kn.view(Hkv, D), cos[p], sin[p], False)).abs().max() < 2e-3
        assert (vf[s, :, p].double() - vn.view(Hkv, D)).abs().max() < 2e-3
        lo = max(0, p + 1 - window) if window else 0
        ref = A.decode_attention_reference(A.rotate_reference(q.view(H, D), cos[p], sin[p], False),
                                           kf[s, :, lo:p + 1], vf[s, :, lo:p + 1], D ** -0.5)
        assert _rel(want[(s, p)].float(), ref) < 4e-3


# ---- the GEMV over activation rows: row i bit-identical to the one-row call on x[i] ----

@pytest.mark.parametrize("t", [GGMLType.Q4_K, GGMLType.Q4_1, GGMLType.Q6_K, GGMLType.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("n_x", [1, 2, 3, 8, 17])
def test_gemv_rows_are_the_one_row_call(packed_weight, device, t, n_x):
    w, ref = packed_weight(t, 13, 3, seed=20 + n_x)
    gen = torch.Generator().manual_seed(n_x)
    x = torch.randn(n_x, w.n_cols, generator=gen).to(device)
    nw = torch.randn(w.n_cols, generator=gen).to(device)
    res = torch.randn(n_x, w.n_rows, generator=gen).to(device)
    cfg = GemvConfig(block_n=8, bb=2, num_warps=4, x_rows=2)       # 2 rows per program: several row groups
    y = gemv(w, x, norm_weight=nw, eps=1e-5, residual=res, config=cfg)
    assert y.shape == (n_x, w.n_rows)
    for i in range(n_x):
        alone = gemv(w, x[i].clone(), norm_weight=nw, eps=1e-5, residual=res[i].clone(), config=cfg)
        assert torch.equal(y[i], alone)
    # grouping of the rows does not change a bit either (all rows in one program)
    assert torch.equal(gemv(w, x, norm_weight=nw, eps=1e-5, residual=res, config=GemvConfig(8, 2, 4, 32)), y)
    # the float64 oracle: libggml's weights, RMSNorm and residual recomputed
    xd = x.double().cpu()
    want = res.double().cpu() + (xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-5) * nw.double().cpu()) @ ref.T
    assert _rel(y, want) < 1e-5
    assert _rel(gemv_reference(w, x, norm_weight=nw, eps=1e-5, residual=res), want) < 1e-12


@pytest.mark.parametrize("n_x", [1, 2, 3, 8, 17])
def test_gemv_rows_strided_in_place_and_half(packed_weight, device, n_x):
    # rows of a wider buffer (any row stride) in and out, the residual being the output, float16 x
    w, ref = packed_weight(GGMLType.Q4_0, 11, 2, seed=40 + n_x)
    gen = torch.Generator().manual_seed(100 + n_x)
    xbuf = torch.randn(n_x, w.n_cols + 7, generator=gen).half().to(device)
    x = xbuf[:, 3:3 + w.n_cols]
    obuf = torch.randn(n_x, w.n_rows + 5, generator=gen).to(device)
    out = obuf[:, 2:2 + w.n_rows]
    before, margins = out.clone(), obuf.clone()
    gemv(w, x, out, residual=out)
    for i in range(n_x):
        assert torch.equal(out[i], gemv(w, x[i].contiguous(), residual=before[i].clone()))
    assert _rel(out, before.double().cpu() + x.double().cpu() @ ref.T) < 1e-5
    keep = torch.ones_like(obuf, dtype=torch.bool)
    keep[:, 2:2 + w.n_rows] = False
    assert torch.equal(obuf[keep], margins[keep])                   # nothing written outside the rows


@pytest.mark.parametrize("t", [GGMLType.Q4_K, GGMLType.Q5_0], ids=lambda t: t.name)
@pytest.mark.parametrize("n_x", [1, 2, 3, 8, 17])
def test_gemv_swiglu_rows_are_the_one_row_call(packed_weight, device, t, n_x):
    wg, g_ref = packed_weight(t, 9, 2, seed=60 + n_x)
    wu, u_ref = packed_weight(t, 9, 2, seed=80 + n_x)
    gen = torch.Generator().manual_seed(7 * n_x)
    x = torch.randn(n_x, wg.n_cols, generator=gen).to(device)
    nw = torch.randn(wg.n_cols, generator=gen).to(device)
    cfg = GemvConfig(block_n=4, bb=1, num_warps=4, x_rows=3)
    obuf = torch.zeros(n_x, wg.n_rows + 3, device=device)
    y = gemv_swiglu(wg, wu, x, obuf[:, 1:1 + wg.n_rows], norm_weight=nw, eps=1e-6, config=cfg)
    for i in range(n_x):
        assert torch.equal(y[i], gemv_swiglu(wg, wu, x[i].clone(), norm_weight=nw, eps=1e-6, config=cfg))
    xd = x.double().cpu()
    xd = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-6) * nw.double().cpu()
    g, u = xd @ g_ref.T, xd @ u_ref.T
    assert _rel(y, g * torch.sigmoid(g) * u) < 1e-5
    assert _rel(gemv_swiglu_reference(wg, wu, x, norm_weight=nw, eps=1e-6), g * torch.sigmoid(g) * u) < 1e-12


def test_gemv_rows_refuses_mismatched_shapes(packed_weight, device):
    w, _ = packed_weight(GGMLType.Q4_0, 5, 1, seed=1)
    x = torch.randn(3, w.n_cols, device=device)
    with pytest.raises(ValueError):
        gemv(w, x, torch.empty(2, w.n_rows, device=device))
    with pytest.raises(ValueError):
        gemv(w, x, residual=torch.empty(w.n_rows, device=device))
    with pytest.raises(ValueError):
        gemv(w, x.t())
    assert gemv(w, x[:0]).shape == (0, w.n_rows)
