"""Replicas on Ray Serve (gguflm.server.ray_serve), as a user starts them: ``gguflm serve
--replicas 2`` on a local Ray, 2 CPU replicas of SmolLM2, the real ``openai`` client.

The app behind Ray is the server's own (same routes, SSE, errors): answers are the ones
the single-process engine gives (temperature 0), requests spread over both replicas
(each response names its replica's process), a replica killed mid-load fails its
in-flight requests cleanly (an error, never a hang) while new requests still succeed,
and stopping the server stops every process Ray started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="replicas need the ray extra: pip install 'gguflm[ray]'")
openai = pytest.importorskip("openai")

HOST = "127.0.0.1"
HEADER = "x-gguflm-replica"
QUESTIONS = ["What is the capital of France?", "Name a color.", "What is 2+2?", "Say hi.",
             "Who wrote Hamlet?", "Describe a cat.", "What day comes after Monday?", "List three prime numbers."]


def _descendants(pid: int) -> set[int]:
    parents = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        parents[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    found, frontier = set(), [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in found:
                found.add(child)
                frontier.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def _port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _ask(client, q: str, max_tokens: int = 12):
    r = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=[{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0)
    return int(r.headers[HEADER]), r.parse().choices[0].message.content


@pytest.mark.slow
def test_two_replicas_spread_survive_a_killed_one_and_stop_clean(smollm2_path, spawn, tmp_path):
    import gguflm

    smollm2_model = gguflm.load(smollm2_path, n_ctx=512)
    port = _port()
    log = tmp_path / "ray-serve.log"
    cmd = [sys.executable, "-m", "gguflm", "serve", "-m", str(smollm2_path), "--replicas", "2", "--host", HOST,
           "--port", str(port), "--parallel", "4", "-c", "512", "--log-level", "warning"]
    with log.open("wb") as out:
        proc = spawn(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 150
        while True:  # Ray, its proxy and both replicas up
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "Ray Serve did not come up:\n" + log.read_text()[-4000:]
            try:
                _ask(client, "Hi", 1)
                break
            except (openai.APIConnectionError, openai.APIStatusError):
                time.sleep(0.5)
        started |= _descendants(proc.pid)

        # the same answers as the engine in this process, spread over both replicas
        want = {q: "".join(smollm2_model.chat([{"role": "user", "content": q}], max_tokens=12, temperature=0))
                for q in QUESTIONS}
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda q: (q, *_ask(client, q)), QUESTIONS * 2))
        pids = {pid for _, pid, _ in got}
        assert len(pids) == 2, got
        assert all(text == want[q] for q, _, text in got), got
        stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                                max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == want[QUESTIONS[0]]
        with pytest.raises(openai.BadRequestError, match="at least one message"):  # the app's own 400
            client.chat.completions.create(model="smollm2", messages=[], max_tokens=4)
        started |= _descendants(proc.pid)

        # one replica killed while 8 long streams run: each ends (done or an error) in time
        victim = sorted(pids)[0]

        def long_stream(q: str) -> str:
            """'finished <reason>' (a finish_reason came), 'cut' (the stream ended without one:
            its replica died), or 'error <type>' (the client raised)."""
            try:
                s = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": q}],
                                                   max_tokens=150, temperature=0, stream=True)
                reasons = [c.choices[0].finish_reason for c in s if c.choices and c.choices[0].finish_reason]
                return f"finished {reasons[-1]}" if reasons else "cut"
            except openai.APIError as e:
                return f"error {type(e).__name__}"

        def long_request(q: str) -> str:
            try:
                return "finished " + client.chat.completions.create(
                    model="smollm2", messages=[{"role": "user", "content": q}], max_tokens=150,
                    temperature=0).choices[0].finish_reason
            except openai.APIError as e:
                return f"error {type(e).__name__}"

        def timed(fn, q: str) -> tuple[str, float]:
            out = fn(q)
            return out, time.monotonic()

        t0 = time.monotonic()
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(timed, long_stream, q) for q in QUESTIONS] + \
                [pool.submit(timed, long_request, q) for q in QUESTIONS[:4]]
            time.sleep(2.0)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            results = [f.result(timeout=120) for f in futures]
        outcomes = [o for o, _ in results]
        print(f"\nrequests with replica {victim} killed: {outcomes} ({time.monotonic() - t0:.1f}s)")
        assert not _alive(victim)
        assert any(at > killed_at for _, at in results), "the kill came after the load: nothing was in flight"
        assert all(o.startswith(("finished", "cut", "error")) for o in outcomes)
        # the survivor's requests finish; the victim's in-flight ones end cleanly (cut / an
        # error) or Ray Serve retried them on the survivor (then they finish too)
        assert any(o.startswith("finished") for o in outcomes), outcomes
        # new requests still succeed (the survivor, or the replacement Ray starts)
        with ThreadPoolExecutor(4) as pool:
            after = list(pool.map(lambda q: _ask(client, q), QUESTIONS[:4]))
        assert all(text == want[q] for q, (_, text) in zip(QUESTIONS, after)), after
        assert victim not in {pid for pid, _ in after}
        started |= _descendants(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)  # serve shuts down Ray Serve and Ray
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            spawn.stop(proc)
            pytest.fail("gguflm serve --replicas did not stop on SIGTERM:\n" + log.read_text()[-4000:])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in started):
        time.sleep(0.5)
    left = [p for p in started if _alive(p)]
    assert not left, f"processes left behind: {left}"
    assert proc.returncode == 0, log.read_text()[-4000:]


def test_the_config_file_builds_the_application(smollm2_path):
    """docs/ray-serve.yaml, as ``serve run`` reads it: the builder's arguments (no Ray started)."""
    import yaml

    from gguflm.server.ray_serve import build

    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "ray-serve.yaml").read_text())
    args = {**cfg["applications"][0]["args"], "model": str(smollm2_path), "replicas": "3"}
    dep = build(args)._bound_deployment
    assert dep._deployment_config.num_replicas == 3
    assert dep.ray_actor_options["num_cpus"] == args["threads"]
    assert dep.init_args == (str(smollm2_path),) and dep.init_kwargs["parallel"] == 8
