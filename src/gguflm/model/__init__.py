"""The model: config from metadata, architectures as data, the decoder as small modules.

Follow a token: :func:`load_model` (model.py) -> :class:`ModelConfig` (config.py, key table) ->
:func:`build_transformer` (loader.py, tensor names from arch.py) -> :class:`Transformer`
(layers.py: embedding, blocks, output; each block the composition of decoder.py over
layers.py's torch ops).
"""

from gguflm.model.arch import ARCHS, ArchSpec, RopeStyle
from gguflm.model.config import ModelConfig
from gguflm.model.kv_cache import KVCache
from gguflm.model.model import Model, load_model

__all__ = ["load_model", "Model", "KVCache", "ModelConfig", "ArchSpec", "ARCHS", "RopeStyle"]
