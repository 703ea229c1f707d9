"""The sandbox chat templates run in: untrusted code, isolated and bounded.

A chat template is Jinja source read from a downloaded GGUF file, i.e. a program written by
somebody else. It runs in Jinja's ``ImmutableSandboxedEnvironment`` (no attribute starting
with ``_``, no internal attributes of functions/frames/generators, no mutation of lists and
dicts, ``str.format`` sandboxed), configured exactly as transformers configures it
(``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, the ``{% generation %}`` tag, its
``tojson``, ``raise_exception``, ``strftime_now``, ``dict`` and a ``namespace`` that refuses
``_`` names), so real templates render the same text. ``lipsum`` is removed: a random-text
generator has no place in a prompt and its size is not bounded.

Jinja bounds none of the resources a template can burn. This module adds the bounds, all
counted per render in a :class:`_Budget` held in a context variable (threads and concurrent
renders each get their own; nothing runs in a helper thread, nothing is left running):

==========================  ===================================================================
bound                       where it is enforced
==========================  ===================================================================
wall-clock deadline         every loop iteration, call, operator, filter, concatenation, output
loop iterations             each ``for`` iterates through a guard (the compiler wraps ``iter``)
call depth (recursion)      every call made by template code: macros, ``loop()``, blocks
``range()`` length          the ``range`` global
size of one value           *before* each operation that can grow a value or turn one into
                            text: ``*`` ``+`` ``%`` ``**`` ``~``, the growing ``str`` methods,
                            ``str.format``, filters and tests that build text, macro/block
                            buffers, printed values
bytes allocated             every new value is charged to a per-render budget
rendered output             the output stream
one C-level operation       :mod:`gguflm.chat.worker`: the render runs in a process that is
                            killed past the deadline, its address space capped (RLIMIT_AS)
==========================  ===================================================================

Methods of plain values (``str``, ``list``, ``tuple``, ``dict``, ``int``, ``float``) may be
called only when listed in :data:`_PLAIN_METHODS` or :data:`_GROWING_STR_METHODS`; the size of
what a growing method or filter returns is estimated from its arguments before it runs, so
``'a'.center(10**10)`` or ``'x' * 10**10`` fail in microseconds without allocating.
Every violation raises :class:`gguflm.TemplateError`.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, ValuesView
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from string import Formatter
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gguflm.errors import TemplateError


@dataclass(frozen=True)
class TemplateLimits:
    """Resource bounds for compiling and rendering one chat template.

    The defaults sit far above what real chat templates use (they render a conversation in
    milliseconds with values of a few KiB) and far below what hurts a server.
    """

    max_source_chars: int = 64 * 1024   # template source (the largest real ones are ~20 KiB)
    max_output_chars: int = 1 << 20     # the rendered prompt
    max_string_chars: int = 1 << 20     # any one string the template builds
    max_items: int = 1 << 17            # any one list/tuple/dict the template builds
    max_alloc_bytes: int = 64 << 20     # all values built during one render, summed
    max_iterations: int = 1 << 20       # loop iterations during one render, summed
    max_range: int = 100_000            # length of one range()
    max_depth: int = 64                 # nested calls (macro recursion)
    max_int_bits: int = 1 << 16         # size of an integer the template computes
    timeout_s: float = 1.0              # wall-clock time of one render
    max_memory_bytes: int = 256 << 20   # address space the render process may add (gguflm.chat.worker)


DEFAULT_LIMITS = TemplateLimits()


class _Budget:
    """What one render (or one compilation) has spent so far; raises when a bound is hit."""

    __slots__ = ("limits", "deadline", "iterations", "depth", "allocated", "now")

    def __init__(self, limits: TemplateLimits, now: datetime | None = None):
        self.limits = limits
        self.now = now  # what strftime_now() shows (None: the clock when it is called)
        self.deadline = time.monotonic() + limits.timeout_s
        self.iterations = 0
        self.depth = 0
        self.allocated = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateError(f"chat template ran longer than the limit of {self.limits.timeout_s} s")

    def step(self) -> None:
        """One loop iteration."""
        self.iterations += 1
        if self.iterations > self.limits.max_iterations:
            raise TemplateError(f"chat template ran more than {self.limits.max_iterations} loop iterations")
        self.tick()

    def iterate(self, iterable: Any) -> Iterator[Any]:
        for item in iterable:
            self.step()
            yield item

    def allow_chars(self, n: int, what: str) -> None:
        """Refuse, before it runs, an operation whose result may hold ``n`` characters."""
        if n > self.limits.max_string_chars or n > self.limits.max_alloc_bytes - self.allocated:
            raise TemplateError(f"chat template: {what} would build a string of up to {n} characters "
                                f"(limit {self.limits.max_string_chars}, allocation budget left "
                                f"{max(self.limits.max_alloc_bytes - self.allocated, 0)} bytes)")

    def allow_items(self, n: int, what: str) -> None:
        if n > self.limits.max_items:
            raise TemplateError(f"chat template: {what} would build {n} items (limit {self.limits.max_items})")

    def allow_int_bits(self, bits: int, what: str) -> None:
        if bits > self.limits.max_int_bits:
            raise TemplateError(f"chat template: {what} would compute an integer of up to {bits} bits "
                                f"(limit {self.limits.max_int_bits})")

    def charge(self, value: Any) -> Any:
        """Count a freshly built value against the size limits and the allocation budget."""
        if isinstance(value, str):
            if len(value) > self.limits.max_string_chars:
                raise TemplateError(f"chat template built a string of {len(value)} characters "
                                    f"(limit {self.limits.max_string_chars})")
            cost = sys.getsizeof(value)
        elif isinstance(value, (list, tuple, dict)):
            self.allow_items(len(value), "this operation")
            cost = sys.getsizeof(value)
            if not isinstance(value, dict):  # split() and friends build new strings too
                cost += sum(sys.getsizeof(v) for v in value if type(v) is str)
        elif type(value) is int:
            self.allow_int_bits(value.bit_length(), "this operation")
            return value
        else:
            return value
        self.allocated += cost
        if self.allocated > self.limits.max_alloc_bytes:
            raise TemplateError(f"chat template allocated more than {self.limits.max_alloc_bytes} bytes")
        return value

    def enter_call(self) -> None:
        """A call from template code begins (the caller decrements ``depth`` when it ends)."""
        if self.depth >= self.limits.max_depth:
            raise TemplateError(f"chat template nested calls (recursion) deeper than {self.limits.max_depth}")
        self.depth += 1


_ACTIVE: ContextVar[_Budget | None] = ContextVar("gguflm_chat_budget", default=None)


def _budget() -> _Budget:
    budget = _ACTIVE.get()
    if budget is None:  # only compile_template() and render() run template code, both in a scope
        raise TemplateError("chat template code ran outside a render")
    return budget


@contextmanager
def _scope(limits: TemplateLimits, now: datetime | None = None) -> Iterator[_Budget]:
    budget = _Budget(limits, now)
    token = _ACTIVE.set(budget)
    try:
        yield budget
    finally:
        _ACTIVE.reset(token)


# -- size estimates -----------------------------------------------------------------------

_PLAIN_WHITESPACE = str.maketrans("", "", "\n\t\r")


def quoted_len(s: str, ascii_only: bool = False) -> int:
    """An upper bound of ``len(repr(s))`` and ``len(json.dumps(s, ensure_ascii=ascii_only))``:
    each quote, backslash, newline, tab and return escapes to 2 characters; a string holding
    any other non-printable character is charged the worst case, 10 characters each
    (``\\U0001xxxx``), as is every character when ASCII-only JSON is asked for (a surrogate
    pair, ``\\ud83d\\ude00``)."""
    if ascii_only and not s.isascii():
        return 12 * len(s) + 2
    if not s.translate(_PLAIN_WHITESPACE).isprintable():
        return 10 * len(s) + 2
    return len(s) + 2 + sum(s.count(c) for c in "\\'\"\n\t\r")


def text_bound(value: Any, limit: int, per_node: int = 0, per_level: int = 0, ascii_only: bool = False,
               quote_top: bool = False) -> int:
    """An upper bound of the length of ``str(value)``, ``repr``, ``json.dumps`` or ``pprint`` of
    ``value``, computed without building it; stops counting once past ``limit``.

    A string at the top counts as itself (unless ``quote_top``), nested strings as their
    :func:`quoted_len`, each string once however often it is referenced. ``per_node`` and
    ``per_level`` add layout: each nested value costs ``per_node + depth * per_level`` more.
    """
    total = 0
    quoted: dict[int, int] = {}
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack and total <= limit:
        v, depth = stack.pop()
        total += per_node + depth * per_level
        if isinstance(v, str):
            if depth == 0 and not quote_top:
                total += len(v)
            else:
                if id(v) not in quoted:
                    quoted[id(v)] = quoted_len(v, ascii_only)
                total += quoted[id(v)]
        elif v is None or isinstance(v, (bool, float)):
            total += 24
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 2
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            if total <= limit:
                for k, item in v.items():
                    stack.append((k, depth + 1))
                    stack.append((item, depth + 1))
        elif isinstance(v, (list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)):
            total += 16 + 2 * len(v)
            if total <= limit:
                stack.extend((item, depth + 1) for item in v)
        elif isinstance(v, jinja2.utils.Namespace):
            total += 16
            stack.append((object.__getattribute__(v, "_Namespace__attrs"), depth))
        else:  # Jinja objects, ranges, generators: short fixed reprs
            total += 256
    return total


def _number_in(text: str) -> int:
    """The largest decimal number written in ``text`` (widths and precisions of a format)."""
    return max((int(m) for m in re.findall(r"\d{1,12}", text)), default=0)


def _format_bound(fmt: str, values: list[Any], *, fields: int, nested_width: bool, limit: int) -> int:
    """Size bound of a formatting result: every field can be as wide as the widest number in
    the format (or, for ``*``/nested widths, the largest int argument) plus the longest argument."""
    width = _number_in(fmt)
    if nested_width:
        width = max([width] + [abs(v) for v in values if type(v) is int])
    longest = max((text_bound(v, limit) for v in values), default=0)
    return len(fmt) + fields * (width + longest + 2)


def _percent_bound(fmt: str, args: Any, limit: int) -> int:
    values = list(args.values()) if isinstance(args, Mapping) else list(args) if isinstance(args, tuple) else [args]
    return _format_bound(fmt, values, fields=fmt.count("%"), nested_width="*" in fmt, limit=limit)


def _str_format_bound(fmt: str, values: list[Any], limit: int) -> int:
    fields, nested = 0, False
    for _literal, field, spec, _conversion in Formatter().parse(fmt):
        if field is not None:
            fields += 1
            nested = nested or "{" in (spec or "")
    return _format_bound(fmt, values, fields=fields, nested_width=nested, limit=limit)


def _s(value: Any, limit: int) -> int:
    return len(value) if isinstance(value, str) else text_bound(value, limit)


def _width_bound(s: str, width: Any = 0, *_: Any, limit: int) -> int:
    return max(len(s), width if type(width) is int else 0)


def _expandtabs_bound(s: str, tabsize: Any = 8, *, limit: int) -> int:
    return len(s) + s.count("\t") * max(tabsize if type(tabsize) is int else 0, 0)


def _replace_bound(s: Any, old: Any, new: Any, count: Any = -1, *, limit: int) -> int:
    n = _s(s, limit)
    if not isinstance(old, str) or not isinstance(new, str):
        return n
    if old == "":
        hits = n + 1
    else:
        hits = s.count(old) if isinstance(s, str) else n // len(old) + 1
    if type(count) is int and count >= 0:
        hits = min(hits, count)
    return n + hits * len(new)


def _join_bound(sep: Any, items: Any, *, limit: int) -> int:
    items = list(items)
    return sum(_s(i, limit) for i in items) + _s(sep, limit) * max(len(items) - 1, 0)


# Methods of str that can return more than their receiver holds: name -> bound of the
# result's size, called as bound(receiver, *args, limit=...).
_GROWING_STR_METHODS: dict[str, Callable[..., int]] = {
    "center": _width_bound,
    "ljust": _width_bound,
    "rjust": _width_bound,
    "zfill": _width_bound,
    "expandtabs": _expandtabs_bound,
    "replace": _replace_bound,
    "join": _join_bound,
}

# Methods of plain values whose result is at most a few times the size of what goes in.
_PLAIN_METHODS: dict[type, frozenset[str]] = {
    str: frozenset({
        "capitalize", "casefold", "count", "endswith", "find", "index", "isalnum", "isalpha",
        "isascii", "isdecimal", "isdigit", "isidentifier", "islower", "isnumeric", "isprintable",
        "isspace", "istitle", "isupper", "lower", "lstrip", "partition", "removeprefix",
        "removesuffix", "rfind", "rindex", "rpartition", "rsplit", "rstrip", "split",
        "splitlines", "startswith", "strip", "swapcase", "title", "upper",
        "striptags", "unescape", "escape",  # markupsafe.Markup (a str) adds these
    }),
    list: frozenset({"count", "index", "copy"}),
    tuple: frozenset({"count", "index"}),
    dict: frozenset({"get", "items", "keys", "values", "copy", "fromkeys"}),
    int: frozenset({"bit_length", "bit_count", "conjugate", "as_integer_ratio", "is_integer"}),
    float: frozenset({"as_integer_ratio", "conjugate", "hex", "fromhex", "is_integer"}),
}
_DATA_TYPES = tuple(_PLAIN_METHODS)


def _data_kind(receiver: Any) -> type | None:
    """The plain type whose method is being called, for instances and for the types themselves."""
    if type(receiver) in _PLAIN_METHODS:
        return type(receiver)
    for kind in _DATA_TYPES:
        if isinstance(receiver, kind) or (isinstance(receiver, type) and issubclass(receiver, kind)):
            return kind
    return None


def _check_method(budget: _Budget, obj: Any, args: tuple, kwargs: dict) -> tuple[tuple, bool]:
    """Refuse methods of plain values that are not listed; bound the growing ones. Returns the
    arguments, with iterators (lazy filter results) turned into lists so they can be measured,
    and whether the result is a new value to charge: methods of containers and numbers return
    parts or views of what exists (``d.get``, ``d.items``), only strings make new text."""
    kind = _data_kind(getattr(obj, "__self__", None))
    if kind is None:
        return args, True
    name = getattr(obj, "__name__", "?")
    args = tuple(list(a) if isinstance(a, Iterator) else a for a in args)
    grow = _GROWING_STR_METHODS.get(name) if kind is str else None
    if grow is not None:
        user_kwargs = {k: v for k, v in kwargs.items() if k not in ("_loop_vars", "_block_vars")}
        budget.allow_chars(grow(obj.__self__, *args, **user_kwargs, limit=budget.limits.max_string_chars),
                           f"str.{name}()")
    elif name not in _PLAIN_METHODS[kind]:
        raise TemplateError(f"chat template called {kind.__name__}.{name}(), which templates may not call")
    return args, kind is str


# -- filters --------------------------------------------------------------------------------

def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' ``tojson``: plain ``json.dumps`` (no HTML escaping, unlike Jinja's)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _indent_len(indent: Any) -> int:
    return indent if type(indent) is int else len(indent) if isinstance(indent, str) else 0


def _tojson_bound(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                  sort_keys: bool = False, *, limit: int) -> int:
    sep = sum(len(s) for s in separators if isinstance(s, str)) if isinstance(separators, (list, tuple)) else 4
    return text_bound(x, limit, per_node=sep + 1, per_level=max(_indent_len(indent), 0),
                      ascii_only=bool(ensure_ascii), quote_top=True)


def _urlize_bound(value: Any, trim_url_limit: Any = None, nofollow: bool = False, target: Any = None,
                  rel: Any = None, extra_schemes: Any = None, *, limit: int) -> int:
    n = _s(value, limit)
    extra = sum(len(a) for a in (target, rel) if isinstance(a, str))
    return 3 * n + (n // 2 + 1) * (80 + extra)


def _lines(s: Any, limit: int) -> int:
    """Upper bound of the number of lines in str(s)."""
    return s.count("\n") + 1 if isinstance(s, str) else _s(s, limit) + 1


def _indent_bound(s: Any, width: Any = 4, first: bool = False, blank: bool = False, *, limit: int) -> int:
    return _s(s, limit) + _lines(s, limit) * max(_indent_len(width), 0)


def _wordwrap_bound(s: Any, width: Any = 79, break_long_words: bool = True, wrapstring: Any = None,
                    break_on_hyphens: bool = True, *, limit: int) -> int:
    """Lines of ``width`` hold at least half their width, or end a paragraph."""
    n = _s(s, limit)
    lines = 2 * n // max(width if type(width) is int else 1, 1) + _lines(s, limit)
    return n + lines * (len(wrapstring) if isinstance(wrapstring, str) else 1)


def _format_filter_bound(value: Any, *args: Any, limit: int, **kwargs: Any) -> int:
    """``value|format(...)`` is ``str(value) % args``: bound str(value) before building it."""
    if not isinstance(value, str):
        size = text_bound(value, limit)
        if size > limit:
            return size
        value = str(value)
    return _percent_bound(value, kwargs or args, limit)


def _sum_bound(iterable: Any, attribute: Any = None, start: Any = 0, *, limit: int) -> int:
    items = list(iterable)
    if all(isinstance(v, (int, float)) for v in items) and isinstance(start, (int, float)):
        return 0
    total = sum(len(v) if hasattr(v, "__len__") else 1 for v in items) + _s(start, limit)
    return total * max(len(items), 1)  # sum() of sequences copies the partial result each step


# Filters that turn their value into text or can return more than they are given: name ->
# bound of the result's size, with the filter's own signature (value first) plus the keyword
# ``limit``. Growth by a small constant factor of text that already exists (case mapping up to
# 3x, HTML escaping up to 6x) is left to the size check on the result.
_FILTER_BOUNDS: dict[str, Callable[..., int]] = {
    "upper": lambda s, *, limit: _s(s, limit),
    "lower": lambda s, *, limit: _s(s, limit),
    "title": lambda s, *, limit: _s(s, limit),
    "capitalize": lambda s, *, limit: _s(s, limit),
    "trim": lambda value, chars=None, *, limit: _s(value, limit),
    "striptags": lambda value, *, limit: _s(value, limit),
    "safe": lambda value, *, limit: _s(value, limit),
    "wordcount": lambda s, *, limit: _s(s, limit),
    "escape": lambda value, *, limit: _s(value, limit),
    "e": lambda value, *, limit: _s(value, limit),
    "forceescape": lambda value, *, limit: _s(value, limit),
    "center": lambda value, width=80, *, limit: max(_s(value, limit), width if type(width) is int else 0),
    "indent": _indent_bound,
    "format": _format_filter_bound,
    "join": lambda value, d="", attribute=None, *, limit: _join_bound(d, value, limit=limit),
    "replace": lambda s, old, new, count=None, *, limit: _replace_bound(
        s, old, new, -1 if count is None else count, limit=limit),
    "wordwrap": _wordwrap_bound,
    "truncate": lambda s, length=255, killwords=False, end="...", leeway=None, *, limit: (
        _s(s, limit) + _s(end, limit)),
    "string": lambda value, *, limit: text_bound(value, limit),
    # pprint splits long strings into quoted pieces of a line each: at most twice the repr
    "pprint": lambda value, *, limit: 2 * text_bound(value, limit, per_node=2, per_level=1, quote_top=True),
    "tojson": _tojson_bound,
    "urlize": _urlize_bound,
    "xmlattr": lambda d, autospace=True, *, limit: 6 * text_bound(d, limit),
    "urlencode": lambda value, *, limit: 12 * text_bound(value, limit),
    "batch": lambda value, linecount, fill_with=None, *, limit: 0 if fill_with is None else 16 * linecount,
    "slice": lambda value, slices, fill_with=None, *, limit: 64 * slices,
    "sum": _sum_bound,
}


def _guard_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a filter: deadline, a size bound before it runs (if it has one), a charge after."""
    bound = _FILTER_BOUNDS.get(name)
    skip = 1 if getattr(fn, "jinja_pass_arg", None) is not None else 0  # context/env goes first

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        if bound is not None and len(args) > skip:
            if isinstance(args[skip], Iterator):  # lazy input (map/select...): measure it first
                args = (*args[:skip], list(args[skip]), *args[skip + 1:])
            budget.allow_chars(bound(*args[skip:], **kwargs, limit=budget.limits.max_string_chars),
                               f"the '{name}' filter")
        return budget.charge(fn(*args, **kwargs))

    return guarded


