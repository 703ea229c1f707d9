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

from gguflm.cli import options

HELP = "measure prefill and decode speed (tokens/s), like llama-bench"
DESCRIPTION = __doc__


def add_arguments(p) -> None:
    options.add_model(p)
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens for pp (0: skip; default 512)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens for tg (0: skip; default 128)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="timed repetitions (default 5)")
    options.add_device(p)
    options.add_threads(p)
    options.add_seed(p, "seed of the random prompt tokens (default: %(default)s)", default=0)
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


def _progress(test: str, reps: int) -> None:
    """One line on stderr while a test is measured (the table row follows when it is done)."""
    print(f"bench: measuring {test}: 1 warm-up + {reps} timed runs ...", file=sys.stderr, flush=True)


def _row(path, size_mb: float, device, test: str, mean: float, sd: float) -> None:
    print(f"| {path.name} | {size_mb:.1f} MiB | {device} | {test} | {mean:.2f} ± {sd:.2f} |", flush=True)


def run(args) -> int:
    import torch

    import gguflm
    from gguflm.cli import UserError
    from gguflm.defaults import resolve_model

    if args.n_prompt < 0 or args.n_gen < 0 or args.repetitions < 1:
        raise UserError("-p and -n must be >= 0 and -r >= 1")
    if args.n_prompt == 0 and args.n_gen == 0:
        raise UserError("nothing to measure: -p and -n are both 0")
    threads = options.check_threads(args)
    device = torch.device(options.device(args, "bench"))
    path = resolve_model(args.model)
    f = gguflm.GGUFFile(path)
    n_ctx = options.check_context(f, max(args.n_prompt, args.n_gen, 2), str(device), flag="-p/-n")
    size_mb = path.stat().st_size / 2**20
    print("| model | size | device | test | t/s |\n| --- | ---: | --- | --- | ---: |", flush=True)
    model = gguflm.load(f, device=device, n_ctx=n_ctx, threads=threads).model
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

        _progress(f"pp{args.n_prompt}", args.repetitions)
        mean, sd = _rate(args.n_prompt, _timed(prefill, sync, args.repetitions))
        result.update(pp_tps=mean, pp_sd=sd)
        rows.append((f"pp{args.n_prompt}", mean, sd))
        _row(path, size_mb, device, *rows[-1])

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

        _progress(f"tg{args.n_gen}", args.repetitions)
        mean, sd = _rate(args.n_gen, _timed(generate, sync, args.repetitions))
        result.update(tg_tps=mean, tg_sd=sd)
        rows.append((f"tg{args.n_gen}", mean, sd))
        _row(path, size_mb, device, *rows[-1])

    if device.type == "cuda":
        peak = torch.cuda.max_memory_reserved(device) / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_mem_mb"] = peak
    print(f"peak memory: {peak:.1f} MiB", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0
