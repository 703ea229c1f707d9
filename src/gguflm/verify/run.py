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

A check has a status ``pass``, ``fail`` or ``skip`` (its oracle is not installed, or
``--reference none``); the report passes when no check fails.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_PROMPT = "Is Paris the capital of France?"

# Logit thresholds. The engine computes in float32 what the reference computes in float64:
# SmolLM2 shows max |dlogit| ~1e-4 and KL ~1e-10, so these leave two orders of magnitude.
REF_MAX_DLOGIT = 1e-2
REF_KL_MEAN = 1e-6
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


@dataclass
class Check:
    section: str
    name: str
    value: str
    threshold: str
    status: str  # "pass" | "fail" | "skip"
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

    def check(self, section: str, name: str, value: str, threshold: str, ok: bool | None, detail: str = "") -> None:
        """Add a check; ``ok`` None means skipped (``detail`` says why)."""
        status = "skip" if ok is None else ("pass" if ok else "fail")
        self.checks.append(Check(section, name, value, threshold, status, detail))

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


STAGES = ["layout", "quantization", "tokenizer", "load", "generate", "trace", "components",
          "float64 reference", "llama.cpp logits", "token investigation"]


def _piece(tokenizer: Any, token: int) -> str:
    return tokenizer.token_to_piece(int(token), special=True).decode("utf-8", "replace")


def greedy_decode(model: Any, prompt: list[int], n_predict: int) -> tuple[list[int], torch.Tensor]:
    """Continue ``prompt`` greedily as the engine generates: the prompt in one step, then one
    token per step through the KV cache, stopping at an end-of-generation token. Returns the
    new ids and each step's float32 logits [len(new) + 1, V] (row i predicts position
    ``len(prompt) + i``; the last row follows the last new token)."""
    eog = set(model.tokenizer.eog_ids)
    dev = model.device
    cache = model.new_cache(1, n_ctx=len(prompt) + n_predict)
    slots = torch.zeros(1, dtype=torch.long, device=dev)
    n = len(prompt)
    logits = model.forward(torch.tensor([prompt], device=dev), torch.arange(n, device=dev)[None], cache, slots,
                           last_only=True)[0].float().cpu()                                  # [V]
    rows, new = [logits], []
    while len(new) < n_predict:
        tok = int(rows[-1].argmax())
        if tok in eog:
            break
        new.append(tok)
        step = model.forward(torch.tensor([[tok]], device=dev), torch.tensor([[n + len(new) - 1]], device=dev),
                             cache, slots, last_only=True)[0]
        rows.append(step.float().cpu())
    return new, torch.stack(rows)


