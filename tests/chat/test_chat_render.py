"""ChatTemplate.render against transformers' apply_chat_template(tokenize=False): the eight
real templates in ../shared/templates and SmolLM2's own, over conversations that exercise
system prompts, multi-turn, assistant-last, generation prompt on/off, reasoning, tool calls
and tools; where transformers raises (a template's raise_exception, an undefined field),
render must raise TemplateError with the same message."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

import gguflm
from gguflm.chat import ChatTemplate

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"},
                                                     "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}]

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello there"}],
    "system_multiturn": [
        {"role": "system", "content": "You are terse. /no_think"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?"}],
    "no_system_multiturn": [
        {"role": "user", "content": "  spaced  \n"},
        {"role": "assistant", "content": "\nreply with newline\n"},
        {"role": "user", "content": "again"}],
    "assistant_last": [
        {"role": "user", "content": "Think first"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nThe answer."}],
    "reasoning_field": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hey", "reasoning_content": "The user greets me."},
        {"role": "user", "content": "Tell me more"}],
    "unicode_and_markup": [
        {"role": "system", "content": "Réponds en français 🇫🇷"},
        {"role": "user", "content": "{{ not jinja }} {% raw %} <|im_end|> 中文 \u00a0nbsp\u00a0"}],
    "tool_calls": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call12345", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}}]},
        {"role": "tool", "tool_call_id": "call12345", "content": "22 degrees"},
        {"role": "assistant", "content": "It is 22 degrees."},
        {"role": "user", "content": "Thanks"}],
    "tool_calls_none_content": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call67890", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call67890", "content": "-3 degrees"}],
}

TEMPLATE_FILES = [
    "HuggingFaceTB-SmolLM3-3B.jinja", "Qwen-Qwen2.5-7B-Instruct.jinja", "Qwen-Qwen3-0.6B.jinja",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja", "google-gemma-2-2b-it.jinja",
    "meta-llama-Llama-3.1-8B-Instruct.jinja", "microsoft-Phi-3.5-mini-instruct.jinja",
    "mistralai-Mistral-Nemo-Instruct-2407.jinja",
]


def both(hf_render, template: ChatTemplate, messages, add_generation_prompt: bool = True,
         **kwargs) -> tuple[str | None, str | None]:
    """(rendered text, error message) from transformers and from us; asserts they agree."""
    kwargs["add_generation_prompt"] = add_generation_prompt  # the two APIs' defaults differ
    try:
        want, want_err = hf_render(template.source, messages, template.bos_token, template.eos_token, **kwargs), None
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, we must raise too
        want, want_err = None, str(e)
    try:
        got, got_err = template.render(messages, **kwargs), None
    except gguflm.TemplateError as e:
        got, got_err = None, str(e)
    assert got == want
    assert (got_err is None) == (want_err is None), (got_err, want_err)
    if want_err is not None:
        assert want_err in got_err  # our message names the template's error unchanged
    return want, want_err


def check_all_conversations(hf_render, template: ChatTemplate, **extra) -> int:
    rendered = 0
    for name, messages in CONVERSATIONS.items():
        for add_generation_prompt in (True, False):
            for tools in (None, TOOLS) if name.startswith("tool") else (None,):
                text, _ = both(hf_render, template, messages, add_generation_prompt=add_generation_prompt,
                               tools=tools, **extra)
                rendered += text is not None
    return rendered


@pytest.mark.parametrize("filename", TEMPLATE_FILES)
def test_shared_templates_match_transformers(hf_render, shared_dir: Path, filename: str):
    source = (shared_dir / "templates" / filename).read_text()
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    rendered = check_all_conversations(hf_render, template)
    assert rendered >= 6, "most conversations must render, not only fail alike"


def test_smollm2_own_template_matches_transformers(hf_render, smollm2_path: Path):
    template = ChatTemplate.from_gguf(smollm2_path)
    assert template.bos_token and template.eos_token
    assert check_all_conversations(hf_render, template) >= 10


@pytest.mark.parametrize("filename, extra", [
    ("Qwen-Qwen3-0.6B.jinja", {"enable_thinking": False}),
    ("HuggingFaceTB-SmolLM3-3B.jinja", {"enable_thinking": False}),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", {"builtin_tools": ["brave_search", "wolfram_alpha"],
                                                "date_string": "01 Jan 2025", "tools_in_user_message": False}),
])
def test_template_variables_pass_through(hf_render, shared_dir: Path, filename: str, extra: dict):
    template = ChatTemplate((shared_dir / "templates" / filename).read_text(), "<s>", "</s>")
    assert check_all_conversations(hf_render, template, **extra) >= 6


def test_raise_exception_is_template_error_with_the_templates_message(hf_render, shared_dir: Path):
    template = ChatTemplate((shared_dir / "templates" / "google-gemma-2-2b-it.jinja").read_text(), "<bos>", "<eos>")
    _, err = both(hf_render, template, CONVERSATIONS["system_multiturn"])
    assert err == "System role not supported"
    with pytest.raises(gguflm.TemplateError) as e:
        template.render(CONVERSATIONS["system_multiturn"])
    assert str(e.value) == "System role not supported"


# Templates written for this test: the Jinja features transformers' environment adds or keeps.
FEATURE_TEMPLATES = {
    "tojson_options": "{{ messages|tojson }}|{{ tools|tojson(indent=2) }}|{{ messages[0]|tojson(sort_keys=true) }}"
                      "|{{ {'b': 'é', 'a': '<&>'}|tojson(separators=(',', ':')) }}",
    "loopcontrols": "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
                    "{% if m.role == 'system' %}{% continue %}{% endif %}[{{ m.role }}]{% endfor %}",
    "namespace_dict": "{% set ns = namespace(n=0, roles=[]) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                      "{% set ns.roles = ns.roles + [m.role] %}{% endfor %}{{ ns.n }} {{ ns.roles|join(',') }} "
                      "{{ dict(a=1, b=[2]) }} {{ dict.fromkeys(['x', 'y'], 0) }}",
    "generation_tag": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                      "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}",
    "documents": "{% for d in documents %}<doc title='{{ d.title }}'>{{ d.text }}</doc>{% endfor %}"
                 "{{ messages[-1].content }}{% if add_generation_prompt %}>{% endif %}",
    "macros_and_filters": "{% macro show(m) %}{{ m.role|upper }}: {{ m.content|trim|replace('o', '0') }}"
                          "{% endmacro %}{% for m in messages %}{{ show(m) }}{{ '\\n' if not loop.last }}"
                          "{% endfor %}{{ messages|map(attribute='role')|unique|list }}"
                          "{{ messages|selectattr('role', 'equalto', 'user')|list|length }}"
                          "{{ '%s-%05.1f' % ('x', 3.14159) }}{{ '{:>6}|{!r}'.format('ab', 'c') }}"
                          "{{ 'a,b,,c'.split(',') }}{{ ('x' * 3) ~ (2 ** 10) }}{{ messages[0].content[::-1] }}",
    "recursive_loop": "{% for item in [{'n': 'a', 'c': [{'n': 'b', 'c': [{'n': 'c', 'c': []}]}]}] recursive %}"
                      "{{ item.n }}({{ loop(item.c) }}){% endfor %}",
    "vars_and_tokens": "{{ bos_token }}{{ eos_token }}{{ add_generation_prompt }}{{ tools is none }}"
                       "{{ custom_flag }}{{ messages|length }}",
}


@pytest.mark.parametrize("name", sorted(FEATURE_TEMPLATES))
def test_jinja_features_match_transformers(hf_render, name: str):
    template = ChatTemplate(FEATURE_TEMPLATES[name], bos_token="<|begin|>", eos_token="<|end|>")
    documents = [{"title": "A", "text": "alpha"}, {"title": "B", "text": "beta"}]
    for messages in CONVERSATIONS.values():
        for add_generation_prompt in (True, False):
            text, err = both(hf_render, template, messages, add_generation_prompt=add_generation_prompt,
                             tools=TOOLS, documents=documents, custom_flag="on")
            assert err is None and text


class FrozenDateTime(dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2025, 3, 7, 14, 5, 9)


def test_strftime_now_with_a_frozen_clock(hf_render, monkeypatch):
    import transformers.utils.chat_template_utils as hf_chat

    import gguflm.chat.sandbox as sandbox

    monkeypatch.setattr(hf_chat, "datetime", FrozenDateTime)
    monkeypatch.setattr(sandbox, "datetime", FrozenDateTime)
    # the Llama 3.2 way of dating the system prompt
    source = ("{%- if not date_string is defined %}{%- if strftime_now is defined %}"
              "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}"
              "{%- endif %}{%- endif %}Today Date: {{ date_string }} {{ strftime_now('%H:%M:%S %A %j') }}\n"
              "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    text, err = both(hf_render, ChatTemplate(source), CONVERSATIONS["single"])
    assert err is None and "07 Mar 2025" in text


def test_long_conversation_renders_within_the_default_limits(hf_render, shared_dir: Path):
    """1200 messages of 500 characters (~150k tokens): beyond a real chat, within the bounds."""
    messages = [{"role": "system", "content": "s" * 500}]
    for i in range(600):
        messages += [{"role": "user", "content": f"question {i} " + "q" * 480},
                     {"role": "assistant", "content": f"<think>r{i}</think>answer {i} " + "a" * 470}]
    template = ChatTemplate((shared_dir / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text())
    text, err = both(hf_render, template, messages, tools=TOOLS)
    assert err is None and len(text) > 600_000


def test_big_tool_output_through_tojson(hf_render, shared_dir: Path):
    """Llama 3.1 prints tool results with |tojson: 300k characters of it stay within the bounds."""
    template = ChatTemplate((shared_dir / "templates" / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text())
    output = "line with \"quotes\", tabs\tand newlines\n" * 8000
    messages = CONVERSATIONS["tool_calls"][:2] + [{"role": "tool", "content": output}]
    text, err = both(hf_render, template, messages, tools=TOOLS)
    assert err is None and len(text) > len(output)


def test_input_objects_are_rebuilt_as_plain_data(hf_render):
    """Message objects with methods of their own never reach the template (as in transformers)."""
    class Role(str):
        def secret(self) -> str:
            return "leaked"

    source = "{% for m in messages %}{{ m.role }}{{ m.role.secret is defined }}{{ m.extra }}{% endfor %}"
    messages = [{"role": Role("user"), "content": "x", "extra": object()}]
    text, err = both(hf_render, ChatTemplate(source), messages)
    assert err is None and "leaked" not in text


@pytest.mark.parametrize("bad", [[], "hello", [["nested"]], [{"role": "user", "content": "x"}, 3]])
def test_bad_conversations_raise_template_error(bad):
    with pytest.raises(gguflm.TemplateError):
        ChatTemplate.builtin("chatml").render(bad)
