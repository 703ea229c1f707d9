"""`gguflm tokenize TEXT`: the token ids and pieces llama.cpp's tokenizer gives."""

from __future__ import annotations

import json
import sys

from gguflm.cli import options
from gguflm.models import resolve

HELP = "show the token ids and pieces of a text, as llama.cpp tokenizes it"
DESCRIPTION = """\
Tokenize TEXT with the model's own tokenizer (identical to llama.cpp's llama_tokenize)
and print one row per token: position, id and piece (special tokens shown by name).
BOS/EOS are added as the model asks unless --no-special; special-token text such as
<|im_end|> is parsed into its token only with --parse-special. Without TEXT, standard
input is read. Without -m, the default model (SmolLM2-135M-Instruct) is used.

examples:
  gguflm tokenize "Hello world"
  gguflm tokenize -m model.gguf --parse-special --json "<|im_start|>user"
  cat notes.txt | gguflm tokenize --no-special --json | jq .count
"""


def add_arguments(p) -> None:
    p.add_argument("text", nargs="?", help="text to tokenize (default: read standard input)")
    p.add_argument("-m", "--model", metavar="FILE_OR_NAME",
                   help="GGUF file (a model or a vocabulary-only file) or a model name (default: smollm2-135m)")
    p.add_argument("--no-special", action="store_true", help="do not add BOS/EOS")
    p.add_argument("--parse-special", action="store_true",
                   help="turn special-token text (e.g. <|im_end|>) into its token")
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON document")


def run(args) -> int:
    from gguflm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(resolve(args.model))
    text = options.read_stdin() if args.text is None else args.text
    ids = tok.encode(text, add_special=not args.no_special, parse_special=args.parse_special)
    pieces = [tok.token_to_piece(t, special=True).decode("utf-8", "backslashreplace") for t in ids]
    if args.json:
        doc = {"model": tok.model, "pre": tok.pre, "count": len(ids), "ids": ids, "pieces": pieces,
               "special": [tok.is_control(t) for t in ids]}
        json.dump(doc, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    width = max([len(str(t)) for t in ids] + [2])
    out = [f"{'#':>5}  {'id':>{width}}  piece"]
    out += [f"{i:>5}  {t:>{width}}  {piece!r}" for i, (t, piece) in enumerate(zip(ids, pieces))]
    out.append(f"{len(ids)} tokens")
    sys.stdout.write("\n".join(out) + "\n")
    return 0
