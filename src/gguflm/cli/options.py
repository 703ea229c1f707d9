"""Option groups shared by the subcommands, spelled as llama.cpp spells them, and the
checks of their values. Each check raises UserError (one line on stderr), before anything
large is allocated.

One spelling per option across subcommands: ``-m/--model``, ``-c/--ctx-size``,
``-t/--threads``, ``-s/--seed``, ``-n/--n-predict``, ``--device`` (and llama.cpp's
``-ngl/--n-gpu-layers``), ``--temp``, ``--top-k``, ``--top-p``, ``--min-p``,
``--repeat-penalty``, ``--chat-template``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gguflm.cli import UserError

SEED_MAX = (1 << 64) - 1          # torch generators take 64-bit seeds
DEFAULT_MAX_CTX = 4096            # the library's default context cap (gguflm.model.model)

# Arguments that carry text for the model (checked to be valid UTF-8): dest -> flag.
TEXT_OPTIONS = {"prompt": "-p/--prompt", "text": "TEXT", "system": "--system", "stop": "--stop",
                "chat_template": "--chat-template"}


# -- option groups -----------------------------------------------------------------------

def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", metavar="FILE_OR_NAME",
                   help="GGUF file, or a name from `gguflm models` (default: smollm2-135m)")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--threads", type=int, metavar="N",
                   help=f"CPU threads, 1..{max_threads()} (default: torch's choice)")


def add_ctx_size(p: argparse.ArgumentParser, default: int | None = None, help: str | None = None) -> None:
    p.add_argument("-c", "--ctx-size", type=int, default=default, metavar="N",
                   help=help or f"context size in tokens (default: the model's, at most {DEFAULT_MAX_CTX})")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", metavar="DEV", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, metavar="N",
                   help="llama.cpp's flag: N > 0 runs the whole model on the GPU (--device cuda; "
                        "there is no partial offload; without a CUDA device: a warning, then the CPU), "
                        "0 on the CPU")


def add_runtime(p: argparse.ArgumentParser) -> None:
    """-m, -c, -t, --device/-ngl, --verbose: which model and how to run it."""
    add_model(p)
    add_ctx_size(p)
    add_threads(p)
    add_device(p)
    p.add_argument("--verbose", action="store_true", help="timings and token counts on stderr")


def add_seed(p: argparse.ArgumentParser, help: str = "random seed, 0..2^64-1 (default, or -1: random)",
             default: int | None = None) -> None:
    p.add_argument("-s", "--seed", type=int, default=default, metavar="S", help=help)


def add_sampling(p: argparse.ArgumentParser, n_predict: int = 256) -> None:
    """Sampling flags, llama.cpp's names and defaults."""
    p.add_argument("-n", "--n-predict", type=int, default=n_predict, metavar="N",
                   help=f"tokens to generate at most (default {n_predict}; -1: until the context is full)")
    p.add_argument("--temp", type=float, default=0.8, metavar="T", help="temperature (default 0.8; 0: greedy)")
    p.add_argument("--top-k", type=int, default=40, metavar="K", help="top-k (default 40; 0: off)")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P", help="top-p in (0, 1] (default 0.95; 1: off)")
    p.add_argument("--min-p", type=float, default=0.05, metavar="P", help="min-p in [0, 1] (default 0.05; 0: off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, metavar="R",
                   help="repetition penalty (default 1.0: off)")
    p.add_argument("--repeat-last-n", type=int, default=64, metavar="N",
                   help="tokens the penalties look back on (default 64; -1: all)")
    p.add_argument("--presence-penalty", type=float, default=0.0, metavar="P", help="default 0: off")
    p.add_argument("--frequency-penalty", type=float, default=0.0, metavar="P", help="default 0: off")
    add_seed(p)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text is generated (not printed); repeatable")


def add_chat_template(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template", metavar="NAME_OR_JINJA",
                   help="use this chat template instead of the file's: a llama.cpp format name "
                        "(chatml, llama3, gemma, ...), a file holding a Jinja template, or the template itself")


# -- checks ------------------------------------------------------------------------------

def max_threads() -> int:
    return 4 * (os.cpu_count() or 1)


def check_threads(args: argparse.Namespace) -> int | None:
    t = getattr(args, "threads", None)
    if t is not None and not 1 <= t <= max_threads():
        raise UserError(f"--threads {t}: expected 1..{max_threads()} (4 x the {os.cpu_count()} CPUs here)")
    return t


def check_seed(seed: int | None) -> int | None:
    """The seed for the engine: None (random) for None or llama.cpp's -1; 0..2^64-1 kept."""
    if seed is None or seed == -1:
        return None
    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"--seed {seed}: expected 0..{SEED_MAX} (-1: random)")
    return seed


