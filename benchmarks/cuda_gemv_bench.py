"""The CUDA C++ GEMV kernels (gguflm/quant/cuda/gemv.cu) against the Triton kernels, in one
device call: build, correctness on fresh random data against the plain-torch twin, the
time of every decode-shape launch (TinyLlama-1.1B, Q4_K_M's and Q4_0's type mixes) for
several launch shapes, and the whole captured decode step of random-weight models with
each backend.

Timing: each case is a CUDA graph of launches over enough copies of the weights to spill
the L2 cache (what a decode step sees), replayed; time per launch = replay / launches
(median of 5 replays of >= 20 launches). GB/s counts the weight bytes once.

    python benchmarks/cuda_gemv_bench.py --out DIR [--skip-model] [--vocab ggml-vocab-llama-spm.gguf]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gguflm.gguf.types import LAYOUTS, GGMLType
from gguflm.quant.cuda import gemv as cg
from gguflm.quant.triton import gemv as tg
from gguflm.quant.triton.planes import PackedWeight

Q4_K, Q6_K, Q4_0, Q8_0 = GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q4_0, GGMLType.Q8_0
E, F, KV, VOCAB = 2048, 5632, 256, 32000
RESULTS: dict = {"meta": {}, "check": [], "shapes": [], "model": []}
VARIANTS = ["triton", "hybrid", "cuda", "cuda+pdl", "hybrid+pdl"]


def save(out: Path) -> None:
    (out / "cuda_gemv_bench.json").write_text(json.dumps(RESULTS, indent=1))


def random_raw(t: GGMLType, n: int, rng: np.random.Generator, dscale: float = 0.02) -> np.ndarray:
    lay = LAYOUTS[t]
    b = rng.integers(0, 256, size=(n, lay.type_size), dtype=np.uint8)
    for f in lay.fields:
        if f.dtype == "<f2":
            off = lay.offsets[f.name]
            v = (rng.standard_normal((n, f.count)) * dscale).astype(np.float16)
            b[:, off:off + f.nbytes] = v.view(np.uint8).reshape(n, -1)
    return b


def weight(t: GGMLType, rows: int, cols: int, rng) -> PackedWeight:
    """Random valid planes made on the GPU: random bytes, F16 fields N(0, 0.02)."""
    lay = LAYOUTS[t]
    n = rows * cols // lay.block_size
    gen = torch.Generator(device="cuda").manual_seed(int(rng.integers(1 << 62)))
    planes = torch.randint(0, 256, (n * lay.type_size,), dtype=torch.uint8, device="cuda", generator=gen)
    for f in lay.fields:
        if f.dtype == "<f2":
            start = n * lay.offsets[f.name]
            h = torch.randn(n * f.count, device="cuda", generator=gen).mul_(0.02).half()
            planes[start:start + n * f.nbytes] = h.view(torch.uint8)
    return PackedWeight(t, rows, cols, planes)


def graph_us(calls: list, reps: int = 5) -> float:
    """Median time of one call (us): the calls captured in one graph, replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(4):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / (4 * len(calls)))
    del g
    return statistics.median(times)


# ---------------------------------------------------------------------------------------

