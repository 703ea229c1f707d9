"""Named chat formats: llama.cpp's detection of a format from template text, our own small
Jinja templates for the common formats, and the choice of a format for a GGUF file that
carries no template.

``detect_format`` follows llama.cpp's ``llm_chat_detect_template`` (src/llama-chat.cpp): a
template that *is* a format name is that format; otherwise the first rule of
:data:`_DETECT_RULES` whose marker strings occur in the text wins (the rules are ordered as
llama.cpp checks them). The names are llama.cpp's names.

:data:`BUILTIN_TEMPLATES` renders each format as llama.cpp's ``llm_chat_apply_template``
formats it (message role and string content only). Like llama.cpp's built-in formats they
never write a BOS token: the tokenizer adds it. Whitespace is trimmed the way llama.cpp's
``trim`` does (ASCII whitespace only), hence ``strip(_WS)`` rather than Jinja's ``trim``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

# Every format name llama.cpp accepts (llama_chat_builtin_templates), plus "dots1", which its
# detection returns but its name table lacks.
LLAMA_CPP_FORMATS = (
    "bailing", "bailing-think", "bailing2", "chatglm3", "chatglm4", "chatml", "command-r",
    "deepseek", "deepseek-ocr", "deepseek2", "deepseek3", "exaone-moe", "exaone3", "exaone4",
    "falcon3", "gemma", "gigachat", "glmedge", "gpt-oss", "granite", "granite-4.0",
    "granite-4.1", "grok-2", "hunyuan-dense", "hunyuan-moe", "hunyuan-vl", "kimi-k2", "llama2",
    "llama2-sys", "llama2-sys-bos", "llama2-sys-strip", "llama3", "llama4", "megrez", "minicpm",
    "mistral-v1", "mistral-v3", "mistral-v3-tekken", "mistral-v7", "mistral-v7-tekken",
    "monarch", "openchat", "orion", "pangu-embedded", "phi3", "phi4", "rwkv-world", "seed_oss",
    "smolvlm", "solar-open", "vicuna", "vicuna-orca", "yandex", "zephyr",
)


def _all(*markers: str) -> Callable[[str], bool]:
    return lambda text: all(m in text for m in markers)


def _inst(text: str) -> bool:
    """llama.cpp's Mistral/Llama 2 family: starts with "mistral" or writes [INST]."""
    return text.startswith("mistral") or "[INST]" in text


def _mistral_official(text: str) -> bool:
    return _inst(text) and ("' [INST] ' + system_message" in text or "[AVAILABLE_TOOLS]" in text)


def _granite_tools(text: str) -> bool:
    return "<|start_of_role|>" in text and ("<tool_call>" in text or "<tools>" in text)


