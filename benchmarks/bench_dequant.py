"""Dequantize every tensor of a GGUF file with gguflm (torch) and with gguf-py's numpy
``gguf.quants.dequantize``, in one run, and report the times and their ratio.

    python benchmarks/bench_dequant.py [-m FILE.gguf] [--repeat 7] [--threads N [N ...]]

Both sides get the same zero-copy tensor views, whose pages are touched before timing.
The two are timed alternately, ``--repeat`` times each, once per torch thread count
asked for (gguf-py's numpy code is single-threaded either way); the best (minimum) wall
time of each side is the figure reported (the least disturbed run on a shared machine),
the median and the CPU time are kept too. Writes benchmarks/results/<date>-cpu-dequant.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import gguflm
from gguflm.models import resolve
from gguflm.quant import dequantize
from machine import cpu_model  # benchmarks/machine.py (this script's folder)

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--repeat", type=int, default=7, help="timed runs of each side (default 7)")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch thread counts to measure (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result")
    args = ap.parse_args()

    import gguf  # gguf-py, the baseline (in the dev extra)

    path = resolve(args.model)
    f = gguflm.GGUFFile(path)
    items = [(info, f.tensor_data(name)) for name, info in f.tensors.items()]
    n_elements = sum(int(np.prod(info.shape)) for info, _ in items)
    for _, raw in items:  # fault the mapped pages in once, outside the timings
        int(raw.sum(dtype=np.uint64))

    def reference_one(info, raw) -> np.ndarray:
        row_bytes = raw.size // int(np.prod(info.shape[1:]))
        return gguf.quants.dequantize(raw.reshape(-1, row_bytes), gguf.GGMLQuantizationType(int(info.ggml_type)))

    def ours() -> None:
        for info, raw in items:
            dequantize(raw, info.ggml_type, info.shape)

    def reference() -> None:
        for info, raw in items:
            reference_one(info, raw)

    # Warm-up (first calls build lookup tables), and how often the two agree bit for bit.
    ours()
    agree = sum(bool(np.array_equal(dequantize(raw, info.ggml_type, info.shape).numpy().reshape(-1).view(np.uint32),
                                    np.asarray(reference_one(info, raw), np.float32).reshape(-1).view(np.uint32)))
                for info, raw in items)

    print(f"{path.name}: {len(items)} tensors, {n_elements / 1e6:.1f} M values; "
          f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"  bit-identical to gguf-py on {agree} of {len(items)} tensors")
    measurements = []
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        load_before = os.getloadavg()[0]
        runs: dict[str, list[tuple[float, float]]] = {"gguflm": [], "gguf-py": []}
        for _ in range(args.repeat):
            runs["gguflm"].append(timed(ours))
            runs["gguf-py"].append(timed(reference))
        load_after = os.getloadavg()[0]
        per_type: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for info, raw in items:
            per_type[info.ggml_type.name] += min(timed(lambda: dequantize(raw, info.ggml_type, info.shape))[0]
                                                 for _ in range(3))
            counts[info.ggml_type.name] += 1
        summary = {}
        for side, rs in runs.items():
            walls = [w for w, _ in rs]
            summary[side] = {"best_s": min(walls), "median_s": statistics.median(walls),
                             "cpu_s_of_best": rs[walls.index(min(walls))][1], "walls_s": walls}
        ratio = summary["gguf-py"]["best_s"] / summary["gguflm"]["best_s"]
        ratio_median = summary["gguf-py"]["median_s"] / summary["gguflm"]["median_s"]
        print(f"torch threads {threads} (load average {load_before:.2f} -> {load_after:.2f}):")
        for side, sm in summary.items():
            print(f"  {side:8s} best {sm['best_s'] * 1e3:8.1f} ms   median {sm['median_s'] * 1e3:8.1f} ms   "
                  f"({n_elements / sm['best_s'] / 1e9:.2f} G values/s)")
        print(f"  speed-up: {ratio:.1f}x (best), {ratio_median:.1f}x (median)")
        print("  gguflm per type (best of 3, summed): " + ", ".join(
            f"{k} {v * 1e3:.1f} ms ({counts[k]})" for k, v in sorted(per_type.items())))
        measurements.append({"torch_threads": threads, "load_average_before_after": [load_before, load_after],
                             "results": summary, "speedup_best": ratio, "speedup_median": ratio_median,
                             "gguflm_per_type_s": dict(per_type), "tensors_per_type": dict(counts)})

    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{dt.date.today().isoformat()}-cpu-dequant.json"
    out.write_text(json.dumps({
        "model": path.name, "tensors": len(items), "values": n_elements,
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__,
        "gguf_py": importlib.metadata.version("gguf"), "python": platform.python_version(),
        "repeat": args.repeat, "bit_identical_to_gguf_py": agree, "measurements": measurements,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
