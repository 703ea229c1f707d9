"""Build a :class:`Transformer` from a GGUF file: every role resolved once through the
:class:`~gguflm.model.arch.WeightTable` (names, shapes, rows of fused tensors), each
weight dequantized once or kept quantized for the CPU kernels, and the block composed
from the ArchSpec's choices."""

from __future__ import annotations

import logging

import torch

from gguflm.gguf.reader import GGUFFile
from gguflm.model.arch import WeightTable
from gguflm.model.config import ModelConfig
from gguflm.model.layers import Block, RMSNorm, Rope, Transformer
from gguflm.model.linear import embedding_from_table, fused_block, linear_from_table, tied_embedding

log = logging.getLogger("gguflm.model")


def build_transformer(f: GGUFFile, cfg: ModelConfig, n_ctx: int,
                      device: torch.device | str = "cpu", shard=None, table: WeightTable | None = None) -> Transformer:
    """The decoder of ``f`` with RoPE tables for ``n_ctx`` positions, weights on ``device``.
    ``shard`` (a :class:`gguflm.model.parallel.Shard`): this rank's part of a tensor-parallel
    model, the same blocks over its :class:`~gguflm.model.parallel.ShardedTable` (``table``)
    with the split linears wrapped in their collectives."""
    w = table or (WeightTable(f, cfg) if shard is None else shard.table(f, cfg))
    spec = w.spec
    attn_cfg = cfg if shard is None else shard.local_config(cfg)  # this rank's head counts

    def lin(role: str, bid: int | None = None) -> torch.nn.Module:
        m = linear_from_table(w, role, bid, device)
        return m if shard is None else shard.wrap(w, role, bid, m, device)

    def norm(role: str, bid: int | None = None) -> RMSNorm:
        return RMSNorm(w.dense(role, bid, device), cfg.rms_eps)

    if shard is not None:  # the output split by vocabulary rows, the embedding read by row
        output = lin("output" if not cfg.tied_output else "token_embd")
        embedding = shard.embedding(w, device)
    elif cfg.tied_output:  # one copy: the embedding shares the output's weight
        output = lin("token_embd")
        embedding = tied_embedding(output)
    else:
        output, embedding = lin("output"), embedding_from_table(w, "token_embd", device)
    freq_factors = w.rope_factors(n_ctx)
    blocks = []
    refused: dict[str, list[int]] = {}  # why the C++ block step cannot run a block -> block ids
    for bid in range(cfg.n_layer):
        qk = (norm("attn_q_norm", bid), norm("attn_k_norm", bid)) if spec.qk_norm else (None, None)
        post = (norm("attn_post_norm", bid), norm("ffn_post_norm", bid)) if spec.post_norms else (None, None)
        block = Block(attn_cfg, norm("attn_norm", bid), *(lin(r, bid) for r in ("attn_q", "attn_k", "attn_v")),
                      lin("attn_output", bid), norm("ffn_norm", bid),
                      *(lin(r, bid) for r in ("ffn_gate", "ffn_up", "ffn_down")), *qk, *post,
                      local=cfg.is_swa(bid), activation=spec.activation)
        if shard is None:  # (the C++ block step has no all-reduce inside)
            block, why = fused_block(block)
            if why is not None:
                refused.setdefault(why, []).append(bid)
        blocks.append(block)
    for why, bids in refused.items():
        log.warning("%s: the C++ block step cannot run %d of %d blocks (%s); they run as torch blocks",
                    cfg.arch, len(bids), cfg.n_layer, why)
    return Transformer(cfg, embedding, blocks, norm("output_norm"), output,
                       Rope(cfg, n_ctx, freq_factors.cpu() if freq_factors is not None else None, device))
