"""Perplexity as llama.cpp's ``llama-perplexity`` computes it, and its KL-divergence mode.

Method (tools/perplexity/perplexity.cpp, ``perplexity``):

* tokenize the whole text once, with BOS when the vocabulary adds one (``add_special``,
  special tokens not parsed);
* cut ``n_chunk = min(chunks, len(tokens) // n_ctx)`` chunks of ``n_ctx`` tokens (at least
  ``2 * n_ctx`` tokens are needed); when the model adds BOS, BOS replaces each chunk's
  first token;
* evaluate each chunk from an empty cache and score only its second half: the logits at
  positions ``first = n_ctx // 2 .. n_ctx - 2`` against the next token, so every scored
  token has at least ``n_ctx / 2`` tokens of context;
* ``nll_i = -log softmax(logits_i)[t_{i+1}]``; ``PPL = exp(mean nll)`` and its standard
  error ``PPL * sqrt((mean(nll^2) - mean(nll)^2) / (N - 1))``.

KL mode (``kl_divergence`` there): a base model's run stores, per scored row, its
log-probabilities quantized to 16 bits; a second model's run over the same tokens
reports ``KL(P_base || P)`` per row (mean, median, max...), the share of rows whose top
token agrees, and both perplexities. The file follows llama-perplexity's layout::

    "_logits_"  u32 n_ctx  i32 n_vocab  i32 n_chunk  i32 tokens[n_chunk * n_ctx]
    then n_chunk * (n_ctx - 1 - n_ctx/2) rows of nv = 2*((n_vocab+1)/2) + 4 uint16:
        f32 scale, f32 min_log_prob (as 4 uint16), n_vocab uint16 q (zero-padded to nv)
    log p_i = scale * q_i + min_log_prob; a row keeps the 16 nats below its top logit.

The logits come from any function ``[B chunks of n_ctx ids] -> [B, n_ctx, V]``: the
engine, the float64 reference or llama.cpp (see the ``*_chunk_logits`` factories).
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

ChunkLogits = Callable[[list[list[int]]], torch.Tensor]  # B chunks of n_ctx ids -> [B, n_ctx, V]

MAGIC = b"_logits_"
KL_FLOOR = -16.0        # base log-probs at or below this are left out of the KL sum (as llama.cpp)
MAX_LOGITS_CTX = 1 << 20


class PerplexityError(ValueError):
    """A request that cannot be computed (too little text) or a bad logits file."""


# --- the method ---------------------------------------------------------------------------

def chunks_of(tokens: Sequence[int], n_ctx: int, n_chunks: int | None) -> list[list[int]]:
    """The chunks llama-perplexity evaluates: ``min(n_chunks, len // n_ctx)`` runs of
    ``n_ctx`` tokens (all of them when ``n_chunks`` is None or negative)."""
    if n_ctx < 4:
        raise PerplexityError(f"context {n_ctx} is too small (at least 4)")
    if len(tokens) < 2 * n_ctx:
        raise PerplexityError(f"the text tokenizes to {len(tokens)} tokens; a context of {n_ctx} "
                              f"needs at least {2 * n_ctx}")
    n = len(tokens) // n_ctx
    if n_chunks is not None and n_chunks >= 0:
        n = min(n, n_chunks)
    if n < 1:
        raise PerplexityError("--chunks must be at least 1")
    return [list(tokens[i * n_ctx:(i + 1) * n_ctx]) for i in range(n)]


def with_bos(chunk: Sequence[int], bos: int | None) -> list[int]:
    """The ids evaluated for a chunk: BOS replaces the first token when ``bos`` is not None."""
    ids = list(chunk)
    if bos is not None:
        ids[0] = bos
    return ids


def chunk_nll(logits: torch.Tensor, chunk: Sequence[int]) -> np.ndarray:
    """Float64 [n_ctx - 1 - first]: -log p(next token) at the scored rows of one chunk
    (``logits`` [n_ctx, V]; row i predicts ``chunk[i + 1]``)."""
    n_ctx = len(chunk)
    first = n_ctx // 2
    rows = logits[first:n_ctx - 1].to(torch.float64)                            # [n, V]
    targets = torch.tensor(chunk[first + 1:n_ctx], dtype=torch.long)
    logp = torch.log_softmax(rows, dim=-1)
    return (-logp[torch.arange(len(targets)), targets]).numpy()


@dataclass
class NLLStats:
    """Running sums of nll and nll^2, and llama.cpp's estimate from them."""

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, nll: np.ndarray) -> None:
        self.count += int(nll.size)
        self.total += float(nll.sum())
        self.total_sq += float((nll * nll).sum())

    @property
    def ppl(self) -> float:
        return math.exp(self.total / self.count)

    @property
    def ppl_stderr(self) -> float:
        """``PPL * sqrt(var(nll) / (N - 1))``, 0 while undefined (as llama.cpp prints it)."""
        mean = self.total / self.count
        var = self.total_sq / self.count - mean * mean
        return self.ppl * math.sqrt(var / (self.count - 1)) if var > 0 and self.count > 1 else 0.0


