"""The GGUF file format: hardened reader and the GGML type/layout table."""

from gguflm.gguf.reader import GGUFFile, TensorInfo
from gguflm.gguf.types import LAYOUTS, GGMLType, Layout, layout

__all__ = ["GGUFFile", "TensorInfo", "GGMLType", "Layout", "LAYOUTS", "layout"]
