"""The generation loop's contract: whole UTF-8 characters, stop strings cut and never
emitted, finish reasons, token budgets, seeds, context limits.

The text oracles are Python's own UTF-8 decoder and str.find on the whole text, and
llama.cpp's detokenizer for real token pieces.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gguflm.engine import ContextLengthError, GenerationError, SamplingParams, TextAssembler

GREEDY = SamplingParams(temperature=0)


def assemble(pieces: list[bytes], stop: list[str]) -> tuple[list[str], bool]:
    text = TextAssembler(stop)
    out, stopped = [], False
    for p in pieces:
        s, stopped = text.push(p)
        out.append(s)
        if stopped:
            break
    if not stopped:
        out.append(text.flush())
    return out, stopped


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab é🙂東\n<|>"), max_size=40), st.data())
def test_text_assembler_against_python(text, data):
    raw = text.encode()
    cuts = sorted(data.draw(st.sets(st.integers(0, len(raw)), max_size=12)))
    pieces = [raw[i:j] for i, j in zip([0, *cuts], [*cuts, len(raw)])]
    stop = data.draw(st.lists(st.text(alphabet=st.sampled_from("ab é🙂<|>"), min_size=1, max_size=4), max_size=3))
    out, stopped = assemble(pieces, stop)
    expected, hit = text, False
    for end in range(1, len(text) + 1):  # the first character that completes a stop string
        done = [len(s) for s in stop if text[:end].endswith(s)]
        if done:
            expected, hit = text[:end - max(done)], True
            break
    assert "".join(out) == expected
    assert stopped == hit
    emitted = ""
    for piece in out:  # nothing is emitted that the whole text would not have at that point
        emitted += piece
        assert text.startswith(emitted)


def test_split_characters_stream_whole(smollm2_model, llama_cpp):
    from oracles import llama_cpp_model

    text = "naïve café, 🙂 東京 — ok"
    tok = smollm2_model.tokenizer
    ids = tok.encode(text, add_special=False)
    pieces = [tok.token_to_piece(t) for t in ids]
    assert any(p and not _is_utf8(p) for p in pieces), "want a character split across tokens"
    out, _ = assemble(pieces, [])
    assert all("\ufffd" not in s for s in out)
    llm = llama_cpp_model(llama_cpp, smollm2_model.file.path, n_ctx=64)
    assert "".join(out) == llm.detokenize(ids).decode() == text


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


def prompt_ids(model, q: str = "Name three colours.") -> list[int]:
    return model.encode_prompt(model.chat_template.render([{"role": "user", "content": q}]))


def test_stop_string_cuts_the_greedy_text(smollm2_model):
    m = smollm2_model
    full = "".join(m.generate(prompt_ids(m), max_tokens=40, temperature=0))
    assert len(full) > 30
    stop = full[20:24]
    stream = m.stream(prompt_ids(m), 40, GREEDY, [stop, "never-generated-stop"])
    got = "".join(stream)
    assert got == full[:full.find(stop)]
    assert stream.result.finish_reason == "stop"


def test_finish_reasons_and_budgets(smollm2_model):
    m = smollm2_model
    s = m.stream(prompt_ids(m), 5, GREEDY)
    list(s)
    assert s.result.finish_reason == "length" and s.result.n_generated == 5
    s = m.stream(prompt_ids(m), 0, GREEDY)
    assert list(s) == [] and s.result.finish_reason == "length"
    s = m.stream(prompt_ids(m, "Say only the word yes."), 200, GREEDY)
    list(s)
    toks = s.result.tokens
    assert s.result.finish_reason == "stop" and len(toks) < 200
    assert not set(toks) & set(m.tokenizer.eog_ids)  # the end-of-generation token is not yielded


def test_seed_makes_sampling_reproducible(smollm2_model):
    m = smollm2_model
    def tokens(seed: int) -> list[int]:
        s = m.stream(prompt_ids(m), 16, SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=seed))
        list(s)
        return s.result.tokens

    runs = [tokens(seed) for seed in (11, 11, 12)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_context_limits(smollm2_path):
    import gguflm

    m = gguflm.load(smollm2_path, n_ctx=24)
    with pytest.raises(ContextLengthError, match="context holds 24"):
        m.stream("word " * 40, 4, GREEDY)
    assert issubclass(ContextLengthError, ValueError)
    with pytest.raises(GenerationError, match="empty"):
        m.stream([], 4, GREEDY)
    s = m.stream("1, 2, 3, 4, 5,", 100, GREEDY)  # counting on fills the context: "length"
    list(s)
    n = s.result.n_generated
    assert s.result.finish_reason == "length" and s.result.n_prompt + n == 24 + 1
