"""The glue between the HTTP side (asyncio) and the scheduler (one worker thread).

A request becomes a prompt (chat template + tokenizer), is checked against the context,
and is submitted as a :class:`Job`; its events come back to its :class:`Generation`
from the worker thread through the loop's :class:`Mailbox` (one wake-up of the loop per
burst of events: the scheduler sends a step's events together). Cancelling a
:class:`Generation` frees its KV-cache slot at the scheduler's next step.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from gguflm.engine.generate import ContextLengthError, GenerationError
from gguflm.engine.scheduler import Done, Event, Failed, Job, KVPoolError, Piece, QueueFullError, Scheduler
from gguflm.errors import TemplateError
from gguflm.server.errors import APIError, invalid
from gguflm.server.schemas import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from gguflm.engine.llm import LLM


class Mailbox:
    """Events from the scheduler's thread to one event loop, delivered in bursts: a decode
    step emits one event per running request, and the loop is woken once per burst (one
    ``call_soon_threadsafe``, not one per event)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[Generation, Event]] = []

    def post(self, gen: Generation, ev: Event) -> None:
        """(Any thread.) Queue ``ev`` for ``gen``; wake the loop if nothing is pending."""
        with self._lock:
            self._items.append((gen, ev))
            if len(self._items) > 1:
                return
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for gen, ev in items:
            gen.put(ev)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()


def mailbox() -> Mailbox:
    """The running loop's mailbox (one per loop)."""
    loop = asyncio.get_running_loop()
    box = _MAILBOXES.get(loop)
    if box is None:
        box = _MAILBOXES[loop] = Mailbox(loop)
    return box


class Generation:
    """One submitted job seen from the event loop: iterate ``events()`` until its
    :class:`Done` or :class:`Failed`; ``cancel()`` at any time (on the loop's thread)."""

    def __init__(self, scheduler: Scheduler, job: Job):
        box = mailbox()
        self._loop = asyncio.get_running_loop()
        self._pending: collections.deque[Event] = collections.deque()
        self._waiter: asyncio.Future | None = None   # set while events() waits
        self._ticket = scheduler.submit(job, lambda ev: box.post(self, ev))

    def put(self, ev: Event) -> None:
        """(On the event loop.) ``ev`` arrived."""
        self._pending.append(ev)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def events(self) -> AsyncIterator[Event]:
        """The job's events; pieces that are already waiting when one is taken come as one
        (their texts and logprobs joined), so a loop that falls behind catches up."""
        pending = self._pending
        while True:
            if not pending:
                self._waiter = self._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            ev = pending.popleft()
            if isinstance(ev, Piece) and pending and isinstance(pending[0], Piece):
                texts, logprobs = [ev.text], list(ev.logprobs)
                while pending and isinstance(pending[0], Piece):
                    nxt = pending.popleft()
                    texts.append(nxt.text)
                    logprobs += nxt.logprobs
                ev = Piece("".join(texts), tuple(logprobs))
            yield ev
            if isinstance(ev, (Done, Failed)):
                return

    def cancel(self) -> None:
        """(On the event loop.) Stop the job; a waiting ``events()`` ends with ``Failed``."""
        if not self._ticket.cancelled:
            self._ticket.cancel()
            self.put(Failed("cancelled"))


class Backend:
    """A loaded model and its scheduler, as the API sees them."""

    def __init__(self, model: LLM, scheduler: Scheduler, model_id: str | None = None):
        self.model, self.scheduler = model, scheduler
        self.model_id = model_id or Path(str(model.file.path)).name
        self.created = int(time.time())

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        """The messages rendered by the model's chat template, tokenized (special tokens parsed)."""
        template = self.model.chat_template
        if template is None:
            raise invalid("this model has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = template.render(messages, add_generation_prompt=True)
        except TemplateError as e:
            raise invalid(f"the chat template failed on these messages: {e}", "messages") from None
        return self.model.encode_prompt(text)

    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        """The prompt text tokenized (BOS as the model wants it), or the given token ids."""
        return self.model.encode_prompt(req.prompt_value())

    def job(self, req: ChatCompletionRequest | CompletionRequest, prompt: list[int]) -> Job:
        """The scheduler job of a validated request; 400 when it cannot run."""
        param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        try:
            params = req.sampling_params()
        except ValueError as e:
            raise invalid(str(e)) from None
        job = Job(tuple(prompt), params, req.token_limit(), req.stop_strings(), req.n_top_logprobs(),
                  ignore_eos=req.ignore_eos)
        try:
            self.scheduler.check(job)
        except KVPoolError as e:
            raise invalid(f"This server's KV cache holds {e.positions} tokens in all. However, your {param} "
                          f"resulted in {len(prompt)} tokens and the request needs {e.needed} positions "
                          f"(its prompt plus max_tokens). Please lower max_tokens or shorten the {param}, "
                          f"or start the server with a larger --kv-size.", param, "context_length_exceeded",
                          n_prompt_tokens=len(prompt), kv_size=e.positions) from None
        except ContextLengthError:
            n_ctx = self.scheduler.n_ctx
            raise invalid(f"This model's maximum context length is {n_ctx} tokens. However, your "
                          f"{param} resulted in {len(prompt)} tokens (at least one must be left to generate). "
                          f"Please shorten them, or start the server with a larger -c.",
                          param, "context_length_exceeded", n_prompt_tokens=len(prompt), n_ctx=n_ctx) from None
        except GenerationError as e:
            raise invalid(str(e), param) from None
        return job

    def start(self, job: Job) -> Generation:
        """Submit; 503 when the waiting queue is full."""
        try:
            return Generation(self.scheduler, job)
        except QueueFullError as e:
            raise APIError(503, str(e), "server_error", None, "server_busy") from None
        except GenerationError as e:
            raise APIError(503, str(e), "server_error", None, "unavailable") from None
