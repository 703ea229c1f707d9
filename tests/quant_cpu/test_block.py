"""FusedBlock (one C++ call per step) against its plain-torch twin, the model's own Block
with the same quantized linears: same outputs, same KV-cache writes, for a single decode
row, a batch of rows in different slots at different positions (some padding), a 16-row
decode step (the server's batch), multi-token steps (causality inside the step), and
prefill-sized steps (SDPA for one sequence, the row loop for a padded batch; panel
products up to fused_max_m() rows, exact tiles into sgemm beyond). The same for the real
Gemma 3 (GeGLU, post norms, q/k norms, its attention scale, local layers with their own
RoPE table and a 512-key window, crossed by the positions here). And the other side: a
block with an op the C++ step lacks is refused at load, loudly, and runs as the torch block."""

from __future__ import annotations

import logging

import pytest
import torch

import gguflm
from gguflm.kernels.cpu import block as cpu_block
from gguflm.kernels.cpu.block import FusedBlock
from gguflm.model.layers import Block


@pytest.fixture(scope="module")
def model(cpu_kernels, requantized):
    # Q4_K_M: Q5_0, Q8_0, Q4_K and Q6_K linears in one model
    return gguflm.load(requantized("Q4_K_M"), n_ctx=64).model


def blocked_mask(positions: torch.Tensor, n_swa: int = 0) -> torch.Tensor:
    """The Transformer's mask for the twin: key position > query position, or (a local
    layer) query position - key position >= n_swa."""
    q_pos = positions.clamp(min=0)
    key_pos = torch.arange(int(positions.max()) + 1)
    blocked = key_pos[None, None, :] > q_pos[:, :, None]
    if n_swa:
        blocked = blocked | (q_pos[:, :, None] - key_pos[None, None, :] >= n_swa)
    return blocked[:, None, None]


def prefilled_cache(model, n_slots: int, n_tokens: int):
    cache = model.new_cache(n_slots)
    g = torch.Generator().manual_seed(0)
    cache.k.normal_(generator=g)  # stand-in history: every slot holds keys/values at every position
    cache.v.normal_(generator=g)
    return cache


@pytest.mark.parametrize("case", ["one_row", "batch_with_padding", "decode_16", "multi_token", "batch_multi_token",
                                  "prefill", "prefill_after_history", "big_batch", "batch_prefill"])
def test_fused_block_matches_block(model, case, code_path, cpu_kernels):
    tr = model.transformer
    fused = [b for b in tr.blocks if isinstance(b, FusedBlock)]
    assert len(fused) == model.config.n_layer
    positions, slots = {
        "one_row": (torch.tensor([[17]]), torch.tensor([0])),
        "batch_with_padding": (torch.tensor([[5], [-1], [40]]), torch.tensor([2, 0, 1])),
        "multi_token": (torch.tensor([[9, 10, 11, 12, 13]]), torch.tensor([1])),
        "batch_multi_token": (torch.tensor([[3, 4, 5, 6], [20, 21, -1, -1]]), torch.tensor([0, 2])),
        "prefill": (torch.arange(20)[None], torch.tensor([1])),                     # GEMM tiles + SDPA
        "prefill_after_history": (torch.arange(30, 47)[None], torch.tensor([2])),
        "big_batch": (torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, -1, -1, -1]]), torch.tensor([1, 0])),
        "decode_16": (torch.tensor([[3 * b + 1] for b in range(16)]), torch.randperm(16, generator=torch.Generator().manual_seed(1))),
        "batch_prefill": (torch.stack([torch.arange(44), torch.arange(20, 64),                       # 132 rows:
                                       torch.cat([torch.arange(30), torch.full((14,), -1)])]),      # sgemm tiles
                          torch.tensor([2, 0, 1])),
    }[case]
    B, T = positions.shape
    assert case != "batch_prefill" or B * T > cpu_kernels.ops().fused_max_m()  # the case reaches the sgemm tiles
    x = torch.randn(B, T, model.config.n_embd, generator=torch.Generator().manual_seed(B * T)) * 0.5
    blocked = blocked_mask(positions)
    for layer in (0, model.config.n_layer - 1):
        block = tr.blocks[layer]
        n_slots = max(3, int(slots.max()) + 1)
        cache_f, cache_t = prefilled_cache(model, n_slots, 64), prefilled_cache(model, n_slots, 64)
        with torch.inference_mode():
            got = block(x, tr.rope, positions, blocked, cache_f, layer, slots)
            want = block.block(x, tr.rope, positions, blocked, cache_t, layer, slots)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        torch.testing.assert_close(cache_f.k, cache_t.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache_f.v, cache_t.v, rtol=1e-5, atol=1e-5)




@pytest.fixture(scope="module")
def gemma3(cpu_kernels, gemma3_path):
    return gguflm.load(gemma3_path, n_ctx=700).model


@pytest.mark.parametrize("case", ["one_row", "beyond_window", "batch_with_padding", "prefill_across_window",
                                  "batch_multi_token"])
