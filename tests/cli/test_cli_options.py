"""llama.cpp users' habits (issue 12 item 5): llama.cpp's flag spellings, one spelling per
option across subcommands, each subcommand's own usage on a bad flag, -ngl."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

import gguflm
from gguflm.cli import COMMANDS, UserError, build_parser, main, options


def parse(*argv: str) -> argparse.Namespace:
    from gguflm.cli import parse_args

    return parse_args(build_parser(), list(argv))


@pytest.mark.parametrize("cmd", COMMANDS)
def test_bad_flag_prints_the_subcommands_usage(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: gguflm {cmd}"), err
    assert err.strip().splitlines()[-1] == f"gguflm {cmd}: error: unrecognized arguments: --bogus"


def test_llama_cpp_spellings_of_run():
    a = parse("run", "-m", "x.gguf", "-f", "q.txt", "-n", "7", "-c", "128", "-t", "2", "-s", "5", "-ngl", "99",
              "--temp", "0.5", "--top-k", "3", "--top-p", "0.9", "--min-p", "0.1", "--repeat-penalty", "1.1",
              "--chat-template", "chatml")
    assert (a.model, a.file, a.n_predict, a.ctx_size, a.threads, a.seed, a.n_gpu_layers) == \
        ("x.gguf", "q.txt", 7, 128, 2, 5, 99)
    assert (a.temp, a.top_k, a.top_p, a.min_p, a.repeat_penalty, a.chat_template) == \
        (0.5, 3, 0.9, 0.1, 1.1, "chatml")
    b = parse("run", "-cnv", "-p", "be brief", "--ctx-size", "64", "--threads", "1", "--seed", "4",
              "--n-gpu-layers", "0", "--n-predict", "3")
    assert (b.conversation, b.prompt, b.ctx_size, b.threads, b.seed, b.n_gpu_layers, b.n_predict) == \
        (True, "be brief", 64, 1, 4, 0, 3)


@pytest.mark.parametrize("cmd", ["run", "chat", "verify", "perplexity", "bench", "serve"])
def test_one_spelling_of_threads_everywhere(cmd):
    extra = ["-p", "x"] if cmd == "run" else []
    assert parse(cmd, *extra, "-t", "3").threads == 3
    assert parse(cmd, *extra, "--threads", "3").threads == 3


@pytest.mark.parametrize("cmd", ["run", "chat", "perplexity", "serve"])
def test_one_spelling_of_ctx_size(cmd):
    assert parse(cmd, "-c", "96").ctx_size == 96
    assert parse(cmd, "--ctx-size", "96").ctx_size == 96


def test_perplexity_keeps_its_old_ctx_spelling():
    assert parse("perplexity", "--ctx", "96").ctx_size == 96


@pytest.mark.parametrize("cmd", ["run", "chat", "bench", "serve"])
def test_ngl_is_not_n(cmd):
    a = parse(cmd, "-ngl", "99")
    assert a.n_gpu_layers == 99


def test_ngl_chooses_the_device(capsys):
    import torch

    ns = argparse.Namespace
    assert options.device(ns(device=None, n_gpu_layers=0), "run") == "cpu"
    assert options.device(ns(device=None, n_gpu_layers=None), "run") == "cpu"
    with pytest.raises(UserError, match="disagree"):
        options.device(ns(device="cpu", n_gpu_layers=99), "run")
    if torch.cuda.is_available():
        assert options.device(ns(device=None, n_gpu_layers=99), "run") == "cuda"
    else:  # llama.cpp's habit: a warning, then the CPU
        assert options.device(ns(device=None, n_gpu_layers=99), "run") == "cpu"
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["gguflm run: warning: -ngl 99: no CUDA device is available; running on the CPU"]
        with pytest.raises(UserError, match="no CUDA device"):
            options.device(ns(device="cuda", n_gpu_layers=None), "run")


def test_seed_bounds():
    assert options.check_seed(None) is None and options.check_seed(-1) is None  # llama.cpp: -1 = random
    assert options.check_seed(2**64 - 1) == 2**64 - 1
    for bad in (-2, 2**64, 1180591620717411303424):
        with pytest.raises(UserError, match="--seed"):
            options.check_seed(bad)


def test_tensor_ggml_type_has_a_name(tmp_path):
    """TensorInfo.ggml_type is a GGMLType member: equal to the id, with a name; dequantize
    takes the member or the plain id."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    rng = np.random.default_rng(0)
    w.add_tensor("q", rng.integers(0, 256, size=(2, 34), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = gguflm.GGUFFile(tmp_path / "t.gguf")
    t = f.tensors["q"]
    assert isinstance(t.ggml_type, gguflm.GGMLType)
    assert t.ggml_type == int(gguf.GGMLQuantizationType.Q8_0) and t.ggml_type.name == "Q8_0"
    a = gguflm.dequantize(f.tensor_data("q"), t.ggml_type, t.shape)
    b = gguflm.dequantize(f.tensor_data("q"), int(t.ggml_type), t.shape)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_chat_template_option(tmp_path, smollm2_path):
    """--chat-template: a llama.cpp format name, a file, or the Jinja text itself."""
    tok = gguflm.Tokenizer.from_gguf(smollm2_path)
    msgs = [{"role": "user", "content": "Hi"}]
    assert options.chat_template(None, tok) is None
    chatml = gguflm.ChatTemplate.builtin("chatml")
    assert options.chat_template("chatml", tok).render(msgs) == chatml.render(msgs)
    jinja = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    assert options.chat_template(jinja, tok).render(msgs) == "[user] Hi\n"
    f = tmp_path / "t.jinja"
    f.write_text(jinja)
    assert options.chat_template(str(f), tok).render(msgs) == "[user] Hi\n"
    with pytest.raises(UserError, match="neither a chat format name"):
        options.chat_template("no-such-format", tok)
    with pytest.raises(gguflm.TemplateError, match="no built-in chat format 'rwkv-world'"):
        options.chat_template("rwkv-world", tok)  # llama.cpp knows it; gguflm has no template for it


def test_bench_prints_header_progress_and_rows(smollm2_path, capsys):
    assert main(["bench", "-m", str(smollm2_path), "-p", "4", "-n", "2", "-r", "1", "-t", "1", "--no-cold-start"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("| model | size |") and lines[1].startswith("| --- |")
    assert [line.split("|")[5].strip() for line in lines[2:4]] == ["pp4", "tg2"]
    assert "bench: measuring pp4" in err and "bench: measuring tg2" in err
