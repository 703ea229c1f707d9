"""Bad requests get the OpenAI error shape and the right 4xx status, through the real
client (which must raise its typed errors) and raw HTTP; the server serves on afterwards."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("fastapi", reason="the server needs .[server]")

from gguflm.server.app import DEFAULT_MAX_BODY  # noqa: E402

MSG = [{"role": "user", "content": "Hi"}]


def error_body(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    err = response.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    return err


def assert_still_serving(server, client) -> None:
    assert server.health()["status"] == "ok"
    r = client.completions.create(model="x", prompt="Hello", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


@pytest.mark.parametrize("kwargs, param", [
    ({"messages": MSG, "temperature": 3.0}, "temperature"),
    ({"messages": MSG, "top_p": 0.0}, "top_p"),
    ({"messages": MSG, "presence_penalty": 2.5}, "presence_penalty"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSG, "n": 2}, "n"),
    ({"messages": MSG, "logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": MSG, "extra_body": {"max_tokens": "ten"}}, "max_tokens"),
    ({"messages": MSG, "extra_body": {"stop": 7}}, "stop"),
    ({"messages": [], "max_tokens": 1}, "messages"),
    ({"messages": [{"role": "user"}], "extra_body": {"messages": [{"role": "user", "content": {"a": 1}}]}},
     "messages.0.content"),
])
def test_invalid_chat_requests(server, client, kwargs: dict, param: str) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"


def test_prompt_longer_than_context(server, client) -> None:
    import openai

    n_ctx = client.models.list().data[0].model_extra["meta"]["n_ctx"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "word " * n_ctx}])
    body = e.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "messages"
    assert body["n_ctx"] == n_ctx and body["n_prompt_tokens"] > n_ctx
    assert str(n_ctx) in body["message"] and str(body["n_prompt_tokens"]) in body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="x", prompt=[1] * n_ctx)
    assert e.value.body["n_prompt_tokens"] == n_ctx
    with pytest.raises(openai.BadRequestError) as e:  # token ids outside the vocabulary
        client.completions.create(model="x", prompt=[1, 10 ** 9])
    assert e.value.body["param"] == "prompt"
    assert_still_serving(server, client)


@pytest.mark.parametrize("body", [b"{", b'{"messages": [{"role": "user", "content": "x"}]', b"\xff", b"[]",
                                  b"", b"null"])
def test_malformed_json(server, body: bytes) -> None:
    r = httpx.post(server.api + "/chat/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=30)
    assert error_body(r, 400)["code"] == "invalid_json"


def test_body_too_large(server, client) -> None:
    big = b'{"prompt": "' + b"a" * DEFAULT_MAX_BODY + b'"}'
    r = httpx.post(server.api + "/completions", content=big, timeout=30)  # with Content-Length
    assert error_body(r, 413)["code"] == "request_too_large"

    def chunks():  # chunked transfer encoding: no Content-Length to refuse it by
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    r = httpx.post(server.api + "/completions", content=chunks(), timeout=30)
    assert error_body(r, 413)["code"] == "request_too_large"
    assert_still_serving(server, client)


def test_unknown_routes_and_methods(server, client) -> None:
    assert error_body(httpx.get(server.api + "/engines", timeout=30), 404)["type"] == "not_found_error"
    error_body(httpx.get(server.api + "/chat/completions", timeout=30), 405)
    error_body(httpx.delete(server.api + "/models", timeout=30), 405)
    import openai

    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="x", input="hello")
    assert_still_serving(server, client)


@pytest.mark.parametrize("args, needle", [
    (["--parallel", "0"], "--parallel"),
    (["-m", "/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
])
def test_serve_command_errors_are_one_line(args: list[str], needle: str) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "gguflm", "serve", *args, "--port", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gguflm serve: error:") and needle in lines[0], r.stderr
