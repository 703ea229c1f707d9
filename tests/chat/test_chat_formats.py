"""Named formats against llama.cpp: its list of format names, its detection of a format from
template text (llama_chat_apply_template renders a template text and a format name alike,
so a detected name must render what the text renders), our built-in templates against its
built-in formatters, and what from_gguf reads compared with what llama.cpp reads."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import pytest

import gguflm
from gguflm.chat import BUILTIN_TEMPLATES, ChatTemplate, detect_format
from gguflm.chat.formats import _DETECT_RULES, LLAMA_CPP_FORMATS

CHATS = {
    "system_multiturn": [("system", "You are terse."), ("user", "Hi"), ("assistant", " Hello! \n"),
                         ("user", "What is 2+2?")],
    "two_systems": [("system", " first "), ("system", "second\n"), ("user", "\tQ "), ("assistant", "A"),
                    ("user", "Q2"), ("assistant", "A2")],
    "single": [("user", "Hello, 世界 🌍")],
    "other_roles": [("user", "call it"), ("assistant", "calling"), ("tool", " 22C "), ("assistant", "done"),
                    ("assistant_tool_call", "{}"), ("user", "ok")],
}

# One template text per detection rule, in llama.cpp's order; each must not trigger an earlier rule.
PROBES = [
    "<|im_start|><|im_sep|>", "<|im_start|><end_of_utterance>", "<|im_start|>", "[INST][SYSTEM_PROMPT]",
    "{{ ' [INST] ' + system_message }}", "\"[INST]\" [AVAILABLE_TOOLS]", "[INST][AVAILABLE_TOOLS]",
    "[INST] {{ content.strip() }}", "{{ bos_token + '[INST] ' }}", "[INST] <<SYS>>", "[INST]",
    "mistral instruct", "<|assistant|><|end|>", "[gMASK]<sop>", "<|assistant|><|user|><|tool_declare|>",
    "<|assistant|><|user|></s>", "<|assistant|><|user|>", "<|{{ item['role'] }}|><|begin_of_image|>",
    "<|user|><|endoftext|>", "{{ bos_token + message['role'] }}", "<start_of_turn>",
    "{{ '\\n\\nAssistant: ' + eos_token }}", "GPT4 Correct ", "USER: ASSISTANT: SYSTEM: ", "USER: ASSISTANT: ",
    "### Instruction:<|EOT|>", "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>", "<|start_header_id|><|end_header_id|>",
    "[gMASK]sop", "<用户>", "{{ 'Assistant: ' + message['content'] + eos_token }}",
    "<｜Assistant｜><｜User｜><｜end▁of▁sentence｜>", "[|system|][|assistant|][|endofturn|][|tool|]",
    "[|system|][|assistant|][|endofturn|]", "rwkv-world", "{{- 'User: ' + message['content']|trim + '\\n\\n' -}}",
    "<|start_of_role|><tool_call>g4_default_system_message", "<|start_of_role|><tools>", "<|start_of_role|>",
    "message['role'] + additional_special_tokens[0] + message['content'] + additional_special_tokens[1]",
    "<|role_start|>", " Ассистент:", "<role>ASSISTANT</role>'HUMAN'", "<role>ASSISTANT</role>\"HUMAN\"<think>",
    "<role>ASSISTANT</role><role>HUMAN</role><|role_end|>", "<|header_start|><|header_end|>",
    "<|endofuserprompt|>", "<|extra_0|><|extra_4|>", "<|start|><|channel|>",
    "<｜hy_Assistant｜><｜hy_begin▁of▁sentence｜>", "<｜hy_Assistant｜><｜hy_place▁holder▁no▁3｜>",
    "<|im_assistant|>assistant<|im_middle|>", "<seed:bos>", "{{ 'Assistant: '  + message['content'] + '<|separator|>' }}",
    "[unused9]系统：[unused10]", "<|begin|><|end|><|content|>",
]

NOT_TEMPLATES = ["", "hello {{ messages }}", "<|im_end|> alone", "[/INST] only"]


def test_format_names_are_llama_cpps(llama_apply):
    import llama_cpp

    names = (ctypes.c_char_p * 128)()
    n = llama_cpp.llama_chat_builtin_templates(names, 128)
    assert set(LLAMA_CPP_FORMATS) == {names[i].decode() for i in range(n)}
    assert set(BUILTIN_TEMPLATES) <= set(LLAMA_CPP_FORMATS)


def test_probes_cover_every_detection_rule():
    assert {detect_format(p) for p in PROBES} == {name for name, _ in _DETECT_RULES}


@pytest.mark.parametrize("text", PROBES + NOT_TEMPLATES + sorted(LLAMA_CPP_FORMATS))
def test_detection_agrees_with_llama_cpp(llama_apply, text: str):
    """llama.cpp renders the text as the format it detects; ours must name that same format."""
    name = detect_format(text)
    for chat in CHATS.values():
        for add_ass in (True, False):
            by_text = llama_apply(text, chat, add_ass)
            assert (name is None) == (by_text is None)
            if name is not None and name in LLAMA_CPP_FORMATS:  # "dots1" has no name in llama.cpp
                assert llama_apply(name, chat, add_ass) == by_text


def real_templates(shared_dir: Path, smollm2_path: Path) -> dict[str, str]:
    found = {p.name: p.read_text() for p in sorted((shared_dir / "templates").glob("*.jinja"))}
    with gguflm.GGUFFile(smollm2_path) as f:
        found["SmolLM2"] = f.metadata["tokenizer.chat_template"]
    return found


def test_detection_of_real_templates_agrees_with_llama_cpp(llama_apply, shared_dir: Path, smollm2_path: Path):
    chat = CHATS["system_multiturn"]
    for filename, text in real_templates(shared_dir, smollm2_path).items():
        name = detect_format(text)
        assert name is not None, filename
        assert llama_apply(name, chat, True) == llama_apply(text, chat, True), filename


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_templates_render_as_llama_cpp(llama_apply, name: str):
    template = ChatTemplate.builtin(name, bos_token="<s>", eos_token="</s>")
    for chat in CHATS.values():
        messages = [{"role": role, "content": content} for role, content in chat]
        for add_ass in (True, False):
            assert template.render(messages, add_generation_prompt=add_ass) == llama_apply(name, chat, add_ass)


def test_unknown_builtin_is_a_template_error():
    with pytest.raises(gguflm.TemplateError, match="no built-in chat format 'nope'"):
        ChatTemplate.builtin("nope")
    missing = sorted(set(LLAMA_CPP_FORMATS) - set(BUILTIN_TEMPLATES))[0]
    with pytest.raises(gguflm.TemplateError, match="llama.cpp knows it"):
        ChatTemplate.builtin(missing)


# -- from_gguf --------------------------------------------------------------------------------

def test_from_gguf_reads_what_llama_cpp_reads(llama_vocab_facts, smollm2_path: Path, shared_dir: Path):
    paths = [smollm2_path] + sorted((shared_dir / "vocab").glob("*.gguf"))
    with_template = 0
    for path in paths:
        facts = llama_vocab_facts(path)
        template = ChatTemplate.from_gguf(path)
        assert (template.bos_token, template.eos_token) == (facts["bos"], facts["eos"]), path.name
        if facts["template"] is not None:
            assert template.source == facts["template"], path.name
            with_template += 1
    assert with_template >= 3  # SmolLM2, phi-3, qwen2


def test_file_without_template_gets_a_builtin_and_says_so(llama_vocab_facts, llama_apply, shared_dir: Path, caplog):
    """llama.cpp has no template for these files (it would use chatml); we pick by the
    vocabulary's special tokens, and a name-less Llama 2 vocabulary gets llama.cpp's chatml."""
    chat = CHATS["system_multiturn"]
    messages = [{"role": r, "content": c} for r, c in chat]
    for filename, expected in [("ggml-vocab-llama-bpe.gguf", "llama3"), ("ggml-vocab-llama-spm.gguf", "chatml")]:
        path = shared_dir / "vocab" / filename
        assert llama_vocab_facts(path)["template"] is None
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gguflm.chat"):
            template = ChatTemplate.from_gguf(path)
        assert f"using the built-in '{expected}' format" in caplog.text
        assert template.render(messages) == llama_apply(expected, chat, True)


def test_from_gguf_accepts_an_open_file(smollm2_path: Path):
    with gguflm.GGUFFile(smollm2_path) as f:
        assert ChatTemplate.from_gguf(f).source == f.metadata["tokenizer.chat_template"]


def write_gguf(path: Path, **metadata) -> Path:
    """A metadata-only GGUF written by the official gguf-py writer."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "hello"])
    for key, value in metadata.items():
        if isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_string(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_template_metadata_variants(tmp_path: Path, llama_vocab_facts, llama_apply, caplog):
    messages = [{"role": "user", "content": "hi"}]
    # a format name instead of Jinja source (llama.cpp accepts names there)
    path = write_gguf(tmp_path / "named.gguf", **{"tokenizer.chat_template": "chatml",
                                                  "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2})
    template = ChatTemplate.from_gguf(path)
    assert template.render(messages) == llama_apply("chatml", [("user", "hi")], True)
    assert (template.bos_token, template.eos_token) == ("<s>", "</s>")
    assert (llama_vocab_facts(path)["bos"], llama_vocab_facts(path)["eos"]) == ("<s>", "</s>")
    # only the tool_use variant: llama.cpp uses it as the default
    path = write_gguf(tmp_path / "tool_use.gguf", **{"tokenizer.chat_template.tool_use": "{{ 'T' }}"})
    assert ChatTemplate.from_gguf(path).render(messages) == "T"
    # a general.name hint when the vocabulary says nothing
    path = write_gguf(tmp_path / "tiny.gguf", **{"general.name": "TinyLlama 1.1B Chat v1.0"})
    with caplog.at_level(logging.WARNING, logger="gguflm.chat"):
        template = ChatTemplate.from_gguf(path)
    assert "'zephyr'" in caplog.text and "TinyLlama" in caplog.text
    assert template.render(messages) == llama_apply("zephyr", [("user", "hi")], True)


@pytest.mark.parametrize("metadata, error", [
    ({"tokenizer.chat_template": ["not", "a", "string"]}, gguflm.TemplateError),
    ({"tokenizer.chat_template": "{% for %}"}, gguflm.TemplateError),
    ({"tokenizer.ggml.bos_token_id": 99}, gguflm.GGUFError),
])
def test_bad_template_metadata_is_a_clear_error(tmp_path: Path, metadata: dict, error: type):
    path = write_gguf(tmp_path / "bad.gguf", **metadata)
    with pytest.raises(error) as e:
        ChatTemplate.from_gguf(path)
    assert "\n" not in str(e.value)