def test_fused_block_matches_block_gemma3(gemma3, case, code_path):
    tr, cfg = gemma3.transformer, gemma3.config
    assert all(isinstance(b, FusedBlock) for b in tr.blocks)
    assert cfg.n_swa == 512 and cfg.is_swa(0) and not cfg.is_swa(5)
    positions, slots = {
        "one_row": (torch.tensor([[17]]), torch.tensor([0])),
        "beyond_window": (torch.tensor([[600]]), torch.tensor([1])),
        "batch_with_padding": (torch.tensor([[5], [-1], [650]]), torch.tensor([2, 0, 1])),
        "prefill_across_window": (torch.arange(500, 540)[None], torch.tensor([1])),   # SDPA with the window
        "batch_multi_token": (torch.tensor([[3, 4, 5, 6], [520, 521, -1, -1]]), torch.tensor([0, 2])),
    }[case]
    B, T = positions.shape
    x = torch.randn(B, T, cfg.n_embd, generator=torch.Generator().manual_seed(B * T)) * 3
    for layer in (0, 5):  # local, global
        block = tr.blocks[layer]
        blocked = blocked_mask(positions, cfg.n_swa if cfg.is_swa(layer) else 0)
        cache_f, cache_t = prefilled_cache(gemma3, 3, 700), prefilled_cache(gemma3, 3, 700)
        with torch.inference_mode():
            got = block(x, tr.rope, positions, blocked, cache_f, layer, slots)
            want = block.block(x, tr.rope, positions, blocked, cache_t, layer, slots)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        torch.testing.assert_close(cache_f.k, cache_t.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache_f.v, cache_t.v, rtol=1e-5, atol=1e-5)


def test_an_op_the_step_lacks_is_refused_loudly(cpu_kernels, requantized, monkeypatch, caplog):
    """Eligibility follows from the provider's ops: without SiLU in its table, a SiLU
    model's blocks are refused at load with a warning naming the op, and run as the torch
    block (same logits as the fused model); a norm kind it lacks is refused likewise."""
    path = requantized("Q4_K_M")
    ids = torch.tensor([[1, 300, 2000, 45, 9]])
    fused = gguflm.load(path, n_ctx=16).model
    monkeypatch.setattr(cpu_block, "ACTIVATIONS", {"gelu_tanh": 1})
    with caplog.at_level(logging.WARNING, logger="gguflm.model"):
        model = gguflm.load(path, n_ctx=16).model
    assert all(type(b) is Block for b in model.transformer.blocks)
    assert any("cannot run" in r.getMessage() and "'silu'" in r.getMessage() for r in caplog.records)
    with pytest.raises(TypeError, match="silu"):
        FusedBlock(model.transformer.blocks[0])
    torch.testing.assert_close(model.logits(ids[0].tolist()), fused.logits(ids[0].tolist()), rtol=1e-4, atol=1e-4)
    monkeypatch.undo()
    block = model.transformer.blocks[0]
    assert FusedBlock.unsupported(block) is None
    monkeypatch.setattr(block.ffn_norm, "op", "layer_norm")
    assert "layer_norm" in FusedBlock.unsupported(block)


def test_the_step_runs_the_decoders_composition(model, monkeypatch):
    """block_step interprets the program recorded from ``gguflm.model.decoder.block``: a
    changed composition (here: the FFN before attention) is what both providers then run,
    the C++ step still matching the torch block; an op the recorder lacks is refused."""
    from gguflm.model import decoder

    def ffn_first(ops, i, layer, attention):
        ops.linear_add(ops.norm_gated(layer), layer.w_down, layer.ffn_post_norm)
        ops.linear_add(attention(i, layer, ops.norm_linear(layer.attn_norm, layer.qkv)), layer.wo, None)

    tr = model.transformer
    plain = tr.blocks[0].block
    positions, slots = torch.tensor([[5], [9]]), torch.tensor([0, 1])
    x = torch.randn(2, 1, model.config.n_embd, generator=torch.Generator().manual_seed(3))
    usual = FusedBlock(plain).program
    monkeypatch.setattr(decoder, "block", ffn_first)
    fused = FusedBlock(plain)
    assert not torch.equal(fused.program, usual) and fused.program[0] == cpu_block.OPS.index("norm_gated")
    cache_f, cache_t = prefilled_cache(model, 2, 64), prefilled_cache(model, 2, 64)
    with torch.inference_mode():
        got = fused(x, tr.rope, positions, blocked_mask(positions), cache_f, 0, slots)
        want = plain(x, tr.rope, positions, blocked_mask(positions), cache_t, 0, slots)
        usual_out = tr.blocks[0](x, tr.rope, positions, blocked_mask(positions), prefilled_cache(model, 2, 64), 0, slots)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert not torch.allclose(got, usual_out, rtol=1e-2, atol=1e-2)
    monkeypatch.setattr(decoder, "block", lambda ops, i, layer, attention: ops.layer_norm(layer.attn_norm))
    assert "layer_norm" in FusedBlock.unsupported(plain)
