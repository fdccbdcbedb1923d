"""The CUDA kernel: the base module once for the whole batch, then every part's sparse
correction added by Triton kernels, one launch per kind of correction for all parts.

The kernels read the plan's per-slot arrays concatenated once per plan and find each part's
entries through index offsets in a work table (no pointer tables), so they also run under
TRITON_INTERPRET=1 on CPU tensors. Corrections accumulate in fp32 with atomic adds: entries
of one row, and the diffs of one interval (shared + residual), land on the same outputs.

- `_weight_kernel` (linear weights): grid (part x 64Ki-position block, token tile); each
  program walks its block's entries in chunks and adds v * x[t, c] to out[t, r].
- `_vector_kernel` (linear biases, LayerNorm weights and biases): out[t, c] += v (times
  x̂[t, c], the input normalised without affine, for a LayerNorm weight).
- `_table_kernel` (embeddings): each token binary-searches its id's table row among the leaf's
  entries and adds them to its output row.
- Low-rank factors: (x @ down) @ up.T per interval, in torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from torch import nn

from serving.kernels.oracle import base_output
from serving.kernels.plan import (
    B_BLOCK,
    B_ENTRY,
    FACTOR,
    ROW_START,
    ROW_STOP,
    SLOT,
    W_BLOCK,
    W_ENTRY,
    BatchPlan,
)
from serving.resident import BLOCK_BITS

# Whether the kernels below are interpreted (Triton reads this when they are defined).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Columns of a work item: token range, index in `blocks` of the block's first-entry offset
# (the leaf's block count for the table kernel), the leaf's first entry, block, x̂ scaling.
TOK_START, TOK_STOP, TABLE, ENTRY, BLOCK, SCALED = range(6)
ITEM_COLS = 6
BLOCK_T = 32  # tokens per program
BLOCK_K = 32  # entries per chunk
TABLE_T = 64  # tokens per program of the table kernel
SEARCH_STEPS = BLOCK_BITS + 1  # a block holds at most 2**16 entries


@triton.jit
def _weight_kernel(
    out_ptr,
    items_ptr,
    x_ptr,
    blocks_ptr,
    lows_ptr,
    values_ptr,
    width_in,
    width_out,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    item = items_ptr + tl.program_id(0) * 6
    t0 = tl.load(item + 0) + tl.program_id(1) * BLOCK_T
    tok_stop = tl.load(item + 1)
    if t0 < tok_stop:
        table = tl.load(item + 2)
        entry = tl.load(item + 3)
        block = tl.load(item + 4)
        k_start = tl.load(blocks_ptr + table)
        k_stop = tl.load(blocks_ptr + table + 1)
        toks = t0 + tl.arange(0, BLOCK_T)
        tmask = toks < tok_stop
        x_rows = x_ptr + toks[:, None] * width_in
        out_rows = out_ptr + toks[:, None] * width_out
        for k in range(k_start, k_stop, BLOCK_K):
            ks = k + tl.arange(0, BLOCK_K)
            kmask = ks < k_stop
            low = tl.load(lows_ptr + entry + ks, mask=kmask, other=0).to(tl.int64) & 0xFFFF
            pos = (block << 16) | low
            r = pos // width_in
            c = pos - r * width_in
            v = tl.load(values_ptr + entry + ks, mask=kmask, other=0).to(tl.float32)
            m = tmask[:, None] & kmask[None, :]
            xv = tl.load(x_rows + c[None, :], mask=m, other=0).to(tl.float32)
            tl.atomic_add(out_rows + r[None, :], xv * v[None, :], mask=m, sem="relaxed")


@triton.jit
def _vector_kernel(
    out_ptr,
    items_ptr,
    src_ptr,
    blocks_ptr,
    lows_ptr,
    values_ptr,
    width,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    item = items_ptr + tl.program_id(0) * 6
    t0 = tl.load(item + 0) + tl.program_id(1) * BLOCK_T
    tok_stop = tl.load(item + 1)
    if t0 < tok_stop:
        table = tl.load(item + 2)
        entry = tl.load(item + 3)
        block = tl.load(item + 4)
        # A vector, not a scalar: the interpreter refuses a scalar in a load mask.
        scaled = (tl.zeros([BLOCK_K], tl.int64) + tl.load(item + 5)) != 0
        k_start = tl.load(blocks_ptr + table)
        k_stop = tl.load(blocks_ptr + table + 1)
        toks = t0 + tl.arange(0, BLOCK_T)
        tmask = toks < tok_stop
        rows = toks[:, None] * width
        for k in range(k_start, k_stop, BLOCK_K):
            ks = k + tl.arange(0, BLOCK_K)
            kmask = ks < k_stop
            low = tl.load(lows_ptr + entry + ks, mask=kmask, other=0).to(tl.int64) & 0xFFFF
            pos = (block << 16) | low
            v = tl.load(values_ptr + entry + ks, mask=kmask, other=0).to(tl.float32)
            m = tmask[:, None] & kmask[None, :]
            s = tl.load(src_ptr + rows + pos[None, :], mask=m & scaled[None, :], other=1.0)
            tl.atomic_add(
                out_ptr + rows + pos[None, :], s.to(tl.float32) * v[None, :], mask=m, sem="relaxed"
            )


@triton.jit
def _lower_bound(bounds_ptr, lows_ptr, count, key, mask, STEPS: tl.constexpr):
    """Index of the leaf's first entry at flat position >= key (entries sorted by position)."""
    block = key >> 16
    inside = mask & (block < count)
    lo = tl.load(bounds_ptr + block, mask=inside, other=0).to(tl.int64)
    hi = tl.load(bounds_ptr + block + 1, mask=inside, other=0).to(tl.int64)
    key_low = key & 0xFFFF
    for _ in tl.static_range(STEPS):
        active = inside & (lo < hi)
        mid = (lo + hi) // 2
        mid_low = tl.load(lows_ptr + mid, mask=active, other=0).to(tl.int64) & 0xFFFF
        right = mid_low < key_low
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    total = tl.load(bounds_ptr + count).to(tl.int64)
    return tl.where(inside, lo, total)


