"""What every generation shares: the request check, the result record, and the text
assembly (whole UTF-8 characters only: bytes of a character split across tokens are held
until it is complete; stop strings are never emitted: text that might begin one is held
back until it cannot). The loop itself is :class:`gguflm.engine.scheduler.Scheduler`.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass, field


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
        if not self.stop:   # nothing to hold back but a character's missing bytes (the decoder's)
            return self._decoder.decode(piece), False
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
        held, checked = self._held, self._checked
        end, longest = 0, 0   # the first end of a stop string past ``checked``, the longest ending there
        for s in self.stop:
            i = held.find(s, max(checked + 1 - len(s), 0))
            if i >= 0 and (not end or i + len(s) < end or (i + len(s) == end and len(s) > longest)):
                end, longest = i + len(s), len(s)
        if end:
            self._held, self._checked = "", 0
            return held[:end - longest], True
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
