"""``gguflm verify``: check a model against outside references, section by section, and
collect everything into one JSON-ready report (written out by :mod:`.report`).

Sections, in the order the data flows:

1. **quantization**: every tensor through ``gguflm.dequantize`` vs libggml's ``to_float``
   (bit-exact count per type); the decoder's weight layout.
2. **tokenizer / chat_template**: the prompt rendered with the model's template; our ids vs
   llama.cpp's tokenizer; our rendering vs llama-cpp-python's Jinja renderer.
3. **components**: each step of layers first/middle/last recomputed in float64 from the
   engine's own inputs (:mod:`.components`), on the prompt and its greedy continuation.
4. **logits**: the engine vs the float64 full-model reference and vs llama.cpp along that
   continuation; the first reply token.
5. **token investigation**: top-k at the end of the prompt and the logit lens.

A check has a status ``pass``, ``fail``, ``skip`` (its oracle is not installed, or
``--reference none``) or ``error`` (its oracle crashed, hung or failed: llama.cpp runs in a
child process, so that is a row of the report, never the end of gguflm); the report
passes when no check fails. An ``error`` says nothing about gguflm: it does not fail the
report (:attr:`Report.passed`), but the report says it loudly, with how to avoid it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gguflm.defaults import DEFAULT_PROMPT


# Logit thresholds. The engine computes in float32 what the reference computes in float64:
# SmolLM2 shows max |dlogit| ~1e-4 and KL ~1e-10, so these leave two orders of magnitude.
REF_MAX_DLOGIT = 1e-2
REF_KL_MEAN = 1e-6
# The CUDA path runs float16 activations into its matmuls (float32 accumulation): as its tests.
CUDA_MAX_DLOGIT = 0.25
CUDA_KL_MEAN = 1e-4
# llama.cpp quantizes activations to 8 bits in its CPU dot products (Q8_0/Q8_K), which puts
# it KL ~3e-3..8e-3 from an exact computation on quantized files; 2e-2 flags a real mismatch.
LLAMA_CPP_KL_MEAN = 2e-2


class VerifyError(ValueError):
    """A request ``run_verification`` cannot carry out (bad option, prompt too long...)."""


@dataclass
class VerifyOptions:
    """What ``gguflm verify`` was asked. ``reference`` None: llama.cpp when installed."""

    model: Path
    prompt: str = DEFAULT_PROMPT
    reference: str | None = None          # "llama.cpp", "none" or None
    explain_token: int | None = None
    n_predict: int = 16
    top_k: int = 10
    threads: int | None = None
    device: str = "cpu"


@dataclass
class Check:
    section: str
    name: str
    value: str
    threshold: str
    status: str  # "pass" | "fail" | "skip" | "error"
    detail: str = ""


@dataclass
class Report:
    """Everything a report shows; ``data`` holds each section's numbers by section name."""

    checks: list[Check] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # for the figures, not the JSON

    @property
    def passed(self) -> bool:
        return not any(c.status == "fail" for c in self.checks)

    @property
    def errors(self) -> list[dict[str, str]]:
        """The oracle failures that left checks not run (what happened, how to avoid it)."""
        return self.data.get("oracle_errors", [])

    def check(self, section: str, name: str, value: str, threshold: str, ok: bool | None, detail: str = "") -> None:
        """Add a check; ``ok`` None means skipped (``detail`` says why)."""
        status = "skip" if ok is None else ("pass" if ok else "fail")
        self.checks.append(Check(section, name, value, threshold, status, detail))

    def error(self, section: str, name: str, threshold: str, err: Any) -> None:
        """Add a check that could not run because its oracle failed (an ``OracleFailed``)."""
        self.checks.append(Check(section, name, "-", threshold, "error", err.what))
        errors = self.data.setdefault("oracle_errors", [])
        if not any(e["what"] == err.what for e in errors):
            errors.append({"oracle": "llama.cpp", "what": err.what, "hint": err.hint, "log": err.log})

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks], **self.data,
                "timings_s": self.timings}


