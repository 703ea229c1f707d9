"""Hostile templates: every known way out of the sandbox must fail or print nothing that leaks,
and every runaway must stop with TemplateError within seconds (1 s deadline) without allocating much memory.
Then each bound on its own, at its edge, with small limits."""

from __future__ import annotations

import json
import pprint
import threading
import time
import tracemalloc

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2.filters import FILTERS
from jinja2.nodes import EvalContext

import gguflm
from gguflm.chat import ChatTemplate, TemplateLimits
from gguflm.chat.sandbox import _FILTER_BOUNDS, text_bound

MESSAGES = [{"role": "user", "content": "hi"}]

# Ways out of the sandbox (CVE-2024-34359 and its relatives). Each must raise TemplateError or
# render text that shows nothing of Python's internals.
ESCAPES = {
    "mro_subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "attr_filter": "{{ (''|attr('__class__')|attr('__mro__'))[1] }}",
    "cycler_globals": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "joiner_globals": "{{ joiner.__init__.__globals__ }}",
    "namespace_globals": "{{ namespace.__init__.__globals__ }}",
    "self_globals": "{{ self.__init__.__globals__ }}",
    "self_context": "{{ self._TemplateReference__context }}",
    "lipsum_globals": "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "flask_config": "{{ config.__class__.__init__.__globals__['os'].popen('id').read() }}",
    "flask_request": "{{ request.application.__globals__.__builtins__.__import__('os').popen('id').read() }}",
    "builtins_name": "{{ __builtins__.__import__('os').popen('id').read() }}",
    "function_globals": "{{ raise_exception.__globals__['os'] }}",
    "strftime_globals": "{{ strftime_now.__globals__ }}",
    "format_attr": "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "format_globals": "{{ '{0.__init__.__globals__}'.format(raise_exception) }}",
    "format_map_attr": "{{ '{x.__class__}'.format_map({'x': 1}) }}",
    "format_via_getitem": "{{ ''['format']('{0.__class__}', 1) }}",
    "percent_format": "{{ '%s' % messages.__class__ }}",
    "namespace_underscore": "{% set ns = namespace(_x=1) %}{{ ns }}",
    "namespace_set_dunder": "{% set ns = namespace() %}{% set ns.__class__ = 1 %}{{ ns }}",
    "dict_type_mro": "{{ dict.mro()[1].__subclasses__() }}",
    "dict_class": "{{ dict.__class__.__base__ }}",
    "range_self": "{{ range.__self__ }}",
    "map_attribute": "{{ messages|map(attribute='__class__')|list }}",
    "sort_attribute": "{{ messages|sort(attribute='__class__.__init__.__globals__')|list }}",
    "generator_frame": "{{ (messages|map('string')).gi_frame.f_globals }}",
    "loop_internals": "{% for m in messages %}{{ loop._iterator }}{{ loop.__class__ }}{% endfor %}",
    "macro_internals": "{% macro m() %}{% endmacro %}{{ m._func.__globals__ }}{{ m.__call__ }}",
    "list_append": "{% set l = [] %}{{ l.append(1) }}",
    "dict_update": "{% set d = {} %}{{ d.update({'a': 1}) }}",
    "message_mutation": "{{ messages.pop() }}{{ messages[0].clear() }}",
    "include_file": "{% include '/etc/passwd' %}",
    "import_module": "{% import 'os' as os %}{{ os.system('id') }}",
    "extends_file": "{% extends '/etc/passwd' %}",
    "str_translate": "{{ 'a'.translate({97: 'x' * 1000}) }}",
    "str_encode": "{{ 'a'.encode().hex() }}",
    "int_to_bytes": "{{ (1).to_bytes(10**9, 'big') }}",
    "generator_send": "{{ (messages|map('string')).throw(messages) }}",
}

LEAK_MARKERS = ("<class", "<function", "<built-in", "<module", "object at 0x", "__", "uid=", "popen", "posix",
                "root:", "globals", "<bound", "<method", "<frame")

