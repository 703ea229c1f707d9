"""Architectures other than Llama on the CUDA path, against the float64 reference, on the
synthetic models of tests/model/synth.py quantized by llama.cpp's own quantizer.

* qwen2 (QKV biases, NEOX RoPE) and phi3 (fused QKV and gate+up, resolved as row ranges)
  are Llama's block with other data: the fused CUDA path runs them (here through Triton's
  interpreter when there is no GPU).
* qwen3 and gemma3 need ops the fused CUDA path lacks (q/k norms; GeGLU, post norms, the
  sliding window): ``gguflm.load(..., device="cuda")`` runs the generic torch block on the
  GPU instead (KL <= 1e-4 vs the reference; needs a GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gguflm
from gguflm.model.config import ModelConfig
from gguflm.model.cuda import load_cuda
from gguflm.verify.reference import reference_logits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from oracles import kl_rows  # noqa: E402
from synth import synthetic_f16  # noqa: E402

N = 6


def _ids(path) -> list[int]:
    n_vocab = gguflm.GGUFFile(path).tensors["token_embd.weight"].shape[1]
    return np.random.default_rng(7).integers(0, n_vocab, N).tolist()


@pytest.mark.parametrize("name", ["qwen2", "phi3"])
def test_fused_cuda_path_runs_llama_like_archs(name, shared_dir, llama_quantize, device):
    path = llama_quantize(synthetic_f16(name, shared_dir / "vocab"), "Q4_0")
    f = gguflm.GGUFFile(path)
    cfg = ModelConfig.from_gguf(f)
    assert cfg.spec.llama_like
    m = load_cuda(f, cfg, 16, device, use_graphs=False)
    ids = _ids(path)
    ref = reference_logits(path, ids)
    got = m.logits(ids).double().cpu().numpy()
    kl = kl_rows(ref, got)
    print(f"\n{name} Q4_0 on {device}: KL(ref || cuda path) mean {kl.mean():.1e} max {kl.max():.1e}")
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert kl.max() < 1e-3   # float16 activations into the many-token matmuls
    cache = m.new_cache(1)
    slots = torch.zeros(1, dtype=torch.long, device=m.device)
    m.forward(torch.tensor([ids[:-1]], device=m.device), torch.arange(N - 1, device=m.device)[None], cache, slots)
    step = m.forward(torch.tensor([[ids[-1]]], device=m.device), torch.tensor([[N - 1]], device=m.device), cache,
                     slots, last_only=True)[0].double().cpu().numpy()
    assert kl_rows(ref[-1:], step[None])[0] < 1e-3


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_generic_path_is_chosen_for_other_blocks(name, shared_dir):
    cfg = ModelConfig.from_gguf(gguflm.GGUFFile(synthetic_f16(name, shared_dir / "vocab")))
    assert not cfg.spec.llama_like


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_generic_cuda_path_matches_reference(name, shared_dir, llama_quantize):
    path = llama_quantize(synthetic_f16(name, shared_dir / "vocab"), "Q4_K_M")
    m = gguflm.load(path, device="cuda", n_ctx=64)
    ids = np.random.default_rng(7).integers(0, m.config.n_vocab, 24).tolist()
    kl = kl_rows(reference_logits(path, ids), m.logits(ids).double().cpu().numpy())
    print(f"\n{name} Q4_K_M generic CUDA path: KL mean {kl.mean():.1e} max {kl.max():.1e}")
    assert kl.mean() <= 1e-4
