"""Request validation without a server: each kind of bad body becomes a 400 in the OpenAI
error shape naming the parameter; the bounds are those of the OpenAI API reference
(temperature in [0, 2], penalties in [-2, 2], top_p in (0, 1], top_logprobs <= 20...)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="the server needs .[server]")

from gguflm.server.errors import APIError  # noqa: E402
from gguflm.server.schemas import ChatCompletionRequest, CompletionRequest, parse  # noqa: E402

USER = [{"role": "user", "content": "hi"}]


def chat(**fields) -> bytes:
    return json.dumps({"messages": USER, **fields}).encode()


def error_of(model, body: bytes) -> dict:
    with pytest.raises(APIError) as e:
        parse(model, body)
    assert e.value.status == 400
    err = e.value.body()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    return err


@pytest.mark.parametrize("body, param", [
    (chat(temperature=2.5), "temperature"),
    (chat(temperature=-0.1), "temperature"),
    (chat(temperature="hot"), "temperature"),
    (chat(top_p=0), "top_p"),
    (chat(top_p=1.5), "top_p"),
    (chat(presence_penalty=3), "presence_penalty"),
    (chat(frequency_penalty=-2.5), "frequency_penalty"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens="10"), "max_tokens"),
    (chat(max_tokens=True), "max_tokens"),
    (chat(max_completion_tokens=-1), "max_completion_tokens"),
    (chat(top_logprobs=21, logprobs=True), "top_logprobs"),
    (chat(logprobs="yes"), "logprobs"),
    (chat(stream=1), "stream"),
    (chat(seed=1.5), "seed"),
    (chat(seed=1 << 64), "seed"),
    (chat(top_k=-1), "top_k"),
    (chat(min_p=1.5), "min_p"),
    (chat(repeat_penalty=0), "repeat_penalty"),
    (chat(stop=""), "stop"),
    (chat(stop=[f"s{i}" for i in range(17)]), "stop"),
    (chat(stop=[1]), "stop.0"),
    (chat(n=2), "n"),
    (chat(stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (json.dumps({"messages": []}).encode(), "messages"),
    (json.dumps({"messages": "hi"}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), "messages.0.role"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), "messages.0.content"),
    (json.dumps({"messages": [{"content": "x"}]}).encode(), "messages.0.role"),
    (json.dumps({}).encode(), "messages"),
])
def test_chat_rejects(body: bytes, param: str) -> None:
    assert error_of(ChatCompletionRequest, body)["param"] == param


@pytest.mark.parametrize("body", [b"", b"{", b'{"messages": [}', b"\xff\xfe", b"[1, 2]", b'"text"', b"null",
                                  b"[" * 100_000])
def test_malformed_json(body: bytes) -> None:
    err = error_of(ChatCompletionRequest, body)
    assert err["param"] is None and err["code"] == "invalid_json"


@pytest.mark.parametrize("body, param", [
    (b'{"prompt": 5}', "prompt"),
    (b'{"prompt": [1, "a"]}', "prompt.1"),
    (b'{"prompt": "x", "logprobs": 6}', "logprobs"),
    (b'{"prompt": "x", "logprobs": true}', "logprobs"),
    (b'{}', "prompt"),
])
def test_completion_rejects(body: bytes, param: str) -> None:
    assert error_of(CompletionRequest, body)["param"] == param


def test_request_level_checks() -> None:
    with pytest.raises(APIError) as e:
        parse(ChatCompletionRequest, chat(top_logprobs=3)).n_top_logprobs()
    assert e.value.body()["error"]["param"] == "top_logprobs"
    for prompt in ([], ["a", "b"]):
        with pytest.raises(APIError) as e:
            parse(CompletionRequest, json.dumps({"prompt": prompt}).encode()).prompt_value()
        assert e.value.body()["error"]["param"] == "prompt"


def test_accepts_the_openai_and_llama_cpp_fields() -> None:
    req = parse(ChatCompletionRequest, chat(
        model="anything", max_completion_tokens=7, max_tokens=99, temperature=0, top_p=0.5, top_k=3, min_p=0.1,
        repeat_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5, seed=-1, stop=["a", "b"],
        logprobs=True, top_logprobs=2, stream=True, stream_options={"include_usage": True},
        unknown_field={"ignored": True}))
    assert req.token_limit() == 7 and req.stop_strings() == ("a", "b") and req.n_top_logprobs() == 2
    assert req.include_usage()
    p = req.sampling_params()
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repeat_penalty) == (0, 0.5, 3, 0.1, 1.1)
    assert (p.presence_penalty, p.frequency_penalty, p.seed) == (0.5, -0.5, (1 << 64) - 1)
    content = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    msg = parse(ChatCompletionRequest, json.dumps({"messages": [{"role": "user", "content": content}]}).encode())
    assert msg.messages[0].text() == "Hello, world"
    assert parse(CompletionRequest, b'{"prompt": ["one"]}').prompt_value() == "one"
    assert parse(CompletionRequest, b'{"prompt": [1, 2, 3]}').prompt_value() == [1, 2, 3]
