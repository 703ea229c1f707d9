"""The engine: KV cache (kv_cache.py), sampling (sampling.py), generation loop (generate.py),
continuous-batching scheduler for the server (scheduler.py)."""

from gguflm.engine.generate import (ContextLengthError, GenerationError, GenerationResult, TextAssembler,
                                    TokenStream, check_request, generate_text)
from gguflm.engine.kv_cache import KVCache
from gguflm.engine.sampling import SamplingParams, sample

__all__ = ["KVCache", "SamplingParams", "sample", "TokenStream", "GenerationResult", "TextAssembler",
           "generate_text", "check_request", "GenerationError", "ContextLengthError"]
