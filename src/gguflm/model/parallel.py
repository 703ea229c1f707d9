"""Tensor parallelism over ``torch.distributed``: one model split across N ranks (one
process each; NCCL between GPUs, gloo between CPU processes), Megatron-style.

The block is the model's own (:mod:`gguflm.model.layers`, composed by
:func:`gguflm.model.loader.build_transformer`); what tensor parallelism changes is data
and one op:

- :class:`ShardedTable` is the :class:`~gguflm.model.arch.WeightTable` of one rank. Its
  column-parallel roles (``attn_q``, ``attn_k``, ``attn_v``, ``ffn_gate``, ``ffn_up``) hold
  this rank's output rows — its query heads, its key/value heads, its FFN rows — and are
  zero-copy slices of the file's memory map (a ggml row is whole blocks). Its row-parallel
  roles (``attn_output``, ``ffn_down``) hold this rank's input columns, cut at ggml block
  boundaries (a strided view of the map, copied: ``1/N`` of the tensor). The output
  projection is split by vocabulary rows. No rank reads the rest of the file
  (``bytes_read`` counts what it did read).
- :class:`RowParallel` wraps a row-parallel linear: the partial products of the ranks are
  summed by one all-reduce (then the bias, once); :class:`VocabParallel` all-gathers the
  output's logit columns.

So a rank's attention runs ``H/N`` query heads over its ``Hkv/N`` key/value heads and its
KV cache holds only those heads. Query head ``h`` reads KV head ``h // (H/Hkv)``, so rank
``r``'s query heads read exactly rank ``r``'s KV heads. Every rank computes the same
embedding rows, norms and residuals (replicated, a few vectors); the sums the
all-reduces form are the ones the single-device model forms, in another order, so the
logits differ by rounding only.

Rank 0 drives: :class:`ParallelModel` is a :class:`~gguflm.model.model.Model` whose every
operation (a forward with its token ids, positions, slots and, for a paged cache, those
slots' block tables; a new cache) is first broadcast to the other ranks, which run
:func:`follow` until rank 0 closes. The KV-cache pool's bookkeeping (which blocks a slot
holds, prefix caching) is rank 0's alone. The scheduler, the tokenizer and
the server run on rank 0 only. :func:`load_parallel` either joins a process group that
``torchrun`` set up, or starts the other ranks itself (``gguflm.load(path, tp=N)``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import weakref
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gguflm.errors import GGUFError
from gguflm.gguf.types import layout
from gguflm.model.arch import Slot, WeightTable
from gguflm.model.config import ModelConfig
from gguflm.model.kv_cache import KVCache
from gguflm.model.model import Model

log = logging.getLogger("gguflm.model")

COLUMN_ROLES = ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")  # output rows split
ROW_ROLES = ("attn_output", "ffn_down")                              # input columns split, all-reduce after
VOCAB_ROLES = ("output", "token_embd")                               # logit columns split, all-gather after

# A rank waits for rank 0's next step as long as the server is idle: the collectives'
# timeout must outlast any idle spell (a rank whose peer process dies fails at once).
IDLE_TIMEOUT = timedelta(days=30)


class ParallelError(GGUFError):
    """A model that cannot be split as asked (heads or widths that do not divide)."""


@dataclass(frozen=True)
class ShardSlot(Slot):
    """A :class:`Slot` of one rank; ``cols``: the element range of each row (ne0) it holds."""

    cols: tuple[int, int] | None = None


def valid_tp(cfg: ModelConfig) -> list[int]:
    """The rank counts that divide both head counts (the first condition of :func:`check`)."""
    g = math.gcd(cfg.n_head, cfg.n_head_kv)
    return [n for n in range(1, g + 1) if g % n == 0]


def check(table: WeightTable, world: int) -> None:
    """Raise :class:`ParallelError` naming the constraint unless ``table``'s model splits
    over ``world`` ranks: query and key/value heads divide by it, the FFN width does, and
    each rank's share of a row-parallel weight's rows is whole ggml blocks."""
    cfg = table.cfg
    if world < 1:
        raise ParallelError("tensor parallel size must be at least 1")
    if cfg.n_head % world or cfg.n_head_kv % world:
        ok = ", ".join(map(str, valid_tp(cfg)))
        raise ParallelError(f"tensor parallel {world} needs the query and key/value head counts to be "
                            f"multiples of {world}: this model has {cfg.n_head} query heads and "
                            f"{cfg.n_head_kv} key/value heads (possible sizes: {ok})")
    if cfg.n_ff % world:
        raise ParallelError(f"tensor parallel {world} needs the FFN width to be a multiple of {world}: "
                            f"this model's is {cfg.n_ff}")
    if cfg.n_vocab < world:
        raise ParallelError(f"tensor parallel {world} exceeds the vocabulary ({cfg.n_vocab} tokens)")
    for bid in range(cfg.n_layer):
        for role in ROW_ROLES:
            s = WeightTable.slot(table, role, bid)
            per_rank = s.shape[0] // world
            t = table.ggml_type(role, bid)
            bs = layout(t).block_size
            if per_rank % bs:
                raise ParallelError(f"tensor parallel {world} splits {s.name} "
                                    f"({t.name}, blocks of {bs}) into rows of {per_rank} values, not "
                                    f"whole blocks: choose a size whose share is a multiple of {bs}")


def _range(n: int, rank: int, world: int) -> tuple[int, int]:
    return n * rank // world, n * (rank + 1) // world


class ShardedTable(WeightTable):
    """The :class:`WeightTable` of rank ``rank`` of ``world`` (see the module doc): ``slot``,
    ``raw``, ``dense`` and ``bias`` give this rank's part of each split role; norms and
    other vectors are whole. ``bytes_read``: bytes of weights this rank took from the map."""

    def __init__(self, f, cfg: ModelConfig, rank: int, world: int):
        super().__init__(f, cfg)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside [0, {world})")
        self.rank, self.world = rank, world
        check(self, world)
        self._read: dict[tuple[str, int | None], int] = {}

    @property
    def bytes_read(self) -> int:
        """Bytes of weights this rank took from the map (each role counted once)."""
        return sum(self._read.values())

    def slot(self, role: str, bid: int | None = None) -> Slot:
        s = super().slot(role, bid)
        if role in COLUMN_ROLES or role in VOCAB_ROLES:
            a, b = _range(s.shape[1], self.rank, self.world)
            base = s.rows[0] if s.rows is not None else 0
            return ShardSlot(role, s.name, (s.shape[0], b - a), (base + a, base + b), s.bias)
        if role in ROW_ROLES:
            a, b = _range(s.shape[0], self.rank, self.world)
            return ShardSlot(role, s.name, (b - a, s.shape[1]), s.rows, None, cols=(a, b))
        return s

    def raw(self, role: str, bid: int | None = None) -> np.ndarray:
        s = self.slot(role, bid)
        cols = getattr(s, "cols", None)
        if cols is None:
            data = super().raw(role, bid)
        else:  # every row's blocks [c0/bs, c1/bs): a strided view of the map, copied
            info = self.f.tensors[s.name]
            lay = layout(info.ggml_type)
            n_rows = info.shape[1]
            rows = self.f.tensor_data(s.name).reshape(n_rows, info.nbytes // n_rows)
            lo, hi = cols[0] // lay.block_size * lay.type_size, cols[1] // lay.block_size * lay.type_size
            data = np.ascontiguousarray(rows[:, lo:hi])
            self.f.release(s.name)  # the other ranks' columns shared our pages: not ours to keep
        self._read[(role, bid)] = data.nbytes
        return data

    def full_bias(self, role: str, bid: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The whole bias of a row-parallel role (added once, after the all-reduce)."""
        return self.slot_bias(WeightTable.slot(self, role, bid), device)

    def whole_bytes(self) -> int:
        """Bytes of every tensor the model reads: what one device would take from the map."""
        return sum(self.f.tensors[n].nbytes for n in self.used)


