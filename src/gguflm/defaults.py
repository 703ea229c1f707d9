"""The default prompt, and the old names for model lookup (now gguflm.models.resolve)."""

from __future__ import annotations

import os
from pathlib import Path

from gguflm.models import resolve

DEFAULT_PROMPT = "Is Paris the capital of France?"  # the seed's example question (gguflm verify)


def default_model_path() -> Path:
    """The default model's file (``$GGUFLM_MODEL``, else smollm2-135m, fetched if needed)."""
    return resolve(None)


def resolve_model(path: str | os.PathLike | None) -> Path:
    """The -m argument (a file or a model name), or the default model; raises ModelError."""
    return resolve(path)
