"""Quantized weights on the GPU: a GGUF tensor's blocks regrouped field by field.

A GGUF tensor stores ``n`` blocks back to back, each block the fields of its layout
(``gguflm.gguf.types.LAYOUTS``) in order: ``[d qs][d qs]...`` for Q4_0. The kernels read
the same bytes regrouped into *field planes*: all ``d`` fields of the tensor, then all
``qs`` fields, and so on (structure of arrays). Field ``f`` of block ``i`` then lives at

    byte  n * offset(f) + i * size(f)

so a plane starts where the layout says the field starts, scaled by the block count, and
each block's ``qs`` is a contiguous, aligned run that the kernels load 16 bytes at a time.
The packed tensor has exactly the file's byte count: VRAM holds the GGUF encoding, not a
float copy. Block ``i`` is block ``b`` of row ``r`` with ``i = r * blocks_per_row + b``
(ggml rows are ``ne0`` elements long).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gguflm.errors import GGUFError
from gguflm.gguf.types import LAYOUTS, GGMLType, Layout
from gguflm.quant.base import byte_tensor


def pack_planes(blocks: torch.Tensor, lay: Layout) -> torch.Tensor:
    """``(n, type_size)`` uint8 blocks -> flat uint8 field planes (same byte count).

    Plane of field ``f`` = ``blocks[:, off(f):off(f) + size(f)]`` flattened, planes in
    layout order; works on any device (the copy happens where ``blocks`` lives).
    """
    offsets = lay.offsets
    planes = [blocks[:, offsets[f.name]:offsets[f.name] + f.nbytes].reshape(-1) for f in lay.fields]
    return torch.cat(planes)


def unpack_planes(planes: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Inverse of :func:`pack_planes`: flat planes -> ``(n, type_size)`` blocks."""
    n = planes.numel() // lay.type_size
    cols, start = [], 0
    for f in lay.fields:
        cols.append(planes[start:start + n * f.nbytes].view(n, f.nbytes))
        start += n * f.nbytes
    return torch.cat(cols, dim=1)


@dataclass
class PackedWeight:
    """A 2-D quantized weight ``W: [n_rows, n_cols]`` (ggml ``ne1 x ne0``) as field planes.

    ``planes``: flat uint8 on the device, ``n_rows * blocks_per_row * type_size`` bytes.
    """

    ggml_type: GGMLType
    n_rows: int
    n_cols: int
    planes: torch.Tensor

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.ggml_type]

    @property
    def blocks_per_row(self) -> int:
        return self.n_cols // self.layout.block_size

    @property
    def nbytes(self) -> int:
        return self.planes.numel()

    @classmethod
    def from_raw(cls, raw: np.ndarray | torch.Tensor, ggml_type: int, shape: Sequence[int],
                 device: torch.device | str) -> PackedWeight:
        """Pack a tensor's bytes (e.g. ``GGUFFile.tensor_data``) of ggml shape ``(ne0, ne1)``.

        The bytes are copied to ``device`` as they are and regrouped there (on a GPU: one
        plain upload, then device copies, instead of a strided copy on the CPU: seconds for
        a 1.1B model on a small CPU). A shape that is not
        2-D, a row length that is not a whole number of blocks, or a byte count that does
        not match the shape raises :class:`GGUFError` naming the problem.
        """
        gt = GGMLType(ggml_type)
        lay = LAYOUTS[gt]
        dims = tuple(int(d) for d in shape)
        if len(dims) != 2 or min(dims) < 1:
            raise GGUFError(f"{gt.name} weight must be 2-D with positive sizes, got shape {list(dims)}")
        n_cols, n_rows = dims
        if n_cols % lay.block_size:
            raise GGUFError(f"{gt.name} row length {n_cols} is not a multiple of its block size {lay.block_size}")
        n_blocks = n_rows * (n_cols // lay.block_size)
        data = byte_tensor(raw)
        if data.numel() != n_blocks * lay.type_size:
            raise GGUFError(f"{gt.name} weight of shape {list(dims)} needs {n_blocks * lay.type_size} bytes, "
                            f"got {data.numel()}")
        planes = pack_planes(data.to(device).view(n_blocks, lay.type_size), lay)
        return cls(gt, n_rows, n_cols, planes)

    @classmethod
    def stack(cls, parts: Sequence[PackedWeight]) -> PackedWeight:
        """Weights of one type and row length stacked along rows (``[q; k; v]``)."""
        first = parts[0]
        if any(p.ggml_type != first.ggml_type or p.n_cols != first.n_cols for p in parts):
            raise ValueError("stacked weights must share type and row length")
        lay = first.layout
        blocks = torch.cat([unpack_planes(p.planes, lay) for p in parts])
        return cls(first.ggml_type, sum(p.n_rows for p in parts), first.n_cols, pack_planes(blocks, lay))

    def to(self, device: torch.device | str) -> PackedWeight:
        return PackedWeight(self.ggml_type, self.n_rows, self.n_cols, self.planes.to(device))

    def blocks(self) -> torch.Tensor:
        """The original GGUF bytes, ``(n_blocks, type_size)`` uint8 (for the dequantizer)."""
        return unpack_planes(self.planes, self.layout)