class RowParallel(nn.Module):
    """A row-parallel linear: ``y = all_reduce(x_r @ W_r^T) + b`` over the ranks, each
    holding the columns ``r`` of W and the matching slice ``x_r`` of the input."""

    def __init__(self, inner: nn.Module, bias: torch.Tensor | None = None):
        super().__init__()
        self.inner = inner
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in/N] -> [..., out]
        y = self.inner(x).contiguous()
        dist.all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallel(nn.Module):
    """The output projection split by vocabulary rows: each rank computes its logits
    ``[..., V_r]``, an all-gather joins them into ``[..., V]`` on every rank."""

    def __init__(self, inner: nn.Module, n_vocab: int, world: int):
        super().__init__()
        self.inner, self.n_vocab, self.world = inner, n_vocab, world
        self.width = -(-n_vocab // world)  # ceil: all-gather wants equal parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., E] -> [..., V]
        y = self.inner(x)
        pad = self.width - y.shape[-1]
        if pad:
            y = torch.nn.functional.pad(y, (0, pad))
        y = y.contiguous()
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y)
        cut = [hi - lo for lo, hi in (_range(self.n_vocab, r, self.world) for r in range(self.world))]
        return torch.cat([p[..., :n] for p, n in zip(parts, cut)], dim=-1)


