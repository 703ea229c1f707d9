"""`gguflm verify` end to end: SmolLM2 Q4_1 (every section, numbers, exit 0), a synthetic
TinyLlama-shaped model, and engines broken on purpose (non-zero exit, the failing
components named). The oracles are llama.cpp (tokenizer, libggml, logits) and the float64
reference; the expected values below are their outputs, read from the report."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

import gguflm
from gguflm.cli import main


def run_verify(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["verify", *args])
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def smollm2_report(smollm2_path, tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the oracle")
    out = tmp_path_factory.mktemp("verify-smollm2")
    rc, stdout = run_verify(["-m", str(smollm2_path), "-o", str(out), "-n", "4"])
    return rc, stdout, out, json.loads((out / "report.json").read_text())


def test_smollm2_passes_with_every_section(smollm2_report):
    rc, stdout, out, report = smollm2_report
    assert rc == 0, stdout
    assert report["passed"] and "PASSED" in stdout
    assert all(c["status"] == "pass" for c in report["checks"]), [c for c in report["checks"] if c["status"] != "pass"]
    md = (out / "report.md").read_text()
    for heading in ("## Summary", "## 1. Quantization", "## 2. Tokenizer and chat template", "## 3. Components",
                    "## 4. Logits", "## 5. Token investigation", "## Timings"):
        assert heading in md
    for name in ("component_errors.png", "logit_scatter.png", "logit_lens.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 400_000
        assert f"]({name})" in md
    assert {c["section"] for c in report["checks"]} == {"quantization", "chat_template", "tokenizer",
                                                        "components", "logits"}


def test_smollm2_quantization_is_bit_exact_for_every_tensor(smollm2_report, smollm2_path):
    report = smollm2_report[3]
    counts: dict[str, int] = {}
    for info in gguflm.GGUFFile(smollm2_path).tensors.values():
        counts[info.ggml_type.name] = counts.get(info.ggml_type.name, 0) + 1
    types = report["quantization"]["types"]
    assert {t: s["tensors"] for t, s in types.items()} == counts
    assert all(s["bit_exact"] == s["compared"] == s["tensors"] for s in types.values())


def test_smollm2_tokenizer_and_logits_numbers(smollm2_report, smollm2_path):
    report = smollm2_report[3]
    tok = report["tokenizer"]
    assert tok["ids"] == tok["llama_cpp_ids"] and len(tok["ids"]) > 10
    assert report["chat_template"]["llama_cpp_python_render_equal"]
    comps = report["components"]
    assert comps["layers"] == [0, 15, 29] and len(comps["results"]) == 3 * 17 + 3
    lg = report["logits"]
    assert lg["ours_vs_reference"]["kl_mean"] < 1e-8
    assert lg["ours_vs_reference"]["max_abs_dlogit"] < 1e-3
    assert lg["ours_vs_reference"]["top1_agreement"] == 1.0
    # llama.cpp's 8-bit activations: a small, non-zero distance, the same seen from the reference
    assert 1e-4 < lg["ours_vs_llama_cpp"]["kl_mean"] < 2e-2
    assert lg["llama_cpp_vs_reference"]["kl_mean"] == pytest.approx(lg["ours_vs_llama_cpp"]["kl_mean"], rel=0.05)
    first = lg["first_reply_token"]
    assert first["ours"]["id"] == first["reference"]["id"] == first["llama_cpp"]["id"]
    print(f"\nfirst reply token: {first['ours']['id']} = {first['ours']['piece']!r}; KL vs llama.cpp "
          f"{lg['ours_vs_llama_cpp']['kl_mean']:.2e}; timings {report['timings_s']}")


def test_smollm2_token_investigation(smollm2_report):
    ti = smollm2_report[3]["token_investigation"]
    probs = [r["prob"] for r in ti["top_k"]]
    assert probs == sorted(probs, reverse=True) and ti["token"] == ti["top_k"][0]["token"] and ti["rank"] == 1
    assert len(ti["lens"]) == 30 + 1 and ti["lens"][0]["layer"] == -1
    last = ti["lens"][-1]  # the lens after the last block is the model's own prediction
    assert last["rank"] == 1 and last["prob"] == pytest.approx(ti["prob"], rel=1e-4)
    for r in ti["top_k"]:
        assert r["prob_reference"] == pytest.approx(r["prob"], rel=1e-4)


def test_tinyllama_like_model_passes(tinyllama_like, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the oracle")
    eos = gguflm.GGUFFile(tinyllama_like).metadata["tokenizer.ggml.eos_token_id"]
    rc, stdout = run_verify(["-m", str(tinyllama_like), "-o", str(tmp_path), "-n", "3", "--explain-token", str(eos)])
    report = json.loads((tmp_path / "report.json").read_text())
    assert rc == 0, stdout
    ti = report["token_investigation"]
    assert ti["token"] == eos and eos in [w["token"] for w in ti["watch"]]
    assert ti["lens"][-1]["rank"] == ti["rank"] and len(ti["lens"]) == 3 + 1
    assert set(report["quantization"]["types"]) == {"F32", "F16", "Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q4_1"}
    assert report["model"]["n_head"] // report["model"]["n_head_kv"] == 8 and not report["model"]["tied_output"]
    assert report["tokenizer"]["ids"][0] == 1  # SPM adds BOS
    assert all(c["status"] == "pass" for c in report["checks"]), stdout


def _gelu_ffn(self, layer):  # the wrong activation in every FFN
    n = layer.ffn_norm(self.x)
    return torch.nn.functional.gelu(layer.w_gate(n)) * layer.w_up(n)


def _shifted_rope(original):
    def forward(self, x, positions, *args):  # rotates by position p + 1: relative angles unchanged
        return original(self, x, positions + 1, *args)
    return forward


def _nudged(original):
    def forward(self, *args, **kwargs):  # a block output 1e-4 off: below what logits show
        return original(self, *args, **kwargs) * (1 + 1e-4)
    return forward


# fault -> (components that must fail, whether the logits check must fail too)
FAULTS = {
    "ffn_gelu": ({"swiglu", "ffn", "block"}, True),
    "rope_shift": ({"rope_q", "rope_k"}, False),   # relative angles kept: only components see it
    "fused_block_nudged": ({"block"}, False),      # the fused kernel's output, its twin intact
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_broken_engine_fails_where_it_is_broken(fault, tinyllama_like, tmp_path, monkeypatch):
    from gguflm.model import layers

    if fault == "ffn_gelu":
        monkeypatch.setenv("GGUFLM_CPU_KERNELS", "0")  # the plain-torch blocks
        monkeypatch.setattr(layers.TorchOps, "norm_gated", _gelu_ffn)
    elif fault == "rope_shift":
        monkeypatch.setenv("GGUFLM_CPU_KERNELS", "0")
        monkeypatch.setattr(layers.Rope, "forward", _shifted_rope(layers.Rope.forward))
    else:
        block_type = type(gguflm.load(tinyllama_like, n_ctx=8).model.transformer.blocks[0])
        if block_type is layers.Block:
            pytest.skip("the engine runs no fused block here")
        monkeypatch.setattr(block_type, "forward", _nudged(block_type.forward))
    rc, stdout = run_verify(["-m", str(tinyllama_like), "-o", str(tmp_path), "-n", "1", "--reference", "none"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert rc == 1 and "FAILED" in stdout and not report["passed"]
    expected, logits_fail = FAULTS[fault]
    assert {r["component"] for r in report["components"]["results"] if not r["passed"]} == expected
    by_name = {c["name"]: c["status"] for c in report["checks"]}
    assert by_name["every component within its threshold"] == "fail"
    assert (by_name["ours vs float64 reference: mean KL"] == "fail") == logits_fail
    assert by_name["ours vs llama.cpp: mean KL"] == "skip"


def test_user_errors_are_one_line(tinyllama_like, tmp_path, capsys):
    assert main(["verify", "-m", str(tinyllama_like), "-o", str(tmp_path), "-n", "0"]) == 1
    assert "--n-predict" in capsys.readouterr().err
    assert main(["verify", "-m", str(tmp_path / "missing.gguf"), "-o", str(tmp_path)]) == 1
    assert "missing.gguf" in capsys.readouterr().err


@pytest.mark.slow
def test_k_quant_requantization_passes(requantized, tmp_path):
    """SmolLM2 requantized to Q4_K_M by llama.cpp's own quantizer (K-quants and Q5_0)."""
    path: Path = requantized("Q4_K_M")
    rc, stdout = run_verify(["-m", str(path), "-o", str(tmp_path), "-n", "1"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert rc == 0, stdout
    assert {"Q4_K", "Q6_K"} <= set(report["quantization"]["types"])
    print("\n" + stdout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU exists")
def test_device_cuda_without_a_gpu_is_one_line(tinyllama_like, tmp_path, capsys):
    for cmd in (["verify", "-o", str(tmp_path)], ["perplexity", "-f", str(tmp_path / "t.txt")]):
        assert main([cmd[0], "-m", str(tinyllama_like), *cmd[1:], "--device", "cuda"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no CUDA device" in err, err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU: --device cuda runs the CUDA path")
def test_verify_and_perplexity_on_cuda(tinyllama_like, tmp_path, capsys):
    """The same report on the CUDA path: logits vs the float64 reference within the CUDA
    thresholds; components skipped with a reason. (The first reply token is not asserted:
    this model's weights are random, its top logits nearly tied, and float16 activations
    may pick the runner-up; on an H200 it did.)"""
    run_verify(["-m", str(tinyllama_like), "-o", str(tmp_path), "-n", "4", "--device", "cuda", "--reference", "none"])
    report = json.loads((tmp_path / "report.json").read_text())
    by_name = {c["name"]: c for c in report["checks"]}
    for name in ("ours vs float64 reference: mean KL", "ours (decode steps) vs float64 reference: mean KL",
                 "ours vs float64 reference: max |Δlogit|", "ours (decode steps) vs float64 reference: max |Δlogit|"):
        assert by_name[name]["status"] == "pass", by_name[name]
    assert by_name["every component within its threshold"]["status"] == "skip"
    assert report["environment"]["device"] == "cuda" and report["token_investigation"]["lens"] == []
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert main(["perplexity", "-m", str(tinyllama_like), "-f", str(text), "-c", "64", "--device", "cuda",
                 "--compare", "float64", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["device"] == "cuda"