# Runaways: each must raise TemplateError.
SHARED = ", ".join(["s"] * 1000)  # a list literal of 1000 references to one big string
RUNAWAYS = {
    "range_huge": "{% for i in range(10**9) %}{% endfor %}",
    "range_list": "{{ range(10**7)|list|length }}",
    "str_repeat": "{{ 'a' * 10**10 }}",
    "str_repeat_left": "{{ 10**10 * 'a' }}",
    "list_repeat": "{{ ([1] * 10**9)|length }}",
    "big_power": "{{ 2 ** (10**9) }}",
    "power_by_squaring": "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "center_method": "{{ 'a'.center(10**10) }}",
    "ljust_method": "{{ 'a'.ljust(10**9, 'x') }}",
    "zfill_method": "{{ '1'.zfill(10**9) }}",
    "expandtabs": "{{ ('\t' * 100000).expandtabs(100000) }}",
    "replace_empty": "{{ ('a' * 100000).replace('', 'b' * 1000) }}",
    "join_method": "{{ ('x' * 100000).join(['y'] * 100000) }}",
    "join_lazy": "{{ ('x' * 10000).join(range(100000)|map('string')) }}",
    "format_width": "{{ '{:>1000000000}'.format('a') }}",
    "format_nested_width": "{{ '{:>{w}}'.format('a', w=10**9) }}",
    "format_many_fields": "{{ ('{0}' * 100000).format('x' * 1000) }}",
    "format_map_width": "{{ '{a:>1000000000}'.format_map({'a': 1}) }}",
    "percent_width": "{{ '%1000000000s' % 'a' }}",
    "percent_star": "{{ '%*s' % (10**9, 'a') }}",
    "format_filter": "{{ '%1000000000s'|format('a') }}",
    "center_filter": "{{ 'a'|center(1000000000) }}",
    "indent_filter": "{{ ('a\n' * 100000)|indent(100000) }}",
    "tojson_indent": "{{ range(100000)|list|tojson(indent=100000) }}",
    "join_filter": "{{ range(100000)|join('x' * 100000) }}",
    "replace_filter": "{{ ('a' * 100000)|replace('a', 'b' * 100000) }}",
    "wordwrap_filter": "{{ ('a' * 500000)|wordwrap(1, wrapstring='x' * 1000) }}",
    "batch_fill": "{{ [1]|batch(10**9, 'x')|list|length }}",
    "slice_many": "{{ [1]|slice(10**9)|list|length }}",
    "sum_of_lists": "{{ ([[1] * 1000] * 1000)|sum(start=[])|length }}",
    "pprint_big": "{{ (range(100000)|list)|pprint|length }}",
    "urlize_target": "{{ ('a.com ' * 100000)|urlize(target='x' * 1000) }}",
    "concat_doubling": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "plus_doubling": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "list_doubling": "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "print_shared_list": "{% set s = 'x' * 1000000 %}{{ [s] * 1000 }}",
    "concat_shared_list": "{% set s = 'x' * 1000000 %}{{ 'a' ~ ([s] * 1000) }}",
    "string_shared_list": "{% set s = 'x' * 1000000 %}{{ ([s] * 1000)|string|length }}",
    "tojson_shared_list": "{% set s = 'x' * 1000000 %}{{ ([s] * 1000)|tojson|length }}",
    "upper_of_list_literal": "{% set s = 'x' * 1000000 %}{{ [" + SHARED + "]|upper|length }}",
    "safe_of_list_literal": "{% set s = 'x' * 1000000 %}{{ [" + SHARED + "]|safe|length }}",
    "trim_of_list_literal": "{% set s = 'x' * 1000000 %}{{ [" + SHARED + "]|trim|length }}",
    "format_of_list_literal": "{% set s = '%s' * 500000 %}{{ [" + SHARED + "]|format('a')|length }}",
    "lower_test_of_list_literal": "{% set s = 'x' * 1000000 %}{{ [" + SHARED + "] is lower }}",
    "raise_exception_of_list_literal": "{% set s = 'x' * 1000000 %}{{ raise_exception([" + SHARED + "]) }}",
    "strftime_expansion": "{{ strftime_now('%c' * 500000)|length }}",
    "string_of_dict_literal": "{% set s = 'x' * 1000000 %}{{ {" + ", ".join(f"{i}: s" for i in range(1000))
                              + "}|string|length }}",
    "self_referencing_namespace": "{% set ns = namespace() %}{% set ns.me = [ns] * 100000 %}{{ ns }}",
    "macro_recursion": "{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}",
    "call_block_recursion": "{% macro m() %}{{ caller() }}{% call m() %}x{% endcall %}{% endmacro %}"
                            "{% call m() %}y{% endcall %}",
    "recursive_loop": "{% for x in [[1]] recursive %}{{ loop([[x]]) }}{% endfor %}",
    "block_recursion": "{% block b %}{{ self.b() }}{% endblock %}",
    "nested_loops": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "nested_loops_over_a_list": "{% set r = range(1000)|list %}{% for a in r %}{% for b in r %}{% for c in r %}"
                                "{% endfor %}{% endfor %}{% endfor %}",
    "slow_body": "{% set s = 'a' * 1000000 %}{% for i in range(100000) %}{% if s.count('b') %}{% endif %}{% endfor %}",
    "output_flood": "{% for i in range(100000) %}" + "x" * 1000 + "{% endfor %}",
    "set_block_flood": "{% set b %}{% for i in range(100000) %}" + "x" * 1000 + "{% endfor %}{% endset %}{{ b|length }}",
    "macro_buffer_flood": "{% macro m() %}{% for i in range(100000) %}" + "x" * 1000 + "{% endfor %}{% endmacro %}"
                          "{{ m()|length }}",
    "loop_cycle_flood": "{% for i in range(100) %}{{ loop.cycle('a' * 1000000, 'b') }}{% endfor %}",
    "many_big_values": "{{ range(1000)|map('center', 1000000)|list|length }}",
    "split_into_many": "{{ ('a,' * 500000).split(',')|length }}",
    "allocation_loop": "{% set s = 'a' * 1000000 %}{% for i in range(100000) %}{% set t = s.upper() %}{% endfor %}",
    "deep_nesting_list": "{% set ns = namespace(x=1) %}{% for i in range(100000) %}{% set ns.x = [ns.x] %}"
                         "{% endfor %}{{ ns.x }}",
    "deep_parentheses": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "long_plus_chain": "{{ " + " + ".join(["'a'"] * 5000) + " }}",
    "huge_int_literal": "{{ " + "9" * 5000 + " }}",
    "huge_int_printed": "{{ 7 ** 20000 }}",
    "source_too_long": "x" * (1 << 20),
}


