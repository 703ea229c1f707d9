"""Checks against outside references: libggml's dequantizers (:mod:`.ggml_oracle`),
llama.cpp's tokenizer and logits, perplexity, and the reports they produce."""
