"""`gguflm run` and `gguflm chat` as a user runs them (subprocesses).

The greedy answer of `run` must be the float64 reference's greedy continuation: the
candidate tokens (our library's greedy decode) are checked position by position against
the reference's argmax over the whole sequence — then the CLI must print exactly their
text. llama.cpp's own greedy continuation is compared too (reported: it rounds activations,
so it may leave the exact path after a while)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gguflm
from gguflm.engine import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "model"))
from fixtures import llama_cpp, smollm2_model  # noqa: E402,F401  (session fixtures)
from oracles import llama_cpp_greedy  # noqa: E402

QUESTION = "Is Paris the capital of France?"


def gguflm_cli(*args: str, stdin: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gguflm", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def with_newline(text: str) -> str:
    """`run`'s stdout: the generated text, ending with a newline (added unless it ends with one)."""
    return text if text.endswith("\n") else text + "\n"


def greedy_text(model, messages: list[dict], n: int) -> str:
    return "".join(model.generate(model.chat_template.render(messages), max_tokens=n, temperature=0))


def test_run_prints_the_reference_greedy_answer(smollm2_path, smollm2_model, llama_cpp):
    from gguflm.verify.reference import reference_logits

    r = gguflm_cli("run", "-m", smollm2_path, "-p", QUESTION, "--temp", "0", "-n", "32")
    assert r.returncode == 0, r.stderr
    m = smollm2_model
    prompt = m.encode_prompt(m.chat_template.render([{"role": "user", "content": QUESTION}]))
    stream = m.stream(prompt, 32, SamplingParams(temperature=0))
    list(stream)
    tokens = stream.result.tokens
    ref = reference_logits(smollm2_path, prompt + tokens)
    assert ref[len(prompt) - 1:-1].argmax(-1).tolist() == tokens   # the reference's greedy path
    if stream.result.finish_reason == "stop":
        assert int(ref[-1].argmax()) in m.tokenizer.eog_ids
    assert r.stdout == with_newline(b"".join(m.tokenizer.token_to_piece(t) for t in tokens).decode())

    theirs = llama_cpp_greedy(llama_cpp, smollm2_path, prompt, 32, set(m.tokenizer.eog_ids))
    agree = next((i for i, (a, b) in enumerate(zip(tokens, theirs)) if a != b), min(len(tokens), len(theirs)))
    print(f"\nllama.cpp's greedy answer agrees with the reference's on the first {agree} of {len(tokens)} tokens")
    assert agree >= 4


def test_run_stdin_raw_verbose(smollm2_path, smollm2_model):
    text = "The three primary colours are"
    r = gguflm_cli("run", "-m", smollm2_path, "-p", "-", "--raw", "--temp", "0", "-n", "12", "--verbose",
                   stdin=text)
    assert r.returncode == 0, r.stderr
    assert r.stdout == with_newline("".join(smollm2_model.generate(text, max_tokens=12, temperature=0)))
    assert "prompt:" in r.stderr and "tok/s" in r.stderr and "loaded" in r.stderr


@pytest.fixture(scope="module")
def unsupported_arch(tmp_path_factory, shared_dir):
    from synth import Shape, write_llama

    return write_llama(tmp_path_factory.mktemp("arch") / "mamba.gguf", Shape(), shared_dir / "vocab" /
                       "ggml-vocab-llama-spm.gguf", arch="mamba")


@pytest.mark.parametrize("case", ["missing", "not_gguf", "vocab_only", "arch", "bad_flag"])
def test_user_errors_are_one_line(case, tmp_path, shared_dir, unsupported_arch, smollm2_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    model, extra, want = {
        "missing": (tmp_path / "nope.gguf", [], "No such file"),
        "not_gguf": (junk, [], "not a GGUF file"),
        "vocab_only": (shared_dir / "vocab" / "ggml-vocab-llama-spm.gguf", [], "no tensors"),
        "arch": (unsupported_arch, [], "unsupported architecture 'mamba'"),
        "bad_flag": (smollm2_path, ["--top-p", "nan"], "top_p must be a finite number"),
    }[case]
    for cmd in ("run", "chat"):
        args = [cmd, "-m", model, *extra] + (["-p", "hi"] if cmd == "run" else [])
        r = gguflm_cli(*args, stdin="")
        assert r.returncode != 0
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"gguflm {cmd}: error:") and want.lower() in lines[0].lower(), \
            r.stderr
        assert r.stdout == ""