@triton.jit
def _table_kernel(
    out_ptr,
    items_ptr,
    ids_ptr,
    blocks_ptr,
    lows_ptr,
    values_ptr,
    width,
    BLOCK_T: tl.constexpr,
    STEPS: tl.constexpr,
):
    item = items_ptr + tl.program_id(0) * 6
    t0 = tl.load(item + 0) + tl.program_id(1) * BLOCK_T
    tok_stop = tl.load(item + 1)
    if t0 < tok_stop:
        table = tl.load(item + 2)
        lows = lows_ptr + tl.load(item + 3)
        values = values_ptr + tl.load(item + 3)
        count = tl.load(blocks_ptr + table).to(tl.int64)
        bounds = blocks_ptr + table + 1
        toks = t0 + tl.arange(0, BLOCK_T)
        tmask = toks < tok_stop
        start = tl.load(ids_ptr + toks, mask=tmask, other=0).to(tl.int64) * width
        first = _lower_bound(bounds, lows, count, start, tmask, STEPS)
        last = _lower_bound(bounds, lows, count, start + width, tmask, STEPS)
        # A row spans at most two blocks (width <= 2**16): entries from `split` on are in the next.
        block = start >> 16
        split = tl.load(bounds + block + 1, mask=tmask & (block < count), other=0).to(tl.int64)
        n = tl.where(tmask, last - first, 0)
        out_rows = out_ptr + toks * width
        for j in range(0, tl.max(n, axis=0)):
            m = j < n
            k = first + j
            low = tl.load(lows + k, mask=m, other=0).to(tl.int64) & 0xFFFF
            pos = ((block + (k >= split).to(tl.int64)) << 16) | low
            v = tl.load(values + k, mask=m, other=0).to(tl.float32)
            tl.atomic_add(out_rows + (pos - start), v, mask=m, sem="relaxed")


@dataclass(eq=False)
class Packed:
    """Every slot's arrays concatenated, with each slot's offsets into them."""

    blocks: torch.Tensor
    lows: torch.Tensor
    values: torch.Tensor
    block_base: np.ndarray
    entry_base: np.ndarray


def packed(plan: BatchPlan) -> Packed:
    """The plan's arrays concatenated (built on first use and kept on the plan)."""
    cached = plan.kernel_cache.get("triton")
    if cached is not None:
        return cached
    blocks, lows, values = plan.blocks, plan.lows, plan.values
    dtypes = {v.dtype for v in values}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    result = Packed(
        torch.cat(blocks),
        torch.cat(lows),
        torch.cat([v.to(dtype) for v in values]),
        np.cumsum([0] + [b.numel() for b in blocks[:-1]], dtype=np.int64),
        np.cumsum([0] + [v.numel() for v in values[:-1]], dtype=np.int64),
    )
    plan.kernel_cache["triton"] = result
    return result


def _block_count(numel: int) -> int:
    return -(-numel >> BLOCK_BITS)


def _items(
    parts: np.ndarray,
    pack: Packed,
    per_row: int,
    block_col: int,
    entry_col: int,
    numel: int,
    *,
    scaled: int = 0,
    per_block: bool = True,
) -> np.ndarray:
    """Work items of one leaf for every part (with a diff) that changes it (one per 64Ki block if
    `per_block`, else one per part pointing at the leaf's block count)."""
    parts = parts[parts[:, block_col] >= 0]
    blocks = _block_count(numel) if per_block else 1
    rep = np.repeat(parts, blocks, axis=0)
    block = np.tile(np.arange(blocks, dtype=np.int64), len(parts))
    table = pack.block_base[rep[:, SLOT]] + rep[:, block_col] + (1 + block if per_block else 0)
    items = np.empty((len(rep), ITEM_COLS), dtype=np.int64)
    items[:, TOK_START] = rep[:, ROW_START] * per_row
    items[:, TOK_STOP] = rep[:, ROW_STOP] * per_row
    items[:, TABLE] = table
    items[:, ENTRY] = pack.entry_base[rep[:, SLOT]] + rep[:, entry_col]
    items[:, BLOCK] = block
    items[:, SCALED] = scaled
    return items