# Tests that turn their value into text: name -> bound of that text's size.
_TEST_BOUNDS: dict[str, Callable[..., int]] = {
    "lower": lambda value, *, limit: _s(value, limit),
    "upper": lambda value, *, limit: _s(value, limit),
}


def _guard_test(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    bound = _TEST_BOUNDS[name]

    @functools.wraps(fn)
    def guarded(value: Any) -> Any:
        budget = _budget()
        budget.allow_chars(bound(value, limit=budget.limits.max_string_chars), f"the '{name}' test")
        return fn(value)

    return guarded


@jinja2.pass_context
def _loop_guard(context: jinja2.runtime.Context, iterable: Any) -> Iterator[Any]:
    """Inserted by the compiler around every ``for`` loop's iterable."""
    return _budget().iterate(iterable)


_LOOP_GUARD = "gguflm:loop"  # not an identifier: templates cannot name this filter themselves


def _finalize(value: Any) -> Any:
    """Applied by Jinja to every ``{{ expression }}`` before it is printed."""
    budget = _ACTIVE.get()
    if budget is not None:
        budget.tick()
        if not isinstance(value, str):
            budget.allow_chars(text_bound(value, budget.limits.max_string_chars), "printing a value")
    return value


# -- globals ----------------------------------------------------------------------------------

def _raise_exception(message: Any) -> None:
    """The template's own error (e.g. "roles must alternate"): its message, unchanged."""
    budget = _budget()
    budget.allow_chars(_s(message, budget.limits.max_string_chars), "raise_exception()")
    raise TemplateError(str(message))


def _strftime_now(format: str) -> str:
    budget = _budget()
    if isinstance(format, str):  # "%c" (2 characters) writes 24 and more, depending on the locale
        budget.allow_chars(16 * len(format), "strftime_now()")
    return (budget.now or datetime.now()).strftime(format)


def _range(*args: int) -> range:
    r = range(*args)
    limit = _budget().limits.max_range
    if len(r) > limit:
        raise TemplateError(f"chat template asked for range() of {len(r)} items (limit {limit})")
    return r


class _DictFactory:
    """The template's ``dict``: builds plain dicts without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses attribute names starting with ``_`` (as transformers does)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise TemplateError(f"chat template tried to store {name!r} on a namespace: "
                                "names starting with '_' are not allowed")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant text with it
    for training masks; rendering shows the body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


# -- the environment ------------------------------------------------------------------------

class _GuardedCodeGenerator(CodeGenerator):
    """Jinja's compiler, plus: every ``for`` iterates through :func:`_loop_guard`, and every
    ``~`` concatenation goes through :meth:`SandboxEnvironment.guarded_concat`."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for loop in list(node.find_all(nodes.For)):
            loop.iter = nodes.Filter(loop.iter, _LOOP_GUARD, [], [], None, None, lineno=loop.iter.lineno)
        super().visit_Template(node, frame)

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            join = "markup_join"
        else:
            join = "str_join"
        self.write(f"environment.guarded_concat({join}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _check_repeat(budget: _Budget, left: Any, right: Any) -> None:
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
            size = len(seq) * max(n, 0)
            if isinstance(seq, str):
                budget.allow_chars(size, "'*' repetition")
            else:
                budget.allow_items(size, "'*' repetition")
                budget.allow_chars(size * 8, "'*' repetition")
            return
    if isinstance(left, int) and isinstance(right, int):
        budget.allow_int_bits(left.bit_length() + right.bit_length(), "'*'")


def _check_add(budget: _Budget, left: Any, right: Any) -> None:
    if isinstance(left, str) and isinstance(right, str):
        budget.allow_chars(len(left) + len(right), "'+' concatenation")
    elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
        budget.allow_items(len(left) + len(right), "'+' concatenation")


def _check_power(budget: _Budget, left: Any, right: Any) -> None:
    if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        budget.allow_int_bits(right * left.bit_length(), "'**'")


def _check_percent(budget: _Budget, left: Any, right: Any) -> None:
    if isinstance(left, str):
        limit = budget.limits.max_string_chars
        budget.allow_chars(_percent_bound(left, right, limit), "'%' formatting")


# Operators that can build big values: operator -> check run before the operation.
_BINOP_CHECKS: dict[str, Callable[[_Budget, Any, Any], None]] = {
    "*": _check_repeat,
    "+": _check_add,
    "**": _check_power,
    "%": _check_percent,
}


class SandboxEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment with resource bounds (see the module doc)."""

    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset(_BINOP_CHECKS)

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, finalize=_finalize,
                         extensions=[jinja2.ext.loopcontrols, _GenerationTag])
        self.filters["tojson"] = _tojson
        self.filters = {name: _guard_filter(name, fn) for name, fn in self.filters.items()}
        self.filters[_LOOP_GUARD] = _loop_guard
        self.tests.update({name: _guard_test(name, self.tests[name]) for name in _TEST_BOUNDS})
        del self.globals["lipsum"]
        self.globals.update(range=_range, dict=_DictFactory(), namespace=_Namespace,
                            raise_exception=_raise_exception, strftime_now=_strftime_now)

    def call(self, context: jinja2.runtime.Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        args, new_value = _check_method(budget, obj, args, kwargs)
        if isinstance(obj, LoopContext) and args:  # loop(children) in a recursive loop
            args = (budget.iterate(args[0]), *args[1:])
        budget.enter_call()
        try:
            result = super().call(context, obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        return budget.charge(result) if new_value else result

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.tick()
        _BINOP_CHECKS[operator](budget, left, right)
        return budget.charge(self.binop_table[operator](left, right))

    def getitem(self, obj: Any, argument: Any) -> Any:
        value = super().getitem(obj, argument)
        if type(argument) is slice:  # s[a:b] copies
            _budget().charge(value)
        return value

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        formatter = super().wrap_str_format(value)
        if formatter is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        @functools.wraps(formatter)
        def guarded(*args: Any, **kwargs: Any) -> str:
            budget = _budget()
            budget.tick()
            if is_map and args and isinstance(args[0], Mapping):
                values = list(args[0].values())
            else:
                values = [*args, *kwargs.values()]
            budget.allow_chars(_str_format_bound(fmt, values, budget.limits.max_string_chars), "str.format()")
            return budget.charge(formatter(*args, **kwargs))

        return guarded

    def guarded_concat(self, join: Callable[[Any], str], parts: tuple) -> str:
        budget = _budget()
        budget.tick()
        limit = budget.limits.max_string_chars
        budget.allow_chars(sum(_s(p, limit) for p in parts), "'~' concatenation")
        return budget.charge(join(parts))

    def concat(self, parts: Any) -> str:  # type: ignore[override]
        """Joins the output of macros, ``{% set %}`` blocks, filter and call blocks."""
        parts = list(parts)
        budget = _budget()
        budget.allow_chars(sum(map(len, parts)), "a block's output")
        return budget.charge("".join(parts))


@functools.lru_cache(maxsize=1)
def _environment() -> SandboxEnvironment:
    return SandboxEnvironment()


def _template_line(exc: BaseException) -> int | None:
    """The template line an error happened on (Jinja rewrites tracebacks to point at it)."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _as_template_error(exc: Exception, doing: str) -> TemplateError:
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return TemplateError(f"chat template syntax error on line {exc.lineno}: {exc.message}")
    line = _template_line(exc)
    where = f" on line {line}" if line else ""
    return TemplateError(f"chat template failed while {doing}{where}: {type(exc).__name__}: {exc}")


def compile_template(source: str, limits: TemplateLimits = DEFAULT_LIMITS) -> jinja2.Template:
    """Parse and compile untrusted Jinja source in the sandbox; TemplateError on any failure."""
    if not isinstance(source, str):
        raise TemplateError(f"a chat template must be a string, not {type(source).__name__}")
    if len(source) > limits.max_source_chars:
        raise TemplateError(f"chat template is {len(source)} characters long "
                            f"(limit {limits.max_source_chars})")
    with _scope(limits):
        try:
            return _environment().from_string(source)
        except TemplateError:
            raise
        except Exception as e:  # noqa: BLE001 - the boundary of untrusted code: nothing else escapes
            raise _as_template_error(e, "compiling") from None


def render(template: jinja2.Template, variables: dict[str, Any],
           limits: TemplateLimits = DEFAULT_LIMITS, now: datetime | None = None) -> str:
    """Render a compiled template within ``limits``; TemplateError on any failure.
    ``strftime_now()`` shows ``now`` when given (the time of the request).

    The bounds are checked between operations: one operation of C code on values that
    share sub-values (comparing, sorting or hashing nested lists) can still run for very
    long. :func:`gguflm.chat.worker.render` runs this in a process it can kill."""
    pieces: list[str] = []
    size = 0
    with _scope(limits, now):
        stream = template.generate(**variables)
        try:
            for piece in stream:
                size += len(piece)
                if size > limits.max_output_chars:
                    raise TemplateError(f"chat template output is longer than {limits.max_output_chars} "
                                        "characters")
                pieces.append(piece)
        except TemplateError:
            raise
        except MemoryError:
            pieces.clear()
            raise TemplateError(f"chat template rendering exceeded {limits.max_memory_bytes >> 20} MB "
                                "of memory") from None
        except Exception as e:  # noqa: BLE001 - the boundary of untrusted code: nothing else escapes
            raise _as_template_error(e, "rendering") from None
        finally:
            stream.close()
    return "".join(pieces)