def compile_and_render(source: str) -> tuple[str | None, str | None]:
    """(output, TemplateError message)."""
    try:
        return ChatTemplate(source).render(MESSAGES), None
    except gguflm.TemplateError as e:
        return None, str(e)


def run(source: str) -> tuple[str | None, str | None, float]:
    """(output, TemplateError message, seconds) of compiling + rendering."""
    t0 = time.perf_counter()
    out, err = compile_and_render(source)
    return out, err, time.perf_counter() - t0


def peak_memory_mb(source: str) -> float:
    """Peak memory allocated by Python while compiling + rendering (a second run: tracing
    slows rendering down, so it is not timed)."""
    tracemalloc.start()
    try:
        compile_and_render(source)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


# The render deadline is 1 s of wall-clock time; a loaded 2-core CI machine gets slack
# (without the sandbox's bounds these templates run for minutes or exhaust memory).
MAX_SECONDS = 4.0


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_sandbox_escapes_fail_or_leak_nothing(name: str):
    out, err, seconds = run(ESCAPES[name])
    assert seconds < MAX_SECONDS
    if err is None:
        assert not any(m in out for m in LEAK_MARKERS), out[:300]


@pytest.mark.parametrize("name", sorted(RUNAWAYS))
def test_runaway_templates_stop_quickly_with_little_memory(name: str):
    threads = threading.active_count()
    out, err, seconds = run(RUNAWAYS[name])
    assert err is not None, f"rendered {len(out)} characters"
    assert "\n" not in err
    assert seconds < MAX_SECONDS, err
    assert threading.active_count() == threads  # nothing left running
    assert peak_memory_mb(RUNAWAYS[name]) < 160, err


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    | st.tuples(inner, inner), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.sampled_from([None, 0, 2, "\t"]))
def test_size_bounds_hold_for_what_python_prints(value, indent):
    """The bounds the sandbox checks before stringifying must cover what str(), repr(), pprint
    and json.dumps actually produce."""
    limit = 10**9
    assert len(str(value)) <= text_bound(value, limit)
    assert len(repr(value)) <= text_bound(value, limit, quote_top=True)
    assert len(pprint.pformat(value)) <= 2 * text_bound(value, limit, per_node=2, per_level=1, quote_top=True)
    for ascii_only in (False, True):
        out = json.dumps(value, ensure_ascii=ascii_only, indent=indent)
        per_level = indent if isinstance(indent, int) else len(indent or "")
        assert len(out) <= text_bound(value, limit, per_node=5, per_level=per_level, ascii_only=ascii_only,
                                      quote_top=True)


