"""CUDA C++ kernels for quantized weights (built with nvcc on first use, cached per GPU
architecture; the Triton kernels of :mod:`gguflm.quant.triton` are the fallback).

    build   nvcc build of ``gemv.cu`` into ``~/.cache/gguflm/kernels``, loaded with ctypes
    gemv    fused dequantize x GEMV (Q4_0, Q8_0, Q4_K, Q6_K): RMSNorm prologue, residual /
            SwiGLU epilogues, several weights (Q, K, V) in one launch

The plain-torch twins are those of :mod:`gguflm.quant.triton.gemv`.
"""
