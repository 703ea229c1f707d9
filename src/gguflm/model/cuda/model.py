"""``gguflm.load(path, device="cuda")``: the :class:`Model` interface on an NVIDIA GPU.

A :class:`CudaModel` keeps the weights in their GGUF encoding (:mod:`.weights`) and
runs two paths over float16 KV caches:

* many tokens (prefill, batched steps, ``logits``): :func:`.forward.forward_tokens`;
* one token of one sequence: the CUDA-graph decode step (:mod:`.decode`), used by
  ``forward`` whenever B = T = 1, and by :meth:`CudaModel.decode_greedy`.

``forward`` returns logits on the GPU; the engine's sampling chain then runs there
too, and the only host sync per token is reading the sampled id.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from gguflm.engine.generate import TokenStream
from gguflm.engine.kv_cache import KVCache
from gguflm.engine.sampling import SamplingParams
from gguflm.gguf.reader import GGUFFile
from gguflm.model.config import ModelConfig
from gguflm.model.cuda.decode import DecodeGraphs
from gguflm.model.cuda.forward import OUTPUT_ROW_CHUNK, forward_tokens
from gguflm.model.cuda.weights import HALF, CudaWeights, Workspace
from gguflm.model.layers import Rope
from gguflm.model.model import Model

MAX_GRAPHS = 4  # captured decode graphs kept (one per cache slot in use), least recent dropped


class CudaModel(Model):
    """A model whose weights live on a CUDA device in their quantized form."""

    def __init__(self, file: GGUFFile, config: ModelConfig, weights: CudaWeights, tokenizer: Any,
                 n_ctx: int, device: torch.device, use_graphs: bool = True):
        super().__init__(file, config, None, tokenizer, n_ctx, device)
        self.weights = weights
        self.rope = Rope(config, n_ctx, weights.rope_freqs, device)
        self.workspace = Workspace(weights.workspace_elements(OUTPUT_ROW_CHUNK), device)
        self.use_graphs = use_graphs
        self._graphs: OrderedDict[tuple[int, int], DecodeGraphs] = OrderedDict()
        self._session: KVCache | None = None

    def new_cache(self, n_slots: int = 1, n_ctx: int | None = None) -> KVCache:
        """An empty float16 KV cache on the device."""
        c = self.config
        n_ctx = n_ctx or self.n_ctx
        if n_ctx > self.n_ctx:
            raise ValueError(f"a cache of {n_ctx} positions exceeds the model's context of {self.n_ctx}")
        return KVCache(c.n_layer, n_slots, c.n_head_kv, n_ctx, c.head_dim, dtype=HALF, device=self.device)

    def graphs(self, cache: KVCache, slot: int) -> DecodeGraphs:
        """The decode graphs of one cache slot (built on first use)."""
        key = (cache.k.data_ptr(), slot)  # the graphs hold views of the cache: the key stays unique
        g = self._graphs.get(key)
        if g is None:
            g = DecodeGraphs(self.config, self.weights, self.rope, cache.k[:, slot], cache.v[:, slot],
                             use_graphs=self.use_graphs)
            self._graphs[key] = g
            while len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        return g

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Batched step (see :meth:`Transformer.forward`). One token of one sequence runs
        the decode graph: its logits are a view of a buffer the next step overwrites."""
        if tokens.shape == (1, 1) and cache.k.dtype == HALF and cache.k.device.type == "cuda":
            g = self.graphs(cache, int(slots[0]))
            g.tok[0:1].copy_(tokens.view(1))
            g.pos[0:1].copy_(positions.view(1))
            g.step(0)
            return g.buf.logits.view(1, -1) if last_only else g.buf.logits.view(1, 1, -1)
        return forward_tokens(self.config, self.weights, self.rope, self.workspace, tokens, positions,
                              cache, slots, last_only)

    def session_cache(self) -> KVCache:
        """The one-sequence cache that ``generate`` reuses (no clearing needed, see KVCache)."""
        if self._session is None:
            self._session = self.new_cache(1)
        return self._session

    def stream_tokens(self, prompt: str | Sequence[int], max_tokens: int = 256,
                      params: SamplingParams | None = None, add_special: bool = True) -> TokenStream:
        return TokenStream(self, self.encode_prompt(prompt, add_special), max_tokens, params,
                           cache=self.session_cache())

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int], cache: KVCache | None = None) -> torch.Tensor:
        """Run ``ids`` from position 0 into ``cache`` (default: the session cache); the
        float32 logits [n_vocab] of the last token, on the device."""
        cache = cache or self.session_cache()
        tokens = torch.tensor([list(ids)], device=self.device)
        positions = torch.arange(len(ids), device=self.device)[None]
        slots = torch.zeros(1, dtype=torch.long, device=self.device)
        return forward_tokens(self.config, self.weights, self.rope, self.workspace, tokens, positions,
                              cache, slots, last_only=True)[0]

    @torch.inference_mode()
    def decode_greedy(self, first: int, position: int, n: int, cache: KVCache | None = None) -> torch.Tensor:
        """``n`` greedy steps from token ``first`` at ``position``, back to back on the
        device with no host sync: the int64 [n] generated ids (on the device)."""
        cache = cache or self.session_cache()
        if position + n > cache.n_ctx:
            raise ValueError(f"{n} steps from position {position} overrun the context of {cache.n_ctx}")
        g = self.graphs(cache, 0)
        g.tok[0] = first
        g.pos[0] = position
        for i in range(n):
            g.step(i % 2)
        return g.history[position + 1:position + 1 + n].clone()
