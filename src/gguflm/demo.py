"""`python -m gguflm.demo` (what `make demo` runs): a real generation with the default model.

Loads SmolLM2-135M-Instruct (fetched into the model cache on first use, 98 MB), asks it
two questions through its chat template and streams the answers: the first greedily
(temperature 0, reproducible), the second sampled at temperature 0.8 with a fixed seed.
Says what it runs as it goes, and what to try next.
"""

from __future__ import annotations

import sys
import time

import gguflm
from gguflm.models import ModelError, resolve

# Prompts the 135M model answers well (its greedy answers: "The capital of France is Paris.";
# "The sea is a vast and mysterious realm, ..."); it is tiny, and wrong on many others.
RUNS = (
    ("What is the capital of France?", dict(temperature=0.0), 64),
    ("Write one sentence about the sea.", dict(temperature=0.8, seed=42), 64),
)
NEXT = """\
next: gguflm chat                       talk to it (/reset, /exit)
      gguflm run -m gemma3-270m --raw -p "Once upon a time"
                                        a base model to continue text (253 MB, fetched once)
      gguflm serve                      OpenAI-compatible API and a chat page on :8080
      gguflm verify                     every step checked against a float64 reference
                                        (and llama.cpp, once `make test` installed it)"""


def main() -> int:
    try:
        path = resolve(None)  # smollm2-135m (or $GGUFLM_MODEL), fetched on first use
    except ModelError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    print(f"Loading {path.name} ...")
    t0 = time.perf_counter()
    model = gguflm.load(path)
    c = model.config
    print(f"  {c.arch}: {c.n_layer} layers, {c.n_embd} wide, {c.n_head}/{c.n_head_kv} heads, "
          f"vocab {c.n_vocab}; loaded in {time.perf_counter() - t0:.1f} s\n")
    for question, sampling, n in RUNS:
        settings = ", ".join(f"{k}={v}" for k, v in sampling.items())
        print(f"user> {question}    [chat template; {settings}; at most {n} tokens]")
        stream = model.chat([{"role": "user", "content": question}], max_tokens=n, **sampling)
        print("assistant> ", end="", flush=True)
        for piece in stream:
            print(piece, end="", flush=True)
        r = stream.result
        speed = r.n_generated / r.decode_seconds if r.decode_seconds else float("nan")
        print(f"\n  ({r.n_prompt} prompt tokens, {r.n_generated} generated at {speed:.1f} tok/s, "
              f"finish: {r.finish_reason})\n")
    print(NEXT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
