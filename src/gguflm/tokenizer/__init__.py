"""Tokenizers identical to llama.cpp's, built from GGUF metadata alone.

Data flow: :mod:`vocab` (metadata -> vocabulary, special tokens, flags) ->
:mod:`pretokenize` (BPE pre-tokenizers, over the character views of :mod:`unicode`) ->
:mod:`bpe` / :mod:`spm` (merging) -> :mod:`tokenizer` (special tokens, BOS/EOS, decoding).
"""

from gguflm.tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
