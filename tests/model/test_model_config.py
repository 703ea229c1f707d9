"""ModelConfig and loading: values from the key table match what gguf-py reads from the
same file; every missing key, missing tensor, wrong shape or unsupported file is a
GGUFError that names the problem (checked through the public `gguflm.load`, and the CLI
for the one-line message)."""

from __future__ import annotations

import numpy as np
import pytest
from synth import Shape, write_llama

import gguflm
from gguflm.model import ModelConfig, RopeStyle


@pytest.fixture(scope="module")
def spm_vocab(shared_dir):
    return shared_dir / "vocab" / "ggml-vocab-llama-spm.gguf"


def test_smollm2_config_matches_gguf_py(smollm2_path):
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(str(smollm2_path))

    def val(key):
        return r.fields[key].contents()

    cfg = ModelConfig.from_gguf(gguflm.GGUFFile(smollm2_path))
    names = {t.name for t in r.tensors}
    assert (cfg.arch, cfg.rope_style) == (val("general.architecture"), RopeStyle.NORM)
    assert cfg.n_layer == val("llama.block_count")
    assert cfg.n_embd == val("llama.embedding_length")
    assert cfg.n_ff == val("llama.feed_forward_length")
    assert cfg.n_head == val("llama.attention.head_count")
    assert cfg.n_head_kv == val("llama.attention.head_count_kv")
    assert cfg.head_dim == cfg.n_rot == val("llama.rope.dimension_count")
    assert cfg.n_ctx_train == val("llama.context_length")
    assert cfg.rope_freq_base == val("llama.rope.freq_base")
    assert cfg.rms_eps == pytest.approx(val("llama.attention.layer_norm_rms_epsilon"), rel=1e-7)
    assert cfg.n_vocab == len(val("tokenizer.ggml.tokens"))
    assert cfg.tied_output == ("output.weight" not in names)
    assert cfg.has_rope_freqs == ("rope_freqs.weight" in names)


REQUIRED = ["llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
            "llama.attention.head_count", "llama.context_length", "llama.attention.layer_norm_rms_epsilon"]


@pytest.mark.parametrize("key", REQUIRED)
def test_missing_required_key_is_named(tmp_path, spm_vocab, key):
    path = write_llama(tmp_path / "m.gguf", Shape(omit_keys=(key,)), spm_vocab)
    with pytest.raises(gguflm.GGUFError, match=f"missing metadata key '{key}'"):
        gguflm.load(path)


@pytest.mark.parametrize("tensor", ["token_embd.weight", "output_norm.weight", "blk.1.attn_k.weight",
                                    "blk.0.ffn_down.weight", "blk.1.ffn_norm.weight"])
def test_missing_tensor_is_named(tmp_path, spm_vocab, tensor):
    path = write_llama(tmp_path / "m.gguf", Shape(omit_tensors=(tensor,)), spm_vocab)
    with pytest.raises(gguflm.GGUFError, match=f"missing tensor '{tensor}'"):
        gguflm.load(path)


def test_wrong_shape_is_named(tmp_path, spm_vocab):
    path = write_llama(tmp_path / "m.gguf", Shape(bad_shapes={"blk.0.attn_v.weight": (16, 64)}), spm_vocab)
    with pytest.raises(gguflm.GGUFError, match=r"'blk.0.attn_v.weight' has shape \[64, 16\], expected \[64, 32\]"):
        gguflm.load(path)


@pytest.mark.parametrize("extra,match", [
    ({"llama.attention.head_count_kv": (3, "UINT32")}, "not a multiple of head_count_kv"),
    ({"llama.attention.head_count": (0, "UINT32")}, "expected an integer"),
    ({"llama.rope.scaling.type": ("yarn", "STRING")}, "RoPE scaling type 'yarn' is not supported"),
    ({"llama.rope.dimension_count": (8, "UINT32")}, "must equal the head size"),
    ({"llama.attention.layer_norm_rms_epsilon": (float("nan"), "FLOAT32")}, "finite"),
    ({"llama.vocab_size": (100, "UINT32")}, "vocab_size 100"),
    ({"llama.block_count": ("two", "STRING")}, "expected an integer"),
])
def test_bad_values_are_refused(tmp_path, spm_vocab, extra, match):
    import gguf

    keys = {k: (v, gguf.GGUFValueType[t]) for k, (v, t) in extra.items()}
    path = write_llama(tmp_path / "m.gguf", Shape(extra_keys=keys), spm_vocab)
    with pytest.raises(gguflm.GGUFError, match=match):
        gguflm.load(path)


