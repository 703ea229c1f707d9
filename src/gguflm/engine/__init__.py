"""The engine: the text API (llm.py: ``gguflm.load`` -> LLM), sampling (sampling.py),
the generation loop (generate.py), continuous-batching scheduler (scheduler.py)."""

from gguflm.engine.generate import (ContextLengthError, GenerationError, GenerationResult, TextAssembler,
                                    TokenStream, check_request, generate_text)
from gguflm.engine.sampling import SamplingParams, sample

__all__ = ["SamplingParams", "sample", "TokenStream", "GenerationResult", "TextAssembler",
           "generate_text", "check_request", "GenerationError", "ContextLengthError"]