def run_verification(opts: VerifyOptions) -> Report:
    """Run every section for ``opts.model``; never raises for a failed check (see Report)."""
    import gguflm
    from gguflm.chat import ChatTemplate
    from gguflm.chat.template import TEMPLATE_KEY
    from gguflm.model.arch import arch_spec
    from gguflm.model.config import ModelConfig
    from gguflm.tokenizer import Tokenizer
    from gguflm.verify import ggml_oracle, llamacpp
    from gguflm.verify.capture import trace_forward
    from gguflm.verify.components import check_components, weight_loader
    from gguflm.verify.lens import logit_lens, rank_of, top_k
    from gguflm.verify.metrics import logit_agreement
    from gguflm.verify.quantization import check_layout, compare_dequantization
    from gguflm.verify.reference import reference_logits

    if opts.reference not in (None, "llama.cpp", "none"):
        raise VerifyError(f"unknown reference {opts.reference!r} (llama.cpp or none)")
    if opts.n_predict < 1:
        raise VerifyError("n_predict must be >= 1")
    use_llama = opts.reference != "none" and llamacpp.available()
    if opts.reference == "llama.cpp" and not llamacpp.available():
        raise VerifyError("--reference llama.cpp needs llama-cpp-python (pip install llama-cpp-python)")
    use_libggml = use_llama and ggml_oracle.available()
    no_oracle = ("--reference none" if opts.reference == "none" else "llama-cpp-python is not installed")
    if opts.threads:
        torch.set_num_threads(opts.threads)

    rep = Report()
    stages = _Stages(STAGES, rep.timings)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    path = Path(opts.model)
    try:
        # -- 1. quantization -------------------------------------------------------------
        with stages.stage("layout"):
            f = gguflm.GGUFFile(path)
            cfg = ModelConfig.from_gguf(f)
            spec = arch_spec(cfg.arch)
            layout = check_layout(f, cfg, use_libggml)
            for c in layout:
                rep.check("quantization", f"layout: {c.name}", "ok" if c.passed else "mismatch", "llama layout",
                          c.passed, c.detail)
        with stages.stage("quantization"):
            types = compare_dequantization(f, use_libggml)
            for name, s in sorted(types.items()):
                if s.compared:
                    rep.check("quantization", f"{name} dequantization bit-exact vs libggml",
                              f"{s.bit_exact}/{s.compared}", "all", s.bit_exact == s.compared,
                              f"max |Δ| {s.max_abs_diff:.3g}" if s.mismatched else "")
                else:
                    rep.check("quantization", f"{name} dequantization bit-exact vs libggml", "-", "all", None,
                              no_oracle if not use_libggml else "libggml has no to_float for this type")
        rep.data["model"] = {
            "path": str(path), "file_bytes": path.stat().st_size, "architecture": cfg.arch,
            "name": f.metadata.get("general.name"), "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
            "n_ff": cfg.n_ff, "n_head": cfg.n_head, "n_head_kv": cfg.n_head_kv, "head_dim": cfg.head_dim,
            "n_vocab": cfg.n_vocab, "n_ctx_train": cfg.n_ctx_train, "rope_style": cfg.rope_style.value,
            "rope_freq_base": cfg.rope_freq_base, "rms_eps": cfg.rms_eps, "tied_output": cfg.tied_output,
            "parameters": sum(i.n_elements for i in f.tensors.values()),
        }
        rep.data["quantization"] = {"types": {k: v.to_dict() for k, v in sorted(types.items())},
                                    "layout": [c.to_dict() for c in layout], "oracle": "libggml to_float"
                                    if use_libggml else None}

        # -- 2. tokenizer and chat template ----------------------------------------------
        with stages.stage("tokenizer"):
            tok = Tokenizer.from_gguf(f)
            tpl = ChatTemplate.from_gguf(f)
            messages = [{"role": "user", "content": opts.prompt}]
            rendered = tpl.render(messages, add_generation_prompt=True)
            ours_ids = tok.encode(rendered, add_special=True, parse_special=True)
            tpl_data: dict[str, Any] = {"origin": tpl.origin, "in_file": TEMPLATE_KEY in f.metadata,
                                        "messages": messages, "rendered": rendered}
            if use_llama and TEMPLATE_KEY in f.metadata:
                theirs = llamacpp.render_chat_template(f.metadata[TEMPLATE_KEY], messages,
                                                       bos_token=tpl.bos_token, eos_token=tpl.eos_token)
                tpl_data["llama_cpp_python_render_equal"] = theirs == rendered
                rep.check("chat_template", "rendering = llama-cpp-python's Jinja2ChatFormatter",
                          "equal" if theirs == rendered else "differs", "equal", theirs == rendered,
                          "" if theirs == rendered else f"theirs: {theirs!r:.200}")
            else:
                rep.check("chat_template", "rendering = llama-cpp-python's Jinja2ChatFormatter", "-", "equal",
                          None, no_oracle if not use_llama else "the file has no template (built-in used)")
            tok_data: dict[str, Any] = {"model": tok.model, "pre": tok.pre, "n_vocab": tok.n_vocab,
                                        "add_bos": tok.add_bos, "ids": ours_ids}
            if use_llama:
                ll_ids = llamacpp.tokenize(path, rendered, add_special=True, parse_special=True)
                tok_data["llama_cpp_ids"] = ll_ids
                same = sum(a == b for a, b in zip(ours_ids, ll_ids))
                rep.check("tokenizer", "prompt ids = llama.cpp's tokenizer", f"{same}/{max(len(ours_ids), len(ll_ids))}"
                          f" equal", "all", ours_ids == ll_ids,
                          "" if ours_ids == ll_ids else f"ours {len(ours_ids)} ids, llama.cpp {len(ll_ids)}")
            else:
                rep.check("tokenizer", "prompt ids = llama.cpp's tokenizer", "-", "all", None, no_oracle)
        rep.data["chat_template"], rep.data["tokenizer"] = tpl_data, tok_data

        # -- 3. the engine on the prompt and its greedy continuation -----------------------
        with stages.stage("load"):
            n_ctx = min(len(ours_ids) + opts.n_predict + 1, cfg.n_ctx_train)
            model = gguflm.load(f, n_ctx=n_ctx)
            prompt_ids = model.encode_prompt(rendered)
        if len(prompt_ids) >= n_ctx:
            raise VerifyError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {cfg.n_ctx_train}")
        with stages.stage("generate"):
            continuation, decoded = greedy_decode(model, prompt_ids, opts.n_predict)
        seq = prompt_ids + continuation
        first = len(prompt_ids) - 1                       # the row that predicts the reply
        L = cfg.n_layer
        detail = sorted({0, L // 2, L - 1})
        with stages.stage("trace"):
            trace = trace_forward(model, seq, detail)
        ours = trace.logits                                                        # [T, V]
        weight = functools.lru_cache(maxsize=16)(weight_loader(f, use_libggml))  # float32, exact
        with stages.stage("components"):
            comps = check_components(trace, cfg, spec, f, weight)
        n_fail = sum(not c.passed for c in comps)
        worst = max(comps, key=lambda c: c.rel / c.threshold if c.threshold else (0.0 if c.rel == 0 else math.inf))
        rep.check("components", "every component within its threshold", f"{len(comps) - n_fail}/{len(comps)}",
                  "all", n_fail == 0, f"closest to its threshold: {worst.component}"
                  f"{'' if worst.layer is None else f' (layer {worst.layer})'} rel {worst.rel:.2e} "
                  f"≤ {worst.threshold:.0e}")
        rep.data["components"] = {"layers": detail, "weights": "libggml to_float" if use_libggml
                                  else "gguflm.dequantize", "positions": len(seq),
                                  "engine_block": type(model.transformer.blocks[0]).__name__,
                                  "twin_layers": sorted(trace.twin_layers),
                                  "results": [c.to_dict() for c in comps]}
        rep.data["sequence"] = {"prompt_ids": prompt_ids, "continuation_ids": continuation,
                                "continuation_text": tok.decode(continuation), "scored_from": first}

        # -- 4. logits --------------------------------------------------------------------
        with stages.stage("float64 reference"):
            ref = torch.from_numpy(reference_logits(f, seq, weights=weight))       # [T, V] float64
        scored = slice(first, len(seq))
        logit_data: dict[str, Any] = {"positions": len(seq) - first}
        for key, label, rows in (("ours_vs_reference", "ours vs float64 reference", ours[scored]),
                                 ("decode_vs_reference", "ours (decode steps) vs float64 reference", decoded)):
            vs_ref = logit_agreement(rows, ref[first:first + len(rows)])
            logit_data[key] = vs_ref.to_dict()
            rep.check("logits", f"{label}: max |Δlogit|", f"{vs_ref.max_abs_dlogit:.2e}",
                      f"≤ {REF_MAX_DLOGIT:.0e}", vs_ref.max_abs_dlogit <= REF_MAX_DLOGIT)
            rep.check("logits", f"{label}: mean KL", f"{vs_ref.kl_mean:.2e}",
                      f"≤ {REF_KL_MEAN:.0e}", vs_ref.kl_mean <= REF_KL_MEAN,
                      f"top-1 agreement {vs_ref.top1_agreement:.1%} over {vs_ref.positions} positions")
        ll: torch.Tensor | None = None
        with stages.stage("llama.cpp logits"):
            if use_llama:
                oracle = llamacpp.LlamaCppModel(path, n_ctx=len(seq), n_threads=opts.threads)
                ll = torch.from_numpy(oracle.logits(seq))
                oracle.close()
        if ll is not None:
            vs_ll = logit_agreement(ours[scored], ll[scored])
            ref_ll = logit_agreement(ll[scored], ref[scored])
            logit_data["ours_vs_llama_cpp"] = vs_ll.to_dict()
            logit_data["llama_cpp_vs_reference"] = ref_ll.to_dict()
            rep.check("logits", "ours vs llama.cpp: mean KL", f"{vs_ll.kl_mean:.2e}", f"≤ {LLAMA_CPP_KL_MEAN:.0e}",
                      vs_ll.kl_mean <= LLAMA_CPP_KL_MEAN,
                      f"top-1 agreement {vs_ll.top1_agreement:.1%}; llama.cpp vs float64 KL {ref_ll.kl_mean:.2e}")
        else:
            rep.check("logits", "ours vs llama.cpp: mean KL", "-", f"≤ {LLAMA_CPP_KL_MEAN:.0e}", None, no_oracle)
        firsts = {"ours": int(ours[first].argmax()), "reference": int(ref[first].argmax())}
        if ll is not None:
            firsts["llama_cpp"] = int(ll[first].argmax())
        logit_data["first_reply_token"] = {k: {"id": v, "piece": _piece(tok, v)} for k, v in firsts.items()}
        rep.check("logits", "first reply token = float64 reference's",
                  f"{firsts['ours']} = {_piece(tok, firsts['ours'])!r}", "same token",
                  firsts["ours"] == firsts["reference"],
                  f"reference {firsts['reference']}" + (f", llama.cpp {firsts['llama_cpp']}" if ll is not None else ""))
        rep.data["logits"] = logit_data
        rep.arrays["logits_reference"] = ref[scored].numpy()
        rep.arrays["logits_gguflm"] = ours[scored].numpy()
        if ll is not None:
            rep.arrays["logits_llama.cpp"] = ll[scored].numpy()

        # -- 5. token investigation -------------------------------------------------------
        with stages.stage("token investigation"):
            row = ours[first]
            token = firsts["ours"] if opts.explain_token is None else int(opts.explain_token)
            if not 0 <= token < cfg.n_vocab:
                raise VerifyError(f"--explain-token {token} is outside the vocabulary [0, {cfg.n_vocab})")
            tops = top_k(row, opts.top_k)
            ref_p = torch.softmax(ref[first], -1)
            ll_p = torch.softmax(ll[first].double(), -1) if ll is not None else None
            watch = [t.token for t in tops] + ([token] if token not in {t.token for t in tops} else [])
            head = spec.tensor_name("output")
            w_out = weight(head if head in f.tensors else spec.tensor_name("token_embd")).double()
            residuals = [trace.block_in[0][first]] + [trace.block_out[i][first] for i in range(L)]
            lens = logit_lens(residuals, weight(spec.tensor_name("output_norm")).double(), w_out, cfg.rms_eps,
                              token, watch)
            rep.data["token_investigation"] = {
                "position": first, "token": token, "piece": _piece(tok, token),
                "rank": rank_of(row, token), "prob": float(torch.softmax(row.double(), -1)[token]),
                "top_k": [{"token": t.token, "piece": _piece(tok, t.token), "logit": t.logit, "prob": t.prob,
                           "prob_reference": float(ref_p[t.token]),
                           "prob_llama_cpp": float(ll_p[t.token]) if ll_p is not None else None} for t in tops],
                "watch": [{"token": t, "piece": _piece(tok, t)} for t in watch],
                "lens": [asdict(r) | {"top_piece": _piece(tok, r.top_token)} for r in lens],
            }
    finally:
        stages.close()
    rep.timings["total"] = round(time.perf_counter() - t_start, 3)
    rep.data["environment"] = {
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "llama_cpp_python": llamacpp.version() if use_llama else None, "numpy": np.__version__,
    }
    rep.data["prompt"] = opts.prompt
    return rep
