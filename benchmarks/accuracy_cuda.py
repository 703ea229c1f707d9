"""Accuracy of the CUDA path against the float64 reference forward pass
(``gguflm.verify.reference``): top-1 agreement and KL(reference || ours) per position, for
the many-token path (``Model.logits``: prefill with float16 activations) and the
one-token path (the CUDA-graph decode step, fed the same tokens one by one).

    python benchmarks/accuracy_cuda.py FILE.gguf [FILE.gguf ...] [--tokens 128] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

import gguflm
from gguflm.model import load_model
from gguflm.verify.reference import reference_logits

TEXT = ("The history of the printing press begins in the fifteenth century, when movable metal type "
        "made it possible to produce books far faster than scribes could copy them. Within decades, "
        "printers across Europe were publishing bibles, grammars, almanacs and pamphlets, and the "
        "price of a book fell sharply. Historians still debate how quickly literacy spread as a "
        "result, but few doubt that the new technology changed how ideas travelled. Scholars could "
        "compare identical copies of a text, errors could be corrected in later editions, and "
        "readers far from the great universities gained access to works that had once been rare. "
        "In the centuries that followed, newspapers, scientific journals and cheap novels all grew "
        "out of the same basic invention.")


def metrics(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    ours = ours.astype(np.float64)
    lp = ref - ref.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = ours - ours.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"top1": float((ours.argmax(-1) == ref.argmax(-1)).mean()), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--json")
    p.add_argument("--device", default="cuda", help="cuda (cpu runs the kernels in Triton's interpreter)")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    rows = []
    for path in a.models:
        if dev.type == "cuda":
            m = load_model(path, device=dev, n_ctx=a.tokens + 8)
        else:
            from gguflm.model.config import ModelConfig
            from gguflm.model.cuda import load_cuda

            f = gguflm.GGUFFile(path)
            m = load_cuda(f, ModelConfig.from_gguf(f), a.tokens + 8, dev)
        ids = gguflm.Tokenizer.from_gguf(m.file).encode(TEXT, add_special=True)[:a.tokens]
        t0 = time.perf_counter()
        ref = reference_logits(m.file, ids)
        t_ref = time.perf_counter() - t0
        prefill = m.logits(ids).numpy()
        cache = m.new_cache(1)
        slots = torch.zeros(1, dtype=torch.long, device=dev)
        steps = []
        for pos, tok in enumerate(ids):
            out = m.forward(torch.tensor([[tok]], device=dev), torch.tensor([[pos]], device=dev), cache, slots,
                            last_only=True)
            steps.append(out[0].float().cpu().numpy())
        row = {"model": str(path), "tokens": len(ids), "fallback": m.weights.fallback,
               "prefill": metrics(prefill, ref), "decode": metrics(np.stack(steps), ref), "ref_seconds": t_ref}
        rows.append(row)
        print(f"{path}: prefill top1 {row['prefill']['top1']:.4f} KL {row['prefill']['kl_mean']:.2e} "
              f"(max {row['prefill']['kl_max']:.2e}) | decode top1 {row['decode']['top1']:.4f} "
              f"KL {row['decode']['kl_mean']:.2e} (max {row['decode']['kl_max']:.2e})", flush=True)
        del m
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
