"""Cold start (issue 14): the nvcc build in parts, its progress line and cache (a stand-in
``nvcc`` that builds an empty shared library with the C compiler; the real build of the
parts gave the same SASS and resources for all 52 1-row kernels and the 20 rows kernels as
one translation unit and as the earlier split (one part per type), checked by hand with
CUDA 13.0's nvcc and cuobjdump; with nvcc: the 1-row parts hold at most 6 kernels each, every
kernel once), the GGUFLM_TIMING lines and
bench's summary of them, and the Triton precompilation: traced without a GPU (a stand-in
driver that reports an sm_90 target; Triton's real compiler and ptxas build the kernels),
checked against Triton itself — after it, tracing the same steps asks for no compilation,
i.e. the real steps find every kernel they launch already compiled."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gguflm.engine.bench import summarize
from gguflm.quant.cuda import build, timing


@pytest.fixture
def fake_nvcc(tmp_path, monkeypatch):
    """An ``nvcc`` that records its calls and writes an empty shared library with cc for
    every output (objects included); it fails a call whose arguments hold ``$FAIL_ON``."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to stand in for nvcc")
    log = tmp_path / "calls"
    script = tmp_path / "nvcc"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$@" >> {log}
        case " $* " in *" $FAIL_ON "*) [ -n "$FAIL_ON" ] && exit 3;; esac
        out=""
        while [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done
        exec {cc} -shared -fPIC -x c /dev/null -o "$out"
        """))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("GGUFLM_NVCC", str(script))
    monkeypatch.setenv("GGUFLM_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FAIL_ON", raising=False)
    monkeypatch.setattr(build, "_built", {})
    monkeypatch.setattr(build, "_started", set())
    return log


def _calls(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("kind", ["gemv", "rows"])
def test_nvcc_build_in_parts_says_so_once_and_is_cached(fake_nvcc, capsys, monkeypatch, kind):
    """Each library (generate()'s 1-row kernels; the server's rows kernels) builds its own
    parts of gemv.cu, one nvcc each, then one link; a new process loads it from the cache."""
    build.library("sm_90", kind=kind)
    err = capsys.readouterr().err
    name = "CUDA GEMV kernels" + (" (rows)" if kind == "rows" else "")
    assert f"compiling the {name} for sm_90 (first run; cached in" in err
    assert f"compiled the {name} for sm_90 in" in err
    calls = _calls(fake_nvcc)
    parts = sorted(int(a.split("=")[1]) for c in calls for a in c if a.startswith("-DGGUFLM_PART="))
    assert parts == list(build.PARTS[kind])                                   # one nvcc per part ...
    assert all("-c" in c and "-shared" not in c for c in calls[:-1])
    link = calls[-1]                                                          # ... then one link of them all
    assert "-shared" in link and sum(a.endswith(".o") for a in link) == len(build.PARTS[kind])
    monkeypatch.setattr(build, "_built", {})  # a new process: the library comes from the cache, silently
    build.library("sm_90", kind=kind)
    assert capsys.readouterr().err == ""
    assert len(_calls(fake_nvcc)) == len(build.PARTS[kind]) + 1
    assert not set(build.PARTS["gemv"]) & set(build.PARTS["rows"])          # generate()'s build never compiles rows parts


def test_a_failed_part_falls_back_to_one_translation_unit(fake_nvcc, monkeypatch):
    monkeypatch.setenv("FAIL_ON", "-DGGUFLM_PART=3")
    build.library("sm_90")
    last = _calls(fake_nvcc)[-1]
    assert "-shared" in last and not any(a.startswith("-DGGUFLM_PART") or a.endswith(".o") for a in last)
    assert last[-1] == str(build.SOURCE)


def test_background_build_then_wait(fake_nvcc):
    build.start("sm_90")
    build.start("sm_90")                        # a second load meanwhile: no second build, no wait
    assert build.library("sm_90") is build.library("sm_90")
    assert len(_calls(fake_nvcc)) == len(build.PARTS["gemv"]) + 1


@pytest.mark.slow
def test_the_1row_parts_hold_at_most_6_kernels_each(tmp_path):
    """The real 1-row parts (nvcc -c for sm_90, as the build runs them): no part holds more
    than 6 of the 52 kernels (the build's wall time is its longest part), each kernel is in
    exactly one part, and only part 0 defines the C entry points."""
    compiler, nm = build.nvcc(), shutil.which("nm")
    if compiler is None or nm is None:
        pytest.skip("needs nvcc and nm")
    flags = [f for f in build.FLAGS if f != "-shared"]
    procs = {k: subprocess.Popen([compiler, *flags, "-gencode=arch=compute_90,code=sm_90", f"-DGGUFLM_PART={k}",
                                  "-c", "-o", str(tmp_path / f"p{k}.o"), str(build.SOURCE)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for k in build.PARTS["gemv"]}
    kernels, entries = {}, {}
    for k, proc in procs.items():
        assert proc.wait(timeout=900) == 0, proc.stderr.read()[-2000:]
        syms = subprocess.run([nm, "-C", "--defined-only", str(tmp_path / f"p{k}.o")], capture_output=True,
                              text=True, check=True).stdout.splitlines()
        kernels[k] = {line.split(" ", 2)[2] for line in syms if " gemv_kernel<" in line and "[clone" not in line}
        entries[k] = {line.split()[-1] for line in syms if line.split()[-1].startswith("gguflm_gemv")}
    sizes = {k: len(v) for k, v in kernels.items()}
    assert max(sizes.values()) <= 6 and sum(sizes.values()) == len(set().union(*kernels.values())) == 52, sizes
    assert sizes[0] == 0 and entries[0] == {"gguflm_gemv", "gguflm_gemv_emulate", "gguflm_gemv_emulate_tile"}
    assert not any(entries[k] for k in build.PARTS["gemv"] if k)


def test_timing_lines_only_when_asked(capsys, monkeypatch):
    monkeypatch.setattr(timing, "ON", False)
    with timing.phase("quiet"):
        timing.note("nothing")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(timing, "ON", True)
    with timing.phase("weights to the device"):
        pass
    line = capsys.readouterr().err.strip()
    assert line.startswith(timing.PREFIX) and "weights to the device" in line
    assert 0 <= timing.since_start() < 3600 * 24 * 365


def test_bench_summary_of_the_phases():
    lines = ["gguflm timing:    0.100 s  interpreter up",
             "gguflm timing:    2.500 s  import torch  2.400 s",
             "gguflm timing:    3.100 s  CUDA init  0.600 s",
             "gguflm timing:    3.600 s  weights to the device  0.500 s",
             "gguflm timing:    5.000 s  triton compile _rms_norm_half_kernel[BLOCK=256]  1.250 s",
             "gguflm timing:    5.010 s  triton load (disk cache) _gated_act_kernel[BLOCK=2048]  0.010 s",
             "gguflm timing:    6.000 s  triton compile _attn_split_kernel[D=64]  0.750 s",
             "gguflm timing:    9.000 s  nvcc build of the CUDA GEMV kernels (sm_90, gguflm-nvcc-sm_90)  8.000 s",
             "gguflm timing:    9.000 s  waited for the background build of the CUDA GEMV kernels (sm_90)  2.000 s",
             "gguflm timing:   10.000 s  first token",
             "gguflm: compiling the Triton kernels (first run; cached in /x) ..."]
    s = summarize(lines)
    for part in ("torch import 2.40 s", "CUDA init 0.60 s", "weights 0.50 s", "nvcc 8.00 s", "waited for nvcc 2.00 s",
                 "2 Triton compilations 2.00 s", "first token at 10.00 s"):
        assert part in s, (part, s)


TRACE = """\
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class StandIn:  # what JITFunction.run asks of the driver before it launches anything
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self): return torch.device("cpu")


driver.set_active(StandIn())
import gguflm
from gguflm.model.config import ModelConfig
from gguflm.model.cuda import load_cuda, precompile

f = gguflm.GGUFFile(sys.argv[1])
m = load_cuda(f, ModelConfig.from_gguf(f), 16, torch.device("cpu"))
print("traced", " ".join(sorted({item[0].__name__ for item in precompile.trace(m)})))
precompile.precompile(m)
print("after", " ".join(sorted({item[0].__name__ for item in precompile.trace(m)})))
"""


@pytest.mark.parametrize("decode_rows", ["", "gemv"])
def test_precompile_compiles_what_the_steps_launch(tiny_model, tmp_path, decode_rows):
    """(With ``GGUFLM_CUDA_DECODE_ROWS=gemv`` the batched step of one decode row is traced
    and compiled too: the rows GEMV's Triton kernels and the attention over slots, sm_90.)"""
    from triton.runtime.jit import JITFunction

    if not hasattr(JITFunction, "_do_compile"):
        pytest.skip("this Triton compiles elsewhere than JITFunction._do_compile")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), GGUFLM_KERNEL_CACHE=str(tmp_path),
               GGUFLM_GEMV="triton", TRITON_DEFAULT_FP_FUSION="1", GGUFLM_TIMING="0",
               GGUFLM_MATMUL="gemm",  # the default (tests/cuda/conftest.py picks cublas in the interpreter)
               GGUFLM_CUDA_DECODE_ROWS=decode_rows)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", TRACE, str(tiny_model("Q4_0"))], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = dict(line.split(" ", 1) if " " in line else (line, "") for line in r.stdout.splitlines())
    traced = set(out["traced"].split())
    # the prefill (embedding rows, norms, the fused GEMM — unsplit for one sequence's prompt,
    # weights.one_sequence —, RoPE) and the decode step
    assert {"_dequant_kernel", "_rms_norm_half_kernel", "_add_rms_norm_half_kernel", "_rope_prefill_kernel",
            "_gemm_kernel", "_attn_split_kernel", "_attn_merge_kernel", "_gemv_kernel"} <= traced, traced
    assert out["after"] == "", "kernels left to compile after precompile: " + out["after"]
    assert r.stderr.count("compiling the Triton kernels (first run") == 1
    assert "Triton kernels in" in r.stderr
    assert any(Path(tmp_path / "triton").rglob("*.cubin"))


