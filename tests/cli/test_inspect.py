"""`gguflm inspect` end to end: output checked against the official gguf-py reader."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

gguf = pytest.importorskip("gguf")


def gguflm_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gguflm", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def test_inspect_json_matches_official_reader(smollm2_path):
    r = gguflm_cli("inspect", str(smollm2_path), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    ref = gguf.GGUFReader(str(smollm2_path))
    assert doc["tensor_count"] == len(ref.tensors)
    assert doc["parameters"] == sum(int(t.n_elements) for t in ref.tensors)
    want = Counter(t.tensor_type.name for t in ref.tensors)
    assert {k: v["tensors"] for k, v in doc["by_type"].items()} == dict(want)
    assert doc["metadata"]["tokenizer.ggml.tokens"]["length"] == len(ref.fields["tokenizer.ggml.tokens"].data)
    assert doc["tokenizer"]["model"] == ref.fields["tokenizer.ggml.model"].contents()
    assert doc["architecture"] == "llama"


def test_inspect_text(smollm2_path):
    r = gguflm_cli("inspect", str(smollm2_path))
    assert r.returncode == 0, r.stderr
    assert "token_embd.weight" in r.stdout and "by type:" in r.stdout


@pytest.mark.parametrize("content", [b"", b"hi\n", b"GGUF\x03\x00\x00\x00" + b"\xff" * 16])
def test_inspect_bad_file_one_line(tmp_path, content):
    p = tmp_path / "bad.gguf"
    p.write_bytes(content)
    r = gguflm_cli("inspect", str(p))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gguflm inspect: error:"), r.stderr
    assert "Traceback" not in r.stderr


def test_inspect_missing_file(tmp_path):
    r = gguflm_cli("inspect", str(tmp_path / "nope.gguf"))
    assert r.returncode == 1 and "no such file" in r.stderr.lower() and "Traceback" not in r.stderr
