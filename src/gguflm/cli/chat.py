"""`gguflm chat`: an interactive multi-turn conversation in the terminal."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from gguflm.cli import UserError, options
from gguflm.cli.run import load_model, model_template, report, sampling_params, stream_answer

HELP = "chat with a model interactively (/reset, /exit; Ctrl-C stops an answer)"
DESCRIPTION = """\
Chat with a model: each line you type is a user turn; the whole conversation goes through
the model's chat template. Answers stream to stdout; prompts and notes go to stderr.

commands:
  /reset   forget the conversation (the --system message stays)
  /exit    leave (as does end of input, Ctrl-D)
Ctrl-C while an answer streams stops that answer; the conversation goes on.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_runtime(p)
    p.add_argument("--system", metavar="TEXT", help="system message for the conversation")
    options.add_chat_template(p)
    options.add_sampling(p, n_predict=1024)


class Conversation:
    """The messages so far; ``prompt(user)`` renders them plus a new user turn."""

    def __init__(self, template, system: str | None = None):
        self.template = template
        self.start = [{"role": "system", "content": system}] if system else []
        self.messages: list[dict[str, str]] = list(self.start)

    def reset(self) -> None:
        self.messages = list(self.start)

    def prompt(self, user: str) -> str:
        return self.template.render(self.messages + [{"role": "user", "content": user}],
                                    add_generation_prompt=True)

    def add_turn(self, user: str, answer: str) -> None:
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _read(prompt: str, inp: TextIO, err: TextIO) -> str | None:
    err.write(prompt)
    err.flush()
    line = inp.readline()
    return None if line == "" else line.rstrip("\n")


def run(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    model = load_model(args)
    conv = Conversation(model_template(args, model), args.system)
    err, out = sys.stderr, sys.stdout
    print("gguflm chat: type a message; /reset clears the conversation, /exit (or Ctrl-D) leaves", file=err)
    while True:
        line = _read("> ", sys.stdin, err)
        if line is None or line.strip() == "/exit":
            if line is None:
                err.write("\n")
            return 0
        if line.strip() == "/reset":
            conv.reset()
            print("(conversation cleared)", file=err)
            continue
        if not line.strip():
            continue
        pieces: list[str] = []
        try:
            answer, result = stream_answer(model, conv.prompt(line), params, args, _Tee(out, pieces))
        except KeyboardInterrupt:
            answer, result = "".join(pieces), None
            print("\n(interrupted)", file=err)
        except UserError as e:  # e.g. the conversation outgrew the context: say so, keep chatting
            print(f"gguflm chat: {e} (use /reset)", file=err)
            continue
        out.write("\n")
        out.flush()
        conv.add_turn(line, answer)
        if args.verbose and result is not None:
            report(result)


class _Tee:
    """A text sink that writes through to ``out`` and keeps what it wrote."""

    def __init__(self, out: TextIO, kept: list[str]):
        self.out, self.kept = out, kept

    def write(self, s: str) -> None:
        self.out.write(s)
        self.kept.append(s)

    def flush(self) -> None:
        self.out.flush()