class MappedEmbedding:
    """Token embedding rows dequantized on lookup from the whole ``[n_vocab, E]`` table in
    the file's map (only the rows looked up are read), for any ggml type and device."""

    def __init__(self, raw: np.ndarray, ggml_type, shape: tuple[int, int], device):
        E, V = shape
        self.rows = raw.reshape(V, raw.nbytes // V)
        self.ggml_type, self.E, self.device = ggml_type, E, torch.device(device)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.shape[0], self.E

    def __getitem__(self, tokens: torch.Tensor) -> torch.Tensor:
        from gguflm.quant import dequantize

        ids = tokens.reshape(-1).cpu().numpy()
        out = dequantize(np.ascontiguousarray(self.rows[ids]), self.ggml_type, (self.E, len(ids)))
        return out.to(self.device).view(*tokens.shape, self.E)


@dataclass(frozen=True)
class Shard:
    """This process's place in a tensor-parallel group: how the loader splits the model."""

    rank: int
    world: int

    def table(self, f, cfg: ModelConfig) -> ShardedTable:
        return ShardedTable(f, cfg, self.rank, self.world)

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config the attention of this rank sees: its own head counts."""
        return dataclasses.replace(cfg, n_head=cfg.n_head // self.world, n_head_kv=cfg.n_head_kv // self.world)

    def wrap(self, table: ShardedTable, role: str, bid: int | None, linear: nn.Module,
             device: torch.device | str = "cpu") -> nn.Module:
        """``linear`` of ``role`` with the collective its split needs."""
        if role in ROW_ROLES:
            return RowParallel(linear, table.full_bias(role, bid, device))
        if role in VOCAB_ROLES:
            return VocabParallel(linear, table.cfg.n_vocab, self.world)
        return linear

    def embedding(self, table: ShardedTable, device):
        """The token embedding: the whole table's rows read on lookup (never split: a lookup
        is a few rows)."""
        from gguflm.model.linear import _quantized
        from gguflm.quant.cpu import QuantEmbedding

        info = table.f.tensors[WeightTable.slot(table, "token_embd").name]
        raw, shape = table.f.tensor_data(info.name), tuple(info.shape)
        q = _quantized(raw, info.ggml_type, shape, device)
        return QuantEmbedding(q) if q is not None else MappedEmbedding(raw, info.ggml_type, shape, device)


# --- rank 0 drives, the others follow ---------------------------------------------------

_FORWARD, _NEW_CACHE, _FREE_CACHE, _STATS, _STOP, _INVARIANT = range(1, 7)
_HEADER = 8


class ShardedCache(KVCache):
    """Rank 0's part of a KV cache of the group (this rank's key/value heads), known to the
    other ranks by ``cache_id``. Its pool bookkeeping (block tables, prefix caching) runs
    here only: each forward sends the table rows of its slots."""

    def __init__(self, owner: ParallelModel, cache_id: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._owner, self.cache_id = owner, cache_id


class ParallelModel(Model):
    """Rank 0 of a tensor-parallel group: a :class:`Model` whose operations run on every
    rank (see the module doc). ``close()`` stops the other ranks (and the processes this
    one started)."""

    paged_cache = True  # rank 0 keeps the block tables; each forward carries its rows' table rows

    def __init__(self, file, config, transformer, n_ctx, device, shard: Shard, table: ShardedTable,
                 comm_device: torch.device, processes=(), own_group: bool = False):
        super().__init__(file, config, transformer, n_ctx, device)
        # A rank runs the torch block, whose attention matmuls round differently with the
        # step's shapes (measured: a row alone and beside another differ by ~5e-5 in its
        # logits, one device or split): the scheduler keeps its steps' shapes fixed and
        # reuses no cached prefix, as on CUDA.
        self.batch_invariant = False
        self.shard, self.table, self.comm_device = shard, table, comm_device
        self._processes = list(processes)
        self._lock = threading.RLock()
        self._next_id, self._dead = 0, []
        self._closed = False
        self._state = {"done": False, "stopped": False}  # stopped: the other ranks were told to stop
        self._finalizer = weakref.finalize(self, _stop_group, self._processes, own_group, self._state)

    @property
    def tp(self) -> int:
        return self.shard.world

    def _send(self, op: int, *values: int, payload: torch.Tensor | None = None) -> None:
        """(Lock held or taken.) Broadcast an op (and its payload) to the other ranks."""
        if self._closed:
            raise RuntimeError("this tensor-parallel model is closed")
        with self._lock:
            while self._dead:  # caches rank 0 dropped since the last op
                self._broadcast_header(_FREE_CACHE, self._dead.pop())
            self._broadcast_header(op, *values)
            if payload is not None:
                dist.broadcast(payload.to(self.comm_device), 0)

    def _broadcast_header(self, op: int, *values: int) -> None:
        h = torch.zeros(_HEADER, dtype=torch.int64)
        h[0] = op
        h[1:1 + len(values)] = torch.tensor(values, dtype=torch.int64)
        dist.broadcast(h.to(self.comm_device), 0)

    def new_cache(self, n_slots: int = 1, n_ctx: int | None = None, block_size: int | None = None,
                  n_blocks: int | None = None) -> KVCache:
        c, n_ctx = self.config, n_ctx or self.n_ctx
        with self._lock:
            cache_id, self._next_id = self._next_id, self._next_id + 1
            cache = ShardedCache(self, cache_id, c.n_layer, n_slots, c.n_head_kv // self.tp, n_ctx, c.head_dim,
                                 device=self.device, block_size=block_size, n_blocks=n_blocks)
            self._send(_NEW_CACHE, cache_id, n_slots, n_ctx, block_size or 0, cache.n_blocks if block_size else 0)
        weakref.finalize(cache, self._dead.append, cache_id)
        return cache

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        B, T = tokens.shape
        parts = [tokens.reshape(-1), positions.reshape(-1), slots.reshape(-1)]
        width = 0
        if cache.paged:  # the block tables of this step's slots: the pool's bookkeeping is rank 0's
            rows = cache.table.index_select(0, slots.to(cache.table.device))
            width = rows.shape[1]
            parts.append(rows.reshape(-1).to(tokens.device))
        payload = torch.cat(parts).to(torch.int64)
        with self._lock:
            self._send(_FORWARD, cache.cache_id, B, T, int(last_only), width, payload=payload)
            return self.transformer(tokens, positions, cache, slots, last_only)

    def set_batch_invariant(self, enable: bool) -> bool:
        """The CPU kernels' batch-invariant mode on every rank."""
        with self._lock:
            self._send(_INVARIANT, int(enable))
            return super().set_batch_invariant(enable)

    def stats(self) -> list[dict[str, int]]:
        """Per rank: ``bytes_read`` (weights taken from the map), ``whole_bytes`` (what one
        device takes), and the process's :func:`memory`: ``rss``, ``rss_anon``,
        ``rss_mapped`` (resident pages of the model file)."""
        with self._lock:
            self._send(_STATS)
            return _gather_stats(self.table, self.comm_device)

    def close(self) -> None:
        """Stop the other ranks and leave the group (the model is unusable afterwards)."""
        with self._lock:
            if self._closed:
                return
            try:
                self._send(_STOP)
                self._state["stopped"] = True
            finally:
                self._closed = True
                self._finalizer()

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", tensor parallel {self.tp})"


