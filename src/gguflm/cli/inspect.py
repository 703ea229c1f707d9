"""`gguflm inspect FILE`: what is inside a GGUF file."""

from __future__ import annotations

import json
import sys
from collections import defaultdict

from gguflm.cli.options import size_text
from gguflm.models import resolve
from gguflm.gguf.reader import GGUFFile, MetadataArray, ValueType

HELP = "show a GGUF file's metadata, tokenizer, chat template and tensors"
DESCRIPTION = """\
Show what a GGUF file holds: metadata (long arrays summarized), tokenizer and chat
template summary, the tensor table (name, type, shape in ggml order, bytes) and
totals by type. Without FILE_OR_NAME, the default model (smollm2-135m) is shown.

examples:
  gguflm inspect gemma3-270m
  gguflm inspect model.gguf
  gguflm inspect model.gguf --json | jq '.tensors | length'
"""

ARRAY_PREVIEW = 8
STRING_PREVIEW = 120


def add_arguments(p) -> None:
    p.add_argument("file", nargs="?", metavar="FILE_OR_NAME",
                   help="GGUF file, or a name from `gguflm models` (default: smollm2-135m)")
    p.add_argument("-m", "--model", dest="model", help="same as FILE")
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON document")
    p.add_argument("--full", action="store_true", help="print arrays and strings in full")
    p.add_argument("--no-tensors", action="store_true", help="leave out the tensor table")


def _summarize(value, vtypes: tuple[ValueType, ...], full: bool):
    if full:
        return _plain(value)
    if isinstance(value, (list, MetadataArray)) and len(value) > ARRAY_PREVIEW:
        elem = vtypes[1].name if len(vtypes) > 1 else "?"
        return {"array": elem, "length": len(value), "head": _plain(value[:ARRAY_PREVIEW])}
    if isinstance(value, str) and len(value) > STRING_PREVIEW:
        return value[:STRING_PREVIEW] + f"... ({len(value)} chars)"
    return _plain(value)


def _plain(value):
    """Metadata as JSON-ready data: numeric arrays (views over the file) become lists."""
    if isinstance(value, MetadataArray):
        return value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def summary(f: GGUFFile, full: bool = False) -> dict:
    """Everything `inspect` shows, as plain data."""
    md = f.metadata
    tensors = [{"name": t.name, "type": t.ggml_type.name, "shape": list(t.shape), "bytes": t.nbytes}
               for t in f.tensors.values()]
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "elements": 0, "bytes": 0})
    for t in f.tensors.values():
        row = by_type[t.ggml_type.name]
        row["tensors"] += 1
        row["elements"] += t.n_elements
        row["bytes"] += t.nbytes
    template = md.get("tokenizer.chat_template")
    tok = None
    if "tokenizer.ggml.model" in md:
        tokens = md.get("tokenizer.ggml.tokens") or []
        ids = {k.rsplit(".", 1)[-1]: v for k, v in md.items()
               if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")}
        tok = {
            "model": md["tokenizer.ggml.model"],
            "pre": md.get("tokenizer.ggml.pre"),
            "n_vocab": len(tokens),
            "n_merges": len(md.get("tokenizer.ggml.merges") or []),
            "special": {k.removesuffix("_token_id"): {"id": v, "text": tokens[v] if 0 <= v < len(tokens) else None}
                        for k, v in ids.items() if isinstance(v, int)},
            "add_bos": md.get("tokenizer.ggml.add_bos_token"),
            "add_eos": md.get("tokenizer.ggml.add_eos_token"),
        }
    chat = None
    if isinstance(template, str):
        chat = {"chars": len(template), "format": _template_format(template)}
    return {
        "file": str(f.path),
        "file_size": f.file_size,
        "gguf_version": f.version,
        "alignment": f.alignment,
        "architecture": f.architecture,
        "metadata": {k: _summarize(v, f.metadata_types[k], full) for k, v in md.items()},
        "tokenizer": tok,
        "chat_template": chat,
        "tensor_count": len(tensors),
        "parameters": sum(t.n_elements for t in f.tensors.values()),
        "tensor_bytes": sum(t.nbytes for t in f.tensors.values()),
        "by_type": dict(by_type),
        "tensors": tensors,
    }


def _template_format(template: str) -> str | None:
    try:
        from gguflm.chat import detect_format
    except ImportError:
        return None
    try:
        return detect_format(template)
    except Exception:  # noqa: BLE001 - a summary must not fail on an odd template
        return None


def _print_text(s: dict, show_tensors: bool, out=sys.stdout) -> None:
    w = out.write
    w(f"file:          {s['file']}\n")
    w(f"size:          {size_text(s['file_size'])} ({s['file_size']} bytes), GGUF v{s['gguf_version']}, "
      f"alignment {s['alignment']}\n")
    w(f"architecture:  {s['architecture']}\n")
    w(f"parameters:    {s['parameters']:,} in {s['tensor_count']} tensors ({size_text(s['tensor_bytes'])})\n")
    if s["tokenizer"]:
        t = s["tokenizer"]
        sp = ", ".join(f"{k}={v['id']} {v['text']!r}" for k, v in t["special"].items())
        w(f"tokenizer:     {t['model']} (pre: {t['pre']}), {t['n_vocab']} tokens, {t['n_merges']} merges\n")
        w(f"special:       {sp}\n")
    if s["chat_template"]:
        c = s["chat_template"]
        w(f"chat template: {c['chars']} chars" + (f", format {c['format']}" if c["format"] else "") + "\n")
    else:
        w("chat template: none in file\n")
    w("\nmetadata:\n")
    width = max((len(k) for k in s["metadata"]), default=0)
    for k, v in s["metadata"].items():
        if isinstance(v, dict) and "array" in v:
            head = ", ".join(repr(x) for x in v["head"])
            text = f"[{v['array']} x {v['length']}] {head}, ..."
        else:
            text = repr(v) if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
        w(f"  {k:<{width}}  {text}\n")
    w("\nby type:\n")
    for name, row in sorted(s["by_type"].items(), key=lambda kv: -kv[1]["bytes"]):
        w(f"  {name:<8} {row['tensors']:>5} tensors {row['elements']:>14,} elements {size_text(row['bytes']):>11}\n")
    if show_tensors:
        w("\ntensors:\n")
        nw = max((len(t["name"]) for t in s["tensors"]), default=4)
        w(f"  {'name':<{nw}}  {'type':<8} {'shape (ne0 first)':<24} {'bytes':>12}\n")
        for t in s["tensors"]:
            shape = "x".join(map(str, t["shape"]))
            w(f"  {t['name']:<{nw}}  {t['type']:<8} {shape:<24} {t['bytes']:>12,}\n")


def run(args) -> int:
    path = resolve(args.model or args.file)
    with GGUFFile(path) as f:
        s = summary(f, full=args.full)
    if args.no_tensors:
        s.pop("tensors")
    if args.json:
        json.dump(s, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        _print_text(s, not args.no_tensors)
    return 0
