"""Errors that gguflm raises on untrusted input."""


class GGUFError(ValueError):
    """A GGUF file is malformed, truncated, hostile or uses something we do not support."""


class TemplateError(ValueError):
    """A chat template is unsafe, runaway, or fails to render."""


class ModelError(RuntimeError):
    """A named model cannot be fetched or fails its checksum (see gguflm.models)."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """Neither a model name nor an existing file."""
