"""Every architecture on the fused CUDA path, against the float64 reference, on the
synthetic models of tests/model/synth.py quantized by llama.cpp's own quantizer: qwen2
(QKV biases, NEOX RoPE), phi3 (fused QKV and gate+up as row ranges), qwen3 (q/k norms),
gemma3 (GeGLU, pre+post norms, q/k norms, sqrt(E) embedding scale, local layers with a
sliding window of 8 and their own RoPE base, soft-cap). Llama itself: test_model.py.

Each of the CUDA path's runners goes through the one decoder: the plain prefill (from
position 0 and continued), the padded many-row forward, the one-token decode step (the
graphs' step, eager here) and the server's batched step (its rows through the GEMM, and as
decode rows through the rows GEMV: ``GGUFLM_CUDA_DECODE_ROWS=gemv``). Without a GPU the Triton
kernels run in Triton's interpreter (few tokens; the window still slides: 12 > 8).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gguflm
from gguflm.errors import GGUFError
from gguflm.model.config import ModelConfig
from gguflm.model.cuda import load_cuda
from gguflm.verify.reference import reference_logits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from oracles import kl_rows  # noqa: E402
from synth import synthetic_f16  # noqa: E402

ON_GPU = torch.cuda.is_available()
N = 24 if ON_GPU else 12
CUT = N - 3                      # prefill CUT tokens, then one-token steps


def _check(name: str, what: str, ref: np.ndarray, got: torch.Tensor) -> None:
    got = got.double().cpu().numpy().reshape(ref.shape)
    kl = kl_rows(ref, got)
    print(f"\n{name} {what}: KL(ref || cuda path) mean {kl.mean():.1e} max {kl.max():.1e}")
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert kl.mean() <= 1e-4 and kl.max() < 1e-3   # float16 activations into the many-token matmuls


@pytest.mark.parametrize("name", ["qwen2", "phi3", "qwen3", "gemma3"])
def test_every_runner_of_the_fused_path_matches_reference(name, shared_dir, llama_quantize, device):
    path = llama_quantize(synthetic_f16(name, shared_dir / "vocab"), "Q4_K_M" if ON_GPU else "Q4_0")
    f = gguflm.GGUFFile(path)
    cfg = ModelConfig.from_gguf(f)
    m = load_cuda(f, cfg, 32, device, use_graphs=False)
    ids = np.random.default_rng(7).integers(0, cfg.n_vocab, N).tolist()
    ref = reference_logits(path, ids)
    dev = m.device
    _check(name, "prefill", ref, m.logits(ids))

    cache = m.new_cache(3)                                 # slot 2: continued prefill, then decode steps
    slot2 = torch.tensor([2], device=dev)
    m.forward(torch.tensor([ids[:4]], device=dev), torch.arange(4, device=dev)[None], cache, slot2)
    out = m.forward(torch.tensor([ids[4:CUT]], device=dev), torch.arange(4, CUT, device=dev)[None], cache, slot2)
    _check(name, "continued prefill", ref[4:CUT], out[0])
    g = m.graphs(cache, 2)
    steps = []
    for p in range(CUT, N):
        g.tok[0], g.pos[0] = ids[p], p
        g.step(0)
        steps.append(g.buf.logits_buf.clone())
    _check(name, "decode steps", ref[CUT:], torch.stack(steps))

    # slot 0: a padded two-row forward (row 1 in slot 1 is shorter), then a batched step of slots 0 and 1
    tokens = torch.tensor([ids[:CUT], ids[:4] + [0] * (CUT - 4)], device=dev)
    positions = torch.tensor([list(range(CUT)), list(range(4)) + [-1] * (CUT - 4)], device=dev)
    out = m.forward(tokens, positions, cache, torch.tensor([0, 1], device=dev), last_only=True)
    _check(name, "padded rows", ref[[CUT - 1, 3]], out)
    step = m.batched(cache, 2).step(torch.tensor([ids[CUT], ids[4]], device=dev), torch.tensor([CUT, 4], device=dev),
                                    torch.tensor([0, 1], device=dev))
    _check(name, "batched step", ref[[CUT, 4]], step)
    # the same rows as decode rows through the rows GEMV (GGUFLM_CUDA_DECODE_ROWS=gemv), then
    # slot 1's row alone in a one-row step: the same bits
    rows = m.batched(cache, 2, width=2, decode_width=2).step(
        torch.tensor([ids[CUT], ids[4]], device=dev), torch.tensor([CUT, 4], device=dev),
        torch.tensor([0, 1], device=dev))[:2].clone()
    _check(name, "decode rows (GEMV)", ref[[CUT, 4]], rows)
    one = m.batched(cache, 1, width=1, decode_width=1).step(
        torch.tensor([ids[4]], device=dev), torch.tensor([4], device=dev), torch.tensor([1], device=dev))[:1]
    assert torch.equal(one[0], rows[1])


def test_a_head_size_the_kernels_lack_is_refused_by_the_fused_path(shared_dir):
    """The fused path refuses a head size its kernels lack (never computes something else);
    load_model reads the same reason and runs such a model through the generic torch block
    on the GPU instead (the documented fallback; Phi-3-mini's head size is 96)."""
    from gguflm.model.cuda.forward import check_supported, cuda_unsupported

    cfg = ModelConfig.from_gguf(gguflm.GGUFFile(synthetic_f16("phi3", shared_dir / "vocab")))
    check_supported(cfg)
    assert cuda_unsupported(cfg) is None
    odd = dataclasses.replace(cfg, head_dim=96, n_rot=96)
    assert "head size 96" in cuda_unsupported(odd)
    with pytest.raises(GGUFError, match="head size 96: the Triton attention kernels need a power of two"):
        check_supported(odd)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_generate_runs_the_fused_path(name, shared_dir, llama_quantize):
    """``gguflm.load(..., device="cuda")`` gives the fused path (no float32 torch block);
    greedy generate() follows the reference's argmax at every step."""
    from gguflm.engine.sampling import SamplingParams
    from gguflm.model.cuda.model import CudaModel

    path = llama_quantize(synthetic_f16(name, shared_dir / "vocab"), "Q4_K_M")
    llm = gguflm.load(path, device="cuda", n_ctx=64)
    assert isinstance(llm.model, CudaModel)
    ids = np.random.default_rng(7).integers(0, llm.model.config.n_vocab, 16).tolist()
    s = llm.stream(ids, 12, SamplingParams(temperature=0), ignore_eos=True)
    list(s)
    got = s.result.tokens
    ref = reference_logits(path, ids + got[:-1])
    assert got == ref[len(ids) - 1:].argmax(-1).tolist()