@dataclass
class PerplexityResult:
    ppl: float
    ppl_stderr: float
    chunks: int
    tokens: int              # tokens scored
    n_ctx: int
    running: list[float] = field(default_factory=list)  # PPL after each chunk

    def to_dict(self) -> dict[str, Any]:
        return {"ppl": self.ppl, "ppl_stderr": self.ppl_stderr, "chunks": self.chunks,
                "tokens": self.tokens, "n_ctx": self.n_ctx}


def _batches(chunks: list[list[int]], per_batch: int) -> Iterator[tuple[int, list[list[int]]]]:
    for i in range(0, len(chunks), per_batch):
        yield i, chunks[i:i + per_batch]


def evaluate(chunk_logits: ChunkLogits, chunks: list[list[int]], bos: int | None, chunks_per_batch: int = 1,
             on_chunk: Callable[[int, torch.Tensor, NLLStats], None] | None = None) -> PerplexityResult:
    """Perplexity of ``chunks`` (from :func:`chunks_of`). ``on_chunk(index, logits [n_ctx, V],
    stats)`` sees each chunk's logits after it is scored (for progress and logits files)."""
    stats, running = NLLStats(), []
    for start, group in _batches(chunks, max(1, chunks_per_batch)):
        logits = chunk_logits([with_bos(c, bos) for c in group])                    # [B, n_ctx, V]
        for j, chunk in enumerate(group):
            stats.add(chunk_nll(logits[j], chunk))
            running.append(stats.ppl)
            if on_chunk is not None:
                on_chunk(start + j, logits[j], stats)
    return PerplexityResult(stats.ppl, stats.ppl_stderr, len(chunks), stats.count, len(chunks[0]), running)


# --- where logits come from ---------------------------------------------------------------

def engine_chunk_logits(model: Any, n_batch: int) -> ChunkLogits:
    """The engine (:class:`gguflm.model.Model`) on B chunks at once, each from an empty
    cache; a chunk longer than ``n_batch`` is fed ``n_batch`` tokens at a time through the
    KV cache (llama-perplexity's ``-b`` below ``-c``)."""

    def run(chunks: list[list[int]]) -> torch.Tensor:
        B, T = len(chunks), len(chunks[0])
        dev = model.device
        cache = model.new_cache(B, n_ctx=T)
        slots = torch.arange(B, device=dev)
        ids = torch.tensor(chunks, device=dev)                                      # [B, T]
        pieces = []
        for s in range(0, T, n_batch):
            e = min(T, s + n_batch)
            pos = torch.arange(s, e, device=dev)[None].expand(B, -1)
            pieces.append(model.forward(ids[:, s:e], pos, cache, slots).float().cpu())  # [B, e-s, V]
        return torch.cat(pieces, dim=1)

    return run


def reference_chunk_logits(f: Any, weights: Callable[[str], torch.Tensor] | None = None) -> ChunkLogits:
    """The float64 reference (:func:`gguflm.verify.reference.reference_logits`), chunk by chunk."""
    from gguflm.verify.reference import reference_logits

    def run(chunks: list[list[int]]) -> torch.Tensor:
        return torch.stack([torch.from_numpy(reference_logits(f, c, weights=weights)) for c in chunks])

    return run


