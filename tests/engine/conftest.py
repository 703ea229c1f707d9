"""The engine tests share tests/model's helpers and session fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "model"))

from fixtures import llama_cpp, smollm2_model  # noqa: E402,F401  (session fixtures)
