"""Errors that gguflm raises on untrusted input."""


class GGUFError(ValueError):
    """A GGUF file is malformed, truncated, hostile or uses something we do not support."""


class TemplateError(ValueError):
    """A chat template is unsafe, runaway, or fails to render."""


class ModelError(RuntimeError):
    """A named model cannot be fetched or fails its checksum (see gguflm.models)."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """Neither a model name nor an existing file."""


class TextError(ValueError):
    """Text that has no UTF-8 encoding: it holds a lone surrogate (U+D800..U+DFFF), as a JSON
    string with an unpaired ``\\ud800`` escape or a command-line argument with invalid UTF-8
    bytes (Python's surrogateescape) carries. llama.cpp tokenizes UTF-8 bytes, so such text
    cannot reach it; gguflm refuses it before tokenizing (a 400 in the server, one line in
    the CLI)."""