# (format, test on the template text), in llama.cpp's order: the first match wins.
_DETECT_RULES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("phi4", _all("<|im_start|>", "<|im_sep|>")),
    ("smolvlm", _all("<|im_start|>", "<end_of_utterance>")),
    ("chatml", _all("<|im_start|>")),
    ("mistral-v7", lambda t: _inst(t) and "[SYSTEM_PROMPT]" in t),
    ("mistral-v1", lambda t: _mistral_official(t) and " [INST]" in t),
    ("mistral-v3-tekken", lambda t: _mistral_official(t) and '"[INST]"' in t),
    ("mistral-v3", _mistral_official),
    ("llama2-sys-strip", lambda t: _inst(t) and "content.strip()" in t),
    ("llama2-sys-bos", lambda t: _inst(t) and "bos_token + '[INST]" in t),
    ("llama2-sys", lambda t: _inst(t) and "<<SYS>>" in t),
    ("llama2", _inst),
    ("phi3", _all("<|assistant|>", "<|end|>")),
    ("chatglm4", _all("[gMASK]<sop>")),
    ("exaone-moe", _all("<|assistant|>", "<|user|>", "<|tool_declare|>")),
    ("falcon3", _all("<|assistant|>", "<|user|>", "</s>")),
    ("glmedge", _all("<|assistant|>", "<|user|>")),
    ("glmedge", _all("<|{{ item['role'] }}|>", "<|begin_of_image|>")),
    ("zephyr", _all("<|user|>", "<|endoftext|>")),
    ("monarch", _all("bos_token + message['role']")),
    ("gemma", _all("<start_of_turn>")),
    ("orion", _all("'\\n\\nAssistant: ' + eos_token")),
    ("openchat", _all("GPT4 Correct ")),
    ("vicuna-orca", _all("USER: ", "ASSISTANT: ", "SYSTEM: ")),
    ("vicuna", _all("USER: ", "ASSISTANT: ")),
    ("deepseek", _all("### Instruction:", "<|EOT|>")),
    ("command-r", _all("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>")),
    ("llama3", _all("<|start_header_id|>", "<|end_header_id|>")),
    ("chatglm3", _all("[gMASK]sop")),
    ("minicpm", _all("<用户>")),
    ("deepseek2", _all("'Assistant: ' + message['content'] + eos_token")),
    ("deepseek3", _all("<｜Assistant｜>", "<｜User｜>", "<｜end▁of▁sentence｜>")),
    ("exaone4", _all("[|system|]", "[|assistant|]", "[|endofturn|]", "[|tool|]")),
    ("exaone3", _all("[|system|]", "[|assistant|]", "[|endofturn|]")),
    ("rwkv-world", lambda t: "rwkv-world" in t or "{{- 'User: ' + message['content']|trim + '\\n\\n' -}}" in t),
    ("granite-4.0", lambda t: _granite_tools(t) and "g4_default_system_message" in t),
    ("granite-4.1", _granite_tools),
    ("granite", _all("<|start_of_role|>")),
    ("gigachat", _all("message['role'] + additional_special_tokens[0] + message['content'] + "
                      "additional_special_tokens[1]")),
    ("megrez", _all("<|role_start|>")),
    ("yandex", _all(" Ассистент:")),
    ("bailing", _all("<role>ASSISTANT</role>", "'HUMAN'")),
    ("bailing-think", _all("<role>ASSISTANT</role>", '"HUMAN"', "<think>")),
    ("bailing2", _all("<role>ASSISTANT</role>", "<role>HUMAN</role>", "<|role_end|>")),
    ("llama4", _all("<|header_start|>", "<|header_end|>")),
    ("dots1", _all("<|endofuserprompt|>")),
    ("hunyuan-moe", _all("<|extra_0|>", "<|extra_4|>")),
    ("gpt-oss", _all("<|start|>", "<|channel|>")),
    ("hunyuan-vl", _all("<｜hy_Assistant｜>", "<｜hy_begin▁of▁sentence｜>")),
    ("hunyuan-dense", _all("<｜hy_Assistant｜>", "<｜hy_place▁holder▁no▁3｜>")),
    ("kimi-k2", _all("<|im_assistant|>assistant<|im_middle|>")),
    ("seed_oss", _all("<seed:bos>")),
    ("grok-2", _all("'Assistant: '  + message['content'] + '<|separator|>")),
    ("pangu-embedded", _all("[unused9]系统：[unused10]")),
    ("solar-open", _all("<|begin|>", "<|end|>", "<|content|>")),
)


def detect_format(source: str) -> str | None:
    """The chat format a template implements, named as llama.cpp names it; None if unknown."""
    if source in LLAMA_CPP_FORMATS:
        return source
    return next((name for name, test in _DETECT_RULES if test(source)), None)


# -- built-in templates ---------------------------------------------------------------------

_WS = r"' \t\n\v\f\r'"  # C isspace(): what llama.cpp's trim() removes


def _with(template: str, **params: str) -> str:
    """A template preceded by ``{%- set name = value -%}`` for each parameter."""
    return "".join(f"{{%- set {k} = {v} -%}}" for k, v in params.items()) + template


def _turns(each: str, generation_prompt: str = "") -> str:
    """A template writing ``each`` (a Jinja expression over ``message``) per message, then
    ``generation_prompt`` (a string literal) when add_generation_prompt is set."""
    tail = f"{{%- if add_generation_prompt -%}}{{{{- {generation_prompt} -}}}}{{%- endif -%}}" \
        if generation_prompt else ""
    return f"{{%- for message in messages -%}}{{{{- {each} -}}}}{{%- endfor -%}}{tail}"