class _Stages:
    """A progress bar over the report's stages (tqdm on stderr) that times each stage."""

    def __init__(self, names: list[str], timings: dict[str, float]):
        from tqdm import tqdm

        self.bar = tqdm(total=len(names), desc="verify", unit="stage", file=sys.stderr,
                        bar_format="{desc:<34}{bar}| {n_fmt}/{total_fmt} [{elapsed}]")
        self.timings = timings

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.bar.set_description_str(f"verify: {name}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 3)
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


STAGES = ["quantization", "tokenizer", "load", "generate", "trace", "components", "float64 reference",
          "llama.cpp logits", "token investigation"]


def _piece(tokenizer: Any, token: int) -> str:
    return tokenizer.token_to_piece(int(token), special=True).decode("utf-8", "replace")


def greedy_decode(model: Any, prompt: list[int], n_predict: int) -> tuple[list[int], torch.Tensor]:
    """Continue ``prompt`` greedily through the generation loop every caller uses
    (:meth:`gguflm.engine.llm.LLM.stream`), stopping at an end-of-generation token.
    Returns the new ids and each step's float32 logits [len(new) (+ 1 when an
    end-of-generation token ended it), V]: row i predicts position ``len(prompt) + i``."""
    from gguflm.engine.sampling import SamplingParams

    s = model.stream(prompt, n_predict, SamplingParams(temperature=0), keep_logits=True)
    for _ in s:
        pass
    return s.result.tokens, torch.stack(s.done.logits)


@dataclass
class _Run:
    """What the sections share: the request, the file, and which oracles are in use."""

    opts: VerifyOptions
    path: Path
    f: Any            # GGUFFile
    cfg: Any          # ModelConfig
    spec: Any         # ArchSpec
    use_llama: bool
    use_libggml: bool
    no_oracle: str    # why a llama.cpp check is skipped
    llama: Any = None                  # LlamaCpp (its child process) while use_llama
    llama_error: Any = None            # the OracleFailed of the last llama.cpp call that failed

    def ask(self, call: Callable[[Any], Any]) -> Any:
        """``call(self.llama)``; None, with ``llama_error`` set, if llama.cpp failed."""
        from gguflm.verify.llamacpp import OracleFailed

        try:
            return call(self.llama)
        except OracleFailed as e:
            self.llama_error = e
            return None

    def not_run(self, rep: Report, section: str, check: str, threshold: str, why: str | None = None) -> None:
        """The row of a llama.cpp check without llama.cpp's answer: error or skip."""
        if self.llama_error is not None:
            rep.error(section, check, threshold, self.llama_error)
        else:
            rep.check(section, check, "-", threshold, None, why or self.no_oracle)


def _quantization(rep: Report, r: _Run) -> None:
    from gguflm.verify.quantization import check_layout, compare_dequantization

    layout = check_layout(r.f, r.cfg, r.use_libggml)
    for c in layout:
        rep.check("quantization", f"layout: {c.name}", "ok" if c.passed else "mismatch", f"{r.cfg.arch} layout",
                  c.passed, c.detail)
    types = compare_dequantization(r.f, r.use_libggml)
    for name, s in sorted(types.items()):
        check = f"{name} dequantization bit-exact vs libggml"
        if s.compared:
            rep.check("quantization", check, f"{s.bit_exact}/{s.compared}", "all", s.bit_exact == s.compared,
                      f"max |Δ| {s.max_abs_diff:.3g}" if s.mismatched else "")
        else:
            rep.check("quantization", check, "-", "all", None,
                      r.no_oracle if not r.use_libggml else "libggml has no to_float for this type")
    rep.data["quantization"] = {"types": {k: v.to_dict() for k, v in sorted(types.items())},
                                "layout": [c.to_dict() for c in layout],
                                "oracle": "libggml to_float" if r.use_libggml else None}


def _prompt(rep: Report, r: _Run) -> tuple[Any, str]:
    """Render and tokenize the prompt, compare with llama.cpp; returns (tokenizer, text)."""
    from gguflm.chat import ChatTemplate
    from gguflm.chat.template import TEMPLATE_KEY
    from gguflm.tokenizer import Tokenizer

    tok, tpl = Tokenizer.from_gguf(r.f), ChatTemplate.from_gguf(r.f)
    messages = [{"role": "user", "content": r.opts.prompt}]
    rendered = tpl.render(messages, add_generation_prompt=True)
    ids = tok.encode(rendered, add_special=True, parse_special=True)
    in_file = TEMPLATE_KEY in r.f.metadata
    tpl_data: dict[str, Any] = {"origin": tpl.origin, "in_file": in_file, "messages": messages, "rendered": rendered}
    check = "rendering = llama-cpp-python's Jinja2ChatFormatter"
    theirs = None
    if r.use_llama and in_file:
        theirs = r.ask(lambda o: o.render_chat_template(r.f.metadata[TEMPLATE_KEY], messages,
                                                        bos_token=tpl.bos_token, eos_token=tpl.eos_token))
    if theirs is not None:
        same = theirs == rendered
        tpl_data["llama_cpp_python_render_equal"] = same
        rep.check("chat_template", check, "equal" if same else "differs", "equal", same,
                  "" if same else f"theirs: {theirs!r:.200}")
    else:
        r.not_run(rep, "chat_template", check, "equal",
                  None if not r.use_llama else "the file has no template (built-in used)")
    tok_data: dict[str, Any] = {"model": tok.model, "pre": tok.pre, "n_vocab": tok.n_vocab, "add_bos": tok.add_bos,
                                "ids": ids}
    check = "prompt ids = llama.cpp's tokenizer"
    theirs_ids = r.ask(lambda o: o.tokenize(r.path, rendered, add_special=True, parse_special=True)) \
        if r.use_llama else None
    if theirs_ids is not None:
        tok_data["llama_cpp_ids"] = theirs_ids
        same_n = sum(a == b for a, b in zip(ids, theirs_ids))
        rep.check("tokenizer", check, f"{same_n}/{max(len(ids), len(theirs_ids))} equal", "all", ids == theirs_ids,
                  "" if ids == theirs_ids else f"ours {len(ids)} ids, llama.cpp {len(theirs_ids)}")
    else:
        r.not_run(rep, "tokenizer", check, "all")
    rep.data["chat_template"], rep.data["tokenizer"] = tpl_data, tok_data
    return tok, rendered


def _components(rep: Report, r: _Run, trace: Any, weight: Any, engine_block: str) -> None:
    from gguflm.verify.components import check_components

    comps = check_components(trace, r.cfg, r.spec, r.f, weight)
    n_fail = sum(not c.passed for c in comps)
    worst = max(comps, key=lambda c: c.rel / c.threshold if c.threshold else (0.0 if c.rel == 0 else math.inf))
    where = "" if worst.layer is None else f" (layer {worst.layer})"
    rep.check("components", "every component within its threshold", f"{len(comps) - n_fail}/{len(comps)}", "all",
              n_fail == 0, f"closest to its threshold: {worst.component}{where} rel {worst.rel:.2e} "
              f"≤ {worst.threshold:.0e}")
    rep.data["components"] = {"layers": sorted(trace.layers), "positions": len(trace.tokens),
                              "weights": "libggml to_float" if r.use_libggml else "gguflm.dequantize",
                              "engine_block": engine_block, "twin_layers": sorted(trace.twin_layers),
                              "results": [c.to_dict() for c in comps]}


def _logits(rep: Report, r: _Run, tok: Any, first: int, ours: torch.Tensor, decoded: torch.Tensor,
            ref: torch.Tensor, ll: torch.Tensor | None) -> dict[str, int]:
    """Compare the rows ``first..`` of the logits [T, V]; returns the first reply token by source."""
    from gguflm.verify.metrics import logit_agreement

    cuda = torch.device(r.opts.device).type == "cuda"
    max_dlogit, kl_mean = (CUDA_MAX_DLOGIT, CUDA_KL_MEAN) if cuda else (REF_MAX_DLOGIT, REF_KL_MEAN)

    scored = slice(first, ours.shape[0])
    data: dict[str, Any] = {"positions": ours.shape[0] - first}
    for key, label, rows in (("ours_vs_reference", "ours vs float64 reference", ours[scored]),
                             ("decode_vs_reference", "ours (decode steps) vs float64 reference", decoded)):
        a = logit_agreement(rows, ref[first:first + len(rows)])
        data[key] = a.to_dict()
        rep.check("logits", f"{label}: max |Δlogit|", f"{a.max_abs_dlogit:.2e}", f"≤ {max_dlogit:.0e}",
                  a.max_abs_dlogit <= max_dlogit)
        rep.check("logits", f"{label}: mean KL", f"{a.kl_mean:.2e}", f"≤ {kl_mean:.0e}", a.kl_mean <= kl_mean,
                  f"top-1 agreement {a.top1_agreement:.1%} over {a.positions} positions")
    check = "ours vs llama.cpp: mean KL"
    if ll is not None:
        a, b = logit_agreement(ours[scored], ll[scored]), logit_agreement(ll[scored], ref[scored])
        data["ours_vs_llama_cpp"], data["llama_cpp_vs_reference"] = a.to_dict(), b.to_dict()
        rep.check("logits", check, f"{a.kl_mean:.2e}", f"≤ {LLAMA_CPP_KL_MEAN:.0e}", a.kl_mean <= LLAMA_CPP_KL_MEAN,
                  f"top-1 agreement {a.top1_agreement:.1%}; llama.cpp vs float64 KL {b.kl_mean:.2e}")
    else:
        r.not_run(rep, "logits", check, f"≤ {LLAMA_CPP_KL_MEAN:.0e}")
    firsts = {"ours": int(ours[first].argmax()), "reference": int(ref[first].argmax())}
    if ll is not None:
        firsts["llama_cpp"] = int(ll[first].argmax())
    data["first_reply_token"] = {k: {"id": v, "piece": _piece(tok, v)} for k, v in firsts.items()}
    rep.check("logits", "first reply token = float64 reference's",
              f"{firsts['ours']} = {_piece(tok, firsts['ours'])!r}", "same token", firsts["ours"] == firsts["reference"],
              f"reference {firsts['reference']}" + (f", llama.cpp {firsts['llama_cpp']}" if ll is not None else ""))
    rep.data["logits"] = data
    rep.arrays["logits_reference"] = ref[scored].numpy()
    rep.arrays["logits_gguflm"] = ours[scored].numpy()
    if ll is not None:
        rep.arrays["logits_llama.cpp"] = ll[scored].numpy()
    return firsts


def _investigate(rep: Report, r: _Run, tok: Any, trace: Any, ours: torch.Tensor, weight: Any, first: int,
                 token: int, ref: torch.Tensor, ll: torch.Tensor | None) -> None:
    """Top-k at ``first`` and the logit lens (when ``trace`` holds the layers' outputs)."""
    from gguflm.verify.lens import logit_lens, rank_of, top_k

    row = ours[first]                                                              # [V]
    tops = top_k(row, r.opts.top_k)
    ref_p = torch.softmax(ref[first], -1)
    ll_p = torch.softmax(ll[first].double(), -1) if ll is not None else None
    watch = [t.token for t in tops] + ([token] if token not in {t.token for t in tops} else [])
    head = r.spec.tensor_name("output")
    w_out = weight(head if head in r.f.tensors else r.spec.tensor_name("token_embd")).double()
    lens = []
    if trace is not None:
        residuals = [trace.block_in[0][first]] + [trace.block_out[i][first] for i in range(r.cfg.n_layer)]
        lens = logit_lens(residuals, weight(r.spec.tensor_name("output_norm")).double(), w_out, r.cfg.rms_eps,
                          token, watch)
    rep.data["token_investigation"] = {
        "position": first, "token": token, "piece": _piece(tok, token),
        "rank": rank_of(row, token), "prob": float(torch.softmax(row.double(), -1)[token]),
        "top_k": [{"token": t.token, "piece": _piece(tok, t.token), "logit": t.logit, "prob": t.prob,
                   "prob_reference": float(ref_p[t.token]),
                   "prob_llama_cpp": float(ll_p[t.token]) if ll_p is not None else None} for t in tops],
        "watch": [{"token": t, "piece": _piece(tok, t)} for t in watch],
        "lens": [asdict(x) | {"top_piece": _piece(tok, x.top_token)} for x in lens],
    }


def run_verification(opts: VerifyOptions) -> Report:
    """Run every section for ``opts.model``; a failed check is recorded, not raised (see
    Report). Raises VerifyError for a request that cannot be carried out."""
    import gguflm
    from gguflm.model.arch import arch_spec
    from gguflm.model.config import ModelConfig
    from gguflm.verify import ggml_oracle, llamacpp
    from gguflm.verify.capture import trace_forward
    from gguflm.verify.components import weight_loader
    from gguflm.verify.reference import reference_logits

    if opts.reference not in (None, "llama.cpp", "none"):
        raise VerifyError(f"unknown reference {opts.reference!r} (llama.cpp or none)")
    if opts.n_predict < 1 or opts.top_k < 1:
        raise VerifyError("n_predict and top_k must be >= 1")
    if opts.reference == "llama.cpp" and not llamacpp.available():
        raise VerifyError(f"--reference llama.cpp needs llama-cpp-python: {llamacpp.INSTALL_HINT}")
    use_llama = opts.reference != "none" and llamacpp.available()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    path = Path(opts.model)
    f = gguflm.GGUFFile(path)
    cfg = ModelConfig.from_gguf(f)
    if opts.explain_token is not None and not 0 <= opts.explain_token < cfg.n_vocab:
        raise VerifyError(f"--explain-token {opts.explain_token} is outside the vocabulary [0, {cfg.n_vocab})")
    r = _Run(opts, path, f, cfg, arch_spec(cfg.arch), use_llama, use_llama and ggml_oracle.available(),
             "--reference none" if opts.reference == "none" else "llama-cpp-python is not installed")
    rep = Report()
    if opts.reference != "none" and not use_llama:
        rep.data["notes"] = [f"llama-cpp-python is not installed, so the checks against llama.cpp and libggml "
                             f"were skipped; {llamacpp.INSTALL_HINT}"]
    rep.data["prompt"] = opts.prompt
    rep.data["model"] = {
        "path": str(path), "file_bytes": path.stat().st_size, "architecture": cfg.arch,
        "name": f.metadata.get("general.name"), "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_ff": cfg.n_ff,
        "n_head": cfg.n_head, "n_head_kv": cfg.n_head_kv, "head_dim": cfg.head_dim, "n_vocab": cfg.n_vocab,
        "n_ctx_train": cfg.n_ctx_train, "rope_style": cfg.rope_style.value, "rope_freq_base": cfg.rope_freq_base,
        "rms_eps": cfg.rms_eps, "tied_output": cfg.tied_output,
        "parameters": sum(i.n_elements for i in f.tensors.values()),
    }
    weight = functools.lru_cache(maxsize=16)(weight_loader(f, r.use_libggml))  # float32, exact
    stages = _Stages(STAGES, rep.timings)
    t_start, load_before = time.perf_counter(), os.getloadavg()
    try:
        if use_llama:
            r.llama = llamacpp.LlamaCpp()      # llama.cpp in a child process: its crash is a report row
        with stages.stage("quantization"):
            _quantization(rep, r)
        with stages.stage("tokenizer"):
            tok, rendered = _prompt(rep, r)
        with stages.stage("load"):
            n_ctx = min(len(rep.data["tokenizer"]["ids"]) + opts.n_predict + 1, cfg.n_ctx_train)
            model = gguflm.load(f, device=opts.device, n_ctx=n_ctx)
            prompt = model.encode_prompt(rendered)
        if len(prompt) >= n_ctx:
            raise VerifyError(f"the prompt has {len(prompt)} tokens; the model's context is {cfg.n_ctx_train}")
        with stages.stage("generate"):
            continuation, decoded = greedy_decode(model, prompt, opts.n_predict)
        seq, first = prompt + continuation, len(prompt) - 1          # row ``first`` predicts the reply
        rep.data["sequence"] = {"prompt_ids": prompt, "continuation_ids": continuation,
                                "continuation_text": tok.decode(continuation), "scored_from": first}
        traced = model.model.transformer is not None     # the CUDA fused path has no module steps to observe
        trace = None
        with stages.stage("trace"):
            if traced:
                trace = trace_forward(model.model, seq, sorted({0, cfg.n_layer // 2, cfg.n_layer - 1}))
            ours = trace.logits if traced else model.logits(seq)
        with stages.stage("components"):
            if traced:
                _components(rep, r, trace, weight, type(model.model.transformer.blocks[0]).__name__)
            else:
                why = (f"{opts.device}: the fused kernels expose no intermediate steps; the components "
                       "are checked on the CPU path (gguflm verify --device cpu)")
                rep.data["components_skipped"] = why
                rep.check("components", "every component within its threshold", "-", "all", None, why)
        with stages.stage("float64 reference"):
            ref = torch.from_numpy(reference_logits(f, seq, weights=weight))       # [T, V] float64
        ll = None
        with stages.stage("llama.cpp logits"):
            if use_llama:
                loaded = r.ask(lambda o: o.load(path, n_ctx=len(seq), n_threads=opts.threads))
                out = r.ask(lambda o: o.logits(seq)) if loaded is not None else None
                ll = torch.from_numpy(out) if out is not None else None              # [T, V]
        firsts = _logits(rep, r, tok, first, ours, decoded, ref, ll)
        with stages.stage("token investigation"):
            token = firsts["ours"] if opts.explain_token is None else opts.explain_token
            _investigate(rep, r, tok, trace, ours, weight, first, token, ref, ll)
    finally:
        stages.close()
        if r.llama is not None:
            r.llama.close()
    rep.timings["total"] = round(time.perf_counter() - t_start, 3)
    rep.data["environment"] = {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "llama_cpp_python": llamacpp.version() if use_llama else None, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "device": opts.device, "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    return rep
