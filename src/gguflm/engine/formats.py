"""Response objects of the OpenAI API, built from scheduler events (shared by the
server and :meth:`gguflm.engine.llm.LLM.create_chat_completion`).

Two formats share one interface (:class:`ChatFormat` for ``/v1/chat/completions``,
:class:`CompletionFormat` for ``/v1/completions``):

* ``chunk(piece)`` / ``opening()`` / ``closing(done)`` / ``usage_chunk(done)``: the
  objects of a stream, each sent as one server-sent event ``data: {json}\\n\\n``,
  the stream ending with ``data: [DONE]``; ``text_event(text)``: the event of a
  ``chunk`` without logprobs, the same bytes as ``sse(chunk(Piece(text)))``, from a
  template (only the text is encoded per token);
* ``response(pieces, done)``: the one object of a non-streamed answer.
"""

from __future__ import annotations

import json
import json.encoder
import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from gguflm.engine.scheduler import Done, Piece, TokenLogprob

SSE_DONE = b"data: [DONE]\n\n"
_MARK = "\x00gguflm-text\x00"   # stands for the text in a chunk's template (no model id holds a NUL)
_encode_str = json.encoder.encode_basestring   # json.dumps of a str (ensure_ascii=False), without the checks


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(done: Done) -> dict[str, Any]:
    return {"prompt_tokens": done.n_prompt, "completion_tokens": done.n_completion,
            "total_tokens": done.n_prompt + done.n_completion,
            "prompt_tokens_details": {"cached_tokens": done.n_cached}}


class TokenText(Protocol):
    def token_to_piece(self, token: int) -> bytes: ...


class _Format:
    object_name = ""
    id_prefix = ""

    def __init__(self, model_id: str, tokenizer: TokenText, include_usage: bool = False):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_id, self.tokenizer, self.include_usage = model_id, tokenizer, include_usage
        head, mark, tail = sse(self.chunk(Piece(_MARK), False)).partition(_encode_str(_MARK).encode())
        assert mark and _encode_str(_MARK).encode() not in tail
        self._head, self._tail = head, tail

    def text_event(self, text: str) -> bytes:
        """``sse(self.chunk(Piece(text), False))``, from the template."""
        return self._head + _encode_str(text).encode() + self._tail

    def chunk(self, piece: Piece, with_logprobs: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model_id,
                "system_fingerprint": "gguflm", "choices": choices}

    def _token(self, tok: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_to_piece(tok)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _stream_chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        obj = self._envelope(self.object_name + ".chunk" if self.object_name == "chat.completion"
                             else self.object_name, [choice])
        if self.include_usage:
            obj["usage"] = None
        return obj

    def usage_chunk(self, done: Done) -> dict[str, Any]:
        """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
        obj = self._stream_chunk({})
        obj["choices"] = []
        obj["usage"] = usage(done)
        return obj


class ChatFormat(_Format):
    object_name = "chat.completion"
    id_prefix = "chatcmpl"

    def logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        content = []
        for e in entries:
            text, raw = self._token(e.id)
            alts = []
            for tok, lp in e.top:
                t, r = self._token(tok)
                alts.append({"token": t, "logprob": lp, "bytes": r})
            content.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": alts})
        return {"content": content, "refusal": None}

    def opening(self) -> dict[str, Any]:
        return self._stream_chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None})

    def chunk(self, piece: Piece, with_logprobs: bool) -> dict[str, Any]:
        return self._stream_chunk({"index": 0, "delta": {"content": piece.text},
                                   "logprobs": self.logprobs(piece.logprobs) if with_logprobs else None,
                                   "finish_reason": None})

    def closing(self, done: Done) -> dict[str, Any]:
        return self._stream_chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": done.finish_reason})

    def response(self, pieces: Sequence[Piece], done: Done, with_logprobs: bool) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(p.text for p in pieces), "refusal": None}
        entries = [e for p in pieces for e in p.logprobs]
        choice = {"index": 0, "message": message, "finish_reason": done.finish_reason,
                  "logprobs": self.logprobs(entries) if with_logprobs else None}
        obj = self._envelope(self.object_name, [choice])
        obj["usage"] = usage(done)
        return obj


class CompletionFormat(_Format):
    object_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, model_id: str, tokenizer: TokenText, include_usage: bool = False):
        super().__init__(model_id, tokenizer, include_usage)
        self._offset = 0  # characters of completion text before the next token (text_offset)

    def logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        """The legacy shape: parallel lists ``tokens``, ``token_logprobs``, ``top_logprobs``
        (one ``{token: logprob}`` per position), ``text_offset``."""
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            text, _ = self._token(e.id)
            out["tokens"].append(text)
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append({self._token(t)[0]: lp for t, lp in e.top})
            out["text_offset"].append(self._offset)
            self._offset += len(text)
        return out

    def opening(self) -> None:
        return None

    def chunk(self, piece: Piece, with_logprobs: bool) -> dict[str, Any]:
        return self._stream_chunk({"index": 0, "text": piece.text,
                                   "logprobs": self.logprobs(piece.logprobs) if with_logprobs else None,
                                   "finish_reason": None})

    def closing(self, done: Done) -> dict[str, Any]:
        return self._stream_chunk({"index": 0, "text": "", "logprobs": None, "finish_reason": done.finish_reason})

    def response(self, pieces: Sequence[Piece], done: Done, with_logprobs: bool) -> dict[str, Any]:
        entries = [e for p in pieces for e in p.logprobs]
        choice = {"index": 0, "text": "".join(p.text for p in pieces), "finish_reason": done.finish_reason,
                  "logprobs": self.logprobs(entries) if with_logprobs else None}
        obj = self._envelope(self.object_name, [choice])
        obj["usage"] = usage(done)
        return obj