_LLAMA2 = (
    "{{- '[INST] ' -}}"
    "{%- set ns = namespace(inside=true) -%}"
    "{%- for message in messages -%}"
    "{%- set content = message.content.strip(" + _WS + ") if strip else message.content -%}"
    "{%- if not ns.inside -%}{%- set ns.inside = true -%}"
    "{{- '<s>[INST] ' if bos_inside else '[INST] ' -}}{%- endif -%}"
    "{%- if message.role == 'system' -%}"
    "{{- ('<<SYS>>\\n' + content + '\\n<</SYS>>\\n\\n') if system else (content + '\\n') -}}"
    "{%- elif message.role == 'user' -%}{{- content + ' [/INST]' -}}"
    "{%- else -%}{{- content + '</s>' -}}{%- set ns.inside = false -%}{%- endif -%}"
    "{%- endfor -%}"
)

_MISTRAL = (
    "{%- set ns = namespace(inside=false) -%}"
    "{%- for message in messages -%}"
    "{%- if not ns.inside -%}{{- lead + '[INST]' + trail -}}{%- set ns.inside = true -%}{%- endif -%}"
    "{%- if message.role == 'system' -%}{{- message.content + '\\n\\n' -}}"
    "{%- elif message.role == 'user' -%}{{- message.content + lead + '[/INST]' -}}"
    "{%- else -%}"
    "{{- trail + (message.content.strip(" + _WS + ") if trim else message.content) + '</s>' -}}"
    "{%- set ns.inside = false -%}{%- endif -%}"
    "{%- endfor -%}"
)

_MISTRAL_V7 = _turns(
    "('[SYSTEM_PROMPT]' + sp + message.content + '[/SYSTEM_PROMPT]') if message.role == 'system' "
    "else ('[INST]' + sp + message.content + '[/INST]') if message.role == 'user' "
    "else (sp + message.content + '</s>')")

_GEMMA = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{%- set ns.system = ns.system + message.content.strip(" + _WS + ") -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message.role == 'assistant' else message.role -%}"
    "{{- '<start_of_turn>' + role + '\\n' -}}"
    "{%- if ns.system and role != 'model' -%}{{- ns.system + '\\n\\n' -}}{%- set ns.system = '' -%}{%- endif -%}"
    "{{- message.content.strip(" + _WS + ") + '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

_ORION = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{%- set ns.system = ns.system + message.content -%}"
    "{%- elif message.role == 'user' -%}{{- 'Human: ' -}}"
    "{%- if ns.system -%}{{- ns.system + '\\n\\n' -}}{%- set ns.system = '' -%}{%- endif -%}"
    "{{- message.content + '\\n\\nAssistant: </s>' -}}"
    "{%- else -%}{{- message.content + '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
)

_VICUNA = _turns(
    "(system_prefix + message.content + system_suffix) if message.role == 'system' "
    "else ('USER: ' + message.content + '\\n') if message.role == 'user' "
    "else ('ASSISTANT: ' + message.content + '</s>\\n') if message.role == 'assistant' else ''",
    "'ASSISTANT:'")

_LOWER = "'abcdefghijklmnopqrstuvwxyz'"

_TRIMMED = "message.content.strip(" + _WS + ")"