GENERATE = """\
import sys
import gguflm
m = gguflm.load(sys.argv[1], device="cuda", n_ctx=64)
print("ids", repr("".join(m.generate("Hello", max_tokens=6, temperature=0, ignore_eos=True))))
"""


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs an NVIDIA GPU")
def test_precompile_on_the_gpu(tiny_model, tmp_path):
    """GGUFLM_PRECOMPILE=1 on the device: the same greedy tokens as the lazy compiles, and
    no Triton compilation left after the load for the first prompt and the decode steps."""
    runs = {}
    for pre in ("0", "1"):
        env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / f"triton{pre}"), GGUFLM_PRECOMPILE=pre,
                   GGUFLM_TIMING="1")
        r = subprocess.run([sys.executable, "-c", GENERATE, str(tiny_model("Q4_K_M"))], capture_output=True,
                           text=True, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[pre] = r
    ids = [next(line for line in runs[p].stdout.splitlines() if line.startswith("ids")) for p in ("0", "1")]
    assert ids[0] == ids[1]
    err = runs["1"].stderr.splitlines()
    after = err[next(i for i, line in enumerate(err) if "CUDA load done" in line):]
    late = [line for line in after if "triton compile" in line]
    assert not late, "compiled after the precompile: " + "\n".join(late)


def test_loading_for_the_gpu_never_builds_the_cpu_kernels(tiny_model, monkeypatch):
    """The weights a GPU keeps as floats (norms, biases, types no kernel covers) are
    dequantized on that device by the torch path (no CPU kernel asked), and float tensors
    never ask the CPU kernels on the CPU either: their first build (10-40 s; 14-17 s of the H200's empty-cache cold start
    before this) stays out of a CUDA load. ``meta`` stands in for the GPU here."""
    import torch

    from gguflm.gguf.reader import GGUFFile
    from gguflm.model.arch import WeightTable
    from gguflm.model.config import ModelConfig
    from gguflm.quant import cpu

    def asked(*args, **kwargs):
        raise AssertionError("the CPU kernels were consulted")

    monkeypatch.setattr(cpu, "supports", asked)
    f = GGUFFile(tiny_model("Q4_0"))
    w = WeightTable(f, ModelConfig.from_gguf(f))
    norm = w.dense("attn_norm", 0, "meta")
    assert norm.device.type == "meta" and norm.shape == (256,)
    assert w.dense("output_norm", None, "cpu").dtype == torch.float32      # float32 on the CPU: torch path
