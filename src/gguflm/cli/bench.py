"""gguflm bench: prompt-processing and generation speed, measured as llama-bench does.

``pp``: ``-p`` tokens processed as one batch from an empty context (prefill).
``tg``: ``-n`` tokens generated one at a time from an empty context (the first at
position 0), each step's greedy token fed to the next. Every figure is the mean ± sample
standard deviation of ``-r`` timed repetitions after one untimed warm-up, in tokens per
second; the device is synchronized before each clock read.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from collections.abc import Callable

HELP = "measure prefill and decode speed (tokens/s), like llama-bench"
DESCRIPTION = __doc__


def add_arguments(p) -> None:
    p.add_argument("-m", "--model", help="GGUF file (default: the bundled SmolLM2)")
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens for pp (0: skip; default 512)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens for tg (0: skip; default 128)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt tokens")
    p.add_argument("--json", action="store_true",
                   help='print {"pp_tps", "tg_tps", "peak_mem_mb", ...} as the last line')


def _timed(fn: Callable[[], None], sync: Callable[[], None], reps: int) -> list[float]:
    """Seconds of ``reps`` runs of ``fn`` after one warm-up."""
    fn()
    sync()
    out = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def _rate(n: int, seconds: list[float]) -> tuple[float, float]:
    tps = [n / s for s in seconds]
    return statistics.fmean(tps), (statistics.stdev(tps) if len(tps) > 1 else 0.0)


def run(args) -> int:
    import torch

    import gguflm
    from gguflm.cli import UserError
    from gguflm.defaults import resolve_model

    if args.n_prompt < 0 or args.n_gen < 0 or args.repetitions < 1:
        raise UserError("-p and -n must be >= 0 and -r >= 1")
    if args.n_prompt == 0 and args.n_gen == 0:
        raise UserError("nothing to measure: -p and -n are both 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: expected cpu or cuda")
    path = resolve_model(args.model)
    n_ctx = max(args.n_prompt, args.n_gen, 1)
    model = gguflm.load(path, device=device, n_ctx=n_ctx, threads=args.threads).model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rng = random.Random(args.seed)
    n_vocab = model.config.n_vocab
    cache = model.new_cache(1, n_ctx)
    slots = torch.zeros(1, dtype=torch.long, device=device)
    result: dict[str, object] = {"model": str(path), "device": str(device), "n_prompt": args.n_prompt,
                                 "n_gen": args.n_gen, "repetitions": args.repetitions}
    rows = []

    if args.n_prompt:
        prompt = torch.tensor([[rng.randrange(n_vocab) for _ in range(args.n_prompt)]], device=device)
        positions = torch.arange(args.n_prompt, device=device)[None]

        def prefill() -> None:
            model.forward(prompt, positions, cache, slots, last_only=True)

        mean, sd = _rate(args.n_prompt, _timed(prefill, sync, args.repetitions))
        result.update(pp_tps=mean, pp_sd=sd)
        rows.append((f"pp{args.n_prompt}", mean, sd))

    if args.n_gen:
        first = rng.randrange(n_vocab)
        if hasattr(model, "decode_greedy"):  # the CUDA model: graph replays back to back

            def generate() -> None:
                model.decode_greedy(first, 0, args.n_gen, cache)
        else:

            def generate() -> None:
                tok = torch.tensor([[first]], device=device)
                for p in range(args.n_gen):
                    logits = model.forward(tok, torch.tensor([[p]], device=device), cache, slots, last_only=True)
                    tok = logits.argmax(-1, keepdim=True)

        mean, sd = _rate(args.n_gen, _timed(generate, sync, args.repetitions))
        result.update(tg_tps=mean, tg_sd=sd)
        rows.append((f"tg{args.n_gen}", mean, sd))

    if device.type == "cuda":
        peak = torch.cuda.max_memory_reserved(device) / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_mem_mb"] = peak
    size_mb = path.stat().st_size / 2**20
    print(f"| model | size | device | test | t/s |\n| --- | ---: | --- | --- | ---: |")
    for test, mean, sd in rows:
        print(f"| {path.name} | {size_mb:.1f} MiB | {device} | {test} | {mean:.2f} ± {sd:.2f} |")
    print(f"peak memory: {peak:.1f} MiB", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0
