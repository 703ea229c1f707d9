"""The engine: the text API (llm.py: ``gguflm.load`` -> LLM), sampling (sampling.py),
what generations share (generate.py), the one generation loop with continuous
batching (scheduler.py)."""

from gguflm.engine.generate import (ContextLengthError, GenerationError, GenerationResult, TextAssembler,
                                    check_request)
from gguflm.engine.sampling import SamplingParams, sample

__all__ = ["SamplingParams", "sample", "GenerationResult", "TextAssembler", "check_request", "GenerationError",
           "ContextLengthError"]
