"""The engine: KV cache (kv_cache.py), sampling (sampling.py), generation loop (generate.py)."""

from gguflm.engine.generate import (ContextLengthError, GenerationError, GenerationResult, TextAssembler,
                                    TokenStream, generate_text)
from gguflm.engine.kv_cache import KVCache
from gguflm.engine.sampling import SamplingParams, sample

__all__ = ["KVCache", "SamplingParams", "sample", "TokenStream", "GenerationResult", "TextAssembler",
           "generate_text", "GenerationError", "ContextLengthError"]
