"""A batch's row segments as the kernels read them: disjoint row intervals, each with the diffs
that correct it (shared first), and per module one table of parts with index offsets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from serving.mixed import DecodedDiff, Segment

# Columns of a parts table (kernels/segmented.cpp reads the same order).
ROW_START, ROW_STOP, SLOT, W_BLOCK, W_ENTRY, B_BLOCK, B_ENTRY, FACTOR = range(8)


@dataclass(eq=False)
class BatchPlan:
    """Disjoint row intervals of one forward and the resident arrays of every diff in it,
    by slot (a diff's index in `diffs`)."""

    rows: int
    intervals: list[tuple[int, int, list[DecodedDiff]]]
    diffs: list[DecodedDiff]
    ups: list[torch.Tensor] = field(default_factory=list)
    downs: list[torch.Tensor] = field(default_factory=list)
    # What a kernel derives once per batch from the arrays below (the Triton kernel's concat).
    kernel_cache: dict[str, Any] = field(default_factory=dict)
    blocks: list[torch.Tensor] = field(init=False)
    lows: list[torch.Tensor] = field(init=False)
    values: list[torch.Tensor] = field(init=False)
    _parts: dict[str, torch.Tensor | None] = field(default_factory=dict)
    _slots: dict[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self._slots = {id(diff): slot for slot, diff in enumerate(self.diffs)}
        self.blocks = [diff.blocks for diff in self.diffs]
        self.lows = [diff.lows for diff in self.diffs]
        self.values = [diff.values for diff in self.diffs]

    def parts(self, module: str) -> torch.Tensor | None:
        """The int64 parts table of `module` ([P, 8], CPU), or None if no row's diff
        changes it; intervals no diff of the module covers are merged into base-only parts."""
        if module in self._parts:
            return self._parts[module]
        table: list[list[int]] = []
        touched = False
        for start, stop, diffs in self.intervals:
            rows = []
            for diff in diffs:
                delta = diff.modules.get(module)
                if delta is None:
                    continue
                factor = -1
                if delta.up is not None:
                    factor = len(self.ups)
                    self.ups.append(delta.up)
                    self.downs.append(delta.down)
                slot = self._slots[id(diff)]
                rows.append([start, stop, slot, *delta.weight_span, *delta.bias_span, factor])
            if rows:
                touched = True
                table += rows
            elif table and table[-1][SLOT] < 0 and table[-1][ROW_STOP] == start:
                table[-1][ROW_STOP] = stop
            else:
                table.append([start, stop, -1, -1, -1, -1, -1, -1])
        parts = torch.tensor(table, dtype=torch.int64) if touched else None
        self._parts[module] = parts
        return parts


def plan_batch(segments: Sequence[Segment], rows: int) -> BatchPlan:
    """Split possibly overlapping segments into disjoint intervals (every row in one)."""
    cuts = sorted({0, rows, *(s.start for s in segments), *(s.stop for s in segments)})
    intervals = []
    for start, stop in zip(cuts, cuts[1:], strict=False):
        if start >= stop:
            continue
        covering = [s.diff for s in segments if s.start <= start and stop <= s.stop]
        if intervals and intervals[-1][1] == start and _same(intervals[-1][2], covering):
            intervals[-1] = (intervals[-1][0], stop, covering)  # one diff over adjacent rows
        else:
            intervals.append((start, stop, covering))
    diffs = list({id(s.diff): s.diff for s in segments}.values())
    return BatchPlan(rows, intervals, diffs)


def _same(left: list[DecodedDiff], right: list[DecodedDiff]) -> bool:
    return len(left) == len(right) and all(a is b for a, b in zip(left, right, strict=True))
