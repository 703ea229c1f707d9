"""`gguflm run`: generate a continuation of one prompt, streamed to stdout."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from gguflm.cli import UserError, options

HELP = "generate text from a prompt (chat template applied unless --raw)"
DESCRIPTION = """\
Generate text from a prompt and stream only the generated text to stdout.

The prompt is sent as a user turn through the model's chat template (with an optional
--system turn) unless --raw is given. Sampling defaults are llama.cpp's; --temp 0 is greedy.
The output ends with a newline; diagnostics (--verbose: load time, prompt tokens, prefill
and decode speed) go to stderr. The flags are llama.cpp's: -m, -p, -f, -n, -c, -t, -s,
-ngl, --temp, --top-k, --top-p, --min-p, --repeat-penalty, --chat-template, -cnv.

examples:
  gguflm run -p "Is Paris the capital of France?" --temp 0
  echo "Once upon a time" | gguflm run --raw -p - -n 64
  gguflm run -m gemma3-270m -ngl 99 -f question.txt -s 42
  gguflm run -cnv -p "You are a pirate."          # interactive, with a system message
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_runtime(p)
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("-p", "--prompt", metavar="TEXT",
                        help="the prompt ('-': read stdin); with -cnv, the system message (as llama.cpp)")
    prompt.add_argument("-f", "--file", metavar="FILE", help="read the prompt from this UTF-8 file")
    p.add_argument("--system", metavar="TEXT", help="system message (chat template only)")
    p.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    options.add_chat_template(p)
    p.add_argument("-cnv", "--conversation", action="store_true",
                   help="interactive chat instead of one answer (as `gguflm chat`)")
    options.add_sampling(p)


def sampling_params(args: argparse.Namespace):
    """SamplingParams from the flags; bad values are a UserError."""
    from gguflm.engine import SamplingParams

    seed = options.check_seed(args.seed)
    try:
        return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                              presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty, seed=seed)
    except ValueError as e:
        raise UserError(str(e)) from None


def load_model(args: argparse.Namespace):
    """The -m model (or the default one) with -c/-t/--device/-ngl, checked before anything
    large is allocated; load time to stderr with --verbose. The --chat-template choice is
    ``model_template(args, model)``."""
    import gguflm
    from gguflm.models import resolve

    threads = options.check_threads(args)
    dev = options.device(args, args.command)
    path = resolve(args.model)
    t0 = time.perf_counter()
    f = gguflm.GGUFFile(path)
    n_ctx = options.check_context(f, args.ctx_size, dev)
    model = gguflm.load(f, device=dev, n_ctx=n_ctx, threads=threads)
    if args.verbose:
        print(f"loaded {path} in {time.perf_counter() - t0:.2f} s: {model}", file=sys.stderr)
    return model


def model_template(args: argparse.Namespace, model):
    """--chat-template's template, else the model's own."""
    return options.chat_template(getattr(args, "chat_template", None), model.tokenizer) or model.chat_template


def max_tokens(args: argparse.Namespace, model) -> int:
    """-n as a token budget (-1: as many as the context holds)."""
    if args.n_predict < -1:
        raise UserError("-n must be >= -1")
    return model.n_ctx if args.n_predict == -1 else args.n_predict


def stream_answer(model, prompt: str, params, args: argparse.Namespace, out: TextIO = sys.stdout):
    """Generate from ``prompt`` (text, special tokens parsed) with SamplingParams ``params``
    and the -n/--stop flags, writing pieces to ``out`` as they come; returns
    (text, GenerationResult). Engine errors become UserError."""
    from gguflm.engine import GenerationError

    try:
        stream = model.stream(prompt, max_tokens(args, model), params, args.stop)
    except GenerationError as e:
        raise UserError(str(e)) from None
    pieces = []
    for piece in stream:
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
    if args.conversation:
        from gguflm.cli import chat

        if args.file or args.raw:
            raise UserError("-cnv is a chat: -f and --raw do not apply")
        if args.prompt is not None:
            if args.system is not None:
                raise UserError("with -cnv, -p is the system message: give -p or --system, not both")
            args.system = args.prompt
        return chat.run(args)
    if args.prompt is None and args.file is None:
        raise UserError("give the prompt with -p TEXT, -p - (stdin) or -f FILE")
    if args.raw and (args.system or args.chat_template):
        raise UserError("--system and --chat-template need the chat template; drop --raw")
    params = sampling_params(args)
    if args.file is not None:
        text = options.read_text_file(args.file, "-f")
    else:
        text = options.read_stdin() if args.prompt == "-" else args.prompt
    model = load_model(args)
    if args.raw:
        prompt = text
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": text}]
        prompt = model_template(args, model).render(messages, add_generation_prompt=True)
    answer, result = stream_answer(model, prompt, params, args)
    if not answer.endswith("\n"):
        sys.stdout.write("\n")  # the output ends with a newline, as a text file does
        sys.stdout.flush()
    if args.verbose:
        report(result)
    return 0
