"""``gguflm.load``: a GGUF file in, an :class:`LLM` out: the model (forward + KV cache,
:mod:`gguflm.model`) with its tokenizer and chat template, and the text API on top:
``generate`` (raw completion), ``chat`` (the file's chat template applied) and
``create_chat_completion`` (OpenAI-shaped, like llama-cpp-python's).

Every generation runs through the one generation loop, :class:`Scheduler`: here a
scheduler of one slot, stepped on the caller's thread by :class:`TextStream` (the server
runs the same loop over N slots on a worker thread)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from gguflm.engine.formats import ChatFormat
from gguflm.engine.generate import GenerationError, GenerationResult
from gguflm.engine.sampling import SamplingParams
from gguflm.engine.scheduler import Done, Event, Failed, Job, Piece, Scheduler
from gguflm.errors import GGUFError
from gguflm.gguf.reader import GGUFFile
from gguflm.model.model import Model, load_model
from gguflm.models import resolve


class TextStream:
    """One job through a scheduler stepped on the caller's thread: iterate for its text
    pieces; ``result`` (a :class:`GenerationResult`) is complete once the iteration
    ends. The job is checked at once and submitted when the iteration starts; closing
    the iterator early cancels it (its slot is free at the next step)."""

    def __init__(self, scheduler: Scheduler, job: Job):
        self.job, self._scheduler = job, scheduler
        self.result = GenerationResult(n_prompt=len(job.prompt))
        self.done: Done | None = None
        self._events: list[Event] = []
        self._run: Iterator[str] | None = None
        scheduler.check(job)

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        if self._run is None:
            self._run = self._pieces()
        return next(self._run)

    def close(self) -> None:
        """Stop the generation now (its slot is free at the next step)."""
        if self._run is not None:
            self._run.close()

    def _pieces(self) -> Iterator[str]:
        ticket = self._scheduler.submit(self.job, self._events.append)
        try:
            while True:
                if not self._events:
                    self._scheduler.step()
                    continue
                ev = self._events.pop(0)
                if isinstance(ev, Piece):
                    if ev.text:
                        yield ev.text
                elif isinstance(ev, Done):
                    self.done = ev
                    r = self.result
                    r.tokens, r.finish_reason = list(ev.tokens), ev.finish_reason
                    r.prefill_seconds, r.decode_seconds = ev.prefill_seconds, ev.decode_seconds
                    return
                elif isinstance(ev, Failed):
                    raise GenerationError(ev.message)
        finally:
            if self.done is None:
                ticket.cancel()


class LLM:
    """A model with its tokenizer and chat template. ``model`` is the :class:`Model`
    (forward + cache); ``logits`` scores token ids; ``generate`` streams text."""

    def __init__(self, model: Model, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self._chat_template: Any = None
        self._scheduler: Scheduler | None = None

    @property
    def file(self) -> GGUFFile:
        return self.model.file

    @property
    def config(self):
        return self.model.config

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def chat_template(self) -> Any:
        """The file's ChatTemplate (a built-in format if the file has none), built on first use."""
        if self._chat_template is None:
            from gguflm.chat import ChatTemplate

            self._chat_template = ChatTemplate.from_gguf(self.model.file)
        return self._chat_template

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Float32 [len(ids), n_vocab] on the CPU: the logits after each token, from a fresh context."""
        return self.model.logits(ids)

    def encode_prompt(self, prompt: str | Sequence[int], add_special: bool = True) -> list[int]:
        """Token ids of a prompt: text is tokenized with special tokens parsed (a rendered
        chat template contains them); a doubled leading BOS (template + tokenizer) is merged."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special=add_special, parse_special=True)
            bos = self.tokenizer.bos_id
            if len(ids) >= 2 and bos is not None and ids[0] == ids[1] == bos:
                ids = ids[1:]
            return ids
        return [int(t) for t in prompt]

    def scheduler(self) -> Scheduler:
        """The one-slot generation loop of this LLM's own calls, run on the caller's thread;
        the whole prompt is prefilled in one step; its cache is kept between calls."""
        if self._scheduler is None:
            self._scheduler = Scheduler(self, 1, prefill_chunk=self.n_ctx, prefill_budget=self.n_ctx, start=False)
        return self._scheduler

    def stream(self, prompt: str | Sequence[int], max_tokens: int | None = 256, params: SamplingParams | None = None,
               stop: Sequence[str] = (), add_special: bool = True, ignore_eos: bool = False,
               keep_logits: bool = False) -> TextStream:
        """The generation of ``prompt`` (text: special tokens parsed; or token ids) as a
        :class:`TextStream`. ``max_tokens`` None: until end of generation or a full context;
        ``ignore_eos``: run on through end-of-generation tokens; ``keep_logits``: the
        result's Done carries each step's logits. Raises GenerationError (ContextLengthError)
        for a request that cannot run."""
        job = Job(tuple(self.encode_prompt(prompt, add_special)), params or SamplingParams(), max_tokens,
                  tuple(stop), ignore_eos=ignore_eos, keep_logits=keep_logits)
        return TextStream(self.scheduler(), job)

    def generate(self, prompt: str | Sequence[int], max_tokens: int | None = 256, stop: Sequence[str] = (),
                 add_special: bool = True, ignore_eos: bool = False, **sampling: Any) -> Iterator[str]:
        """Stream the continuation of ``prompt`` (raw completion: no chat template) as text
        pieces. ``sampling``: any field of :class:`SamplingParams` (temperature, top_k,
        top_p, min_p, repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty,
        seed), llama.cpp's defaults otherwise."""
        return self.stream(prompt, max_tokens, SamplingParams(**sampling), stop, add_special, ignore_eos)

    def chat_prompt(self, messages: Sequence[dict[str, Any]], tools: Any = None) -> str:
        """``messages`` rendered by the file's chat template, with the generation prompt."""
        return self.chat_template.render(messages, add_generation_prompt=True, tools=tools)

    def chat(self, messages: Sequence[dict[str, Any]], max_tokens: int | None = 256, stop: Sequence[str] = (),
             tools: Any = None, **sampling: Any) -> TextStream:
        """Stream the assistant's answer to ``messages`` (``[{"role": "user", "content":
        "..."}]``) as text pieces: the file's chat template applied (its generation
        prompt added), ending at an end-of-generation token, a stop string or
        ``max_tokens``. ``sampling``: as for :meth:`generate`."""
        return self.stream(self.chat_prompt(messages, tools), max_tokens, SamplingParams(**sampling), stop)

    def create_chat_completion(self, messages: Sequence[dict[str, Any]], stream: bool = False,
                               max_tokens: int | None = 256, stop: str | Sequence[str] | None = None,
                               tools: Any = None, **sampling: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """:meth:`chat` in the OpenAI shape, like llama-cpp-python's: a ``chat.completion``
        dict (``choices[0].message.content``, ``finish_reason``, ``usage``), or with
        ``stream=True`` an iterator of ``chat.completion.chunk`` dicts."""
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        text = self.chat(messages, max_tokens, stops, tools, **sampling)
        fmt = ChatFormat(Path(str(self.file.path)).name, self.tokenizer)
        if stream:
            return _chunks(fmt, text)
        pieces = [Piece(p) for p in text]
        return fmt.response(pieces, text.done, with_logprobs=False)

    def close(self) -> None:
        """Release what the model holds beyond memory (a tensor-parallel model's other ranks)."""
        self.model.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LLM({self.model!r})"


def load(path: str | os.PathLike | GGUFFile, device: str | torch.device = "cpu",
         n_ctx: int | None = None, threads: int | None = None, tp: int = 1) -> LLM | None:
    """Load a GGUF model with its tokenizer: a file, or a name from gguflm.models
    (``"gemma3-270m"``, fetched into the cache on first use). ``n_ctx``: context size
    (default: the training context, at most 4096); ``threads``: torch CPU threads
    (default: torch's own choice; with ``tp``, per rank: the cores divided among them).
    ``tp``: tensor parallel over that many processes (gloo on the CPU, NCCL with a GPU
    each; see docs/scaling.md): this process is rank 0 and starts the others, or, under
    ``torchrun``, every rank calls ``load`` and ranks other than 0 follow rank 0 inside it
    and get None when it closes. ``close()`` (or ``with``) stops the other ranks."""
    from gguflm.tokenizer import Tokenizer

    f = path if isinstance(path, GGUFFile) else GGUFFile(resolve(path))
    tokenizer = Tokenizer.from_gguf(f)
    model = load_model(f, device, n_ctx, threads, tp)
    if model is None:  # a follower rank under torchrun: rank 0 has closed
        return None
    if tokenizer.n_vocab != model.config.n_vocab:  # as llama.cpp: token_embd must be [n_embd, n_tokens]
        raise GGUFError(f"the tokenizer has {tokenizer.n_vocab} tokens but the embedding {model.config.n_vocab} "
                        "rows: every row must be a token (llama.cpp refuses the file too)")
    f.release_header()  # parsed: the vocabulary's pages need not stay resident (~2 MB for SmolLM2)
    return LLM(model, tokenizer)


def _chunks(fmt: ChatFormat, text: TextStream) -> Iterator[dict[str, Any]]:
    """The ``chat.completion.chunk`` dicts of a streamed answer: the role, the pieces, the
    finish reason."""
    yield fmt.opening()
    for piece in text:
        yield fmt.chunk(Piece(piece), with_logprobs=False)
    yield fmt.closing(text.done)
