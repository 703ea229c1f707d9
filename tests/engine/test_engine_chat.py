"""The chat API (``LLM.chat``, ``LLM.create_chat_completion``) on SmolLM2.

Oracles: llama-cpp-python's Jinja2ChatFormatter renders the file's template to the same
prompt; llama.cpp's tokenizer gives the same prompt ids; the greedy answer's tokens are
the float64 reference's greedy path (so its first reply token is the reference's)."""

from __future__ import annotations

from gguflm.chat.template import TEMPLATE_KEY

MESSAGES = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
N = 24


def test_chat_is_the_reference_greedy_answer_to_the_rendered_prompt(smollm2_model, smollm2_path, llama_cpp):
    from gguflm.verify import llamacpp
    from gguflm.verify.reference import reference_logits

    m = smollm2_model
    tpl = m.chat_template
    rendered = m.chat_prompt(MESSAGES)
    with llamacpp.LlamaCpp() as oracle:                                # llama.cpp in a child process
        theirs = oracle.render_chat_template(m.file.metadata[TEMPLATE_KEY], MESSAGES, bos_token=tpl.bos_token,
                                             eos_token=tpl.eos_token)
        their_ids = oracle.tokenize(smollm2_path, rendered, add_special=True, parse_special=True)
    assert rendered == theirs
    prompt = m.encode_prompt(rendered)
    assert prompt == their_ids

    answer = m.chat(MESSAGES, max_tokens=N, temperature=0)
    text = "".join(answer)
    tokens = answer.result.tokens
    assert text and text == b"".join(m.tokenizer.token_to_piece(t) for t in tokens).decode()
    ref = reference_logits(smollm2_path, prompt + tokens)
    assert ref[len(prompt) - 1:-1].argmax(-1).tolist() == tokens       # the reference's greedy path
    if answer.result.finish_reason == "stop":                          # ended by the model: EOG there too
        assert int(ref[-1].argmax()) in m.tokenizer.eog_ids
    raw = m.generate(rendered, max_tokens=N, temperature=0)            # raw completion of the same prompt
    assert "".join(raw) == text and raw.result.tokens == tokens


def test_create_chat_completion_shapes(smollm2_model):
    m = smollm2_model
    text = "".join(m.chat(MESSAGES, max_tokens=8, temperature=0))
    n_prompt = len(m.encode_prompt(m.chat_prompt(MESSAGES)))
    out = m.create_chat_completion(MESSAGES, max_tokens=8, temperature=0)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": text, "refusal": None}
    assert choice["finish_reason"] in ("stop", "length")
    u = out["usage"]
    assert u["prompt_tokens"] == n_prompt and u["total_tokens"] == n_prompt + u["completion_tokens"]

    chunks = list(m.create_chat_completion(MESSAGES, stream=True, max_tokens=8, temperature=0))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_chat_stop_string_and_early_close(smollm2_model):
    m = smollm2_model
    text = "".join(m.chat(MESSAGES, max_tokens=N, temperature=0))
    assert len(text) > 12
    stop = text[6:9]
    s = m.chat(MESSAGES, max_tokens=N, stop=[stop], temperature=0)
    assert "".join(s) == text[:text.find(stop)] and s.result.finish_reason == "stop"
    s = m.chat(MESSAGES, max_tokens=N, temperature=0)
    next(s)
    s.close()                                                          # leaves its slot to the next call
    assert "".join(m.chat(MESSAGES, max_tokens=N, temperature=0)) == text
