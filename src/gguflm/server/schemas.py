"""Request bodies of the OpenAI API (the subset gguflm serves), validated strictly.

Every body is untrusted: :func:`parse` turns malformed JSON, a wrong type or an
out-of-range value into a 400 :class:`APIError` that names the offending parameter
(``param``: a dotted path such as ``messages.0.content``). Unknown fields are ignored,
as llama.cpp's server ignores them. Sampling fields left out take llama.cpp's defaults
(:class:`SamplingParams`), so ``top_k``, ``min_p`` and ``repeat_penalty`` behave as there.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from gguflm.engine.sampling import SamplingParams
from gguflm.server.errors import APIError, invalid

MAX_STOP = 16            # stop strings per request
MAX_STOP_CHARS = 256     # characters per stop string
MAX_TOP_LOGPROBS = 20    # OpenAI's bound for chat; completions allow 5
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)
MAX_INT = (1 << 31) - 1  # token counts and windows are int32 in llama.cpp's server

StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _Sampling(_Strict):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_INT)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0, le=10)
    repeat_last_n: int | None = Field(None, ge=-1, le=MAX_INT)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    ignore_eos: bool = Field(False, description="llama.cpp's server field: never sample an end-of-generation token")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request is generated")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling_params(self) -> SamplingParams:
        """The request's sampling parameters over llama.cpp's defaults."""
        given = {name: getattr(self, name) for name in
                 ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
                  "presence_penalty", "frequency_penalty")
                 if getattr(self, name) is not None}
        seed = None if self.seed is None else self.seed % (1 << 64)
        return SamplingParams(**given, seed=seed)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def n_top_logprobs(self) -> int | None:
        """None: no logprobs; else how many alternatives per token."""
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] = Field()
    logprobs: int | None = Field(None, ge=0, le=5)

    def prompt_value(self) -> str | list[int]:
        """The one prompt: a string or token ids (a list of strings must hold exactly one)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise invalid("only one prompt per request is supported", "prompt")
            return p[0]
        if isinstance(p, list) and not p:
            raise invalid("the prompt is empty", "prompt")
        return p

    def token_limit(self) -> int | None:
        return self.max_tokens

    def n_top_logprobs(self) -> int | None:
        return self.logprobs


# Field names, to tell a field from a union tag ("list[int]") in a validation error path.
_FIELDS = frozenset().union(*(m.model_fields for m in (ChatCompletionRequest, CompletionRequest, ChatMessage,
                                                        TextPart, StreamOptions)))

R = TypeVar("R", bound=_Strict)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(obj: object) -> str | None:
    """The path (``messages.0.content``) of the first string, key or value, holding a lone
    surrogate (JSON's ``"\\ud800"`` decodes to one): no UTF-8 text can carry it."""
    stack: list[tuple[object, str]] = [(obj, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path or "body"
        elif isinstance(value, dict):
            for k, v in value.items():
                where = f"{path}.{k}" if path else k
                if _SURROGATE.search(k):
                    return where
                stack.append((v, where))
        elif isinstance(value, list):
            stack.extend((v, f"{path}.{i}") for i, v in enumerate(value))
    return None


def parse(model: type[R], body: bytes) -> R:
    """Validate a request body; raises a 400 :class:`APIError` describing the first problem."""
    try:
        obj = json.loads(body, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise invalid("the request body is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # NaN/Infinity, or an integer of more than 4300 digits
        why = "a number has more than 4300 digits" if "integer string conversion" in str(e) else str(e)
        raise invalid(f"the request body is not valid JSON: {why}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    where = _lone_surrogate(obj)
    if where is not None:
        raise invalid(f"invalid value for '{where}': the string holds a lone UTF-16 surrogate "
                      "(not a Unicode character)", where, "invalid_value")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise _validation_error(e) from None


def _validation_error(e: ValidationError) -> APIError:
    def path(err: dict) -> list[str]:
        return [str(x) for x in err["loc"] if isinstance(x, int) or x in _FIELDS]

    # Of a union's alternatives, report the one that got furthest: the deepest path,
    # a value error rather than a type error.
    errors = e.errors(include_url=False)
    first = path(errors[0])[:1]
    err = min((x for x in errors if path(x)[:1] == first),
              key=lambda x: (-len(path(x)), x["type"].endswith("_type")))
    path = path(err)
    param = ".".join(path) or None
    if err["type"] == "missing":
        message = f"missing required parameter: '{param}'"
        return invalid(message, param, "missing_required_parameter")
    if param == "n" and err["type"] in ("less_than_equal", "greater_than_equal"):
        return invalid("only n=1 is supported", "n", "invalid_value")
    detail = err["msg"]
    if param == "messages" and err["type"] == "too_short":
        detail = "at least one message is required"
    return invalid(f"invalid value for '{param}': {detail}", param,
                   "invalid_type" if err["type"].endswith("_type") else "invalid_value")

