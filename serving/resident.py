"""The resident form of a served diff: entries in 16-bit position blocks, values in the
artifact's dtype (fp16 by default), one set of arrays per diff and spans per module.

Entry k of leaf block b changes flat position (b << 16) | lows[k]; a leaf's block table is
[nb, offsets of each block's first entry ..., its end] (kernels/segmented.cpp reads this).
At 0.5% density that is 4 bytes per fp16 entry, against 6 for int32 indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK_BITS = 16
RESIDENT_DTYPES = (torch.float16, torch.float32)


@dataclass(eq=False)
class ModuleDelta:
    """One diff's change to one module: (block, entry) offsets of its weight and bias entries in
    the diff's arrays ((-1, -1): unchanged), and low-rank factors U, V of a linear weight."""

    weight_span: tuple[int, int] = (-1, -1)
    bias_span: tuple[int, int] = (-1, -1)
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None


@dataclass(eq=False)
class DecodedDiff:
    """One diff ready for the mixed forward: packed entries and per-module spans."""

    modules: dict[str, ModuleDelta]
    blocks: torch.Tensor  # int32
    lows: torch.Tensor  # int16 (read as uint16)
    values: torch.Tensor  # float16 or float32
    nbytes: int


class LeafPacker:
    """Collects leaves (flat sorted indices + values) into one diff's packed arrays."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype if dtype in RESIDENT_DTYPES else torch.float32
        self._blocks: list[np.ndarray] = []
        self._lows: list[np.ndarray] = []
        self._values: list[torch.Tensor] = []
        self._block_len = 0
        self._entry_len = 0

    def add(self, indices: torch.Tensor, values: torch.Tensor, numel: int) -> tuple[int, int]:
        """Append one leaf; returns its (block, entry) offsets."""
        flat = indices.to(torch.int64).numpy()
        count = -(-numel >> BLOCK_BITS)  # ceil
        starts = np.searchsorted(flat >> BLOCK_BITS, np.arange(count + 1)).astype(np.int32)
        table = np.concatenate([np.array([count], np.int32), starts])
        span = (self._block_len, self._entry_len)
        self._blocks.append(table)
        self._lows.append((flat & 0xFFFF).astype(np.uint16).view(np.int16))
        self._values.append(values.to(self.dtype))
        self._block_len += table.size
        self._entry_len += flat.size
        return span

    def arrays(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The packed (blocks, lows, values) on `device`."""
        blocks = torch.from_numpy(np.concatenate(self._blocks or [np.zeros(0, np.int32)]))
        lows = torch.from_numpy(np.concatenate(self._lows or [np.zeros(0, np.int16)]))
        values = torch.cat(self._values) if self._values else torch.zeros(0, dtype=self.dtype)
        return blocks.to(device), lows.to(device), values.to(device)


def leaf_positions(diff: DecodedDiff, span: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A leaf's flat int64 positions and its values, unpacked (the oracle's view)."""
    block_off, entry_off = span
    blocks = diff.blocks[block_off:].cpu()
    count = int(blocks[0])
    bounds = blocks[1 : count + 2].to(torch.int64)
    sizes = bounds[1:] - bounds[:-1]
    total = int(bounds[-1])
    block_ids = torch.repeat_interleave(torch.arange(count), sizes)
    lows = diff.lows[entry_off : entry_off + total].cpu().to(torch.int64) & 0xFFFF
    positions = (block_ids << BLOCK_BITS) | lows
    return positions.to(diff.values.device), diff.values[entry_off : entry_off + total]


def tensor_nbytes(*tensors: torch.Tensor | None) -> int:
    """Bytes held by the given tensors (None counts nothing)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
