"""``gguflm bench``: the measurement runs end to end and its --json line carries the
fields the benchmark scripts read (speeds themselves are not asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from gguflm.cli import main


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_bench_json(tiny_model, capsys, device):
    rc = main(["bench", "-m", str(tiny_model("Q4_0")), "--device", device, "-p", "8", "-n", "4", "-r", "2", "--json"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["pp_tps"] > 0 and result["tg_tps"] > 0 and result["peak_mem_mb"] > 0
    assert any("pp8" in line for line in out) and any("tg4" in line for line in out)


def test_bench_rejects_nothing_to_measure(tiny_model, capsys):
    assert main(["bench", "-m", str(tiny_model("Q4_0")), "-p", "0", "-n", "0"]) == 1
    assert "nothing to measure" in capsys.readouterr().err
