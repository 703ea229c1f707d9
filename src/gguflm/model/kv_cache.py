"""The KV cache: preallocated key/value buffers, one slot per sequence.

A slot holds one sequence's keys and values at positions ``0 .. n_ctx-1``. A sequence
must fill its slot contiguously from position 0 (prefill, then one position per decoded
token); attention then reads positions ``0 .. max position`` and the causal mask
(key position <= query position) hides whatever a previous occupant left beyond them,
so reusing a slot needs no clearing.
"""

from __future__ import annotations

import torch


class KVCache:
    """Buffers ``k``, ``v``: ``[n_layer, n_slots, n_kv_head, n_ctx, head_dim]``."""

    def __init__(self, n_layer: int, n_slots: int, n_kv_head: int, n_ctx: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layer, n_slots, n_kv_head, n_ctx, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    @property
    def n_ctx(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values and return everything each row may attend to.

        slots: Long[B]; positions: Long[B, T] (< 0 marks padding, not written);
        k, v: [B, n_kv_head, T, head_dim].
        Returns (keys, values): [B, n_kv_head, S, head_dim] with S = max position + 1;
        entry ``s`` of row ``b`` is slot ``slots[b]``'s key/value at position ``s``.
        """
        n_seen = int(positions.max()) + 1
        assert 0 < n_seen <= self.n_ctx, "positions must lie inside the context"
        k_buf, v_buf = self.k[layer], self.v[layer]  # [n_slots, Hkv, n_ctx, D]
        if positions.shape[0] == 1 and bool((positions >= 0).all()):
            s = int(slots[0])
            p0, T = int(positions[0, 0]), positions.shape[1]
            contiguous = bool((positions[0] == torch.arange(p0, p0 + T, device=positions.device)).all())
            if contiguous:  # the common single-sequence case: slice writes, views back
                k_buf[s, :, p0:p0 + T] = k[0]
                v_buf[s, :, p0:p0 + T] = v[0]
                return k_buf[s:s + 1, :, :n_seen], v_buf[s:s + 1, :, :n_seen]
        valid = positions >= 0                                        # [B, T]
        rows = slots[:, None].expand_as(positions)[valid]             # [N]
        pos = positions[valid]                                        # [N]
        k_buf[rows, :, pos] = k.transpose(1, 2)[valid]                # [N, Hkv, D]
        v_buf[rows, :, pos] = v.transpose(1, 2)[valid]
        return (k_buf[:, :, :n_seen].index_select(0, slots),
                v_buf[:, :, :n_seen].index_select(0, slots))

    def copy_prefix(self, dst: int, src: int, n: int) -> None:
        """Give slot ``dst`` the keys/values of slot ``src``'s first ``n`` positions."""
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
