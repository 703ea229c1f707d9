"""`gguflm tokenize` end to end: ids and pieces against llama.cpp's tokenizer (through
the CLI's entry point in-process, and once as a real subprocess)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from gguflm.cli import main

TEXT = "Hello world! <|im_start|>user\n  déjà vu 12345 😀<|im_end|>"


@pytest.mark.parametrize("name", ["smollm2", "llama-spm"])
@pytest.mark.parametrize("flags", [(), ("--no-special",), ("--parse-special",)])
def test_json_matches_llama_cpp(name, flags, pair, capsys):
    p = pair(name)
    assert main(["tokenize", "-m", str(p.path), "--json", *flags, TEXT]) == 0
    doc = json.loads(capsys.readouterr().out)
    expect = p.llama.tokenize(TEXT, "--no-special" not in flags, "--parse-special" in flags)
    assert doc["ids"] == expect and doc["count"] == len(expect)
    assert doc["pieces"] == [p.llama.piece(t, True).decode("utf-8", "backslashreplace") for t in expect]
    assert doc["special"] == [p.llama.is_control(t) for t in expect]


def test_table_from_stdin(pair, capsys, monkeypatch):
    p = pair("llama-spm")
    monkeypatch.setattr(sys, "stdin", io.StringIO(TEXT))
    assert main(["tokenize", "-m", str(p.path)]) == 0
    rows = capsys.readouterr().out.splitlines()
    ids = [int(line.split()[1]) for line in rows[1:-1]]
    assert ids == p.llama.tokenize(TEXT, True, False)
    assert rows[-1] == f"{len(ids)} tokens"


def test_subprocess_default_model(smollm2_path, pair):
    r = subprocess.run([sys.executable, "-m", "gguflm", "tokenize", "--json", "Hi there"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ids"] == pair("smollm2").llama.tokenize("Hi there", True, False)


def test_bad_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    assert main(["tokenize", "-m", str(bad), "x"]) == 1
    err = capsys.readouterr()
    assert len(err.err.strip().splitlines()) == 1 and not err.out
