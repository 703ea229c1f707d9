"""GGML tensor types, dequantized bit-exactly with torch (any device).

``dequantize(raw, ggml_type, shape, device=None)`` is the entry point; each type is
one registered class (see :mod:`gguflm.quant.base`), grouped by family:

    floats     F32, F16, BF16
    legacy     Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q1_0, Q2_0
"""

from gguflm.quant import floats, legacy  # noqa: F401  (registers the types)
from gguflm.quant.base import Blocks, QuantType, dequantize, quant_type, supported_types

__all__ = ["Blocks", "QuantType", "dequantize", "quant_type", "supported_types"]
