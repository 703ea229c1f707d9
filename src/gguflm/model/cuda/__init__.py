"""The CUDA path: quantized weights on the GPU, Triton kernels, CUDA-graph decode.

    weights   GGUF tensors -> packed planes (or an explicit float16 fallback) on the device
    forward   the many-row ops of gguflm.model.decoder (the block written once for every
              device): the fused dequantize x GEMM on the tensor cores, SDPA
    decode    its one-row ops (fused GEMVs, split attention), captured as CUDA graphs
    batched   the server's step of many sequences, one token each, captured per width
    model     CudaModel: the Model interface over these runners
"""

from __future__ import annotations

import os

import torch

from gguflm.gguf.reader import GGUFFile
from gguflm.model.config import ModelConfig


def load_cuda(f: GGUFFile, config: ModelConfig, n_ctx: int, device: torch.device,
              use_graphs: bool = True):
    """A :class:`CudaModel` of ``f`` on ``device`` (CUDA graphs off for a CPU device,
    where the Triton kernels run in the interpreter). ``GGUFLM_TIMING=1``: the phases on
    stderr (:mod:`gguflm.quant.cuda.timing`)."""
    from gguflm.quant.cuda import build, timing

    timing.note("CUDA load starts (interpreter, imports, GGUF header, tokenizer before it)")
    if device.type == "cuda":
        with timing.phase("CUDA init"):
            major, minor = torch.cuda.get_device_capability(device)
            if timing.ON:
                torch.zeros(1, device=device)
        # nvcc's first build of the GEMV kernels (cached) starts before anything else: it runs
        # while the rest loads (and the Triton kernels compile); their first use waits for it
        if os.environ.get("GGUFLM_GEMV", "").lower() != "triton" and build.nvcc() is not None:
            build.start(f"sm_{major}{minor}")
            if os.environ.get("GGUFLM_CUDA_DECODE_ROWS", "").lower() == "gemv":
                build.start(f"sm_{major}{minor}", "rows")     # the batched step's decode rows (x [R, K])
    with timing.phase("import the CUDA path (triton, kernel modules)"):
        from gguflm.model.cuda.forward import check_supported
        from gguflm.model.cuda.model import CudaModel
        from gguflm.model.cuda.weights import load_weights

    check_supported(config)

    # cuBLAS workspaces of 4 MiB (one buffer) and 1 MiB (cublasLt) instead of PyTorch's
    # larger defaults: the prefill matmuls pick the same kernels at the same speed
    # (H100, pp512), and the process needs ~100 MiB less. Read once, at cuBLAS's first
    # use; a value the user set wins.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:1")
    os.environ.setdefault("TORCH_CUBLASLT_WORKSPACE_SIZE", "1024")

    # Triton's compiled kernels beside gguflm's own build of the GEMV kernels
    # ($GGUFLM_KERNEL_CACHE, default ~/.cache/gguflm/kernels) instead of ~/.triton: one
    # cache to keep or empty. Triton reads it at each compilation; a value the user set wins.
    os.environ.setdefault("TRITON_CACHE_DIR", str(build.kernel_cache_dir() / "triton"))
    timing.watch_triton(os.environ["TRITON_CACHE_DIR"])  # the progress line of a first compilation

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    with timing.phase("weights to the device", sync):
        weights = load_weights(f, config, device, n_ctx)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the file's bytes, uploaded then regrouped: not kept reserved
    model = CudaModel(f, config, weights, n_ctx, device, use_graphs=use_graphs and device.type == "cuda")
    from gguflm.model.cuda import precompile

    if precompile.enabled() and device.type == "cuda":
        with timing.phase("precompile (trace + compile the Triton kernels of a prompt and a decode step)"):
            precompile.precompile(model)
    timing.note("CUDA load done")
    return model
