"""Errors that gguflm raises on untrusted input."""


class GGUFError(ValueError):
    """A GGUF file is malformed, truncated, hostile or uses something we do not support."""


class TemplateError(ValueError):
    """A chat template is unsafe, runaway, or fails to render."""