def check(rng) -> bool:
    """Every type and built launch shape against the torch twin on fresh random data;
    two runs bit-identical."""
    ok = True
    gen = torch.Generator(device="cuda").manual_seed(int(rng.integers(1 << 30)))
    for t in (Q4_0, Q8_0, Q4_K, Q6_K):
        for rows, cols in ((37, 2048), (300, 5632), (64, 768 if LAYOUTS[t].block_size == 256 else 800)):
            w = weight(t, rows, cols, rng)
            x, nw, r = (torch.randn(n, device="cuda", generator=gen) for n in (cols, cols, rows))
            want = tg.gemv_reference(w, x, norm_weight=nw, eps=1e-5)
            want_r = tg.gemv_reference(w, x, residual=r)
            worst = 0.0
            for (R, U) in sorted(cg.INSTANCES):
                for warps in (2, 4, 8):
                    cfg = cg.CudaGemvConfig(R, U, warps)
                    o1 = torch.full((rows,), float("nan"), device="cuda")
                    cg.launch([w], x, [o1], norm_weight=nw, eps=1e-5, config=cfg)
                    o2 = torch.full((rows,), float("nan"), device="cuda")
                    cg.launch([w], x, [o2], norm_weight=nw, eps=1e-5, config=cfg)
                    o3 = r.clone()
                    cg.launch([w], x, [o3], residuals=[o3], config=cfg)
                    e1 = float((o1.double() - want).abs().max() / want.abs().max())
                    e3 = float((o3.double() - want_r).abs().max() / want_r.abs().max())
                    same = bool(torch.equal(o1, o2))
                    worst = max(worst, e1, e3) if same else float("inf")
                    if not (e1 < 1e-5 and e3 < 1e-5 and same):
                        ok = False
                        print(f"CHECK FAIL {t.name} {rows}x{cols} {cfg}: {e1:.2e} {e3:.2e} same={same}", flush=True)
            RESULTS["check"].append({"type": t.name, "rows": rows, "cols": cols, "worst_rel": worst})
            print(f"check {t.name:5s} {rows}x{cols}: worst rel {worst:.2e}", flush=True)
    # segments and swiglu
    x, nw = (torch.randn(2048, device="cuda", generator=gen) for _ in range(2))
    for group in ([(Q4_K, 2048), (Q4_K, 256), (Q6_K, 256)], [(Q4_0, 2048), (Q8_0, 256), (Q4_0, 100)]):
        ws = [weight(t, rows, 2048, rng) for t, rows in group]
        for cfg in (None, cg.CudaGemvConfig(2, 1, 4), cg.CudaGemvConfig(1, 2, 8)):
            outs = [torch.full((w.n_rows,), float("nan"), device="cuda") for w in ws]
            cg.launch(ws, x, outs, norm_weight=nw, eps=1e-5, config=cfg)
            for w, o in zip(ws, outs):
                ref = tg.gemv_reference(w, x, norm_weight=nw, eps=1e-5)
                e = float((o.double() - ref).abs().max() / ref.abs().max())
                ok &= e < 1e-5
                print(f"check segment {w.ggml_type.name} {w.n_rows} {cfg}: {e:.2e}", flush=True)
    # argmax epilogue: against torch.argmax of the same logits, twice (the counter resets), ties
    aws = cg.ArgmaxWorkspace(torch.device("cuda"))
    for t, rows in ((Q6_K, 32000), (Q4_K, 1000), (Q4_0, 77)):
        w = weight(t, rows, 2048, rng)
        for cfg in (None, cg.CudaGemvConfig(1, 2, 4), cg.CudaGemvConfig(2, 1, 8)):
            for xx in (x, torch.zeros_like(x)):
                am = torch.full((1,), -1, dtype=torch.int64, device="cuda")
                o = torch.full((rows,), float("nan"), device="cuda")
                cg.launch([w], xx, [o], norm_weight=nw, eps=1e-5, config=cfg, argmax=(am, aws))
                want = int(torch.argmax(o))
                am2 = torch.full((1,), -1, dtype=torch.int64, device="cuda")
                cg.launch([w], xx, [o], norm_weight=nw, eps=1e-5, config=cfg, argmax=(am2, aws))
                good = int(am) == want == int(am2) and int(aws.counter) == 0
                ok &= good
                print(f"check argmax {t.name} {rows} {cfg} zero_x={bool((xx == 0).all())}: {int(am)} {int(am2)} "
                      f"torch {want} {'ok' if good else 'FAIL'}", flush=True)
                RESULTS["check"].append({"argmax": t.name, "rows": rows, "ok": good})
    for t in (Q4_K, Q4_0, Q6_K):
        wg, wu = weight(t, 5632, 2048, rng), weight(t, 5632, 2048, rng)
        ref = tg.gemv_swiglu_reference(wg, wu, x, norm_weight=nw, eps=1e-5)
        for cfg in (None, cg.CudaGemvConfig(2, 2, 4), cg.CudaGemvConfig(1, 2, 8)):
            y = torch.full((5632,), float("nan"), device="cuda")
            cg.launch([wg], x, [y], norm_weight=nw, eps=1e-5, ups=[wu], config=cfg)
            e = float((y.double() - ref).abs().max() / ref.abs().max())
            ok &= e < 1e-5
            print(f"check swiglu {t.name} {cfg}: {e:.2e}", flush=True)
            RESULTS["check"].append({"type": t.name, "swiglu": True, "config": str(cfg), "rel": e})
    return ok