def _stop_group(processes, own_group: bool, state: dict) -> None:
    """Reap the ranks this process started (told to stop: they exit by themselves; never
    told, as when the model is dropped without ``close()``: ended now) and leave the group."""
    if state["done"]:
        return
    state["done"] = True
    for p in processes:
        try:
            if not state["stopped"]:
                p.terminate()
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if own_group and dist.is_initialized():
        dist.destroy_process_group()


def memory(path: str | os.PathLike | None = None) -> dict[str, int]:
    """This process's resident memory in bytes (Linux; -1 where unknown): ``rss``,
    ``rss_anon`` (private: tensors, caches) and, with ``path``, ``rss_mapped``: the pages
    of that file's memory mappings that are resident here (what of the model it touched)."""
    out = {"rss": -1, "rss_anon": -1, "rss_mapped": -1}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon"):
                    out["rss" if k == "VmRSS" else "rss_anon"] = int(v.split()[0]) * 1024
        if path is not None:
            target, mapped, inside = os.path.realpath(path), 0, False
            with open("/proc/self/smaps") as fh:
                for line in fh:
                    head = line.split()
                    if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                        inside = len(head) >= 6 and os.path.realpath(head[5]) == target
                    elif inside and head and head[0] == "Rss:":
                        mapped += int(head[1]) * 1024
            out["rss_mapped"] = mapped
    except OSError:
        pass
    return out


