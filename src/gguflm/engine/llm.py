"""``gguflm.load``: a GGUF file in, an :class:`LLM` out: the model (forward + KV cache,
:mod:`gguflm.model`) with its tokenizer and chat template, and the text API on top:
``generate`` (raw completion), ``chat`` (the file's chat template applied) and
``create_chat_completion`` (OpenAI-shaped, like llama-cpp-python's)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from gguflm.engine.generate import TokenStream, generate_text
from gguflm.engine.sampling import SamplingParams
from gguflm.errors import GGUFError
from gguflm.gguf.reader import GGUFFile
from gguflm.model.model import Model, load_model
from gguflm.models import resolve


class LLM:
    """A model with its tokenizer and chat template. ``model`` is the :class:`Model`
    (forward + cache); ``logits`` scores token ids; ``generate`` streams text."""

    def __init__(self, model: Model, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self._chat_template: Any = None

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

    def stream_tokens(self, prompt: str | Sequence[int], max_tokens: int = 256,
                      params: SamplingParams | None = None, add_special: bool = True) -> TokenStream:
        """The low-level generator: token ids and a GenerationResult (see TokenStream)."""
        session = getattr(self.model, "session_cache", None)
        return TokenStream(self, self.encode_prompt(prompt, add_special), max_tokens, params,
                           cache=session() if session else None)

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 seed: int | None = None, stop: Sequence[str] = (), add_special: bool = True) -> Iterator[str]:
        """Stream the continuation of ``prompt`` as text pieces (llama.cpp's sampling defaults)."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
                                presence_penalty, frequency_penalty, seed)
        return generate_text(self.stream_tokens(prompt, max_tokens, params, add_special), stop)

    def __repr__(self) -> str:
        c = self.config
        return (f"LLM({str(self.file.path)!r}, {c.arch}, {c.n_layer} layers, {c.n_embd} wide, "
                f"vocab {c.n_vocab}, n_ctx {self.n_ctx}, {self.device})")


def load(path: str | os.PathLike | GGUFFile, device: str | torch.device = "cpu",
         n_ctx: int | None = None, threads: int | None = None) -> LLM:
    """Load a GGUF model with its tokenizer: a file, or a name from gguflm.models
    (``"gemma3-270m"``, fetched into the cache on first use). ``n_ctx``: context size
    (default: the training context, at most 4096); ``threads``: torch CPU threads
    (default: torch's own choice)."""
    from gguflm.tokenizer import Tokenizer

    f = path if isinstance(path, GGUFFile) else GGUFFile(resolve(path))
    tokenizer = Tokenizer.from_gguf(f)
    model = load_model(f, device, n_ctx, threads)
    if tokenizer.n_vocab != model.config.n_vocab:  # as llama.cpp: token_embd must be [n_embd, n_tokens]
        raise GGUFError(f"the tokenizer has {tokenizer.n_vocab} tokens but the embedding {model.config.n_vocab} "
                        "rows: every row must be a token (llama.cpp refuses the file too)")
    return LLM(model, tokenizer)
