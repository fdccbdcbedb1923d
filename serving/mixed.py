"""Mixed-task forward: one pass over rows of many tasks on one pristine base encoder.

Every `nn.Linear`, `nn.Embedding` and `nn.LayerNorm` of the encoder gets a forward hook that,
while a batch runs, adds each task's sparse correction to that task's rows only: `x_g · Δᵀ`
(+ bias diff) for a linear layer, plus `(x_g · V) · Uᵀ` where its weight diff has low-rank
factors (format version 2; kept as factors, r·(m + n) resident values, never densified), the diff rows of the looked-up ids for an embedding, and
`x̂_g ⊙ Δw + Δb` for a LayerNorm. The base product is computed once for the whole batch.
A probe forward finds the modules that see the batch on their first dimension; a diff on any
other tensor is refused here (the predictor applies such a diff in place instead).
Kernel: each task's CSR rows summed by `embedding_bag` over the rows of xᵀ. In
`python -m bench.serving --kernels` it beats CSR `torch.sparse.mm` on most of MiniLM's shapes
(COO and gather + index_add_ are slower); over a whole forward the two measure the same.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from registry.artifact import ArtifactError, SparseDiff

_HOOKED = (nn.Linear, nn.Embedding, nn.LayerNorm)


class UnsupportedDiffError(ArtifactError):
    """A diff touches a base tensor the mixed forward cannot correct per row."""


@dataclass(eq=False)
class _LinearDelta:
    weight: torch.Tensor | None  # sparse CSR (out, in)
    bias: torch.Tensor | None  # dense (out,)
    up: torch.Tensor | None = None  # U (out, r) of a low-rank weight diff U Vᵀ
    down: torch.Tensor | None = None  # V (in, r)


@dataclass(eq=False)
class _EmbeddingDelta:
    crow: torch.Tensor  # CSR row pointers over the table's rows
    col: torch.Tensor
    val: torch.Tensor


@dataclass(eq=False)
class _NormDelta:
    weight: torch.Tensor | None
    bias: torch.Tensor | None


@dataclass(eq=False)
class DecodedDiff:
    """One diff in a ready-to-multiply form, keyed by the encoder module it corrects."""

    modules: dict[str, _LinearDelta | _EmbeddingDelta | _NormDelta]
    nbytes: int


@dataclass(eq=False)
class Segment:
    """Rows `start:stop` of a batch that one diff corrects (a row may be in several segments:
    a consolidated task's shared and residual diffs). Contiguous rows keep corrections to views."""

    diff: DecodedDiff
    start: int
    stop: int


@dataclass(eq=False)
class _Context:
    segments: list[Segment] = field(default_factory=list)
    batch_rows: int = 0


def _nbytes(*tensors: torch.Tensor | None) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        if t.layout == torch.sparse_csr:
            total += sum(
                x.numel() * x.element_size()
                for x in (t.crow_indices(), t.col_indices(), t.values())
            )
        else:
            total += t.numel() * t.element_size()
    return total


class MixedEncoder:
    """Hooks on one encoder so a single forward serves rows of many tasks (one thread at a time)."""

    def __init__(self, encoder: nn.Module, *, probe_inputs: dict[str, torch.Tensor]) -> None:
        self.encoder = encoder
        self.dtype = next(encoder.parameters()).dtype
        self.device = next(encoder.parameters()).device
        self._context: _Context | None = None
        self._lock = threading.Lock()
        self._modules = {name: m for name, m in encoder.named_modules() if isinstance(m, _HOOKED)}
        self._owner: dict[str, tuple[str, str]] = {}  # param name -> (module name, leaf)
        for module_name, module in self._modules.items():
            for leaf, _ in module.named_parameters(recurse=False):
                self._owner[f"{module_name}.{leaf}" if module_name else leaf] = (module_name, leaf)
        self.row_safe = self._probe(probe_inputs)
        for name, module in self._modules.items():
            module.register_forward_hook(self._hook_for(name, module))

    def _probe(self, inputs: dict[str, torch.Tensor]) -> set[str]:
        """Modules that run once per forward with the batch on their first dimension."""
        rows = int(next(iter(inputs.values())).shape[0])
        seen: dict[str, bool] = {}
        handles = []
        for name, module in self._modules.items():

            def record(mod, args, out, name=name):
                # A leading 1 is a table looked up once for every row (BERT's position ids).
                ok = isinstance(out, torch.Tensor) and out.dim() >= 2 and out.shape[0] in (rows, 1)
                seen[name] = seen.get(name, True) and ok

            handles.append(module.register_forward_hook(record))
        try:
            with torch.inference_mode():
                self.encoder(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        return {name for name, ok in seen.items() if ok}

    # -- decoding ---------------------------------------------------------------------

    def decode(self, diff: SparseDiff) -> DecodedDiff:
        """The diff as per-module corrections (CSR matrices); refuses tensors it cannot hook."""
        params = dict(self.encoder.named_parameters())
        grouped: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        lowrank: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (U, V)
        for name in diff.tensor_names:
            owner = self._owner.get(name)
            if owner is None or owner[0] not in self.row_safe:
                raise UnsupportedDiffError(
                    f"diff tensor {name!r} is not read through a per-row module of the encoder"
                )
            if name not in params or tuple(params[name].shape) != tuple(diff.shapes[name]):
                raise ArtifactError(f"diff tensor {name!r} does not match the encoder")
            if name in diff.factors:
                if not isinstance(self._modules[owner[0]], nn.Linear) or owner[1] != "weight":
                    raise UnsupportedDiffError(
                        f"diff tensor {name!r} has factors but is not a linear layer's weight"
                    )
                u, v = diff.factors[name]
                lowrank[owner[0]] = (
                    u.to(device=self.device, dtype=self.dtype).contiguous(),
                    v.to(device=self.device, dtype=self.dtype).contiguous(),
                )
                grouped.setdefault(owner[0], {})
            if name in diff.indices:
                idx = diff.indices[name].to(torch.int64)
                val = diff.values[name].to(self.dtype)
                grouped.setdefault(owner[0], {})[owner[1]] = (idx, val)
        modules: dict[str, Any] = {}
        total = 0
        for module_name, leaves in grouped.items():
            module = self._modules[module_name]
            if isinstance(module, nn.Linear):
                weight = None
                if "weight" in leaves:
                    weight = _csr(*leaves["weight"], tuple(module.weight.shape), self.device)
                bias = _dense(leaves.get("bias"), module.out_features, self.device)
                up, down = lowrank.get(module_name, (None, None))
                entry = _LinearDelta(weight, bias, up, down)
                total += _nbytes(weight, bias, up, down)
            elif isinstance(module, nn.Embedding):
                table = _csr(*leaves["weight"], tuple(module.weight.shape), self.device)
                entry = _EmbeddingDelta(table.crow_indices(), table.col_indices(), table.values())
                total += _nbytes(entry.crow, entry.col, entry.val)
            else:
                size = module.normalized_shape
                entry = _NormDelta(
                    _dense(leaves.get("weight"), size, self.device),
                    _dense(leaves.get("bias"), size, self.device),
                )
                total += _nbytes(entry.weight, entry.bias)
            modules[module_name] = entry
        return DecodedDiff(modules, total)

    # -- running ----------------------------------------------------------------------

    def forward(self, inputs: dict[str, torch.Tensor], segments: Sequence[Segment]) -> Any:
        """The encoder's output for the batch, each segment's rows corrected by its diff."""
        with self._lock:
            self._context = _Context(list(segments), int(inputs["input_ids"].shape[0]))
            try:
                with torch.inference_mode():
                    return self.encoder(**inputs)
            finally:
                self._context = None

    def _hook_for(self, name: str, module: nn.Module):
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            context = self._context
            if context is None or not context.segments or name not in self.row_safe:
                return None
            deltas = [
                (slice(seg.start, seg.stop), seg.diff.modules[name])
                for seg in context.segments
                if name in seg.diff.modules
            ]
            if not deltas:
                return None
            x = args[0]
            if out.shape[0] != context.batch_rows:  # broadcast over the batch: give rows their own
                out = out.expand(context.batch_rows, *out.shape[1:]).clone()
                x = x.expand(context.batch_rows, *x.shape[1:])
            for rows, delta in deltas:
                if isinstance(delta, _LinearDelta):
                    _correct_linear(out, x, rows, delta)
                elif isinstance(delta, _EmbeddingDelta):
                    _correct_embedding(out, x, rows, delta)
                else:
                    _correct_norm(out, x, rows, delta, mod)
            return out

        return hook


def _csr(idx: torch.Tensor, val: torch.Tensor, shape: tuple[int, ...], device) -> torch.Tensor:
    cols = shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CSR is marked beta; its mm kernel is the fast one
        coo = torch.sparse_coo_tensor(
            torch.stack([idx // cols, idx % cols]), val, shape, is_coalesced=True
        )
        csr = coo.to_sparse_csr()
    # int32 indices halve the resident bytes; the CSR kernels accept them.
    return torch.sparse_csr_tensor(
        csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32), csr.values(), shape
    ).to(device)


def _dense(entry, size, device) -> torch.Tensor | None:
    if entry is None:
        return None
    idx, val = entry
    shape = (size,) if isinstance(size, int) else tuple(size)
    dense = torch.zeros(shape, dtype=val.dtype)
    dense.view(-1).index_copy_(0, idx, val)
    return dense.to(device)


def _correct_linear(out: torch.Tensor, x: torch.Tensor, rows: slice, d: _LinearDelta) -> None:
    target = out[rows]
    if d.weight is not None:
        x_g = x[rows]
        # Δ·x_gᵀ as one bag per row of Δ over the rows of x_gᵀ (`python -m bench.serving --kernels`)
        corr = nn.functional.embedding_bag(
            d.weight.col_indices(),
            x_g.reshape(-1, x_g.shape[-1]).t().contiguous(),
            d.weight.crow_indices()[:-1],
            mode="sum",
            per_sample_weights=d.weight.values(),
        ).t()
        if target.is_contiguous():  # add the transposed product in place, no reshaped copy
            target.view(-1, target.shape[-1]).add_(corr)
        else:
            target.add_(corr.reshape(target.shape))
    if d.down is not None and d.up is not None:
        target.add_((x[rows] @ d.down) @ d.up.T)
    if d.bias is not None:
        target.add_(d.bias)


def _correct_embedding(out: torch.Tensor, ids: torch.Tensor, rows: slice, d: _EmbeddingDelta):
    token_ids = ids[rows].reshape(-1)
    starts = d.crow.index_select(0, token_ids).long()
    counts = d.crow.index_select(0, token_ids + 1).long() - starts
    total = int(counts.sum())
    if total == 0:
        return
    token = torch.repeat_interleave(torch.arange(token_ids.numel(), device=ids.device), counts)
    first = torch.cumsum(counts, 0) - counts
    entry = starts[token] + torch.arange(total, device=ids.device) - first[token]
    target = out[rows]
    width = target.shape[-1]
    corr = torch.zeros(token_ids.numel() * width, dtype=out.dtype, device=out.device)
    corr.index_add_(0, token * width + d.col[entry], d.val[entry])
    target.add_(corr.view(target.shape))


def _correct_norm(out, x, rows: slice, d: _NormDelta, mod: nn.LayerNorm) -> None:
    target = out[rows]
    if d.weight is not None:
        normed = nn.functional.layer_norm(x[rows], mod.normalized_shape, None, None, mod.eps)
        target.addcmul_(normed, d.weight)
    if d.bias is not None:
        target.add_(d.bias)
