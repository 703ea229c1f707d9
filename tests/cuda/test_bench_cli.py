"""``gguflm bench``: the measurement runs end to end and its --json line carries the
fields the benchmark scripts read (speeds themselves are not asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from gguflm.cli import main


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_bench_json(tiny_model, capsys, device):
    rc = main(["bench", "-m", str(tiny_model("Q4_0")), "--device", device, "-p", "8", "-n", "4", "-d", "6", "-r", "2",
               "--no-cold-start", "--json"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["pp_tps"] > 0 and result["tg_tps"] > 0 and result["tg_depth_tps"] > 0 and result["peak_mem_mb"] > 0
    assert result["path"] == "generate"
    assert any("pp8" in line for line in out) and any("| tg4 |" in line for line in out)
    assert any("tg4 @ d6" in line for line in out)
    if device == "cuda":  # graphs per prompt length: fresh prompts and a length's first prompt apart
        assert result["pp_first_tps"] > 0 and any("first prompt of its length" in line for line in out)


def test_bench_counts_generated_tokens_through_the_loop(tiny_model, monkeypatch):
    """tg N is N tokens out of the generation loop (end of generation ignored)."""
    import gguflm
    from gguflm.engine.bench import Bench

    llm = gguflm.load(tiny_model("Q4_0"), n_ctx=16)
    seen = []
    stream = llm.stream

    def spy(*a, **k):
        s = stream(*a, **k)
        seen.append(s)
        return s

    monkeypatch.setattr(llm, "stream", spy)
    row = Bench(llm, reps=2).tg(5)
    assert len(row.values) == 2 and all(s.result.n_generated == 5 for s in seen)
    assert all(s.job.ignore_eos and s.job.params.greedy for s in seen)


def test_bench_rejects_nothing_to_measure(tiny_model, capsys):
    assert main(["bench", "-m", str(tiny_model("Q4_0")), "-p", "0", "-n", "0"]) == 1
    assert "nothing to measure" in capsys.readouterr().err