def _launch(kernel, items: np.ndarray, tile: int, out: torch.Tensor, *args, **meta) -> None:
    """Launch `kernel` over (work item, token tile), unless there is no work."""
    if not len(items):
        return
    tiles = triton.cdiv(int((items[:, TOK_STOP] - items[:, TOK_START]).max()), tile)
    if tiles:
        work = torch.from_numpy(items).to(out.device)
        kernel[(len(items), tiles)](out, work, *args, **meta)


def run(
    name: str, module: nn.Module, x: torch.Tensor, plan: BatchPlan, forward: Callable
) -> torch.Tensor:
    """The module's output for the batch, each interval corrected by its diffs."""
    parts = plan.parts(name)
    out, x = base_output(x, plan, forward)
    out = out.contiguous()
    x = x.contiguous()
    table = parts.numpy()
    table = table[table[:, SLOT] >= 0]
    pack = packed(plan)
    if pack.values.numel():  # else only factors (and an empty tensor is a null pointer)
        # fp32 outputs take the atomic adds directly; others get them summed in fp32 first.
        acc = out if out.dtype == torch.float32 else torch.zeros_like(out, dtype=torch.float32)
        if isinstance(module, nn.Embedding):
            _embedding(acc, x, module, table, pack)
        elif isinstance(module, nn.Linear):
            _linear(acc, x, module, table, pack)
        else:
            _layer_norm(acc, x, module, table, pack)
        if acc is not out:
            out += acc.to(out.dtype)
    if isinstance(module, nn.Linear):
        _factors(out, x, table, plan)
    return out


def _linear(acc: torch.Tensor, x: torch.Tensor, module: nn.Linear, table, pack: Packed) -> None:
    per_row = x.numel() // (x.shape[0] * module.in_features)
    weights = _items(table, pack, per_row, W_BLOCK, W_ENTRY, module.weight.numel())
    arrays = (pack.blocks, pack.lows, pack.values)
    _launch(
        _weight_kernel,
        weights,
        BLOCK_T,
        acc,
        x,
        *arrays,
        module.in_features,
        module.out_features,
        BLOCK_T=BLOCK_T,
        BLOCK_K=BLOCK_K,
    )
    if module.bias is not None:
        biases = _items(table, pack, per_row, B_BLOCK, B_ENTRY, module.bias.numel())
        meta = {"BLOCK_T": BLOCK_T, "BLOCK_K": BLOCK_K}
        _launch(_vector_kernel, biases, BLOCK_T, acc, acc, *arrays, module.out_features, **meta)


def _layer_norm(acc: torch.Tensor, x: torch.Tensor, module: nn.LayerNorm, table, pack) -> None:
    width = module.weight.numel()
    per_row = x.numel() // (x.shape[0] * width)
    items = [_items(table, pack, per_row, W_BLOCK, W_ENTRY, width, scaled=1)]
    if module.bias is not None:
        items.append(_items(table, pack, per_row, B_BLOCK, B_ENTRY, width))
    normed = acc  # read only by items of a weight leaf
    if len(items[0]):
        normed = nn.functional.layer_norm(x, module.normalized_shape, None, None, module.eps)
    arrays = (pack.blocks, pack.lows, pack.values)
    meta = {"BLOCK_T": BLOCK_T, "BLOCK_K": BLOCK_K}
    _launch(_vector_kernel, np.concatenate(items), BLOCK_T, acc, normed, *arrays, width, **meta)


def _embedding(acc: torch.Tensor, ids: torch.Tensor, module: nn.Embedding, table, pack) -> None:
    width = module.embedding_dim
    if width > 1 << BLOCK_BITS:  # a row would span more than two position blocks
        raise ValueError(f"embedding rows wider than {1 << BLOCK_BITS} are not supported")
    per_row = ids.numel() // ids.shape[0]
    items = _items(table, pack, per_row, W_BLOCK, W_ENTRY, 0, per_block=False)
    arrays = (pack.blocks, pack.lows, pack.values)
    meta = {"BLOCK_T": TABLE_T, "STEPS": SEARCH_STEPS}
    _launch(_table_kernel, items, TABLE_T, acc, ids, *arrays, width, **meta)


def _factors(out: torch.Tensor, x: torch.Tensor, table: np.ndarray, plan: BatchPlan) -> None:
    flat_out = out.view(-1, out.shape[-1])
    flat_in = x.view(-1, x.shape[-1])
    per_row = flat_in.shape[0] // x.shape[0]
    for row in table[table[:, FACTOR] >= 0].tolist():
        rows = slice(row[ROW_START] * per_row, row[ROW_STOP] * per_row)
        factor = row[FACTOR]
        flat_out[rows].addmm_(flat_in[rows] @ plan.downs[factor], plan.ups[factor].T)