CASES = [  # name, kind, segments [(type, rows)], cols
    ("qkv", "norm", [(Q4_K, 2560)], E),
    ("qkv_mixed", "norm", [(Q4_K, 2048), (Q4_K, 256), (Q6_K, 256)], E),
    ("o", "residual", [(Q4_K, 2048)], E),
    ("gate_up", "swiglu", [(Q4_K, 5632)], E),
    ("down", "residual", [(Q4_K, 2048)], F),
    ("down", "residual", [(Q6_K, 2048)], F),
    ("output", "norm", [(Q6_K, 32000)], E),
    ("qkv", "norm", [(Q4_0, 2560)], E),
    ("o", "residual", [(Q4_0, 2048)], E),
    ("gate_up", "swiglu", [(Q4_0, 5632)], E),
    ("down", "residual", [(Q4_0, 2048)], F),
    ("qkv", "norm", [(Q8_0, 2560)], E),
]


def configs_for(cols: int, swiglu: bool) -> list:
    if cols <= 2048:
        return [None, cg.CudaGemvConfig(1, 2, 8), cg.CudaGemvConfig(2, 1, 8), cg.CudaGemvConfig(2, 2, 4)]
    return [None, cg.CudaGemvConfig(1, 6, 4), cg.CudaGemvConfig(1, 3, 8)]


