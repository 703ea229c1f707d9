"""FusedBlock (one C++ call per step) against its plain-torch twin, the model's own Block
with the same quantized linears: same outputs, same KV-cache writes, for a single decode
row, a batch of rows in different slots at different positions (some padding), a 16-row
decode step (the server's batch), multi-token steps (causality inside the step), and
prefill-sized steps (SDPA for one sequence, the row loop for a padded batch; panel
products up to fused_max_m() rows, exact tiles into sgemm beyond)."""

from __future__ import annotations

import pytest
import torch

import gguflm
from gguflm.kernels.cpu.block import FusedBlock


@pytest.fixture(scope="module")
def model(cpu_kernels, requantized):
    # Q4_K_M: Q5_0, Q8_0, Q4_K and Q6_K linears in one model
    return gguflm.load(requantized("Q4_K_M"), n_ctx=64).model


def blocked_mask(positions: torch.Tensor) -> torch.Tensor:
    """The Transformer's mask for the twin: key position > query position."""
    q_pos = positions.clamp(min=0)
    key_pos = torch.arange(int(positions.max()) + 1)
    return (key_pos[None, None, :] > q_pos[:, :, None])[:, None, None]


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