def check_text(args: argparse.Namespace) -> None:
    """Text arguments must be valid UTF-8 (invalid bytes in argv arrive as lone surrogates)."""
    for dest, flag in TEXT_OPTIONS.items():
        value = getattr(args, dest, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and any("\ud800" <= ch <= "\udfff" for ch in v):
                raw = os.fsencode(v) if _fs_encodable(v) else v.encode("utf-8", "backslashreplace")
                shown = raw[:60] + (b"..." if len(raw) > 60 else b"")
                raise UserError(f"argument {flag} is not valid UTF-8: {shown!r}")


def _fs_encodable(v: str) -> bool:
    try:
        os.fsencode(v)
        return True
    except UnicodeError:
        return False


def device(args: argparse.Namespace, command: str) -> str:
    """--device, or llama.cpp's -ngl N (N != 0: cuda, 0: cpu). -ngl without a CUDA device
    runs on the CPU after one warning line, as llama.cpp does; --device cuda without one
    is an error."""
    dev, ngl = getattr(args, "device", None), getattr(args, "n_gpu_layers", None)
    if ngl is not None:
        want = "cuda" if ngl != 0 else "cpu"
        if dev is not None and dev.partition(":")[0] != want:
            raise UserError(f"--device {dev} and -ngl {ngl} disagree")
        if want == "cuda" and dev is None and not _cuda_available():
            print(f"gguflm {command}: warning: -ngl {ngl}: no CUDA device is available; running on the CPU",
                  file=sys.stderr)
            want = "cpu"
        dev = dev or want
    dev = dev or "cpu"
    kind, _, index = dev.partition(":")
    if kind not in ("cpu", "cuda") or (kind == "cpu" and index) or (index and not index.isdigit()):
        raise UserError(f"--device {dev}: expected cpu, cuda or cuda:N")
    if kind == "cuda":
        if not _cuda_available():
            raise UserError(f"--device {dev}: no CUDA device is available")
        import torch

        if index and int(index) >= torch.cuda.device_count():
            raise UserError(f"--device {dev}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_context(f, n_ctx: int | None, dev: str, n_slots: int = 1, flag: str = "-c") -> int:
    """The context size that ``gguflm.load(f, n_ctx=...)`` will use, after checking that its
    KV cache (and RoPE tables) fit in the memory that is available now."""
    from gguflm.model.config import MAX_CTX, ModelConfig

    cfg = ModelConfig.from_gguf(f)
    n = n_ctx if n_ctx is not None else min(cfg.n_ctx_train, DEFAULT_MAX_CTX)
    if not 2 <= n <= MAX_CTX:
        raise UserError(f"{flag} {n}: expected 2..{MAX_CTX}")
    cuda = dev.startswith("cuda")
    per_position = 2 * cfg.n_layer * cfg.n_head_kv * cfg.head_dim * (2 if cuda else 4)  # K and V
    need = per_position * n * n_slots + n * cfg.n_rot * 4 * 2                           # + cos/sin tables
    avail = available_memory(dev)
    if avail is not None and need > avail:
        slots = f"{n_slots} x " if n_slots > 1 else ""
        raise UserError(f"{flag} {n}: the KV cache needs {size_text(need)} ({slots}{n} positions x {per_position} bytes), "
                        f"more than the {size_text(avail)} of {'GPU ' if cuda else ''}memory available; use a smaller {flag}")
    return n


def available_memory(dev: str) -> int | None:
    """Bytes of memory available now: the GPU's free memory, or the host's MemAvailable
    (bounded by a cgroup v2 limit when there is one); None when unknown."""
    if dev.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(dev))[0])
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    try:
        cg = Path("/sys/fs/cgroup")
        limit = (cg / "memory.max").read_text().strip()
        if limit != "max":
            free = int(limit) - int((cg / "memory.current").read_text())
            avail = free if avail is None else min(avail, free)
    except (OSError, ValueError):
        pass
    return avail


def size_text(n: float) -> str:
    """A byte count in B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def read_text_file(path: str, flag: str) -> str:
    """A UTF-8 text file ('-': standard input); invalid UTF-8 is a UserError naming where."""
    if path == "-":
        return read_stdin()
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError:
        raise UserError(f"{flag} {path}: is a directory") from None
    except OSError as e:
        raise UserError(f"{flag} {path}: {e.strerror or e}") from None
    return decode_text(data, f"{flag} {path}")


def decode_text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_stdin(what: str = "standard input") -> str:
    """All of standard input as text; invalid UTF-8 is a UserError."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # already text (a test's StringIO)
        return sys.stdin.read()
    return decode_text(buffer.read(), what)


def chat_template(spec: str | None, tokenizer):
    """The template that --chat-template names (None: the caller uses the file's)."""
    if spec is None:
        return None
    from gguflm.chat import ChatTemplate
    from gguflm.chat.formats import BUILTIN_TEMPLATES, LLAMA_CPP_FORMATS

    def text(tid):
        return tokenizer.token_text(tid) if tid is not None else ""

    bos, eos = text(tokenizer.bos_id), text(tokenizer.eos_id)
    if spec in BUILTIN_TEMPLATES or spec in LLAMA_CPP_FORMATS:
        return ChatTemplate.builtin(spec, bos, eos)
    source, origin = spec, "--chat-template"
    if "{" not in spec:
        p = Path(spec)
        if not p.is_file():
            raise UserError(f"--chat-template {spec!r}: neither a chat format name, a file, nor a Jinja "
                            f"template (formats: {', '.join(sorted(BUILTIN_TEMPLATES))})")
        source, origin = read_text_file(spec, "--chat-template"), f"--chat-template {spec}"
    return ChatTemplate(source, bos, eos, origin=origin)