TEXT = st.text(alphabet=st.sampled_from("ab -\n\t&<>\"'%é😀"), max_size=200)


@settings(max_examples=300, deadline=None)
@given(TEXT, TEXT.filter(bool), st.integers(1, 30), st.sampled_from([None, "", "<br>"]), st.integers(-1, 5))
def test_filter_bounds_hold_for_jinjas_own_filters(text, other, width, wrapstring, count):
    """Each size bound checked before a filter runs covers what Jinja's own filter returns."""
    env = jinja2.Environment()
    cases = [
        ("center", (text, width), FILTERS["center"](text, width)),
        ("indent", (text, width, True, True), FILTERS["indent"](text, width, True, True)),
        ("wordwrap", (text, width, True, wrapstring), FILTERS["wordwrap"](env, text, width, True, wrapstring)),
        ("replace", (text, other, text, count), FILTERS["replace"](EvalContext(env), text, other, text, count)),
        ("replace", (text, "", other), FILTERS["replace"](EvalContext(env), text, "", other)),
        ("truncate", (text, width + len(other), False, other),
         FILTERS["truncate"](env, text, width + len(other), False, other)),
        ("join", ([text, other, text], other), FILTERS["join"](EvalContext(env), [text, other, text], other)),
        ("format", ("%s|%5s|%r" + text.replace("%", ""), other, width, text),
         FILTERS["format"]("%s|%5s|%r" + text.replace("%", ""), other, width, text)),
        ("urlize", (text + " http://a.b/" + other,), FILTERS["urlize"](EvalContext(env), text + " http://a.b/" + other)),
        ("xmlattr", ({"k": text, "v": other},), FILTERS["xmlattr"](EvalContext(env), {"k": text, "v": other})),
        ("urlencode", ({"k": text, "v": [other]},), FILTERS["urlencode"]({"k": text, "v": [other]})),
    ]
    for name, args, result in cases:
        assert len(result) <= _FILTER_BOUNDS[name](*args, limit=10**9), (name, args)


def render(source: str, **limits) -> str:
    return ChatTemplate(source, limits=TemplateLimits(**limits)).render(MESSAGES)


def test_each_bound_at_its_edge():
    # (template, limits, the smallest value that passes) - one below must fail
    cases = [
        ("{% for i in range(50) %}{% for j in range(2) %}{% endfor %}{% endfor %}", "max_iterations", 150),
        ("{{ range(1000)|length }}", "max_range", 1000),
        ("{% macro m(n) %}{% if n %}{{ m(n - 1) }}{% endif %}{% endmacro %}{{ m(9) }}", "max_depth", 10),
        ("{{ 'x' * 5000 }}", "max_output_chars", 5000),
        ("{% set s = 'ab' * 3000 %}{{ s|length }}", "max_string_chars", 6000),
        ("{{ ([1] * 4000)|length }}", "max_items", 4000),
        ("{{ 2 ** 999 }}", "max_int_bits", 1998),
        ("{{ 'x' }}" + " " * 1000, "max_source_chars", 1009),
    ]
    for source, field, edge in cases:
        render(source, **{field: edge})
        with pytest.raises(gguflm.TemplateError):
            render(source, **{field: edge - 1})


def test_allocation_budget():
    source = "{% set s = 'a' * 100000 %}{% for i in range(50) %}{% set t = s.upper() %}{% endfor %}"
    render(source, max_alloc_bytes=50 << 20)
    with pytest.raises(gguflm.TemplateError, match="allocated more than"):
        render(source, max_alloc_bytes=4 << 20)


def test_deadline_stops_a_busy_loop_early():
    source = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    t0 = time.perf_counter()
    with pytest.raises(gguflm.TemplateError, match="longer than the limit of 0.2 s"):
        render(source, timeout_s=0.2, max_iterations=10**12)
    assert time.perf_counter() - t0 < 0.5


def test_limits_are_per_render():
    """A template that uses most of a budget renders again and again: nothing accumulates."""
    template = ChatTemplate("{% for i in range(900) %}.{% endfor %}", limits=TemplateLimits(max_iterations=1000))
    for _ in range(3):
        assert template.render(MESSAGES) == "." * 900


