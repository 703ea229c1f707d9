"""The KV cache: a pool of fixed-size blocks of keys/values, a block table per sequence,
and the prefix cache of full prompt blocks shared between sequences.

The pool holds ``n_blocks`` blocks of ``block_size`` positions; sequence (slot) ``s``
finds position ``p`` in block ``table[s, p // block_size]``, row ``p % block_size``
(vLLM's PagedAttention layout). Blocks are taken from the pool as a sequence grows
(:meth:`KVCache.reserve`) and given back when it ends (:meth:`KVCache.release`): no
sequence holds a whole context it does not use. A sequence fills its positions
contiguously from 0; attention reads positions ``0 .. max position`` through the table
and the causal mask (key position <= query position) hides whatever lies beyond a row's
own, so a block needs no clearing between owners (a fresh one is zeroed, so that masked
entries are finite).

Prefix caching: a block whose ``block_size`` positions all hold prompt tokens is
*published* under the key of its tokens chained to the keys of the blocks before it
(``sha256(parent key + token ids)``: the key names the whole prefix, never just the
block). A later sequence whose prompt starts with the same tokens *shares* those blocks
(reference counts; a shared block is full, so nobody writes it again) and computes only
the rest. A block nobody references stays cached until the pool needs it: the least
recently released goes first.

``KVCache.contiguous(...)`` is the special case of one block of ``n_ctx`` positions per
slot (``table[s] = [s]``, ``k[:, s]`` is slot ``s``'s whole context), which the CUDA
path's kernels address directly.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import torch

DEFAULT_BLOCK_SIZE = 16  # positions per block of a paged cache (vLLM's default)


def host_to_device(values: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """Long tensor of ``values`` on ``device``, copied without waiting for the device: on
    CUDA from pinned memory, since a copy from pageable memory waits for whatever the
    stream runs (a scheduler that runs ahead has a step in flight)."""
    if torch.device(device).type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


class KVCache:
    """Buffers ``k``, ``v``: ``[n_layer, n_blocks, n_kv_head, block_size, head_dim]``;
    ``table``: Long ``[n_slots, ceil(n_ctx / block_size)]`` on the cache's device.

    ``KVCache(n_layer, n_slots, n_kv_head, n_ctx, head_dim)`` without ``block_size`` is
    contiguous (one block per slot, owned for good); with it, paged: ``n_blocks`` blocks
    (default: enough for every slot's whole context) handed out on demand."""

    def __init__(self, n_layer: int, n_slots: int, n_kv_head: int, n_ctx: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 block_size: int | None = None, n_blocks: int | None = None):
        if n_slots < 1 or n_ctx < 1:
            raise ValueError("a KV cache needs n_slots >= 1 and n_ctx >= 1")
        self.paged = block_size is not None
        if not self.paged:
            block_size, n_blocks = n_ctx, n_slots
        elif block_size < 1:
            raise ValueError("block_size must be >= 1")
        per_slot = -(-n_ctx // block_size)
        if n_blocks is None:
            n_blocks = n_slots * per_slot
        if n_blocks < 1:
            raise ValueError("a KV cache needs at least one block")
        self._n_ctx, self.block_size = n_ctx, block_size
        shape = (n_layer, n_blocks, n_kv_head, block_size, head_dim)
        make = torch.empty if self.paged else torch.zeros  # paged: blocks are zeroed when first taken
        self.k = make(shape, dtype=dtype, device=device)
        self.v = make(shape, dtype=dtype, device=device)
        self._table = [[] for _ in range(n_slots)] if self.paged else [[s] for s in range(n_slots)]
        self.table = torch.zeros((n_slots, per_slot), dtype=torch.long, device=device)
        if not self.paged:
            self.table[:, 0] = torch.arange(n_slots, device=device)
        self._refs = [0] * n_blocks
        self._free = list(range(n_blocks - 1, -1, -1))  # popped from the end: lowest ids first
        self._fresh = [True] * n_blocks                  # never handed out: zero it first
        self._key_of: dict[int, bytes] = {}              # published block -> its prefix key
        self._block_of: dict[bytes, int] = {}            # prefix key -> block
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # published, unreferenced (LRU)

    @classmethod
    def contiguous(cls, n_layer: int, n_slots: int, n_kv_head: int, n_ctx: int, head_dim: int,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> KVCache:
        return cls(n_layer, n_slots, n_kv_head, n_ctx, head_dim, dtype, device)

    @property
    def n_slots(self) -> int:
        return self.table.shape[0]

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_blocks(self) -> int:
        return self.k.shape[1]

    # ---- blocks (host bookkeeping) ---------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Blocks of the pool: total, referenced by a sequence, cached (published, idle), free."""
        used = sum(r > 0 for r in self._refs)
        return {"blocks_total": self.n_blocks, "blocks_used": used, "blocks_cached": len(self._idle),
                "blocks_free": len(self._free), "block_size": self.block_size}

    def reserve(self, slot: int, n: int) -> bool:
        """Give ``slot`` blocks for its positions ``0 .. min(n, n_ctx)-1``; False (and
        nothing taken) when the pool cannot (every block in use). A contiguous cache always can."""
        if not self.paged:
            return True
        n = min(n, self.n_ctx)
        owned = self._table[slot]
        need = -(-n // self.block_size) - len(owned)
        if need <= 0:
            return True
        if need > len(self._free) + len(self._idle):
            return False
        new = [self._take() for _ in range(need)]
        first = len(owned)
        owned.extend(new)
        self.table[slot, first:first + need] = host_to_device(new, self.table.device)
        return True

    def _take(self) -> int:
        if self._free:
            b = self._free.pop()
        else:  # the least recently released cached block
            b, _ = self._idle.popitem(last=False)
            del self._block_of[self._key_of.pop(b)]
        if self._fresh[b]:
            self._fresh[b] = False
            self.k[:, b].zero_()
            self.v[:, b].zero_()
        self._refs[b] = 1
        return b

    def release(self, slot: int) -> None:
        """``slot`` ends: its blocks go back to the pool (published ones stay cached)."""
        if not self.paged:
            return
        for b in self._table[slot]:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._key_of:
                    self._idle[b] = None
                else:
                    self._free.append(b)
        self._table[slot] = []

    @staticmethod
    def _chain(parent: bytes, tokens: Sequence[int]) -> bytes:
        h = hashlib.sha256(parent)
        h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in tokens))
        return h.digest()

    def lookup(self, tokens: Sequence[int]) -> list[int]:
        """The published blocks holding the longest run of whole blocks that ``tokens``
        starts with (their keys/values are those of exactly these tokens)."""
        if not self.paged:
            return []
        bs, key, found = self.block_size, b"gguflm-kv", []
        for i in range(len(tokens) // bs):
            key = self._chain(key, tokens[i * bs:(i + 1) * bs])
            b = self._block_of.get(key)
            if b is None:
                break
            found.append(b)
        return found

    def share(self, slot: int, blocks: Sequence[int]) -> None:
        """Start ``slot`` (holding no block) on ``blocks`` (from :meth:`lookup`): its first
        ``len(blocks) * block_size`` positions are theirs, read-only."""
        if not self.paged:  # a contiguous slot holds its whole context already
            assert not blocks, "a contiguous cache shares no blocks"
            return
        assert not self._table[slot], "share() starts a sequence"
        for b in blocks:
            if self._refs[b] == 0:
                del self._idle[b]
            self._refs[b] += 1
        self._table[slot] = list(blocks)
        if blocks:
            self.table[slot, :len(blocks)] = host_to_device(blocks, self.table.device)

    def publish(self, slot: int, tokens: Sequence[int]) -> None:
        """``tokens`` are at positions ``0..`` of ``slot`` (their keys/values written):
        make its whole blocks of them findable by :meth:`lookup`."""
        if not self.paged:
            return
        bs, key = self.block_size, b"gguflm-kv"
        owned = self._table[slot]
        for i in range(min(len(tokens) // bs, len(owned))):
            key = self._chain(key, tokens[i * bs:(i + 1) * bs])
            b = owned[i]
            if key in self._block_of or b in self._key_of:
                continue  # published already (this block, or the same tokens in another block)
            self._block_of[key] = b
            self._key_of[b] = key

    # ---- the step (device) ------------------------------------------------------------
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
        k_buf, v_buf = self.k[layer], self.v[layer]  # [n_blocks, Hkv, bs, D]
        bs = self.block_size
        if not self.paged and positions.shape[0] == 1 and bool((positions >= 0).all()):
            s = int(slots[0])
            p0, T = int(positions[0, 0]), positions.shape[1]
            contiguous = bool((positions[0] == torch.arange(p0, p0 + T, device=positions.device)).all())
            if contiguous:  # the common single-sequence case: slice writes, views back
                k_buf[s, :, p0:p0 + T] = k[0]
                v_buf[s, :, p0:p0 + T] = v[0]
                return k_buf[s:s + 1, :, :n_seen], v_buf[s:s + 1, :, :n_seen]
        valid = positions >= 0                                        # [B, T]
        pos = positions[valid]                                        # [N]
        rows = slots[:, None].expand_as(positions)[valid]             # [N]
        blocks = self.table[rows, pos // bs]                          # [N]
        k_buf[blocks, :, pos % bs] = k.transpose(1, 2)[valid]         # [N, Hkv, D]
        v_buf[blocks, :, pos % bs] = v.transpose(1, 2)[valid]
        nb = -(-n_seen // bs)
        if nb == 1 and not self.paged:
            return (k_buf[:, :, :n_seen].index_select(0, slots),
                    v_buf[:, :, :n_seen].index_select(0, slots))
        table = self.table.index_select(0, slots)[:, :nb]             # [B, nb]

        def gather(buf: torch.Tensor) -> torch.Tensor:               # [B, nb, Hkv, bs, D] -> [B, Hkv, S, D]
            g = buf[table].transpose(1, 2)
            return g.reshape(g.shape[0], g.shape[1], nb * bs, g.shape[-1])[:, :, :n_seen]

        return gather(k_buf), gather(v_buf)