def shapes(rng) -> None:
    x = torch.randn(F, device="cuda")
    nw = torch.randn(F, device="cuda")
    for name, kind, segs, cols in CASES:
        per_copy = sum(rows * cols // LAYOUTS[t].block_size * LAYOUTS[t].type_size for t, rows in segs)
        per_copy *= 2 if kind == "swiglu" else 1
        n_copies = max(20, int(240e6 // per_copy) + 1)
        n_copies = min(n_copies, 64)
        copies = [[weight(t, rows, cols, rng) for t, rows in segs] for _ in range(n_copies)]
        ups = [[weight(t, rows, cols, rng) for t, rows in segs] for _ in range(n_copies)] if kind == "swiglu" else None
        xs = x[:cols]
        nws = nw[:cols]
        outs = [torch.zeros(rows, device="cuda") for _, rows in segs]
        label = f"{name}:{'+'.join(f'{t.name}x{r}' for t, r in segs)}:{cols}"

        def triton_call(i):
            ws = copies[i]
            if kind == "swiglu":
                return lambda: tg.gemv_swiglu(ws[0], ups[i][0], xs, outs[0], norm_weight=nws, eps=1e-5)
            if kind == "residual":
                return lambda: tg.gemv(ws[0], xs, outs[0], residual=outs[0])
            return lambda: [tg.gemv(w, xs, o, norm_weight=nws, eps=1e-5) for w, o in zip(ws, outs)]

        def cuda_call(i, cfg):
            ws = copies[i]
            if kind == "swiglu":
                return lambda: cg.launch([ws[0]], xs, [outs[0]], norm_weight=nws, eps=1e-5, ups=[ups[i][0]], config=cfg)
            if kind == "residual":
                return lambda: cg.launch([ws[0]], xs, [outs[0]], residuals=[outs[0]], config=cfg)
            return lambda: cg.launch(ws, xs, outs, norm_weight=nws, eps=1e-5, config=cfg)

        rows_tot = []
        us = graph_us([triton_call(i) for i in range(n_copies)])
        row = {"case": label, "backend": "triton", "config": str(tg.gemv_config(copies[0][0])), "us": us,
               "gbps": per_copy / (us * 1e-6) / 1e9}
        rows_tot.append(row)
        print(f"{label:40s} triton           {us:7.2f} us {row['gbps']:6.0f} GB/s", flush=True)
        for cfg, pdl in [(c, "0") for c in configs_for(cols, kind == "swiglu")] + [(None, "1")]:
            used = cfg or cg.gemv_config(max(r for _, r in segs), cols, kind == "swiglu")
            os.environ["GGUFLM_PDL"] = pdl
            try:
                us = graph_us([cuda_call(i, cfg) for i in range(n_copies)])
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{label} {used} failed: {e}", flush=True)
                continue
            finally:
                os.environ.pop("GGUFLM_PDL", None)
            row = {"case": label, "backend": "cuda" if pdl == "0" else "cuda+pdl",
                   "config": f"R{used.rows} U{used.unroll} w{used.warps}{' pdl' if pdl == '1' else ''}",
                   "default": cfg is None and pdl == "0", "us": us, "gbps": per_copy / (us * 1e-6) / 1e9}
            rows_tot.append(row)
            print(f"{label:40s} cuda {row['config']:11s}{'*' if cfg is None else ' '} {us:7.2f} us "
                  f"{row['gbps']:6.0f} GB/s", flush=True)
        RESULTS["shapes"].extend(rows_tot)
        del copies, ups
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------

def more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the layers whose attn_v and ffn_down Q4_K_M keeps in Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def write_model(path: Path, mix: str, vocab: str, rng) -> None:
    import gguf

    sys.path.insert(0, str(Path(__file__).parent))
    from make_tinyllama import copy_tokenizer

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"tinyllama-random-{mix}")
    n_vocab = copy_tokenizer(w, vocab)
    w.add_context_length(2048)
    w.add_embedding_length(E)
    w.add_block_count(22)
    w.add_feed_forward_length(F)
    w.add_head_count(32)
    w.add_head_count_kv(4)
    w.add_rope_dimension_count(64)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    base = Q4_K if mix == "Q4_K_M" else Q4_0

    def q(name: str, t: GGMLType, rows: int, cols: int) -> None:
        lay = LAYOUTS[t]
        raw = random_raw(t, rows * cols // lay.block_size, rng, dscale=2e-4).reshape(rows, -1)
        w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType(int(t)))

    q("token_embd.weight", base, n_vocab, E)
    w.add_tensor("output_norm.weight", np.ones(E, dtype=np.float32))
    q("output.weight", Q6_K, n_vocab, E)
    for i in range(22):
        hi = Q6_K if (mix == "Q4_K_M" and more_bits(i, 22)) else base
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(E, dtype=np.float32))
        q(f"blk.{i}.attn_q.weight", base, E, E)
        q(f"blk.{i}.attn_k.weight", base, KV, E)
        q(f"blk.{i}.attn_v.weight", hi, KV, E)
        q(f"blk.{i}.attn_output.weight", base, E, E)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(E, dtype=np.float32))
        q(f"blk.{i}.ffn_gate.weight", base, F, E)
        q(f"blk.{i}.ffn_up.weight", base, F, E)
        q(f"blk.{i}.ffn_down.weight", hi, E, F)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def step_us(m, position: int = 64, steps: int = 200) -> tuple[float, torch.Tensor]:
    g = m.graphs(m.session_cache(), 0)
    g.tok[0], g.pos[0] = 1, position
    g.step(0)
    torch.cuda.synchronize()
    logits = g.buf.logits_buf.clone()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            g.step(0)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / steps)
    if not torch.equal(logits, g.buf.logits_buf):   # the same inputs each replay: bit-identical
        print("  NOT DETERMINISTIC: logits differ between replays", flush=True)
        RESULTS.setdefault("nondeterministic", []).append(str(m.config.n_layer))
    return statistics.median(times), logits


