"""Multi-row decode steps (the server's continuous batching) against the float64 reference.

B sequences of different lengths are prefilled into their own slots of one cache, then
decoded together, one token per row per step, each row at its own position: on the CPU
these steps multiply all B rows with each weight row decoded once (the panel kernels of
gguflm.quant.cpu, register tiles of at most 6 rows: B = 16 runs tiles of 6, 5, 5 rows and
B = 7 of 4 and 3). Every row's logits must match the reference's for that row's own
sequence as closely as the single-row decode path does (mean KL ~1e-11, see
docs/cpu-kernels.md): within 1e-8, with the same top token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import kl_rows

from gguflm.verify.reference import reference_logits

STEPS = 2


@pytest.mark.parametrize("B", [7, 16])
def test_batched_decode_matches_reference(B, smollm2_model, smollm2_path, weight_source):
    model = smollm2_model.model
    g = torch.Generator().manual_seed(B)
    lengths = (torch.randperm(B, generator=g) % 12 + 1).tolist()               # 1..12 tokens each
    seqs = [torch.randint(0, model.config.n_vocab, (n,), generator=g).tolist() for n in lengths]
    cache = model.new_cache(B, n_ctx=32)
    slots = torch.randperm(B, generator=g)                                     # rows in shuffled slots
    for b, seq in enumerate(seqs):                                             # prefill each slot
        model.forward(torch.tensor([seq]), torch.arange(len(seq))[None], cache, slots[b:b + 1])
    ours: list[list[np.ndarray]] = [[] for _ in range(B)]
    for _ in range(STEPS):
        nxt = torch.randint(0, model.config.n_vocab, (B, 1), generator=g)
        pos = torch.tensor([[len(s)] for s in seqs])
        logits = model.forward(nxt, pos, cache, slots, last_only=True)         # [B, V], one forward
        for b in range(B):
            seqs[b].append(int(nxt[b]))
            ours[b].append(logits[b].numpy())
    weights = weight_source(smollm2_path)
    kl, agree = [], []
    for b in range(B):
        ref = reference_logits(smollm2_path, seqs[b], weights=weights)[-STEPS:]
        got = np.stack(ours[b])
        kl.extend(kl_rows(ref, got))
        agree.extend(ref.argmax(-1) == got.argmax(-1))
    print(f"\nB={B}: {B * STEPS} rows, KL(reference || ours) mean {np.mean(kl):.1e}, max {np.max(kl):.1e}")
    assert max(kl) < 1e-8
    assert all(agree)