# name -> Jinja source. Each renders as llama.cpp's llm_chat_apply_template renders that format.
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": _turns("'<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n'",
                     "'<|im_start|>assistant\\n'"),
    "llama2": _with(_LLAMA2, system="false", bos_inside="false", strip="false"),
    "llama2-sys": _with(_LLAMA2, system="true", bos_inside="false", strip="false"),
    "llama2-sys-bos": _with(_LLAMA2, system="true", bos_inside="true", strip="false"),
    "llama2-sys-strip": _with(_LLAMA2, system="true", bos_inside="false", strip="true"),
    "mistral-v1": _with(_MISTRAL, lead="' '", trail="' '", trim="false"),
    "mistral-v3": _with(_MISTRAL, lead="''", trail="' '", trim="true"),
    "mistral-v3-tekken": _with(_MISTRAL, lead="''", trail="''", trim="false"),
    "mistral-v7": _with(_MISTRAL_V7, sp="' '"),
    "mistral-v7-tekken": _with(_MISTRAL_V7, sp="''"),
    "phi3": _turns("'<|' + message.role + '|>\\n' + message.content + '<|end|>\\n'", "'<|assistant|>\\n'"),
    "phi4": _turns("'<|im_start|>' + message.role + '<|im_sep|>' + message.content + '<|im_end|>'",
                   "'<|im_start|>assistant<|im_sep|>'"),
    "falcon3": _turns("'<|' + message.role + '|>\\n' + message.content + '\\n'", "'<|assistant|>\\n'"),
    "zephyr": _turns("'<|' + message.role + '|>\\n' + message.content + '<|endoftext|>\\n'",
                     "'<|assistant|>\\n'"),
    "monarch": _turns("('' if loop.first else '<s>') + message.role + '\\n' + message.content + '</s>\\n'",
                      "'<s>assistant\\n'"),
    "gemma": _GEMMA,
    "orion": _ORION,
    "openchat": _turns(
        "(message.content + '<|end_of_turn|>') if message.role == 'system' else "
        "('GPT4 Correct ' + (message.role[:1].upper() if message.role[:1] in " + _LOWER + " else "
        "message.role[:1]) + message.role[1:] + ': ' + message.content + '<|end_of_turn|>')",
        "'GPT4 Correct Assistant:'"),
    "vicuna": _with(_VICUNA, system_prefix="''", system_suffix="'\\n\\n'"),
    "vicuna-orca": _with(_VICUNA, system_prefix="'SYSTEM: '", system_suffix="'\\n'"),
    "deepseek": _turns(
        "message.content if message.role == 'system' "
        "else ('### Instruction:\\n' + message.content + '\\n') if message.role == 'user' "
        "else ('### Response:\\n' + message.content + '\\n<|EOT|>\\n') if message.role == 'assistant' else ''",
        "'### Response:\\n'"),
    "command-r": _turns(
        "('<|START_OF_TURN_TOKEN|>' + {'system': '<|SYSTEM_TOKEN|>', 'user': '<|USER_TOKEN|>', "
        "'assistant': '<|CHATBOT_TOKEN|>'}[message.role] + " + _TRIMMED + " + '<|END_OF_TURN_TOKEN|>') "
        "if message.role in ('system', 'user', 'assistant') else ''",
        "'<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>'"),
    "llama3": _turns("'<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + " + _TRIMMED
                     + " + '<|eot_id|>'", "'<|start_header_id|>assistant<|end_header_id|>\\n\\n'"),
    "llama4": _turns("'<|header_start|>' + message.role + '<|header_end|>\\n\\n' + " + _TRIMMED
                     + " + '<|eot|>'", "'<|header_start|>assistant<|header_end|>\\n\\n'"),
    "deepseek2": _turns(
        "(message.content + '\\n\\n') if message.role == 'system' "
        "else ('User: ' + message.content + '\\n\\n') if message.role == 'user' "
        "else ('Assistant: ' + message.content + '<｜end▁of▁sentence｜>') if message.role == 'assistant' else ''",
        "'Assistant:'"),
    "deepseek3": _turns(
        "(message.content + '\\n\\n') if message.role == 'system' "
        "else ('<｜User｜>' + message.content) if message.role == 'user' "
        "else ('<｜Assistant｜>' + message.content + '<｜end▁of▁sentence｜>') if message.role == 'assistant' "
        "else ''",
        "'<｜Assistant｜>'"),
    "exaone3": _turns(
        "('[|system|]' + " + _TRIMMED + " + '[|endofturn|]\\n') if message.role == 'system' "
        "else ('[|user|]' + " + _TRIMMED + " + '\\n') if message.role == 'user' "
        "else ('[|assistant|]' + " + _TRIMMED + " + '[|endofturn|]\\n') if message.role == 'assistant' "
        "else ''",
        "'[|assistant|]'"),
    "granite": _turns(
        "'<|start_of_role|>' + message.role + '<|end_of_role|>' + "
        "('<|tool_call|>' if message.role == 'assistant_tool_call' else '') + message.content + "
        "'<|end_of_text|>\\n'",
        "'<|start_of_role|>assistant<|end_of_role|>'"),
    "smolvlm": "{{- '<|im_start|>' -}}" + _turns(
        "(message.content + '\\n\\n') if message.role == 'system' "
        "else ('User: ' + message.content + '<end_of_utterance>\\n') if message.role == 'user' "
        "else ('Assistant: ' + message.content + '<end_of_utterance>\\n')",
        "'Assistant:'"),
}