_STAT_KEYS = ("bytes_read", "whole_bytes", "rss", "rss_anon", "rss_mapped")


def _gather_stats(table: ShardedTable, comm_device) -> list[dict[str, int]]:
    m = memory(table.f.path)
    mine = torch.tensor([table.bytes_read, table.whole_bytes(), m["rss"], m["rss_anon"], m["rss_mapped"]],
                        dtype=torch.int64, device=comm_device)
    parts = [torch.empty_like(mine) for _ in range(table.world)]
    dist.all_gather(parts, mine)
    return [dict(zip(_STAT_KEYS, map(int, p.tolist()))) for p in parts]


def follow(model: Model, table: ShardedTable, comm_device: torch.device) -> None:
    """Run rank 0's operations on this rank until it stops (see the module doc)."""
    caches: dict[int, KVCache] = {}
    c = model.config
    world = table.world
    header = torch.zeros(_HEADER, dtype=torch.int64, device=comm_device)
    while True:
        dist.broadcast(header, 0)
        op, *v = header.cpu().tolist()
        if op == _FORWARD:
            cache_id, B, T, last_only, width = v[:5]
            n = B * T
            payload = torch.empty(2 * n + B + B * width, dtype=torch.int64, device=comm_device)
            dist.broadcast(payload, 0)
            payload = payload.to(model.device)
            tokens, positions, slots = payload[:n].view(B, T), payload[n:2 * n].view(B, T), payload[2 * n:2 * n + B]
            cache = caches[cache_id]
            if width:  # rank 0's block tables of these slots
                cache.table[slots] = payload[2 * n + B:].view(B, width)
            model.transformer(tokens, positions, cache, slots, bool(last_only))
        elif op == _NEW_CACHE:
            cache_id, n_slots, n_ctx, block_size, n_blocks = v[:5]
            cache = KVCache(c.n_layer, n_slots, c.n_head_kv // world, n_ctx, c.head_dim, device=model.device,
                            block_size=block_size or None, n_blocks=n_blocks or None)
            if block_size:  # rank 0 zeroes a block when it first hands it out; here all at once
                cache.k.zero_()
                cache.v.zero_()
            caches[cache_id] = cache
        elif op == _FREE_CACHE:
            caches.pop(v[0], None)
        elif op == _INVARIANT:
            model.set_batch_invariant(bool(v[0]))
        elif op == _STATS:
            _gather_stats(table, comm_device)
        elif op == _STOP:
            return
        else:  # pragma: no cover - the protocol is ours
            raise RuntimeError(f"unknown tensor-parallel op {op}")


# --- starting a group --------------------------------------------------------------------

