"""Chat templates: the GGUF's Jinja template, rendered as transformers renders it, in a sandbox.

``ChatTemplate`` (template.py) normalizes the conversation and renders; ``sandbox.py`` is the
trust boundary (isolation and resource bounds for untrusted template code); ``formats.py``
names formats as llama.cpp does, detects them in template text, and holds our built-in
templates for files that carry none.
"""

from gguflm.chat.formats import BUILTIN_TEMPLATES, detect_format
from gguflm.chat.sandbox import TemplateLimits
from gguflm.chat.template import ChatTemplate

__all__ = ["ChatTemplate", "TemplateLimits", "detect_format", "BUILTIN_TEMPLATES"]