@contextlib.contextmanager
def llama_cpp_chunk_logits(path: str | os.PathLike, n_ctx: int, n_threads: int | None = None,
                           timeout: float | None = None) -> Iterator[ChunkLogits]:
    """llama.cpp's logits (llama-cpp-python, ``logits_all``), chunk by chunk, from a child
    process that lives as long as the block: a crash or a hang there raises
    :class:`gguflm.verify.llamacpp.OracleFailed` here."""
    from gguflm.verify.llamacpp import LlamaCppModel

    with LlamaCppModel(path, n_ctx=n_ctx, n_threads=n_threads, timeout=timeout) as oracle:

        def run(chunks: list[list[int]]) -> torch.Tensor:
            return torch.stack([torch.from_numpy(oracle.logits(c)) for c in chunks])

        yield run


# --- the logits file ----------------------------------------------------------------------

def row_width(n_vocab: int) -> int:
    """uint16 entries per stored row: 4 for the two floats, the vocabulary padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def quantize_log_probs(logits: torch.Tensor) -> np.ndarray:
    """[N, V] logits -> [N, row_width(V)] uint16 rows (see the module docstring), in float32
    as llama.cpp does: the 16 nats below the top logit on 65535 steps."""
    x = logits.to(torch.float32).numpy()
    n, V = x.shape
    mx = x.max(axis=1, keepdims=True)
    mn = np.maximum(x.min(axis=1, keepdims=True), mx - 16.0)
    lse = np.log(np.exp((x - mx).astype(np.float64)).sum(axis=1, keepdims=True)).astype(np.float32)
    min_log_prob = (mn - mx - lse).astype(np.float32)
    scale = ((mx - mn) / np.float32(65535.0)).astype(np.float32)
    inv = np.divide(np.float32(1.0), scale, out=np.zeros_like(scale), where=scale != 0)
    q = np.where(x > mn, np.rint(inv * (x - mn)), 0.0).astype(np.uint16)
    out = np.zeros((n, row_width(V)), dtype=np.uint16)
    head = np.concatenate([scale, min_log_prob], axis=1).astype("<f4")         # [N, 2]
    out[:, :4] = head.view("<u2")
    out[:, 4:4 + V] = q
    return out


def dequantize_log_probs(rows: np.ndarray, n_vocab: int) -> torch.Tensor:
    """[N, row_width] uint16 -> float32 [N, V] log-probabilities."""
    head = np.ascontiguousarray(rows[:, :4]).view("<f4")                        # [N, 2]
    q = rows[:, 4:4 + n_vocab].astype(np.float32)
    return torch.from_numpy(head[:, :1] * q + head[:, 1:2])


class LogitsWriter:
    """Writes a base model's run (header, tokens, then each chunk's rows as scored)."""

    def __init__(self, path: str | os.PathLike, n_ctx: int, n_vocab: int, chunks: list[list[int]]):
        self.path, self.n_vocab = Path(path), n_vocab
        self.file: BinaryIO = open(self.path, "wb")
        self.file.write(MAGIC + struct.pack("<Iii", n_ctx, n_vocab, len(chunks)))
        self.file.write(np.asarray(chunks, dtype="<i4").tobytes())

    def add(self, logits: torch.Tensor) -> None:
        """Append one chunk's scored rows (``logits`` [n_ctx, V])."""
        n_ctx = logits.shape[0]
        self.file.write(quantize_log_probs(logits[n_ctx // 2:n_ctx - 1]).astype("<u2").tobytes())

    def close(self) -> None:
        self.file.close()


@dataclass
class LogitsFile:
    """A base run read back: its tokens [n_chunk, n_ctx] and uint16 rows (memory-mapped)."""

    n_ctx: int
    n_vocab: int
    tokens: np.ndarray       # int32 [n_chunk, n_ctx]
    rows: np.ndarray         # uint16 [n_chunk, n_ctx - 1 - n_ctx/2, row_width]

    @property
    def chunks(self) -> list[list[int]]:
        return self.tokens.tolist()


def read_logits_file(path: str | os.PathLike, n_vocab: int) -> LogitsFile:
    """Open and check a logits file against a model of ``n_vocab`` tokens; every field is
    bounded and the file size must match the header exactly (PerplexityError otherwise)."""
    p = Path(path)
    size = p.stat().st_size
    head_size = len(MAGIC) + 12
    with open(p, "rb") as fh:
        head = fh.read(head_size)
    if len(head) < head_size or head[:len(MAGIC)] != MAGIC:
        raise PerplexityError(f"{p}: not a logits file (no {MAGIC.decode()!r} header)")
    n_ctx, file_vocab, n_chunk = struct.unpack("<Iii", head[len(MAGIC):])
    if not 4 <= n_ctx <= MAX_LOGITS_CTX:
        raise PerplexityError(f"{p}: context {n_ctx} out of range [4, {MAX_LOGITS_CTX}]")
    if file_vocab != n_vocab:
        raise PerplexityError(f"{p}: saved with a vocabulary of {file_vocab} tokens; this model has {n_vocab}")
    if n_chunk < 1:
        raise PerplexityError(f"{p}: {n_chunk} chunks")
    n_rows = n_ctx - 1 - n_ctx // 2
    expected = head_size + 4 * n_chunk * n_ctx + 2 * n_chunk * n_rows * row_width(n_vocab)
    if size != expected:
        raise PerplexityError(f"{p}: {size} bytes, but its header ({n_chunk} chunks of {n_ctx}, vocabulary "
                              f"{n_vocab}) needs {expected}")
    tokens = np.memmap(p, dtype="<i4", mode="r", offset=head_size, shape=(n_chunk, n_ctx))
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= n_vocab):
        raise PerplexityError(f"{p}: token ids outside [0, {n_vocab})")
    rows = np.memmap(p, dtype="<u2", mode="r", offset=head_size + 4 * n_chunk * n_ctx,
                     shape=(n_chunk, n_rows, row_width(n_vocab)))
    return LogitsFile(n_ctx, n_vocab, np.asarray(tokens), rows)


# --- KL divergence against a base run -----------------------------------------------------

@dataclass
class KLStats:
    """Per-row values of a KL run, and their summary (llama-perplexity's statistics)."""

    kl: list[float] = field(default_factory=list)
    same_top: int = 0
    nll: NLLStats = field(default_factory=NLLStats)
    nll_base: NLLStats = field(default_factory=NLLStats)

    def add(self, logits: torch.Tensor, base_rows: np.ndarray, chunk: Sequence[int]) -> None:
        """One chunk: ``logits`` [n_ctx, V] of the model under test, ``base_rows`` its stored rows."""
        n_ctx = len(chunk)
        first = n_ctx // 2
        rows = logits[first:n_ctx - 1].to(torch.float64)                            # [n, V]
        logp = torch.log_softmax(rows, dim=-1)
        base = dequantize_log_probs(base_rows, rows.shape[1]).to(torch.float64)     # [n, V]
        keep = base > KL_FLOOR
        kl = torch.where(keep, base.exp() * (base - logp), torch.zeros_like(base)).sum(dim=-1)
        self.kl.extend(kl.tolist())
        self.same_top += int((rows.argmax(-1) == base.argmax(-1)).sum())
        targets = torch.tensor(chunk[first + 1:n_ctx], dtype=torch.long)
        idx = torch.arange(len(targets))
        self.nll.add((-logp[idx, targets]).numpy())
        self.nll_base.add((-base[idx, targets]).numpy())

    def summary(self) -> dict[str, float | int]:
        kl = np.asarray(self.kl)
        n = kl.size
        return {
            "rows": n, "kl_mean": float(kl.mean()),
            "kl_mean_stderr": float(kl.std() / math.sqrt(n - 1)) if n > 1 else 0.0,
            "kl_median": float(np.median(kl)), "kl_p99": float(np.quantile(kl, 0.99)), "kl_max": float(kl.max()),
            "top1_agreement": self.same_top / n,
            "ppl": self.nll.ppl, "ppl_base": self.nll_base.ppl, "delta_ppl": self.nll.ppl - self.nll_base.ppl,
            "ln_ppl_ratio": (self.nll.total - self.nll_base.total) / n,
        }