def test_unsupported_architecture(tmp_path, spm_vocab):
    path = write_llama(tmp_path / "m.gguf", Shape(), spm_vocab, arch="mamba")
    with pytest.raises(gguflm.GGUFError,
                       match=r"unsupported architecture 'mamba' \(supported: gemma3, llama, phi3, qwen2, qwen3\)"):
        gguflm.load(path)


@pytest.mark.parametrize("arch,shape,match", [
    ("gemma3", Shape(n_swa=8, extra_keys={"gemma3.attention.sliding_window_pattern": (-1, "INT32")}),
     "sliding_window_pattern' = -1"),
    ("gemma3", Shape(extra_keys={"gemma3.attention.sliding_window": (-4, "INT32")}), "sliding_window' = -4"),
    ("gemma3", Shape(omit_tensors=("blk.1.post_ffw_norm.weight",)), "missing tensor 'blk.1.post_ffw_norm.weight'"),
    ("qwen3", Shape(bad_shapes={"blk.0.attn_k_norm.weight": (3,)}), r"'blk.0.attn_k_norm.weight' has shape \[3\]"),
    ("phi3", Shape(bad_shapes={"blk.0.attn_qkv.weight": (64, 64)}), "'blk.0.attn_qkv.weight' has shape"),
    ("phi3", Shape(extra_tensors={"rope_factors_long.weight": 16, "rope_factors_short.weight": 16}),
     r"'rope_factors_long.weight' has shape \[16\], expected \[8\]"),
    ("qwen2", Shape(bad_shapes={"blk.0.attn_q.bias": (5,)}), r"'blk.0.attn_q.bias' has shape \[5\]"),
])
def test_arch_specific_errors_name_the_problem(tmp_path, spm_vocab, arch, shape, match):
    import gguf

    shape.extra_keys = {k: (v, gguf.GGUFValueType[t]) for k, (v, t) in shape.extra_keys.items()}
    path = write_llama(tmp_path / "m.gguf", shape, spm_vocab, arch=arch)
    with pytest.raises(gguflm.GGUFError, match=match):
        gguflm.load(path)


def test_vocab_only_file(spm_vocab):
    with pytest.raises(gguflm.GGUFError, match="no tensors"):
        gguflm.load(spm_vocab)


def test_tied_output_reuses_the_embedding(tmp_path, spm_vocab):
    path = write_llama(tmp_path / "m.gguf", Shape(tied=True), spm_vocab)
    m = gguflm.load(path, n_ctx=16).model
    assert m.config.tied_output
    emb = m.transformer.embedding
    assert emb.data_ptr() == m.transformer.output.weight_t.data_ptr()  # one copy, two views
    raw = gguflm.GGUFFile(path)
    info = raw.tensors["token_embd.weight"]
    np.testing.assert_array_equal(
        emb.numpy(), gguflm.dequantize(raw.tensor_data(info.name), info.ggml_type, info.shape).numpy())


def test_phi3_long_factors_beyond_the_original_context(tmp_path, shared_dir):
    """llama.cpp's get_rope_factors: the short factors up to original_context_length (64
    here), the long ones beyond."""
    from synth import ARCHS

    from gguflm.model.arch import WeightTable

    shape, vocab, arch = ARCHS["phi3-longrope"]
    path = write_llama(tmp_path / "m.gguf", shape, shared_dir / "vocab" / vocab, arch=arch)
    f = gguflm.GGUFFile(path)
    cfg = ModelConfig.from_gguf(f)
    assert cfg.has_longrope and cfg.n_ctx_orig == 4096 and cfg.rope_attn_factor == pytest.approx(1.19)
    table = WeightTable(f, cfg)
    for n_ctx, which in ((4096, "short"), (4097, "long")):
        info = f.tensors[f"rope_factors_{which}.weight"]
        want = gguflm.dequantize(f.tensor_data(info.name), info.ggml_type, info.shape)
        assert table.rope_factors(n_ctx).equal(want)
