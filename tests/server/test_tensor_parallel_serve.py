"""``gguflm serve --tensor-parallel 3`` (SmolLM2: 9 query / 3 key-value heads): this process
serves HTTP and drives 2 more ranks over gloo. Answers at temperature 0 are the
single-process engine's, streamed and not, several requests decoded together and again
one by one on the paged cache's used blocks (rank 0 keeps the block tables, each step
sends them); stopping the server stops its ranks."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

QUESTIONS = ["What is the capital of France?", "Name a color.", "What is 2+2?", "Say hi."]


def _ranks(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z" and b"gguflm.model.parallel" in cmd:
            out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.slow
def test_serve_tensor_parallel_answers_as_one_process(smollm2_path, start_server, tmp_path):
    import gguflm

    one = gguflm.load(smollm2_path, n_ctx=256)
    want = {q: "".join(one.chat([{"role": "user", "content": q}], max_tokens=10, temperature=0)) for q in QUESTIONS}
    with start_server(smollm2_path, tmp_path / "serve.log", "--tensor-parallel", "3") as srv:
        ranks = _ranks(srv.proc.pid)
        assert len(ranks) == 2, ranks
        client = openai.OpenAI(base_url=srv.api, api_key="unused", max_retries=0, timeout=120)

        def ask(q: str) -> str:
            r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": q}],
                                               max_tokens=10, temperature=0)
            return r.choices[0].message.content

        with ThreadPoolExecutor(4) as pool:
            got = dict(zip(QUESTIONS, pool.map(ask, QUESTIONS)))
        assert got == want
        assert [ask(q) for q in QUESTIONS] == [want[q] for q in QUESTIONS]  # one by one, on a used cache
        s = client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                           max_tokens=10, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in s) == want[QUESTIONS[0]]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(map(_alive, ranks)):
        time.sleep(0.2)
    assert not any(map(_alive, ranks))
