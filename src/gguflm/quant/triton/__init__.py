"""Triton kernels for quantized weights on CUDA (TRITON_INTERPRET=1 runs them on the CPU).

    planes     the GPU layout of a GGUF tensor: its blocks regrouped into field planes
    codecs     one registered block decoder per GGML type, driven by LAYOUTS
    gemv       fused dequantize x GEMV (+ RMSNorm prologue, residual / SwiGLU epilogues)
    dequant    tile dequantization to fp16 for the tensor-core prefill matmul

Each kernel has a plain-torch twin in its module. Attention, norms and activations
live in :mod:`gguflm.kernels.triton`.
"""
