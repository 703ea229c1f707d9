"""gguflm bench: speed as users get it, through the generation loop, in llama-bench's terms.

``tg N``: N tokens generated greedily (end of generation ignored) from a one-token prompt,
through the same loop as ``generate()`` (sampling on the device, one id read per step).
``pp N``: a fresh random N-token prompt each repetition (admission -> first token); where
the model keeps captured graphs per prompt shape (CUDA), a ``cold`` row (shape never
seen) and a ``warm`` row (graph replay) are shown apart. ``-d D``: ``tg N`` after a
D-token prompt. ``cold start``: a fresh process, interpreter start -> first token (on
CUDA also with an empty Triton kernel cache). Figures are the mean ± sample standard
deviation of ``-r`` repetitions after a warm-up, in tokens/s (seconds for cold start).
"""

from __future__ import annotations

import json
import sys

from gguflm.cli import options

HELP = "measure prefill and decode speed through the generation loop (tokens/s), like llama-bench"
DESCRIPTION = __doc__


def add_arguments(p) -> None:
    options.add_model(p)
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens for pp (0: skip; default 512)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens for tg (0: skip; default 128)")
    p.add_argument("-d", "--n-depth", type=int, default=0, help="also tg N after a prompt of D tokens (default 0: no)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="timed repetitions (default 5)")
    options.add_device(p)
    options.add_threads(p)
    options.add_seed(p, "seed of the random prompt tokens (default: %(default)s)", default=0)
    p.add_argument("--no-cold-start", action="store_true", help="skip the fresh-process cold-start rows")
    p.add_argument("--ceiling", action="store_true",
                   help="CUDA: also the decode graph replayed back to back (no loop: not a user's path)")
    p.add_argument("--json", action="store_true",
                   help='print {"pp_tps", "tg_tps", "rows", "peak_mem_mb", ...} as the last line')


def run(args) -> int:
    import torch

    import gguflm
    from gguflm.cli import UserError
    from gguflm.models import resolve
    from gguflm.engine.bench import Bench, cold_start

    if args.n_prompt < 0 or args.n_gen < 0 or args.n_depth < 0 or args.repetitions < 1:
        raise UserError("-p, -n and -d must be >= 0 and -r >= 1")
    if args.n_prompt == 0 and args.n_gen == 0:
        raise UserError("nothing to measure: -p and -n are both 0")
    threads = options.check_threads(args)
    device = torch.device(options.device(args, "bench"))
    path = resolve(args.model)
    f = gguflm.GGUFFile(path)
    n_ctx = options.check_context(f, max(args.n_prompt + 1, args.n_gen + 1, args.n_depth + args.n_gen + 2),
                                  str(device), flag="-p/-n/-d")
    print(f"bench: {path.name} on {device}, -p {args.n_prompt} -n {args.n_gen} -d {args.n_depth} "
          f"-r {args.repetitions}", file=sys.stderr)
    size_mb = path.stat().st_size / 2**20
    print("| model | size | backend | threads | test | t/s | note |\n| --- | ---: | --- | ---: | --- | ---: | --- |",
          flush=True)
    llm = gguflm.load(f, device=device, n_ctx=n_ctx, threads=threads)
    n_threads = torch.get_num_threads() if device.type == "cpu" else "-"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bench = Bench(llm, args.repetitions, args.seed)
    rows = []

    def measured(what: str, make) -> None:
        print(f"bench: measuring {what}: 1 warm-up + {args.repetitions} timed runs ...", file=sys.stderr, flush=True)
        got = make()
        got = [r for r in (got if isinstance(got, list) else [got]) if r is not None]
        for r in got:
            value = f"{r.mean:.2f} ± {r.sd:.2f}" + (" s" if r.unit == "s" else "")
            print(f"| {path.name} | {size_mb:.1f} MiB | {device} | {n_threads} | {r.test} | {value} | {r.note} |",
                  flush=True)
        rows.extend(got)

    if args.n_prompt:
        measured(f"pp{args.n_prompt}", lambda: bench.pp(args.n_prompt))
    if args.n_gen:
        measured(f"tg{args.n_gen}", lambda: bench.tg(args.n_gen))
        if args.n_depth:
            measured(f"tg{args.n_gen} @ d{args.n_depth}", lambda: bench.depth(args.n_gen, args.n_depth))
        if args.ceiling:
            measured("ceiling", lambda: bench.ceiling(args.n_gen))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_reserved(device) / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if not args.no_cold_start:
        measured("cold start", lambda: cold_start(str(path), str(device)))
        if device.type == "cuda":
            measured("cold start, empty kernel cache",
                     lambda: cold_start(str(path), str(device), empty_kernel_cache=True))

    print(f"peak memory: {peak:.1f} MiB", file=sys.stderr)
    if args.json:
        result: dict[str, object] = {"model": str(path), "device": str(device), "n_prompt": args.n_prompt,
                                     "n_gen": args.n_gen, "n_depth": args.n_depth, "repetitions": args.repetitions,
                                     "path": "generate", "peak_mem_mb": peak, "rows": [r.to_dict() for r in rows]}
        for r in rows:  # the figures the benchmark scripts read
            key = {f"pp{args.n_prompt}": "pp", f"tg{args.n_gen}": "tg",
                   f"tg{args.n_gen} @ d{args.n_depth}": "tg_depth"}.get(r.test)
            if r.note.startswith("first"):
                key = "pp_first"
            elif r.note.startswith("ceiling"):
                key = "tg_ceiling"
            elif r.unit == "s":
                key = "cold_start_empty_cache" if "empty" in r.test else "cold_start"
            if key is not None:
                suffix = "_s" if r.unit == "s" else "_tps"
                result[key + suffix], result[key + "_sd"] = r.mean, r.sd
        print(json.dumps(result))
    return 0
