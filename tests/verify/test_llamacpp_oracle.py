"""llama.cpp as an oracle in a child process: its answers are llama.cpp's own (the same
calls made in this process, on the same model parameters), and its crash, early exit or
hang becomes an error that `gguflm verify` reports as a row and `gguflm perplexity` as
one line, never the end of gguflm; no process is left behind."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from gguflm.cli import main
from gguflm.verify import llamacpp
from gguflm.verify.llamacpp_worker import CRASH_ENV, open_llama

KL_CHECK = "ours vs llama.cpp: mean KL"


def gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether process ``pid`` no longer exists (reaped, or never ours), waiting up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def oracle_pids(monkeypatch):
    """The pids of every llama.cpp child started during the test; at its end each must be gone."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the oracle")
    pids: list[int] = []
    init = llamacpp.LlamaCpp.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        pids.append(self.pid)

    monkeypatch.setattr(llamacpp.LlamaCpp, "__init__", recording_init)
    yield pids
    assert pids, "no llama.cpp child was started"
    assert all(gone(p) for p in pids), f"llama.cpp children left running: {pids}"


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(args)
    return rc, out.getvalue(), capsys.readouterr().err


def test_the_child_answers_what_llama_cpp_answers_in_process(smollm2_path, oracle_pids):
    """Same tokens, bit-identical logits: the process boundary changes nothing."""
    import llama_cpp

    text = "The capital of France is Paris. <|im_end|>"
    with llamacpp.LlamaCpp() as child:
        ids = child.tokenize(smollm2_path, text, add_special=True, parse_special=True)
        assert child.load(smollm2_path, n_ctx=len(ids), n_threads=2) == 49152
        theirs = child.logits(ids)
    llm = open_llama(smollm2_path, n_ctx=len(ids), n_batch=len(ids), logits_all=True, n_threads=2,
                     n_threads_batch=2, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
        llm.eval(ids)
        mine = np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()
    assert theirs.shape == (len(ids), 49152) and theirs.dtype == np.float32
    assert np.array_equal(theirs, mine)
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts   # llama.cpp's default is kept


def test_models_load_without_extra_buffer_types(smollm2_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the oracle")
    llm = open_llama(smollm2_path, vocab_only=True, verbose=False)
    try:
        assert llm.model_params.use_extra_bufts is False
    finally:
        llm.close()


# The timeout bounds every request, the child's start included: 20 s leaves the requests
# before the hanging one time to answer on a loaded machine.
@pytest.mark.parametrize("kind, what", [
    ("segv", "llama.cpp crashed with SIGSEGV (signal 11) while evaluating logits"),
    ("hang", "llama.cpp did not answer within 20 s while evaluating logits (its process was stopped)"),
])
def test_verify_reports_a_crash_or_hang_as_a_row(kind, what, tinyllama_like, tmp_path, monkeypatch, capsys,
                                                 oracle_pids):
    monkeypatch.setenv(CRASH_ENV, kind)
    if kind == "hang":
        monkeypatch.setenv(llamacpp.TIMEOUT_ENV, "20")
    rc, stdout, err = cli(["verify", "-m", str(tinyllama_like), "-o", str(tmp_path), "-n", "1"], capsys)
    report = json.loads((tmp_path / "report.json").read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert rc == 0 and report["passed"], stdout            # an oracle's failure is not gguflm's
    assert status[KL_CHECK] == "error"
    assert {s for n, s in status.items() if n != KL_CHECK} == {"pass"}   # the tokenizer's came first
    assert [e["what"] for e in report["oracle_errors"]] == [what]
    assert f"ERROR: {what}: the checks against llama.cpp did not run" in stdout
    assert "1 NOT RUN" in stdout and "Traceback" not in err
    hint = "pip install --force-reinstall" if kind == "segv" else llamacpp.TIMEOUT_ENV
    assert hint in stdout and hint in report["oracle_errors"][0]["hint"]
    assert f"**⚠️ ERROR: {what}**" in (tmp_path / "report.md").read_text()


def test_verify_with_an_explicit_reference_fails_when_it_cannot_run(tinyllama_like, tmp_path, monkeypatch, capsys,
                                                                    oracle_pids):
    """A crash at the tokenizer: every later llama.cpp check is an error with the same cause,
    reported once; --reference llama.cpp asked for the comparison, so the exit status is 1."""
    monkeypatch.setenv(CRASH_ENV, "exit@tokenize")
    rc, stdout, _ = cli(["verify", "-m", str(tinyllama_like), "-o", str(tmp_path), "-n", "1",
                         "--reference", "llama.cpp"], capsys)
    report = json.loads((tmp_path / "report.json").read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert rc == 1 and report["passed"]
    assert status["prompt ids = llama.cpp's tokenizer"] == status[KL_CHECK] == "error"
    assert status["rendering = llama-cpp-python's Jinja2ChatFormatter"] == "pass"
    assert [e["what"] for e in report["oracle_errors"]] == ["llama.cpp's process exited with status 3 while tokenizing"]
    assert stdout.count("ERROR: ") == 1


@pytest.mark.parametrize("kind, what", [
    ("segv", "llama.cpp crashed with SIGSEGV (signal 11) while evaluating logits"),
    ("hang@load", "llama.cpp did not answer within 3 s while loading the model"),
])
def test_perplexity_compare_reports_a_crash_or_hang_in_one_line(kind, what, tinyllama_like, english_text, monkeypatch,
                                                                capsys, oracle_pids):
    monkeypatch.setenv(CRASH_ENV, kind)
    if kind.startswith("hang"):
        monkeypatch.setenv(llamacpp.TIMEOUT_ENV, "3")             # the first request hangs: nothing before it
    rc, stdout, err = cli(["perplexity", "-m", str(tinyllama_like), "-f", str(english_text), "-c", "128",
                           "--chunks", "1", "--compare", "llama.cpp", "--json"], capsys)
    assert rc == 1
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith(f"gguflm perplexity: error: {what}"), err
    assert "Traceback" not in err
    assert "Final estimate: PPL = " in stdout                                 # gguflm's own figure
    summary = json.loads(stdout.splitlines()[-1])
    assert summary["ppl"] > 1 and summary["compare"]["llama.cpp"]["error"].startswith(what)


def test_without_llama_cpp_python_one_line_names_the_install(tinyllama_like, english_text, tmp_path, monkeypatch,
                                                              capsys):
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    rc, stdout, _ = cli(["verify", "-m", str(tinyllama_like), "-o", str(tmp_path), "-n", "1"], capsys)
    report = json.loads((tmp_path / "report.json").read_text())
    assert rc == 0 and {c["status"] for c in report["checks"] if "llama.cpp" in c["name"] or "llama-cpp" in c["name"]} == {"skip"}
    notes = [line for line in stdout.splitlines() if line.startswith("NOTE: ")]
    assert len(notes) == 1 and "llama-cpp-python is not installed" in notes[0] and "pip install" in notes[0]
    for args in (["verify", "-m", str(tinyllama_like), "-o", str(tmp_path), "--reference", "llama.cpp"],
                 ["perplexity", "-m", str(tinyllama_like), "-f", str(english_text), "--compare", "llama.cpp"]):
        rc, _, err = cli(args, capsys)
        assert rc == 1 and len(err.strip().splitlines()) == 1 and "pip install" in err, err


def test_the_child_dies_with_its_parent(tmp_path):
    """A parent killed outright (SIGKILL: no finalizer runs) takes llama.cpp's process with it."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the oracle")
    code = ("import os, signal, sys\n"
            "from gguflm.verify.llamacpp import LlamaCpp\n"
            "o = LlamaCpp()\n"
            "o.version()\n"
            "print(o.pid, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert gone(int(r.stdout)), "llama.cpp's process outlived its parent"


def test_a_python_error_in_the_child_is_an_answer_not_a_crash(shared_dir, oracle_pids):
    """llama-cpp-python refusing a file raises in the caller; the child keeps serving."""
    vocab = shared_dir / "vocab" / "ggml-vocab-llama-spm.gguf"              # no tensors: not loadable
    with llamacpp.LlamaCpp() as child:
        with pytest.raises(llamacpp.OracleFailed, match="^llama.cpp failed while loading the model: "):
            child.load(vocab, n_ctx=16)
        ids = child.tokenize(vocab, "Hello", add_special=True)
    llm = open_llama(vocab, vocab_only=True, verbose=False)
    assert ids == llm.tokenize(b"Hello", add_bos=True) and len(ids) == 2
    llm.close()
