"""Tensor parallel (gguflm.model.parallel) on CPU ranks over gloo, as CI runs it: 2
processes on small models whose heads divide (synth.py's random-weight files: Llama of
Mistral's shape quantized to Q4_K_M by llama.cpp, so ranks split K-quant blocks; Qwen2's
QKV biases, Qwen3's q/k norms, Phi-3's fused QKV and gate+up, at F16), and 3 processes
on SmolLM2 (9 query / 3 key-value heads: 2 does not divide them, and is refused).

Oracles: the float64 reference (verify/reference.py, itself checked against llama.cpp in
test_model_archs.py) for the logits, and the single-device engine for the greedy tokens,
which must be identical (the all-reduce sums in another order: logits agree to rounding).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from oracles import kl_rows, top1
from synth import CACHE, Shape, synthetic_f16, write_llama

import gguflm
from gguflm.engine.sampling import SamplingParams
from gguflm.model.parallel import ParallelError
from gguflm.verify.reference import reference_logits

CASES = [("mistral", "Q4_K_M"), ("qwen2", "F16"), ("qwen3", "F16"), ("phi3", "F16"), ("llama-biases", "F16")]
# Llama with biases on every linear of block 0 (llama.cpp reads optional ones): the row-parallel
# ones (attn_output, ffn_down) must be added once, after the all-reduce, not once per rank.
BIASED = Shape(n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_layer=2, n_ctx=256, head_dim=128,
               extra_tensors={f"blk.0.{r}.bias": n for r, n in (("attn_q", 512), ("attn_k", 256), ("attn_v", 256),
                                                                  ("attn_output", 256), ("ffn_gate", 512),
                                                                  ("ffn_up", 512), ("ffn_down", 256))})
N_TOKENS, N_GREEDY = 24, 16


@pytest.fixture(autouse=True)
def _keep_threads():
    """A tensor-parallel load sets this process's torch threads to its share of the cores."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _file(name: str, quant: str, shared_dir: Path, llama_quantize) -> Path:
    if name == "llama-biases":
        f16 = CACHE / "synthetic-llama-biases-v1.F16.gguf"
        if not f16.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            tmp = f16.with_suffix(f".{__import__('os').getpid()}.tmp")
            write_llama(tmp, BIASED, shared_dir / "vocab" / "ggml-vocab-llama-spm.gguf", seed=5)
            tmp.rename(f16)
    else:
        f16 = synthetic_f16(name, shared_dir / "vocab")
    return f16 if quant == "F16" else llama_quantize(f16, quant)


def _ids(path: Path, n: int = N_TOKENS) -> list[int]:
    n_vocab = gguflm.GGUFFile(path).tensors["token_embd.weight"].shape[1]
    return np.random.default_rng(11).integers(0, n_vocab, n).tolist()


def _greedy(llm, ids: list[int], n: int = N_GREEDY) -> list[int]:
    text = llm.stream(ids, max_tokens=n, params=SamplingParams(temperature=0.0), ignore_eos=True)
    for _ in text:
        pass
    return text.result.tokens


@pytest.mark.slow
@pytest.mark.parametrize("name,quant", CASES)
def test_tp2_matches_one_device_and_the_reference(name, quant, shared_dir, llama_quantize):
    path = _file(name, quant, shared_dir, llama_quantize)
    ids = _ids(path)
    ref = reference_logits(path, ids)
    single = gguflm.load(path, n_ctx=64)
    one = single.logits(ids).numpy()
    greedy_one = _greedy(single, ids)
    with gguflm.load(path, n_ctx=64, tp=2) as tp:
        assert "tensor parallel 2" in repr(tp)
        two = tp.logits(ids).numpy()
        greedy_two = _greedy(tp, ids)
        stats = tp.model.stats()
    kl_ref_one, kl_ref_two, kl_one_two = kl_rows(ref, one), kl_rows(ref, two), kl_rows(one, two)
    print(f"\n{name} {quant} tp=2: KL(one || tp2) max {kl_one_two.max():.1e}; KL(ref || one) max "
          f"{kl_ref_one.max():.1e}, KL(ref || tp2) max {kl_ref_two.max():.1e}; "
          f"bytes read per rank {[s['bytes_read'] for s in stats]} of {stats[0]['whole_bytes']}")
    assert kl_one_two.max() < 1e-6
    assert kl_ref_two.max() < 1e-6 and top1(ref, two) == 1.0
    assert greedy_two == greedy_one
    for s in stats:  # each rank took about half of the weights from the map, never all
        assert s["bytes_read"] < 0.6 * s["whole_bytes"], s


def test_heads_that_do_not_divide_are_refused_before_any_process_starts(smollm2_path):
    with pytest.raises(ParallelError, match=r"9 query heads and 3 key/value heads \(possible sizes: 1, 3\)"):
        gguflm.load(smollm2_path, tp=2)


@pytest.mark.slow
def test_smollm2_tp3_greedy_is_one_device(smollm2_path, smollm2_model):
    """3 ranks on 2 cores: slow per token, so a short continuation."""
    ids = smollm2_model.encode_prompt(smollm2_model.chat_prompt([{"role": "user", "content": "What is 2+2?"}]))
    one = smollm2_model.logits(ids).numpy()
    want = _greedy(smollm2_model, ids, 8)
    with gguflm.load(smollm2_path, n_ctx=512, tp=3) as tp:
        three = tp.logits(ids).numpy()
        got = _greedy(tp, ids, 8)
        previous = tp.model.set_batch_invariant(True)  # every rank's kernels (an op of the group)
        assert tp.model.set_batch_invariant(previous) is True
        stats = tp.model.stats()
    print(f"\nSmolLM2 tp=3: KL(one || tp3) max {kl_rows(one, three).max():.1e}; per rank read "
          f"{stats[0]['bytes_read'] / 1e6:.1f} of {stats[0]['whole_bytes'] / 1e6:.1f} MB, model pages resident "
          f"{[round(s['rss_mapped'] / 1e6, 1) for s in stats]} MB")
    assert kl_rows(one, three).max() < 1e-6
    assert got == want
    for s in stats:
        assert s["bytes_read"] < 0.4 * s["whole_bytes"], s


TORCHRUN_SCRIPT = """
import json, sys
import gguflm
from gguflm.engine.sampling import SamplingParams
llm = gguflm.load(sys.argv[1], n_ctx=64, tp=2)   # every rank; rank 1 follows inside and gets None
if llm is not None:
    ids = json.loads(sys.argv[2])
    text = llm.stream(ids, max_tokens=int(sys.argv[3]), params=SamplingParams(temperature=0.0), ignore_eos=True)
    for _ in text:
        pass
    print("TOKENS", json.dumps(text.result.tokens), flush=True)
    llm.close()
"""


@pytest.mark.slow
def test_under_torchrun(shared_dir, llama_quantize, tmp_path):
    path = _file("mistral", "Q4_K_M", shared_dir, llama_quantize)
    ids = _ids(path)
    want = _greedy(gguflm.load(path, n_ctx=64), ids)
    script = tmp_path / "tp.py"
    script.write_text(TORCHRUN_SCRIPT)
    port = __import__("gguflm.model.parallel", fromlist=["_free_port"])._free_port()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(port), str(script), str(path), json.dumps(ids), str(N_GREEDY)],
                       capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                         "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    line = [s for s in r.stdout.splitlines() if s.startswith("TOKENS ")]
    assert line and json.loads(line[0][7:]) == want
