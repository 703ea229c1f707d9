"""GGML tensor types, dequantized bit-exactly with torch (any device).

``dequantize(raw, ggml_type, shape, device=None)`` is the entry point; each type is
one registered class (see :mod:`gguflm.quant.base`), grouped by family:

    floats     F32, F16, BF16
    legacy     Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q1_0, Q2_0
    kquants    Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K
    iquants    IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_NL, IQ4_XS
    ternary    TQ1_0, TQ2_0
    microscale MXFP4, NVFP4
"""

from gguflm.quant import floats, iquants, kquants, legacy, microscale, ternary  # noqa: F401  (registers the types)
from gguflm.quant.base import Blocks, QuantType, dequantize, quant_type, supported_types, use_cpu_kernels

__all__ = ["Blocks", "QuantType", "dequantize", "quant_type", "supported_types", "use_cpu_kernels"]