def test_run_conversation_is_chat_with_p_as_system(smollm2_path, smollm2_model):
    """llama.cpp's -cnv: `run` becomes the interactive chat; -p is then the system message."""
    system, q, n = "You answer in one word.", "What colour is the sky?", 8
    r = gguflm_cli("run", "-cnv", "-m", smollm2_path, "-p", system, "--temp", "0", "-n", n, stdin=f"{q}\n")
    assert r.returncode == 0, r.stderr
    answer = greedy_text(smollm2_model, [{"role": "system", "content": system}, {"role": "user", "content": q}], n)
    assert r.stdout == f"{answer}\n"


def test_chat_keeps_history_and_resets(smollm2_path, smollm2_model):
    q1, q2, n = "What is 2+2?", "And what is that times ten?", 16
    r = gguflm_cli("chat", "-m", smollm2_path, "--temp", "0", "-n", n, stdin=f"{q1}\n{q2}\n/reset\n{q2}\n")
    assert r.returncode == 0, r.stderr
    m = smollm2_model
    a1 = greedy_text(m, [{"role": "user", "content": q1}], n)
    a2 = greedy_text(m, [{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                         {"role": "user", "content": q2}], n)
    a3 = greedy_text(m, [{"role": "user", "content": q2}], n)
    assert r.stdout == f"{a1}\n{a2}\n{a3}\n"
    assert "(conversation cleared)" in r.stderr and "Traceback" not in r.stderr


class Streams:
    """A child's stdout and stderr read as they come, so a test waits on what the child
    has printed (a condition), never on a sleep."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.data = {"out": bytearray(), "err": bytearray()}
        self.open = {"out": proc.stdout, "err": proc.stderr}

    def pump(self, timeout: float) -> None:
        """Read whatever either stream has within ``timeout`` seconds."""
        fds = {f.fileno(): name for name, f in self.open.items()}
        ready = select.select(list(fds), [], [], timeout)[0] if fds else []
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if chunk:
                self.data[fds[fd]] += chunk
            else:
                del self.open[fds[fd]]

    def wait_until(self, done, what: str, timeout: float = 300) -> None:
        """Pump until ``done()``; fails, showing both streams, at the deadline or if both
        streams ended first."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or not self.open:
                pytest.fail(f"{what}: not within {timeout} s (exit status {self.proc.poll()}):\n"
                            f"stdout: {bytes(self.data['out'][-2000:])!r}\nstderr: {bytes(self.data['err'][-2000:])!r}")
            self.pump(min(left, 1.0))

    def wait_for(self, name: str, text: bytes, start: int = 0, timeout: float = 300) -> int:
        """Pump until ``text`` appears in std``name`` at or after ``start``; the index just past it."""
        self.wait_until(lambda: self.data[name].find(text, start) >= 0, f"{text!r} on std{name}", timeout)
        return self.data[name].find(text, start) + len(text)

    def wait_exit(self, timeout: float = 120) -> int:
        """Pump both streams to their end, then the exit status."""
        deadline = time.monotonic() + timeout
        while self.open and time.monotonic() < deadline:
            self.pump(min(deadline - time.monotonic(), 1.0))
        return self.proc.wait(max(0.1, deadline - time.monotonic()))


def test_chat_ctrl_c_stops_the_answer_not_the_program(smollm2_path, spawn):
    p = spawn([sys.executable, "-m", "gguflm", "chat", "-m", str(smollm2_path), "-n", "100000", "--temp", "0"],
              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    io = Streams(p)
    try:
        io.wait_for("err", b"\n> ")                          # loaded, asking for a message
        p.stdin.write(b"Count from 1 to 10000, one number per line.\n")
        p.stdin.flush()
        io.wait_until(lambda: len(io.data["out"]) >= 8, "the answer streaming")
        os.kill(p.pid, signal.SIGINT)
        after = io.wait_for("err", b"(interrupted)\n")
        io.wait_for("err", b"> ", start=after)               # the program asks for the next message
        streamed = len(io.data["out"])
        p.stdin.write(b"/exit\n")
        p.stdin.flush()
        rc = io.wait_exit()
    finally:
        spawn.stop(p, grace=1.0)
    err = io.data["err"].decode(errors="replace")
    assert rc == 0, err
    assert "Traceback" not in err
    assert len(io.data["out"]) == streamed and io.data["out"].endswith(b"\n")   # the answer stopped there
