"""gguflm: run GGUF language models in Python, verified against llama.cpp."""

from gguflm import models
from gguflm.errors import GGUFError, ModelError, TemplateError, TextError
from gguflm.gguf.reader import GGUFFile, TensorInfo
from gguflm.gguf.types import GGMLType

__version__ = "0.1.0"

__all__ = ["GGUFError", "TemplateError", "TextError", "ModelError", "models", "GGUFFile", "TensorInfo",
           "GGMLType", "dequantize", "Tokenizer", "ChatTemplate", "load", "__version__"]


def __getattr__(name):  # lazy: `import gguflm` stays light (no torch until needed)
    if name == "dequantize":
        from gguflm.quant import dequantize
        return dequantize
    if name == "Tokenizer":
        from gguflm.tokenizer import Tokenizer
        return Tokenizer
    if name == "ChatTemplate":
        from gguflm.chat import ChatTemplate
        return ChatTemplate
    if name == "load":
        from gguflm.engine.llm import load
        return load
    raise AttributeError(f"module 'gguflm' has no attribute {name!r}")