def kernel_table(m, label: str) -> list:
    g = m.graphs(m.session_cache(), 0)
    g.use_graphs = False
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            g.step(0)
        torch.cuda.synchronize()
    g.use_graphs = True
    per: dict = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            d = per.setdefault(e.name[:80], [0.0, 0])
            d[0] += e.device_time_total / 5
            d[1] += 1
    rows = sorted(([k, v[0], v[1] // 5] for k, v in per.items()), key=lambda r: -r[1])[:10]
    for name, us, n in rows:
        print(f"  {label} {us:8.1f} us x{n:<4d} {name}", flush=True)
    return rows


def model(out: Path, vocab: str, rng) -> None:
    import gguflm

    for mix in ("Q4_K_M", "Q4_0"):
        path = Path("/tmp") / f"tinyllama-random-{mix}.gguf"
        t0 = time.time()
        if not path.exists():
            write_model(path, mix, vocab, rng)
        print(f"{mix}: wrote {path.stat().st_size / 2**20:.0f} MiB in {time.time() - t0:.1f} s", flush=True)
        res = {"mix": mix}
        for backend in VARIANTS:
            gemv_mode, pdl = backend.split("+") if "+" in backend else (backend, "nopdl")
            os.environ["GGUFLM_GEMV"] = gemv_mode
            os.environ["GGUFLM_PDL"] = "1" if pdl == "pdl" else "0"
            m = gguflm.load(str(path), device="cuda", n_ctx=256)
            m = getattr(m, "model", m)              # the Model behind the LLM
            try:
                us, logits = step_us(m)
            except Exception:  # noqa: BLE001 - report, keep the rest of the run
                import traceback

                traceback.print_exc()
                return
            res[f"{backend}_step_us"] = us
            res[f"{backend}_tok_s"] = 1e6 / us
            res[f"{backend}_kernels"] = kernel_table(m, backend)
            res[f"{backend}_argmax"] = int(logits.argmax())
            res[f"_{backend}_logits"] = logits
            print(f"{mix} {backend}: decode step {us:.1f} us = {1e6 / us:.0f} tok/s, argmax {int(logits.argmax())}",
                  flush=True)
            del m
            torch.cuda.empty_cache()
        a = res.pop("_triton_logits").double()
        for v in VARIANTS[1:]:
            b = res.pop(f"_{v}_logits").double()
            res[f"{v}_logits_rel_diff"] = float((a - b).abs().max() / a.abs().max())
            res[f"{v}_finite"] = bool(torch.isfinite(b).all())
            print(f"{mix}: logits rel diff {v} vs triton {res[f'{v}_logits_rel_diff']:.2e}", flush=True)
        RESULTS["model"].append(res)
        save(out)
        os.environ.pop("GGUFLM_GEMV", None)
        os.environ.pop("GGUFLM_PDL", None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    p.add_argument("--vocab", default=".dev/shared/vocab/ggml-vocab-llama-spm.gguf")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-shapes", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    RESULTS["meta"] = {"card": smi, "torch": torch.__version__, "triton": triton.__version__,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    print(RESULTS["meta"], flush=True)
    t0 = time.time()
    lib = cg.library(torch.device("cuda"))
    RESULTS["meta"]["build_s"] = time.time() - t0
    print(f"library {lib} in {time.time() - t0:.1f} s", flush=True)
    if lib is None:
        save(out)
        return 1
    rng = np.random.default_rng(int(time.time()))
    RESULTS["meta"]["check_ok"] = check(rng)
    save(out)
    if not a.skip_shapes:
        shapes(rng)
        save(out)
    if not a.skip_model:
        model(out, a.vocab, rng)
        save(out)
    print("\n=== summary (us per launch; * = default config) ===")
    best: dict = {}
    for r in RESULTS["shapes"]:
        k = r["case"]
        b = best.setdefault(k, {"triton": None, "cuda": None, "default": None})
        if r["backend"] == "triton":
            b["triton"] = r["us"]
        else:
            if b["cuda"] is None or r["us"] < b["cuda"][0]:
                b["cuda"] = (r["us"], r["config"])
            if r.get("default"):
                b["default"] = r["us"]
    for k, b in best.items():
        c = b["cuda"] or (float("nan"), "-")
        print(f"{k:40s} triton {b['triton'] or float('nan'):7.2f}  cuda default {b['default'] or float('nan'):7.2f}  "
              f"best {c[0]:7.2f} ({c[1]})")
    for r in RESULTS["model"]:
        print(f"model {r['mix']}: " + "  ".join(
            f"{v} {r.get(f'{v}_step_us', float('nan')):.1f} us ({r.get(f'{v}_tok_s', float('nan')):.0f} tok/s, "
            f"argmax {r.get(f'{v}_argmax')}, rel {r.get(f'{v}_logits_rel_diff', 0):.1e})" for v in VARIANTS))
    print(f"check_ok={RESULTS['meta']['check_ok']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
