"""`gguflm perplexity`: llama-perplexity's method, checked against an independent
computation (llama.cpp's tokenizer, the float64 reference's logits, the method written out
plainly below); the JSON line; the KL-divergence round trip F16 base -> Q4_1; the logits
file's checks at the boundary."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import struct

import numpy as np
import pytest
import torch

import gguflm
from gguflm.cli import main
from gguflm.verify import perplexity as pp

CTX, CHUNKS = 128, 2


def run_ppl(args: list[str]) -> tuple[int, list[str]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["perplexity", *args])
    return rc, out.getvalue().splitlines()


def independent_ppl(path, text: str, n_ctx: int, n_chunks: int) -> tuple[float, float]:
    """llama-perplexity's estimate written out plainly, from llama.cpp's tokenizer and the
    float64 reference's logits (libggml's dequantization when available)."""
    import llama_cpp

    from gguflm.verify.components import weight_loader
    from gguflm.verify.reference import reference_logits

    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(vocab.model))
    tokens = vocab.tokenize(text.encode(), add_bos=True, special=False)  # add_bos = add_special
    f = gguflm.GGUFFile(path)
    weights = functools.cache(weight_loader(f, use_libggml=True))                 # libggml's to_float
    nll = []
    for c in range(min(n_chunks, len(tokens) // n_ctx)):
        chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
        ids = [vocab.token_bos()] + chunk[1:] if add_bos else chunk
        logits = reference_logits(f, ids, weights)                           # float64 [n_ctx, V]
        for i in range(n_ctx // 2, n_ctx - 1):
            row = logits[i] - logits[i].max()
            nll.append(math.log(np.exp(row).sum()) - row[chunk[i + 1]])
    nll = np.array(nll)
    ppl = math.exp(nll.mean())
    return ppl, ppl * math.sqrt((np.mean(nll ** 2) - nll.mean() ** 2) / (len(nll) - 1))


@pytest.fixture(scope="module")
def base_run(requantized, english_text, tmp_path_factory):
    """The F16 requantization of SmolLM2 (by llama.cpp's quantizer) saving its log-probs."""
    base = tmp_path_factory.mktemp("ppl") / "f16.logits"
    rc, lines = run_ppl(["-m", str(requantized("F16")), "-f", str(english_text), "-c", str(CTX),
                         "--chunks", str(CHUNKS), "--save-logits", str(base), "--json"])
    assert rc == 0
    return base, json.loads(lines[-1])


@pytest.fixture(scope="module")
def q41_run(smollm2_path, english_text, base_run):
    """SmolLM2 Q4_1 scored against the F16 base, with llama.cpp's figure beside."""
    rc, lines = run_ppl(["-m", str(smollm2_path), "-f", str(english_text), "-c", str(CTX), "--chunks", str(CHUNKS),
                         "--kl-base", str(base_run[0]), "--compare", "llama.cpp", "--json"])
    assert rc == 0
    return lines


def test_json_is_the_last_line(q41_run):
    out = json.loads(q41_run[-1])
    assert out["chunks"] == CHUNKS and out["tokens"] == CHUNKS * (CTX - 1 - CTX // 2) and out["n_ctx"] == CTX
    assert out["ppl"] > 1 and out["ppl_stderr"] > 0
    assert any(line.startswith("Final estimate: PPL = ") for line in q41_run)
    assert q41_run[0].startswith("[1]") and f"[{CHUNKS}]" in q41_run[0]


def test_q4_1_equals_the_float64_reference(q41_run, smollm2_path, english_text):
    pytest.importorskip("llama_cpp", reason="llama.cpp's tokenizer is the oracle")
    ours = json.loads(q41_run[-1])
    ref_ppl, ref_err = independent_ppl(smollm2_path, english_text.read_text(), CTX, CHUNKS)
    llama = ours["compare"]["llama.cpp"]["ppl"]
    print(f"\nPPL gguflm {ours['ppl']:.4f} +/- {ours['ppl_stderr']:.4f} | float64 reference {ref_ppl:.4f} "
          f"+/- {ref_err:.4f} | llama.cpp {llama:.4f} ({llama / ref_ppl - 1:+.2%}: 8-bit activations)")
    assert ours["ppl"] == pytest.approx(ref_ppl, rel=1e-3)
    assert ours["ppl_stderr"] == pytest.approx(ref_err, rel=1e-3)
    assert llama == pytest.approx(ref_ppl, rel=2e-2) and llama != pytest.approx(ref_ppl, rel=1e-4)


def test_kl_round_trip_f16_base_to_q4_1(q41_run, base_run):
    kl = json.loads(q41_run[-1])["kl"]
    base = base_run[1]
    print(f"\nKL(F16 || Q4_1): mean {kl['kl_mean']:.2e}, median {kl['kl_median']:.2e}, max {kl['kl_max']:.2e}, "
          f"top-1 {kl['top1_agreement']:.1%}, PPL {kl['ppl']:.4f} vs base {kl['ppl_base']:.4f}")
    assert kl["rows"] == base["tokens"]
    assert 0 < kl["kl_median"] <= kl["kl_mean"] * 10 and kl["kl_mean"] <= kl["kl_max"] < 1.0
    assert kl["top1_agreement"] >= 0.9
    # the base's perplexity comes back from its 16-bit log-probs, within their resolution
    assert kl["ppl_base"] == pytest.approx(base["ppl"], rel=1e-3)
    assert kl["delta_ppl"] == pytest.approx(kl["ppl"] - kl["ppl_base"])


def test_bos_model_in_pieces_equals_the_float64_reference(tinyllama_like, english_text):
    """A model that adds BOS (BOS replaces each chunk's first token), fed 48 tokens at a
    time through the KV cache (-b below -c)."""
    pytest.importorskip("llama_cpp", reason="llama.cpp's tokenizer is the oracle")
    rc, lines = run_ppl(["-m", str(tinyllama_like), "-f", str(english_text), "-c", str(CTX), "--chunks", "2",
                         "-b", "48", "--json"])
    assert rc == 0
    ours = json.loads(lines[-1])
    ref_ppl, _ = independent_ppl(tinyllama_like, english_text.read_text(), CTX, 2)
    assert ours["ppl"] == pytest.approx(ref_ppl, rel=1e-3)


def test_log_prob_rows_round_trip_within_their_resolution():
    logits = torch.randn(5, 1001, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 6
    rows = pp.quantize_log_probs(logits)
    assert rows.shape == (5, pp.row_width(1001)) and rows.dtype == np.uint16
    back = pp.dequantize_log_probs(rows, 1001).double()
    exact = torch.log_softmax(logits, -1)                                         # the oracle: plain math
    top = logits.max(-1, keepdim=True).values
    floor = torch.maximum(logits.min(-1, keepdim=True).values, top - 16)      # the row's 16-nat window
    step = (top - floor) / 65535
    inside = logits > floor
    assert (~inside).any() and inside.all(-1).logical_not().any()
    err = (back - exact).abs()
    assert (err <= step / 2 + 1e-5)[inside].all()
    assert (back >= exact - 1e-5)[~inside].all()  # below the window: clamped up to its floor


@pytest.mark.parametrize("damage", ["magic", "truncated", "vocab", "token"])
def test_bad_logits_files_are_one_line_errors(damage, smollm2_path, tmp_path, capsys):
    n_ctx, n_vocab = 8, 49152
    rows = np.zeros((n_ctx - 1 - n_ctx // 2, pp.row_width(n_vocab)), dtype="<u2")
    tokens = np.arange(n_ctx, dtype="<i4")
    if damage == "token":
        tokens[3] = n_vocab
    head = b"_logits_" + struct.pack("<Iii", n_ctx, n_vocab if damage != "vocab" else 32000, 1)
    data = head + tokens.tobytes() + rows.tobytes()
    if damage == "magic":
        data = b"_logitz_" + data[8:]
    if damage == "truncated":
        data = data[:-2]
    path = tmp_path / "bad.logits"
    path.write_bytes(data)
    with pytest.raises(pp.PerplexityError):
        pp.read_logits_file(path, n_vocab)
    rc, _ = run_ppl(["-m", str(smollm2_path), "--kl-base", str(path)])
    err = capsys.readouterr().err
    assert rc == 1 and "bad.logits" in err and "Traceback" not in err


def test_too_little_text_is_a_user_error(smollm2_path, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Too short to score.")
    rc, _ = run_ppl(["-m", str(smollm2_path), "-f", str(short), "-c", "128"])
    assert rc == 1 and "at least 256" in capsys.readouterr().err
