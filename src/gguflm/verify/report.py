"""Write a :class:`~gguflm.verify.run.Report` out: ``report.json`` (every number),
``report.md`` (tables a person reads, linking the PNG figures) and the figures, plus the
plain-text summary table ``gguflm verify`` prints."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import numpy as np

from gguflm.verify import plots
from gguflm.verify.run import Report

LLAMA_CPP_NOTE = (
    "Why llama.cpp differs slightly: on the CPU, llama.cpp does not multiply float activations by "
    "the quantized weights. Before each dot product it quantizes the activation row to 8 bits "
    "(Q8_0 blocks of 32 for the legacy types, Q8_K blocks of 256 for the K-quants) and multiplies "
    "integer blocks; for F16 weights it rounds activations to F16. That rounding (relative error "
    "~1/256 per activation) is llama.cpp's, not the model's: the float64 reference computes "
    "exactly the product the file describes, and the engine, which multiplies float32 "
    "activations by exactly dequantized weights, sits orders of magnitude closer to it "
    "(KL ~1e-10) than llama.cpp does (KL ~3e-3..8e-3 on quantized files)."
)


def _code(text: str) -> str:
    """A token piece as an inline code span (quotes, newlines... escaped as in JSON)."""
    esc = json.dumps(text, ensure_ascii=False)[1:-1]
    return f"`` {esc} ``" if "`" in esc else f"`{esc}`"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; a ``|`` inside a cell is escaped."""
    def line(cells: list[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|"] + [line(r) for r in rows])


_STATUS = {"pass": "✅ pass", "fail": "❌ FAIL", "skip": "⏭ skip", "error": "⚠️ ERROR (not run)"}


def _counts(rep: Report) -> str:
    n = {s: sum(c.status == s for c in rep.checks) for s in _STATUS}
    return (f"{n['pass']} passed, {n['fail']} failed, {n['skip']} skipped"
            + (f", {n['error']} NOT RUN (oracle error)" if n["error"] else ""))


def errors_text(rep: Report) -> str:
    """One paragraph per oracle failure: what happened, that its checks did not run, and
    how to avoid it ("" when none)."""
    return "\n".join(f"ERROR: {e['what']}: the checks against {e['oracle']} did not run "
                     f"(gguflm itself is not at fault)." + (f"\n  To avoid it: {e['hint']}" if e["hint"] else "")
                     for e in rep.errors)


def summary_text(rep: Report) -> str:
    """The checks as an aligned plain-text table with the overall verdict."""
    rows = [(c.status.upper(), c.section, c.name, c.value, c.threshold) for c in rep.checks]
    head = ("STATUS", "SECTION", "CHECK", "VALUE", "THRESHOLD")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head)] + [fmt.format(*r) for r in rows]
    lines.append(f"\n{'PASSED' if rep.passed else 'FAILED'}: {_counts(rep)} ({rep.timings.get('total', 0):.1f} s)")
    lines += [f"NOTE: {note}" for note in rep.data.get("notes", [])]
    if rep.errors:
        lines.append(errors_text(rep))
    return "\n".join(lines)


