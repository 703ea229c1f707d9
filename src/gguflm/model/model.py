""":func:`load_model`: a GGUF file in, a runnable :class:`Model` out: forward + KV cache +
``logits``. Text (tokenizer, chat template, generation) is the engine's
(:mod:`gguflm.engine.llm`, what ``gguflm.load`` returns)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from gguflm.gguf.reader import GGUFFile
from gguflm.model.config import MAX_CTX, ModelConfig
from gguflm.model.kv_cache import KVCache
from gguflm.model.layers import Block, Transformer
from gguflm.model.loader import build_transformer

DEFAULT_MAX_CTX = 4096  # default context: the training context, capped here to bound cache memory


class Model:
    """A loaded model. ``forward`` is the batched step (see :meth:`Transformer.forward`);
    ``logits`` scores a token sequence from a fresh context.

    ``batch_invariant``: a row's results do not depend on the other rows of its forward,
    on how its prompt was cut into chunks, or on whose computation its cached keys and
    values came from: to the bit with the C++ kernels' batch-invariant mode
    (:func:`gguflm.quant.cpu.set_batch_invariant`), else up to float rounding (the row
    kernels, panel kernels and sgemm tiles sum in different orders). A model without it (CUDA)
    offers :meth:`pin_decode_width` so that a scheduler can keep every step's shapes fixed."""

    batch_invariant = True
    paged_cache = True  # new_cache(block_size=...) works with forward

    def __init__(self, file: GGUFFile, config: ModelConfig, transformer: Transformer | None,
                 n_ctx: int, device: torch.device):
        self.file = file  # kept open: float32 weights may be zero-copy views of the mapping
        self.config, self.transformer = config, transformer
        self.n_ctx, self.device = n_ctx, device

    #: The model computes a step's decode rows (a sampled token of each sequence) with other
    #: kernels than its prompt rows (CUDA with ``GGUFLM_CUDA_DECODE_ROWS=gemv``): ``forward``
    #: with ``select`` then takes ``n_decode``, the count of the leading decode rows, and the
    #: scheduler publishes for prefix caching only the positions of prompts, and feeds a
    #: preempted request's generated tokens again as decode rows, one per step.
    row_kinds = False

    @property
    def flat_steps(self) -> bool:
        """True when a step of one-token rows that share slots (a prompt chunk beside other
        sequences' decode rows, :meth:`forward` with ``select``) costs no more than the same
        tokens as [B, T] rows: every block runs the C++ block step, whose attention goes row
        by row (the torch block would gather each row's keys)."""
        t = self.transformer
        return t is not None and self.device.type == "cpu" and not any(isinstance(b, Block) for b in t.blocks)

    def flat_steps_over(self, cache: KVCache) -> bool:
        """:attr:`flat_steps` over ``cache`` (the C++ block step reads the block table of a paged cache)."""
        return cache.paged and self.flat_steps

    def new_cache(self, n_slots: int = 1, n_ctx: int | None = None, block_size: int | None = None,
                  n_blocks: int | None = None) -> KVCache:
        """An empty KV cache of ``n_slots`` sequences of ``n_ctx`` (default: the model's)
        positions: contiguous, or paged with ``block_size`` (``n_blocks`` in the pool,
        default enough for every slot's whole context; see :class:`KVCache`)."""
        c = self.config
        return KVCache(c.n_layer, n_slots, c.n_head_kv, n_ctx or self.n_ctx, c.head_dim, device=self.device,
                       block_size=block_size, n_blocks=n_blocks)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor, last_only: bool = False, select: torch.Tensor | None = None) -> torch.Tensor:
        """Batched step: tokens/positions Long[B, T], slots Long[B] -> logits (see Transformer;
        ``select``: the flat indices of the tokens whose logits are wanted)."""
        return self.transformer(tokens, positions, cache, slots, last_only, select)

    @torch.inference_mode()
    def decode_one(self, token: torch.Tensor, position: torch.Tensor, cache: KVCache, slot: int) -> torch.Tensor:
        """One token of one sequence: ``token``, ``position`` Long[1] on the cache's device,
        used there as they are (a device that runs asynchronously never waits for them:
        a token chosen on the device by the previous step can be fed before the host has
        read it) -> float32 logits [1, n_vocab] (what ``forward`` gives for them)."""
        slots = torch.full((1,), slot, dtype=torch.long, device=cache.k.device)
        return self.forward(token.view(1, 1), position.view(1, 1), cache, slots, last_only=True)

    def set_batch_invariant(self, enable: bool) -> bool:
        """The CPU kernels' batch-invariant mode (:func:`gguflm.quant.cpu.set_batch_invariant`,
        process-wide); returns the previous setting."""
        from gguflm.quant import cpu

        return cpu.set_batch_invariant(enable)

    def close(self) -> None:
        """Release what the model holds beyond memory (a tensor-parallel model's other ranks)."""

    def pin_decode_width(self, cache: KVCache) -> None:
        """Run every later one-token step over ``cache`` through the same kernels (at the
        same shapes where their rounding depends on them), whatever number of rows it has
        (nothing to do where ``batch_invariant``)."""

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Float32 [len(ids), n_vocab]: the logits after each token, from a fresh context."""
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("no tokens to score")
        if not all(0 <= t < self.config.n_vocab for t in ids):
            raise ValueError(f"token ids must lie in [0, {self.config.n_vocab})")
        cache = self.new_cache(1, n_ctx=len(ids))
        tokens = torch.tensor([ids], device=self.device)
        positions = torch.arange(len(ids), device=self.device)[None]
        return self.forward(tokens, positions, cache, torch.zeros(1, dtype=torch.long, device=self.device))[0].cpu()

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({str(self.file.path)!r}, {c.arch}, {c.n_layer} layers, {c.n_embd} wide, "
                f"vocab {c.n_vocab}, n_ctx {self.n_ctx}, {self.device})")


def load_model(path: str | os.PathLike | GGUFFile, device: str | torch.device = "cpu",
               n_ctx: int | None = None, threads: int | None = None, tp: int = 1) -> Model | None:
    """Load a GGUF model's weights. ``n_ctx``: context size (default: the training context,
    at most 4096); ``threads``: torch CPU threads (default: torch's own choice); ``tp``:
    split it over that many processes (tensor parallel, :mod:`gguflm.model.parallel`:
    under ``torchrun``, ranks other than 0 follow rank 0 here and get None)."""
    if tp < 1:
        raise ValueError("tp must be >= 1")
    if threads is not None:
        if threads < 1:
            raise ValueError("threads must be >= 1")
        torch.set_num_threads(threads)
    f = path if isinstance(path, GGUFFile) else GGUFFile(path)
    config = ModelConfig.from_gguf(f)
    if n_ctx is None:
        n_ctx = min(config.n_ctx_train, DEFAULT_MAX_CTX)
    if not 1 <= n_ctx <= MAX_CTX:
        raise ValueError(f"context size {n_ctx} out of range [1, {MAX_CTX}]")
    dev = torch.device(device)
    if tp > 1:  # the generic block over each rank's shard (the fused CUDA path is not split)
        from gguflm.model.parallel import load_parallel

        return load_parallel(f, config, n_ctx, dev, tp, threads)
    if dev.type == "cuda":  # quantized weights on the GPU, Triton kernels, CUDA graphs (every arch)
        from gguflm.model.cuda import load_cuda
        from gguflm.model.cuda.forward import cuda_unsupported

        why = cuda_unsupported(config)
        if why is None:
            return load_cuda(f, config, n_ctx, dev)
        # documented fallback (docs/architectures.md): the generic block on the GPU
        logging.getLogger("gguflm.model").warning(
            "%s: the fused CUDA path cannot run it (%s); it runs the generic torch block on the GPU, "
            "weights dequantized to float32 (slower, more memory)", config.arch, why)
    transformer = build_transformer(f, config, n_ctx, dev)
    return Model(f, config, transformer, n_ctx, dev)
