"""`gguflm verify`: the verification report for a model (see gguflm.verify.run)."""

from __future__ import annotations

import sys
from pathlib import Path

from gguflm.cli import options
from gguflm.defaults import DEFAULT_PROMPT
from gguflm.models import resolve

NO_FIGURES = "none: matplotlib is missing, pip install 'gguflm[verify]'"
HELP = "check a model against llama.cpp and a float64 reference; write a report"
DESCRIPTION = """\
Check a GGUF model, section by section, against outside references and write
DIR/report.md, DIR/report.json and PNG figures:

  quantization    every tensor dequantized by gguflm vs libggml's to_float (bit-exact
                  count per type); the weight layout (shapes, tied output, GQA ratio)
  tokenizer       the prompt rendered with the model's chat template and tokenized,
                  ids vs llama.cpp's tokenizer; rendering vs llama-cpp-python's
  components      each step of the first, middle and last layer recomputed in float64
                  from the engine's own inputs: max abs / relative error, thresholds
  logits          vs the float64 full-model reference and vs llama.cpp along a greedy
                  continuation: top-1 agreement, KL, max |dlogit|, first reply token
  token           top-k at the end of the prompt and the logit lens through the layers

Prints the checks as a table and exits 1 if any check fails its threshold. llama.cpp's
checks need llama-cpp-python; without it (or with --reference none) they are skipped.
llama.cpp runs in a child process: if it crashes or hangs, its checks are ERROR rows
(what happened, how to avoid it) and the rest of the report is written. An ERROR says
nothing about gguflm, so it leaves the exit status alone, unless --reference llama.cpp
asked for that comparison explicitly (then it exits 1).

examples:
  gguflm verify                                   # the default SmolLM2 model
  gguflm verify -m gemma3-270m -o report/gemma/
  gguflm verify -m model.gguf -o report/ -p "Name three primes."
  gguflm verify -m model.gguf --explain-token 6830
"""


def add_arguments(p) -> None:
    options.add_model(p)
    p.add_argument("-o", "--output", default="verify-report", help="report folder (default: %(default)s)")
    p.add_argument("-p", "--prompt", default=DEFAULT_PROMPT, help="user message (default: %(default)r)")
    p.add_argument("--reference", choices=["llama.cpp", "none"], default=None,
                   help="outside reference besides the float64 one (default: llama.cpp when installed)")
    p.add_argument("--explain-token", type=int, metavar="ID",
                   help="token to investigate (default: the model's top prediction)")
    p.add_argument("-n", "--n-predict", type=int, default=16, help="greedy tokens to score (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=10, help="rows of the top-k table (default: %(default)s)")
    options.add_threads(p)
    options.add_device(p)


def run(args) -> int:
    from gguflm.cli import UserError
    from gguflm.verify.report import summary_text, write_report
    from gguflm.verify.run import VerifyError, VerifyOptions, run_verification

    if args.n_predict < 1 or args.top_k < 1:
        raise UserError("--n-predict and --top-k must be >= 1")
    options.check_threads(args)
    dev = options.device(args, "verify")  # cuda: the same report; the components section is skipped (fused kernels)
    opts = VerifyOptions(model=resolve(args.model), prompt=args.prompt, reference=args.reference,
                         explain_token=args.explain_token, n_predict=args.n_predict, top_k=args.top_k,
                         threads=args.threads, device=dev)
    try:
        rep = run_verification(opts)
    except VerifyError as e:
        raise UserError(str(e)) from e
    paths = write_report(rep, Path(args.output))
    print(summary_text(rep))
    print(f"report: {paths['md']} (data: {paths['json'].name}, figures: "
          f"{', '.join(p.name for k, p in paths.items() if k not in ('md', 'json')) or NO_FIGURES})", file=sys.stderr)
    return 0 if rep.passed and not (args.reference == "llama.cpp" and rep.errors) else 1
