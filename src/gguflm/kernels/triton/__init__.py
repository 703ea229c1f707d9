"""Triton providers on CUDA, each with a plain-torch twin in its module:

    attention    decode attention over the static KV cache; RoPE + cache write
    activations  RMSNorm (with residual add), SiLU x mul, RoPE of a prefill into the cache
"""
