"""Encode ~1 MB of mixed English and code with gguflm's tokenizer and with llama.cpp's
(llama-cpp-python, vocab only), in one run, on SmolLM2 (BPE) and on the Llama 2 SPM
vocabulary; report the speeds and their ratio.

    python benchmarks/bench_tokenizer.py [--repeat 5] [--size 1000000] [-m FILE ...]

The text: Python's own documentation (pydoc_data.topics: English prose, up to half) and
its standard library's modules (code) for the rest, --size characters in all;
deterministic for one Python version (its sha256 is recorded). Both tokenizers must
give identical ids. Timings, each the best of --repeat runs, alternating sides:

* gguflm cold: a fresh tokenizer (empty word cache) encodes the text once;
* gguflm warm: the same tokenizer encodes it again (every word cached);
* llama.cpp: llama_tokenize on the UTF-8 bytes.

Vocabulary loading is not timed. Writes benchmarks/results/<date>-cpu-tokenizer.json.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import hashlib
import json
import platform
import sysconfig
import time
from pathlib import Path

import gguflm
from gguflm.models import resolve
from machine import cpu_model  # benchmarks/machine.py (this script's folder)
from gguflm.tokenizer.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
SHARED_SPM = ROOT.parent.parent / "shared" / "vocab" / "ggml-vocab-llama-spm.gguf"


def corpus(size: int) -> str:
    """English prose (up to half) and Python code, from the running Python's own files."""
    from pydoc_data.topics import topics

    prose = "\n\n".join(topics[k] for k in sorted(topics))
    lib = Path(sysconfig.get_paths()["stdlib"])
    code = "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(lib.glob("*.py")))
    prose = prose[: size // 2]
    return prose + code[: size - len(prose)]


class LlamaCpp:
    """llama.cpp's tokenizer on a vocab-only load."""

    def __init__(self, path: Path):
        import llama_cpp as ll

        self.ll = ll
        self._log = ll.llama_log_callback(lambda level, text, data: None)
        ll.llama_log_set(self._log, ctypes.c_void_p())
        params = ll.llama_model_default_params()
        params.vocab_only = True
        self.model = ll.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise SystemExit(f"llama.cpp cannot load {path}")
        self.vocab = ll.llama_model_get_vocab(self.model)

    def tokenize(self, data: bytes) -> list[int]:
        n = len(data) + 16
        buf = (self.ll.llama_token * n)()
        got = self.ll.llama_tokenize(self.vocab, data, len(data), buf, n, True, False)
        return list(buf[:got])


def bench(path: Path, text: str, repeat: int) -> dict:
    vocab = Tokenizer.from_gguf(path).vocab
    llama = LlamaCpp(path)
    data = text.encode()
    ours_ids = Tokenizer(vocab).encode(text)
    if ours_ids != llama.tokenize(data):
        raise SystemExit(f"{path.name}: gguflm and llama.cpp disagree; not timing")
    best = {"gguflm_cold": float("inf"), "gguflm_warm": float("inf"), "llama_cpp": float("inf")}
    for _ in range(repeat):
        tok = Tokenizer(vocab)
        for name, fn in (("gguflm_cold", lambda: tok.encode(text)),
                         ("gguflm_warm", lambda: tok.encode(text)),
                         ("llama_cpp", lambda: llama.tokenize(data))):
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    mb = len(data) / 1e6
    return {
        "file": path.name, "model": tok.model, "pre": tok.pre, "n_vocab": tok.n_vocab,
        "tokens": len(ours_ids), "identical_ids": True,
        "seconds": best,
        "mb_per_s": {k: mb / v for k, v in best.items()},
        "ratio_cold": best["llama_cpp"] / best["gguflm_cold"],
        "ratio_warm": best["llama_cpp"] / best["gguflm_warm"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", action="append", type=Path,
                    help="GGUF file(s) (default: SmolLM2 and ../shared's llama-spm vocabulary)")
    ap.add_argument("--size", type=int, default=1_000_000, help="characters of text (default 1e6)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs of each side (default 5)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result")
    args = ap.parse_args()

    paths = args.model or [resolve(None), SHARED_SPM]
    text = corpus(args.size)
    runs = []
    for path in paths:
        r = bench(path, text, args.repeat)
        runs.append(r)
        s = r["mb_per_s"]
        print(f"{r['file']}: {r['tokens']} tokens, MB/s gguflm cold {s['gguflm_cold']:.2f} "
              f"warm {s['gguflm_warm']:.2f}, llama.cpp {s['llama_cpp']:.2f}; "
              f"ratio (gguflm/llama.cpp speed) cold {r['ratio_cold']:.2f} warm {r['ratio_warm']:.2f}")
    result = {
        "benchmark": "tokenizer encode",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "python": platform.python_version()},
        "gguflm": gguflm.__version__,
        "text": {"chars": len(text), "bytes": len(text.encode()),
                 "sha256": hashlib.sha256(text.encode()).hexdigest(),
                 "source": "pydoc_data.topics (prose, up to half) + stdlib *.py (code)"},
        "repeat": args.repeat,
        "runs": runs,
        "requirement": "gguflm cold speed >= 0.5 x llama.cpp",
        "met": all(r["ratio_cold"] >= 0.5 for r in runs),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{dt.date.today().isoformat()}-cpu-tokenizer.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if result["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
