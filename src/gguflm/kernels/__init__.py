"""Device providers of the model's ops that are not quantization: norms, RoPE, attention,
activations and the fused block step. ``cpu/`` (C++ through :mod:`gguflm.quant.cpu`'s
extension), ``triton/`` (CUDA; TRITON_INTERPRET=1 runs them on the CPU). Quantized
GEMV/GEMM kernels stay with their types in :mod:`gguflm.quant`."""
