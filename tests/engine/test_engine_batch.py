"""Batched forward over the slotted KV cache, against the float64 reference.

Three chat prompts of different lengths are prefilled in ONE right-padded batch into
slots (2, 0, 1) of a 3-slot cache, then decoded together, greedily, one token per row per
step, each row at its own position. Afterwards slot 2 — still holding the longest
sequence — is reused for a shorter prompt, prefilled in two chunks (as the server's
scheduler does). Every logit row must match the reference for that row's own sequence.
"""

from __future__ import annotations

import numpy as np
import torch
from oracles import PROMPTS, kl_rows

from gguflm.verify.reference import reference_logits

STEPS = 6


def chat_ids(model, question: str) -> list[int]:
    return model.encode_prompt(model.chat_template.render([{"role": "user", "content": question}]))


def check(ref: np.ndarray, ours: list[torch.Tensor]) -> None:
    ours_np = torch.stack(ours).numpy()
    kl = kl_rows(ref, ours_np)
    assert kl.max() < 1e-4, kl
    assert (ref.argmax(-1) == ours_np.argmax(-1)).all()


def test_ragged_batch_and_slot_reuse_match_reference(smollm2_model, smollm2_path, weight_source):
    model = smollm2_model.model
    prompts = sorted((chat_ids(smollm2_model, q) for q in PROMPTS[:3]), key=len, reverse=True)
    assert len({len(p) for p in prompts}) == 3  # ragged: three different lengths
    cache = model.new_cache(3, n_ctx=128)
    slots = torch.tensor([2, 0, 1])
    lengths = [len(p) for p in prompts]
    T = max(lengths)
    tokens = torch.zeros(3, T, dtype=torch.long)
    positions = torch.full((3, T), -1, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p)
        positions[b, :len(p)] = torch.arange(len(p))
    logits = model.forward(tokens, positions, cache, slots, last_only=True)         # [3, V]
    seqs = [list(p) for p in prompts]
    rows: list[list[torch.Tensor]] = [[logits[b]] for b in range(3)]
    for _ in range(STEPS):
        nxt = [int(rows[b][-1].argmax()) for b in range(3)]
        pos = torch.tensor([[len(s)] for s in seqs])
        logits = model.forward(torch.tensor(nxt)[:, None], pos, cache, slots, last_only=True)
        for b in range(3):
            seqs[b].append(nxt[b])
            rows[b].append(logits[b])
    weights = weight_source(smollm2_path)
    for b in range(3):
        ref = reference_logits(smollm2_path, seqs[b], weights=weights)
        check(ref[lengths[b] - 1:], rows[b])

    # slot 2 held the longest sequence; a shorter one reuses it, prefilled in two chunks
    short = chat_ids(smollm2_model, "Hi!")
    assert len(short) < lengths[0]
    cut = len(short) // 2
    slot = torch.tensor([2])
    model.forward(torch.tensor([short[:cut]]), torch.arange(cut)[None], cache, slot)
    out = [model.forward(torch.tensor([short[cut:]]), torch.arange(cut, len(short))[None], cache, slot)[0]]
    seq = list(short)
    for _ in range(STEPS):
        tok = int(out[-1][-1].argmax())
        out.append(model.forward(torch.tensor([[tok]]), torch.tensor([[len(seq)]]), cache, slot)[0])
        seq.append(tok)
    ours = list(out[0]) + [o[-1] for o in out[1:]]
    check(reference_logits(smollm2_path, seq, weights=weights)[cut:], ours)
