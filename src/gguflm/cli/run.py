"""`gguflm run`: generate a continuation of one prompt, streamed to stdout."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from gguflm.cli import UserError

HELP = "generate text from a prompt (chat template applied unless --raw)"
DESCRIPTION = """\
Generate text from a prompt and stream only the generated text to stdout.

The prompt is sent as a user turn through the model's chat template (with an optional
--system turn) unless --raw is given. Sampling defaults are llama.cpp's; --temp 0 is greedy.
Diagnostics (--verbose: load time, prompt tokens, prefill and decode speed) go to stderr.

examples:
  gguflm run -p "Is Paris the capital of France?" --temp 0
  echo "Once upon a time" | gguflm run --raw -p - -n 64
"""


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """-m, -c, --threads: which model and how to run it."""
    p.add_argument("-m", "--model", metavar="FILE", help="GGUF model (default: SmolLM2-135M-Instruct)")
    p.add_argument("-c", "--ctx-size", type=int, metavar="N",
                   help="context size in tokens (default: the model's, at most 4096)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="timings and token counts on stderr")


def add_sampling_arguments(p: argparse.ArgumentParser, n_predict: int = 256) -> None:
    """Sampling flags, llama.cpp's names and defaults."""
    p.add_argument("-n", "--n-predict", type=int, default=n_predict, metavar="N",
                   help=f"tokens to generate at most (default {n_predict}; -1: until the context is full)")
    p.add_argument("--temp", type=float, default=0.8, metavar="T", help="temperature (default 0.8; 0: greedy)")
    p.add_argument("--top-k", type=int, default=40, metavar="K", help="top-k (default 40; 0: off)")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P", help="top-p (default 0.95; 1: off)")
    p.add_argument("--min-p", type=float, default=0.05, metavar="P", help="min-p (default 0.05; 0: off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, metavar="R",
                   help="repetition penalty (default 1.0: off)")
    p.add_argument("--repeat-last-n", type=int, default=64, metavar="N",
                   help="tokens the penalties look back on (default 64; -1: all)")
    p.add_argument("--presence-penalty", type=float, default=0.0, metavar="P", help="default 0: off")
    p.add_argument("--frequency-penalty", type=float, default=0.0, metavar="P", help="default 0: off")
    p.add_argument("--seed", type=int, metavar="S", help="random seed (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text is generated (not printed); repeatable")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("-p", "--prompt", required=True, metavar="TEXT", help="the prompt ('-': read stdin)")
    p.add_argument("--system", metavar="TEXT", help="system message (chat template only)")
    p.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    add_sampling_arguments(p)


def sampling_params(args: argparse.Namespace):
    """SamplingParams from the flags; bad values are a UserError."""
    from gguflm.engine import SamplingParams

    try:
        return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                              presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty, seed=args.seed)
    except ValueError as e:
        raise UserError(str(e)) from None


def load_model(args: argparse.Namespace):
    """The -m model (or the default one) with -c/--threads; load time to stderr with --verbose."""
    import gguflm
    from gguflm.defaults import resolve_model

    path = resolve_model(args.model)
    if args.ctx_size is not None and args.ctx_size < 2:
        raise UserError("--ctx-size must be at least 2")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise UserError(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
    t0 = time.perf_counter()
    model = gguflm.load(path, device=args.device, n_ctx=args.ctx_size, threads=args.threads)
    if args.verbose:
        print(f"loaded {path} in {time.perf_counter() - t0:.2f} s: {model}", file=sys.stderr)
    return model


def max_tokens(args: argparse.Namespace, model) -> int:
    """-n as a token budget (-1: as many as the context holds)."""
    if args.n_predict < -1:
        raise UserError("-n must be >= -1")
    return model.n_ctx if args.n_predict == -1 else args.n_predict


def stream_answer(model, prompt: str, params, args: argparse.Namespace, out: TextIO = sys.stdout):
    """Generate from ``prompt`` (text, special tokens parsed) with SamplingParams ``params``
    and the -n/--stop flags, writing pieces to ``out`` as they come; returns
    (text, GenerationResult). Engine errors become UserError."""
    from gguflm.engine import GenerationError, generate_text

    try:
        stream = model.stream_tokens(prompt, max_tokens(args, model), params)
    except GenerationError as e:
        raise UserError(str(e)) from None
    pieces = []
    for piece in generate_text(stream, args.stop):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    return "".join(pieces), stream.result


def report(result, file: TextIO = sys.stderr) -> None:
    """Token counts and speeds of one generation."""
    pre = result.n_prompt / result.prefill_seconds if result.prefill_seconds else float("nan")
    dec = result.n_generated / result.decode_seconds if result.decode_seconds else float("nan")
    print(f"prompt: {result.n_prompt} tokens, {result.prefill_seconds:.2f} s ({pre:.1f} tok/s); "
          f"generated: {result.n_generated} tokens, {result.decode_seconds:.2f} s ({dec:.1f} tok/s); "
          f"finish: {result.finish_reason}", file=file)


def run(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.raw and args.system:
        raise UserError("--system needs the chat template; drop --raw")
    params = sampling_params(args)
    model = load_model(args)
    if args.raw:
        prompt = text
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": text}]
        prompt = model.chat_template.render(messages, add_generation_prompt=True)
    answer, result = stream_answer(model, prompt, params, args)
    if sys.stdout.isatty() and not answer.endswith("\n"):
        sys.stdout.write("\n")
    if args.verbose:
        report(result)
    return 0