# -- a format for a file without a template -------------------------------------------------

def _tokens(*tokens: str) -> Callable[[Mapping[str, Any], frozenset[str]], bool]:
    return lambda md, vocab: all(t in vocab for t in tokens)


def _named(pattern: str) -> Callable[[Mapping[str, Any], frozenset[str]], bool]:
    rx = re.compile(pattern, re.IGNORECASE)
    return lambda md, vocab: isinstance(md.get("general.name"), str) and rx.search(md["general.name"]) is not None


def _arch(*archs: str) -> Callable[[Mapping[str, Any], frozenset[str]], bool]:
    return lambda md, vocab: md.get("general.architecture") in archs


def _tekken(md: Mapping[str, Any], vocab: frozenset[str]) -> bool:
    return md.get("tokenizer.ggml.pre") == "tekken"


def _mistral_small_2503(md: Mapping[str, Any], vocab: frozenset[str]) -> bool:
    """llama.cpp's one-off rule (llama_model_chat_template): tekken vocabulary and 40 layers."""
    arch = md.get("general.architecture")
    return _tekken(md, vocab) and isinstance(arch, str) and md.get(f"{arch}.block_count") == 40


# (format, reason, test on (metadata, set of token texts)); the first match wins. Special
# tokens in the vocabulary are the strongest evidence, then the model's name and architecture;
# llama.cpp itself falls back to chatml for every file without a template.
FALLBACK_RULES: tuple[tuple[str, str, Callable[[Mapping[str, Any], frozenset[str]], bool]], ...] = (
    ("mistral-v7-tekken", "tekken vocabulary with 40 layers (llama.cpp's Mistral-Small-2503 rule)",
     _mistral_small_2503),
    ("chatml", "the vocabulary has <|im_start|>", _tokens("<|im_start|>")),
    ("llama3", "the vocabulary has <|start_header_id|>", _tokens("<|start_header_id|>", "<|eot_id|>")),
    ("gemma", "the vocabulary has <start_of_turn>", _tokens("<start_of_turn>", "<end_of_turn>")),
    ("phi3", "the vocabulary has <|assistant|> and <|end|>", _tokens("<|assistant|>", "<|end|>")),
    ("mistral-v7-tekken", "tekken vocabulary with [SYSTEM_PROMPT]",
     lambda md, vocab: _tekken(md, vocab) and "[SYSTEM_PROMPT]" in vocab),
    ("mistral-v7", "the vocabulary has [SYSTEM_PROMPT]", _tokens("[SYSTEM_PROMPT]", "[INST]")),
    ("mistral-v3-tekken", "tekken vocabulary with [INST]",
     lambda md, vocab: _tekken(md, vocab) and "[INST]" in vocab),
    ("mistral-v3", "the vocabulary has [INST]", _tokens("[INST]", "[/INST]")),
    ("zephyr", "general.name says TinyLlama/Zephyr", _named(r"tinyllama|zephyr")),
    ("llama2-sys", "general.name says Llama 2", _named(r"llama[-_ ]?2")),
    ("llama3", "general.name says Llama 3", _named(r"llama[-_ ]?3")),
    ("mistral-v1", "general.name says Mistral", _named(r"mistral|mixtral")),
    ("gemma", "general.architecture is Gemma", _arch("gemma", "gemma2", "gemma3")),
    ("phi3", "general.architecture is phi3", _arch("phi3")),
    ("chatml", "llama.cpp's default for files without a template", lambda md, vocab: True),
)


def fallback_format(metadata: Mapping[str, Any]) -> tuple[str, str]:
    """(format, reason) for a GGUF file whose metadata has no chat template."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = frozenset(t for t in tokens if isinstance(t, str)) if isinstance(tokens, list) else frozenset()
    return next((name, why) for name, why, test in FALLBACK_RULES if test(metadata, vocab))
