"""The CPU engine with the fused kernels, end to end.

* Its decode path (one token per step: FusedBlock, fused GEMVs, quantized tied output)
  against the float64 reference (gguflm.verify.reference, itself shown to agree with
  llama.cpp on an F16 file by tests/model): mean KL < 1e-4 — the engine's accuracy bar.
* The weights really stay in the file: every linear layer, the output projection and the
  embedding table are views of the GGUF mapping, no float copy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gguflm
from gguflm.quant.cpu import QuantEmbedding, QuantLinear
from gguflm.kernels.cpu.block import FusedBlock
from gguflm.verify.reference import reference_logits

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of"


def kl_mean(p: np.ndarray, q: np.ndarray) -> float:
    lp = torch.log_softmax(torch.from_numpy(p).double(), -1)
    lq = torch.log_softmax(torch.from_numpy(q).double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("quant", ["Q4_1", "Q4_K_M"])
def test_decode_path_matches_reference(quant, cpu_kernels, smollm2_path, requantized):
    path = smollm2_path if quant == "Q4_1" else requantized(quant)
    llm = gguflm.load(path, n_ctx=64)
    model = llm.model
    ids = llm.tokenizer.encode(PROMPT, add_special=True, parse_special=True)[:24]
    cache, slots = model.new_cache(1), torch.tensor([0])
    ours = np.stack([model.forward(torch.tensor([[t]]), torch.tensor([[p]]), cache, slots, last_only=True)[0].numpy()
                     for p, t in enumerate(ids)])                               # [T, n_vocab], one step each
    ref = np.asarray(reference_logits(path, ids))
    kl = kl_mean(ref, ours)
    print(f"\n{quant} decode path, {len(ids)} steps: mean KL(reference || ours) {kl:.2e}")
    assert kl < 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_weights_stay_in_the_file(cpu_kernels, smollm2_path):
    model = gguflm.load(smollm2_path, n_ctx=32).model
    f = model.file
    in_file = {int(f.tensor_data(name).ctypes.data) for name in f.tensors}
    tr = model.transformer
    linears = [m for m in tr.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 7 * model.config.n_layer + 1                      # + the tied output
    assert all(isinstance(b, FusedBlock) for b in tr.blocks)
    assert isinstance(tr.embedding, QuantEmbedding) and tr.embedding.weight is tr.output.weight
    assert all(lin.weight.raw.data_ptr() in in_file for lin in linears)
    floats = sum(p.numel() for p in tr.parameters())                          # norms (and nothing else)
    assert floats == (2 * model.config.n_layer + 1) * model.config.n_embd