def test_concurrent_renders_keep_separate_budgets():
    template = ChatTemplate("{% for i in range(600) %}{{ i }}{% endfor %}", limits=TemplateLimits(max_iterations=1000))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                template.render(MESSAGES)
        except BaseException as e:  # noqa: BLE001 - collected and re-raised in the test
            errors.append(e)

    workers = [threading.Thread(target=work) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors


# -- one C-level operation that runs for ages (issue 16, item 1) ------------------------------
# Between operations the deadline is checked; inside one (comparing, sorting, hashing or
# in-testing values that share sub-values; inserting colliding integers into a set) it is not:
# the render runs in a worker process that is killed (gguflm.chat.worker).

def _doubling(name: str, depth: int = 40, open_: str = "[", close: str = "]") -> str:
    """{% set name0 = [1] %}{% set name1 = [name0, name0] %}...: 2**depth leaves, depth+1 lists."""
    return (f"{{% set {name}0 = {open_}1{close} %}}"
            + "".join(f"{{% set {name}{i} = {open_}{name}{i - 1}, {name}{i - 1}{close} %}}" for i in range(1, depth + 1)))


PAIR = _doubling("a") + _doubling("b")
TUPLES = _doubling("a", open_="(", close=",)") + _doubling("b", open_="(", close=",)")
COLLIDING = "range(0, 100000 * 2305843009213693951, 2305843009213693951)"  # all hash to 0
C_LEVEL_BOMBS = {
    "nested_equal": PAIR + "{{ a40 == b40 }}",
    "nested_not_equal": PAIR + "{% if a40 != b40 %}x{% endif %}",
    "nested_sort": PAIR + "{{ [a40, b40, a40]|sort }}",
    "nested_in": PAIR + "{{ a40 in [b40] }}",
    "nested_count": PAIR + "{{ [b40].count(a40) }}",
    "nested_unique": TUPLES + "{{ [a40, b40]|unique|list|length }}",
    "tuple_dict_key": TUPLES + "{{ {a40: 1}|length }}",
    "tuple_hash_lookup": TUPLES + "{{ {(1,): 1}.get(a40) }}",
    "colliding_hashes": "{{ " + COLLIDING + "|unique|list|length }}",
    "colliding_dict_keys": "{{ dict.fromkeys(" + COLLIDING + ")|length }}",
}


@pytest.mark.parametrize("name", sorted(C_LEVEL_BOMBS))
def test_one_long_c_operation_is_killed_at_the_deadline(name: str):
    out, err, seconds = run(C_LEVEL_BOMBS[name])
    assert err is not None, f"rendered {out!r:.100}"
    assert "exceeded 1.0 s" in err, err
    assert seconds < MAX_SECONDS, err
    assert ChatTemplate("{{ messages[0].content }}").render(MESSAGES) == "hi"  # a fresh worker renders


def test_a_render_cannot_take_more_memory_than_its_limit():
    limits = dict(max_memory_bytes=32 << 20, max_string_chars=1 << 30, max_alloc_bytes=1 << 30,
                  max_output_chars=1 << 30)
    with pytest.raises(gguflm.TemplateError, match="32 MB"):
        render("{% set s = 'a' * 200000000 %}{{ s|length }}", **limits)
    assert render("{% set s = 'a' * 2000000 %}{{ s|length }}", **limits) == "2000000"


def test_a_stuck_render_does_not_hold_up_the_others():
    """While one render spins in C, others (from other threads) render at once."""
    stuck = threading.Thread(target=run, args=(C_LEVEL_BOMBS["nested_equal"],))
    stuck.start()
    time.sleep(0.2)
    template = ChatTemplate("{{ messages[0].content }}")
    for _ in range(20):
        assert template.render(MESSAGES) == "hi"
    assert stuck.is_alive(), "the other renders waited for the stuck one"
    stuck.join()


def test_a_worker_killed_from_outside_is_replaced():
    import os
    import signal

    from gguflm.chat import worker

    template = ChatTemplate("{{ messages[0].content }}")
    assert template.render(MESSAGES) == "hi"
    for w in list(worker._POOL._idle):
        os.kill(w.proc.pid, signal.SIGKILL)
        w.proc.wait()
    assert template.render(MESSAGES) == "hi"
