"""The `gguflm` command. Thin: each subcommand is a module of this package with
``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; it delegates to the
library. Errors a user can cause print one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

from gguflm.errors import GGUFError, ModelError, TemplateError, TextError

# Order shown in --help follows the data flow.
COMMANDS = ["models", "inspect", "tokenize", "run", "chat", "verify", "perplexity", "bench", "serve"]


class UserError(Exception):
    """A problem with what the user asked for (bad flag combination, missing model...)."""


# Optional dependencies by top-level module -> the extra that installs them.
EXTRAS = {"fastapi": "server", "uvicorn": "server", "anyio": "server", "starlette": "server",
          "pydantic": "server", "pydantic_core": "server", "h11": "server",
          "matplotlib": "verify", "triton": "cuda", "ray": "ray"}


def missing_extra(e: ModuleNotFoundError) -> str | None:
    """The extra that provides the module ``e`` failed to import, if it is one of ours."""
    return EXTRAS.get((e.name or "").partition(".")[0])


def _available():
    for name in COMMANDS:
        try:
            yield name, importlib.import_module(f"gguflm.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"gguflm.cli.{name}":
                raise


def build_parser() -> argparse.ArgumentParser:
    from gguflm import __version__

    p = argparse.ArgumentParser(
        prog="gguflm",
        description="Run, inspect and verify GGUF language models (llama.cpp's format) from Python.",
    )
    p.add_argument("--version", action="version", version=f"gguflm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    p.commands = {}  # name -> its parser, for errors that argparse reports at the top level
    for name, mod in _available():
        sp = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run)
        p.commands[name] = sp
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like ``parser.parse_args``, but an unknown argument after a command is reported by that
    command's parser (its usage and the error), not by the top-level one."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        culprit = parser.commands.get(getattr(args, "command", None) or "", parser)
        culprit.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        from gguflm.cli import options

        options.check_text(args)
        return int(args._run(args) or 0)
    except (GGUFError, TemplateError, TextError, UserError, ModelError) as e:
        print(f"gguflm {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except UnicodeError as e:  # e.g. standard input that is not UTF-8
        print(f"gguflm {args.command}: error: text is not valid UTF-8 ({e.reason})", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"gguflm {args.command}: error: out of memory", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        extra = missing_extra(e)
        if extra is None:
            raise
        print(f"gguflm {args.command} needs the {extra} extra: pip install 'gguflm[{extra}]'", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # a missing file, a full disk, no memory for a thread...
        msg = f"{e.strerror}: {e.filename}" if e.filename and e.strerror else (e.strerror or str(e))
        print(f"gguflm {args.command}: error: {_one_line(msg)}", file=sys.stderr)
        return 1


def _one_line(e) -> str:
    """An error message on one line (a multi-line message keeps its lines, joined)."""
    return " / ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
