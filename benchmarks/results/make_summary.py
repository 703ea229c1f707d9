"""Combine the raw device runs of one day into benchmarks/results/<date>-<card>.json.

The gguflm rows come from the last run of the final code (``--ours``: bench_cuda.py
output); the llama.cpp columns from the run that measured both on the same card type
that day (``--baseline``; the same file when one run measured both); accuracy from
accuracy_cuda.py. Every number is copied, none computed except the ratios.

    python benchmarks/results/make_summary.py --ours raw/...-bench-ours.json \\
        --baseline raw/...-bench.json --accuracy raw/...-accuracy.json --out 2026-11-27-h100.json
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ours", required=True)
    p.add_argument("--baseline", required=True)
    p.add_argument("--accuracy", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--note", action="append", default=[], help="a line of context for the reader; repeatable")
    p.add_argument("--accuracy-note", default=None, help="which code the accuracy rows were measured with")
    a = p.parse_args(argv)
    ours, base = json.load(open(a.ours)), json.load(open(a.baseline))
    by_quant = {r["quant"]: r for r in base["rows"]}
    rows = []
    for r in ours["rows"]:
        b = by_quant[r["quant"]]
        row = {k: r[k] for k in ("device", "card", "model", "quant", "ours_tg128", "ours_tg128_sd", "ours_pp512",
                                 "ours_pp512_sd", "ours_vram_mb")}
        row.update({k: b[k] for k in ("llama_cpp_tg128", "llama_cpp_tg128_sd", "llama_cpp_pp512",
                                      "llama_cpp_pp512_sd", "llama_cpp_vram_mb")})
        row.update(tg_ratio=row["ours_tg128"] / row["llama_cpp_tg128"],
                   pp_ratio=row["ours_pp512"] / row["llama_cpp_pp512"],
                   vram_ratio=row["ours_vram_mb"] / row["llama_cpp_vram_mb"])
        rows.append(row)
    meta = dict(ours["meta"])
    same_run = a.baseline == a.ours
    meta["baseline"] = {"source": a.baseline, "meta": base["meta"],
                        "note": "llama.cpp (llama-cpp-python 0.3.36's vendored source, CUDA sm_90) measured with "
                                "llama-bench -ngl 99 -fa 1 -p 512 -n 128 -r 5 "
                                + ("in the same bench_cuda.py run, on the same card, as the gguflm rows" if same_run else
                                   "on the same card type the same day, in an earlier lease than the gguflm rows")}
    meta["ours_source"] = a.ours
    meta["notes"] = a.note
    if a.accuracy_note:
        meta["accuracy_source"] = {"source": a.accuracy, "note": a.accuracy_note}
    meta["scripts"] = ["benchmarks/gpu_run.sh", "benchmarks/bench_cuda.py", "benchmarks/accuracy_cuda.py",
                       "benchmarks/make_tinyllama.py", "benchmarks/llama_cpp_build.sh", "benchmarks/results/make_summary.py"]
    acc = [{"model": r["model"].rsplit("/", 1)[-1], "tokens": r["tokens"], "prefill": r["prefill"], "decode": r["decode"]}
           for r in json.load(open(a.accuracy))]
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "accuracy_smollm2_vs_float64": acc}, f, indent=1)
    for r in rows:
        print(f"{r['quant']}: tg {r['ours_tg128']:.0f} vs {r['llama_cpp_tg128']:.0f} ({r['tg_ratio']:.2f}x), "
              f"pp {r['ours_pp512']:.0f} vs {r['llama_cpp_pp512']:.0f} ({r['pp_ratio']:.2f}x), "
              f"VRAM {r['ours_vram_mb']} vs {r['llama_cpp_vram_mb']} ({r['vram_ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