def write_report(rep: Report, out_dir: Path) -> dict[str, Path]:
    """Write report.json, the figures (when matplotlib is installed) and report.md into
    ``out_dir``; returns the written paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md"}
    figures = _figures(rep, out_dir) if plots.available() else {}
    paths.update(figures)
    data = rep.to_json() | {"figures": {k: p.name for k, p in figures.items()}}
    paths["json"].write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["md"].write_text(_markdown(rep, {k: p.name for k, p in figures.items()}), encoding="utf-8")
    return paths


def _figures(rep: Report, out_dir: Path) -> dict[str, Path]:
    d = rep.data
    figs = {}
    if "components" in d:
        figs["components"] = plots.component_errors(d["components"]["results"], out_dir / "component_errors.png")
    panels = [(k.removeprefix("logits_"), v) for k, v in rep.arrays.items() if k != "logits_reference"]
    figs["logits"] = plots.logit_scatter(rep.arrays["logits_reference"], panels, out_dir / "logit_scatter.png")
    ti = d["token_investigation"]
    if not ti["lens"]:
        return figs
    probs = np.array([r["probs"] for r in ti["lens"]]).T                        # [tokens, depth]
    labels = [f"{w['token']} {json.dumps(w['piece'])}" for w in ti["watch"]]  # ASCII: any font
    depth = ["emb" if r["layer"] < 0 else str(r["layer"]) for r in ti["lens"]]
    figs["lens"] = plots.lens_heatmap(probs, labels, depth, out_dir / "logit_lens.png",
                                      f"Logit lens at position {ti['position']}: probability of the final top "
                                      f"tokens after each block")
    return figs


def _components_section(w: Any, c: dict[str, Any], figures: dict[str, str]) -> None:
    w(f"The engine ran the prompt and its greedy continuation ({c['positions']} positions) once; forward hooks "
      f"recorded each step's input and output in layers {', '.join(map(str, c['layers']))}. Each step was "
      f"recomputed in float64 by separate code (`gguflm/verify/components.py`) from the engine's own float32 "
      f"input and weights from {c['weights']}. Cells: relative error ‖ours − ref‖/‖ref‖ "
      f"(max absolute error).\n")
    if c["twin_layers"]:
        w(f"The engine runs each block as one fused kernel (`{c['engine_block']}`), whose steps cannot be "
          f"observed: the per-step rows come from the block's plain-torch twin (`gguflm.model.layers.Block`) "
          f"run again on the same input, and the `block` row measures the fused kernel's own output "
          f"against the whole block computed by hand from that input.\n")
    layers = c["layers"]
    by: dict[str, dict[Any, dict[str, Any]]] = {}
    for r in c["results"]:
        by.setdefault(r["component"], {})[r["layer"]] = r

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return ""
        return f"{r['rel']:.1e} ({r['max_abs']:.1e}){'' if r['passed'] else ' ❌'}"

    w(_table(["Component"] + [f"Layer {layer}" for layer in layers] + ["Threshold (rel)"],
             [[comp] + [cell(cells.get(layer)) for layer in layers] + [f"{next(iter(cells.values()))['threshold']:.0e}"]
              for comp, cells in by.items() if None not in cells]))
    w("\nOutside the blocks:\n")
    w(_table(["Component", "All positions", "Threshold (rel)"],
             [[comp, cell(cells[None]), f"{cells[None]['threshold']:.0e}"]
              for comp, cells in by.items() if None in cells]))
    if "components" in figures:
        w(f"\n![Component errors]({figures['components']})\n")


def _markdown(rep: Report, figures: dict[str, str]) -> str:
    d = rep.data
    m, env = d["model"], d["environment"]
    out: list[str] = []
    w = out.append
    w(f"# gguflm verification report: {m['name'] or Path(m['path']).name}\n")
    for e in rep.errors:
        w(f"> **⚠️ ERROR: {e['what']}**: the checks against {e['oracle']} did not run (gguflm itself is not "
          f"at fault)." + (f" To avoid it: {e['hint']}" if e["hint"] else "") + "\n")
        if e["log"]:
            w(f"<details><summary>the end of {e['oracle']}'s log</summary>\n\n```text\n{e['log']}\n```\n</details>\n")
    for note in d.get("notes", []):
        w(f"> Note: {note}\n")
    w(f"**{'PASSED' if rep.passed else 'FAILED'}**: {_counts(rep)}. Generated {datetime.date.today().isoformat()} in {rep.timings['total']:.0f} s "
      f"on {env['cpus']} CPUs, {env['threads']} torch threads, load average "
      f"{env['load_average_before'][0]:.1f} before / {env['load_average_after'][0]:.1f} after "
      f"(torch {env['torch']}, llama-cpp-python {env['llama_cpp_python'] or 'not used'}).\n")
    seq = d["sequence"]
    w(_table(["", ""], [
        ["File", f"`{Path(m['path']).name}` ({m['file_bytes'] / 2**20:.1f} MiB, "
                 f"{m['parameters'] / 1e6:.1f} M weights)"],
        ["Architecture", f"{m['architecture']}: {m['n_layer']} layers, width {m['n_embd']}, FFN {m['n_ff']}, "
                         f"{m['n_head']} heads / {m['n_head_kv']} KV heads of {m['head_dim']}, vocab {m['n_vocab']}, "
                         f"RoPE {m['rope_style']} base {m['rope_freq_base']:g}, "
                         f"{'tied' if m['tied_output'] else 'separate'} output"],
        ["Prompt", _code(d["prompt"])],
        ["Greedy continuation", f"{_code(seq['continuation_text'])} ({len(seq['continuation_ids'])} tokens)"],
    ]))
    w("\n## Summary\n")
    w(_table(["Section", "Check", "Value", "Threshold", "Status", "Detail"],
             [[c.section, c.name, c.value, c.threshold, _STATUS[c.status], c.detail]
              for c in rep.checks]))

    q = d["quantization"]
    w("\n## 1. Quantization\n")
    w("Every tensor dequantized by `gguflm.dequantize` and by libggml's own `to_float` (the C code "
      "llama.cpp runs, loaded from llama-cpp-python), compared bit for bit. F32 tensors are their own bytes.\n")
    w(_table(["Type", "Tensors", "Weights", "Bits/weight", "Bit-exact vs libggml", "Max |Δ|"],
             [[t, s["tensors"], f"{s['elements']:,}", f"{s['bits_per_weight']:.2f}",
               f"{s['bit_exact']}/{s['compared']}" if s["compared"] else "not compared",
               f"{s['max_abs_diff']:.3g}" if s["mismatched"] else "0"] for t, s in q["types"].items()]))
    w("\nWeight layout (shapes in ggml order, ne0 first):\n")
    w(_table(["Check", "Status", "Detail"],
             [[c["name"], _STATUS["pass" if c["passed"] else "fail"], c["detail"]] for c in q["layout"]]))

    t, tk = d["chat_template"], d["tokenizer"]
    w("\n## 2. Tokenizer and chat template\n")
    origin = t["origin"].replace(m["path"], Path(m["path"]).name)
    w(f"Template: {origin}{'' if t['in_file'] else ' (the file has none)'}. "
      f"Messages: {_code(json.dumps(t['messages'], ensure_ascii=False))}. Rendered prompt:\n")
    w("```text\n" + t["rendered"] + "\n```\n")
    if "llama_cpp_python_render_equal" in t:
        w(f"llama-cpp-python's Jinja2ChatFormatter renders the same template "
          f"{'identically' if t['llama_cpp_python_render_equal'] else '**differently**'}.\n")
    w(f"Tokenizer: {tk['model']} (pre-tokenizer `{tk['pre']}`), {tk['n_vocab']} tokens, add_bos {tk['add_bos']}. "
      f"Ours ({len(tk['ids'])} ids, special tokens parsed):\n")
    w(f"```text\n{tk['ids']}\n```\n")
    if "llama_cpp_ids" in tk:
        w("llama.cpp's tokenizer (`Llama(vocab_only=True).tokenize(..., add_bos=True, special=True)`): "
          + ("**identical**.\n" if tk["llama_cpp_ids"] == tk["ids"]
             else f"**differs**:\n```text\n{tk['llama_cpp_ids']}\n```\n"))

    w("\n## 3. Components\n")
    if "components" in d:
        _components_section(w, d["components"], figures)
    else:
        w(f"Not checked here: {d.get('components_skipped', 'no trace')}.\n")

    lg = d["logits"]
    w("\n## 4. Logits\n")
    w(f"Scored along the greedy continuation: the {lg['positions']} rows from the last prompt token on. "
      f"\"gguflm\" is the whole sequence in one forward pass (as in the components section); \"decode "
      f"steps\" are the rows the engine produced while generating it, one token per step through its KV "
      f"cache. KL(P_reference ‖ P_compared) in nats per row, averaged; the reference is the second-named.\n")
    rows = []
    for key, label in (("ours_vs_reference", "gguflm vs float64 reference"),
                       ("decode_vs_reference", "gguflm decode steps (KV cache) vs float64 reference"),
                       ("ours_vs_llama_cpp", "gguflm vs llama.cpp"),
                       ("llama_cpp_vs_reference", "llama.cpp vs float64 reference")):
        if key in lg:
            s = lg[key]
            rows.append([label, s["positions"], f"{s['top1_agreement']:.1%}", f"{s['kl_mean']:.2e}",
                         f"{s['kl_max']:.2e}", f"{s['max_abs_dlogit']:.2e}"])
    w(_table(["Comparison", "Positions", "Top-1 agreement", "Mean KL", "Max KL", "Max |Δlogit|"], rows))
    w("\nFirst reply token under the chat template:\n")
    w(_table(["Computed by", "Token"], [[k.replace("_", "."), f"Token {v['id']} = {_code(v['piece'])}"]
                                        for k, v in lg["first_reply_token"].items()]))
    w("\n" + LLAMA_CPP_NOTE + "\n")
    if "logits" in figures:
        w(f"\n![Logit scatter]({figures['logits']})\n")

    ti = d["token_investigation"]
    w("\n## 5. Token investigation\n")
    w(f"Position {ti['position']} (the last prompt token) predicts the first reply token. Investigated: "
      f"token {ti['token']} = {_code(ti['piece'])}, rank {ti['rank']}, probability {ti['prob']:.4f}.\n")
    w(_table(["Rank", "Token", "Piece", "Logit", "P (gguflm)", "P (float64)", "P (llama.cpp)"],
             [[i + 1, r["token"], _code(r["piece"]), f"{r['logit']:.3f}", f"{r['prob']:.4f}",
               f"{r['prob_reference']:.4f}", "-" if r["prob_llama_cpp"] is None else f"{r['prob_llama_cpp']:.4f}"]
              for i, r in enumerate(ti["top_k"])]))
    if ti["lens"]:
        w(f"\nLogit lens: the final norm and LM head applied (float64) to the residual stream after each "
          f"block. Rank and probability of token {ti['token']} = {_code(ti['piece'])}, and the lens's own top "
          f"token:\n")
        w(_table(["After", "Rank", "P(token)", "Top token", "P(top)"],
                 [["embedding" if r["layer"] < 0 else f"block {r['layer']}", r["rank"], f"{r['prob']:.4f}",
                   f"{r['top_token']} {_code(r['top_piece'])}", f"{r['top_prob']:.4f}"] for r in ti["lens"]]))
    if "lens" in figures:
        w(f"\n![Logit lens]({figures['lens']})\n")

    w("\n## Timings\n")
    w(_table(["Stage", "Seconds"], [[k, f"{v:.1f}"] for k, v in rep.timings.items()]))
    return "\n".join(out) + "\n"