def _build(f, config: ModelConfig, n_ctx: int, device: torch.device, shard: Shard):
    from gguflm.model.loader import build_transformer

    table = shard.table(f, config)
    transformer = build_transformer(f, config, n_ctx, device, shard=shard, table=table)
    return transformer, table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _watch_parent(parent: int) -> None:
    """(A started rank.) Exit when the process that started this one is gone."""
    import time

    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _rank_main(path: str, rank: int, world: int, init_method: str, n_ctx: int, device: str,
               threads: int, parent: int) -> None:
    """A rank started by :func:`load_parallel`: join, load its shard, follow rank 0."""
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", rank)
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=init_method,
                            rank=rank, world_size=world, timeout=IDLE_TIMEOUT)
    try:
        from gguflm.gguf.reader import GGUFFile

        f = GGUFFile(path)
        config = ModelConfig.from_gguf(f)
        transformer, table = _build(f, config, n_ctx, dev, Shard(rank, world))
        model = Model(f, config, transformer, n_ctx, dev)
        dist.barrier()
        follow(model, table, _comm_device(dev))
    finally:
        dist.destroy_process_group()


def _comm_device(dev: torch.device) -> torch.device:
    return dev if dev.type == "cuda" else torch.device("cpu")


def load_parallel(f, config: ModelConfig, n_ctx: int, device: torch.device, tp: int,
                  threads: int | None = None) -> ParallelModel | None:
    """The model of ``f`` split over ``tp`` ranks (see the module doc). Under ``torchrun``
    (a process group already set up, or its environment variables present) every process
    calls this: rank 0 gets the :class:`ParallelModel`, the others follow it here and get
    None once it closes. Otherwise this process becomes rank 0 and starts ``tp - 1``
    others (gloo on the CPU, NCCL with one GPU per rank); ``threads``: torch threads per
    rank (default: the cores divided among the ranks)."""
    check(WeightTable(f, config), tp)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // tp)
    torch.set_num_threads(threads)
    launched = dist.is_initialized() or "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ)
    processes, own = [], False
    if launched:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=IDLE_TIMEOUT)
            own = True
        if dist.get_world_size() != tp:
            raise ParallelError(f"tensor parallel {tp} asked for, but the process group has "
                                f"{dist.get_world_size()} ranks (torchrun --nproc-per-node {tp})")
        rank = dist.get_rank()
    else:
        if device.type == "cuda":
            if torch.cuda.device_count() < tp:
                raise ParallelError(f"tensor parallel {tp} needs {tp} GPUs, {torch.cuda.device_count()} visible")
            device = torch.device("cuda", 0)
            torch.cuda.set_device(device)
        init = f"tcp://127.0.0.1:{_free_port()}"
        for r in range(1, tp):  # a fresh interpreter each (no re-import of the caller's __main__)
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "gguflm.model.parallel", str(f.path), str(r), str(tp), init, str(n_ctx),
                 str(device), str(threads), str(os.getpid())], stdin=subprocess.DEVNULL))
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init,
                                    rank=0, world_size=tp, timeout=IDLE_TIMEOUT)
        except BaseException:
            for p in processes:
                p.kill()
                p.wait()
            raise
        own, rank = True, 0
    shard = Shard(rank, tp)
    transformer, table = _build(f, config, n_ctx, device, shard)
    comm = _comm_device(device)
    if rank != 0:
        model = Model(f, config, transformer, n_ctx, device)
        dist.barrier()
        follow(model, table, comm)
        if own:
            dist.destroy_process_group()
        return None
    dist.barrier()
    log.debug("tensor parallel %d: rank 0 read %d of %d weight bytes", tp, table.bytes_read, table.whole_bytes())
    return ParallelModel(f, config, transformer, n_ctx, device, shard, table, comm, processes, own)


__all__ = ["ParallelModel", "ShardedTable", "RowParallel", "VocabParallel", "Shard", "ParallelError",
           "load_parallel", "follow", "check", "valid_tp", "memory"]


if __name__ == "__main__":  # a rank started by load_parallel
    a = sys.argv[1:]
    _rank_main(a[0], int(a[1]), int(a[2]), a[3], int(a[4]), a[5], int(a[6]), int(a[7]))
