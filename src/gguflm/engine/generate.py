"""The generation loop: prefill the prompt in one batch, then decode one token at a time
through the preallocated KV cache.

Two levels:

* :class:`TokenStream` yields token ids and records a :class:`GenerationResult`
  (finish reason, token counts, timings) — what a server needs.
* :func:`generate_text` turns a token stream into text pieces: whole UTF-8 characters
  only (bytes of a character split across tokens are held until it is complete), and
  stop strings are never emitted (text that might begin one is held back until it cannot).
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gguflm.model.kv_cache import KVCache
from gguflm.engine.sampling import SamplingParams, sample

if TYPE_CHECKING:
    from gguflm.engine.llm import LLM


class GenerationError(ValueError):
    """A generation request that cannot run (empty prompt, bad parameters...)."""


class ContextLengthError(GenerationError):
    """The prompt does not fit in the context window."""


def check_request(prompt: Sequence[int], n_ctx: int, n_vocab: int, max_tokens: int | None) -> None:
    """Raise GenerationError (ContextLengthError for length) unless ``prompt`` is non-empty,
    leaves a free position in ``n_ctx``, holds ids below ``n_vocab``, and ``max_tokens``
    (None: unbounded) is >= 0."""
    if not prompt:
        raise GenerationError("the prompt is empty: nothing to continue from")
    if len(prompt) >= n_ctx:
        raise ContextLengthError(f"the prompt has {len(prompt)} tokens but the context holds "
                                 f"{n_ctx}; shorten it or raise the context size")
    if not all(0 <= t < n_vocab for t in prompt):
        raise GenerationError(f"prompt token ids must lie in [0, {n_vocab})")
    if max_tokens is not None and max_tokens < 0:
        raise GenerationError("max_tokens must be >= 0")


@dataclass
class GenerationResult:
    """What a finished (or running) generation did. ``finish_reason`` is "stop" (end-of-
    generation token or stop string), "length" (max_tokens or a full context) or None
    while running."""

    n_prompt: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def n_generated(self) -> int:
        return len(self.tokens)


class TokenStream:
    """Iterate to generate: yields each sampled token id; an end-of-generation id ends the
    stream (finish "stop") without being yielded, as does ``max_tokens`` (finish "length").

    ``cache``/``slot`` let a caller (a batching server) place the sequence; by default a
    one-slot cache of the model's context size is made.
    """

    def __init__(self, llm: LLM, prompt_ids: Sequence[int], max_tokens: int = 256,
                 params: SamplingParams | None = None, cache: KVCache | None = None, slot: int = 0):
        self.llm, model = llm, llm.model
        self.model = model
        self.prompt = [int(t) for t in prompt_ids]
        self.params = params or SamplingParams()
        self.cache = cache if cache is not None else model.new_cache(1)
        check_request(self.prompt, self.cache.n_ctx, model.config.n_vocab, max_tokens)
        self.max_tokens = max_tokens
        self.slot = slot
        self.result = GenerationResult(n_prompt=len(self.prompt))
        self.generator = torch.Generator()
        if self.params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.params.seed)

    def __iter__(self) -> Iterator[int]:
        model, res, eog = self.model, self.result, set(self.llm.tokenizer.eog_ids)
        device = self.cache.k.device
        slots = torch.tensor([self.slot], device=device)
        history = list(self.prompt)
        if self.max_tokens == 0:
            res.finish_reason = "length"
            return
        t0 = time.perf_counter()
        n = len(self.prompt)
        logits = model.forward(torch.tensor([self.prompt], device=device),
                               torch.arange(n, device=device)[None], self.cache, slots, last_only=True)[0]
        res.prefill_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            while True:
                tok = sample(logits, self.params, history, self.generator)
                if tok in eog:
                    res.finish_reason = "stop"
                    return
                res.tokens.append(tok)
                history.append(tok)
                yield tok
                if len(res.tokens) >= self.max_tokens or n >= self.cache.n_ctx:
                    res.finish_reason = "length"
                    return
                logits = model.forward(torch.tensor([[tok]], device=device), torch.tensor([[n]], device=device),
                                       self.cache, slots, last_only=True)[0]
                n += 1
        finally:
            res.decode_seconds = time.perf_counter() - t0


class TextAssembler:
    """Bytes of token pieces in, text out: complete UTF-8 characters only (invalid bytes
    become U+FFFD, as Python decodes), and nothing that is or may start a stop string.

    The text ends at the first character that completes a stop string (if several complete
    there, the longest); that stop string and everything after it are dropped, whatever
    the split of the bytes into pieces. ``push(piece) -> (text, stopped)``: the text that is
    now final. ``flush()`` returns what was held back at the end of the stream.
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""     # text not yet released: a possible beginning of a stop string
        self._checked = 0   # characters of _held already known to end no stop string

    def push(self, piece: bytes) -> tuple[str, bool]:
        self._held += self._decoder.decode(piece)
        return self._release()

    def flush(self) -> str:
        self._held += self._decoder.decode(b"", final=True)
        text, stopped = self._release()
        if stopped:
            return text
        text, self._held, self._checked = text + self._held, "", 0
        return text

    def _release(self) -> tuple[str, bool]:
        held = self._held
        for end in range(self._checked + 1, len(held) + 1):
            done = [len(s) for s in self.stop if held.endswith(s, 0, end)]
            if done:
                self._held, self._checked = "", 0
                return held[:end - max(done)], True
        keep = max((_overlap(held, s) for s in self.stop), default=0)
        self._held = held[len(held) - keep:]
        self._checked = len(self._held)
        return held[:len(held) - keep], False


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def generate_text(stream: TokenStream, stop: Sequence[str] = ()) -> Iterator[str]:
    """Text pieces of ``stream`` (see :class:`TextAssembler`); a stop string ends the
    stream with finish reason "stop"."""
    tokenizer = stream.llm.tokenizer
    text = TextAssembler(stop)
    tokens = iter(stream)
    try:
        for tok in tokens:
            piece, stopped = text.push(tokenizer.token_to_piece(tok))
            if piece:
                yield piece
            if stopped:
                stream.result.finish_reason = "stop"
                return
    finally:
        tokens.close()  # ends the decode loop now (and records its timing)
    tail = text.flush()
    if tail:
        yield tail
