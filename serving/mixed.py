"""Mixed-task forward: one pass over rows of many tasks on one pristine base encoder.

Every `nn.Linear`, `nn.Embedding` and `nn.LayerNorm` of the encoder runs through the batch's
kernel (serving.kernels) while a mixed batch is in flight: a module that some row's diff
changes is computed for all row segments in one kernel call, the others run as they are.
A probe forward finds the modules that see the batch on their first dimension; a diff on any
other tensor is refused here (the engine applies such a diff in place instead).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffs.types import ArtifactError, SparseDiff
from serving.kernels import select_kernel
from serving.kernels.plan import BatchPlan, plan_batch
from serving.resident import DecodedDiff, LeafPacker, ModuleDelta, tensor_nbytes

_HOOKED = (nn.Linear, nn.Embedding, nn.LayerNorm)


class UnsupportedDiffError(ArtifactError):
    """A diff touches a base tensor the mixed forward cannot correct per row."""


@dataclass(eq=False)
class Segment:
    """Rows `start:stop` of a batch that one diff corrects (a row may be in several segments:
    a consolidated task's shared and residual diffs)."""

    diff: DecodedDiff
    start: int
    stop: int


class MixedEncoder:
    """Routes one encoder's modules through a kernel so a single forward serves rows of many
    tasks (one forward at a time: a kernel may patch weights in place while it runs)."""

    def __init__(
        self, encoder: nn.Module, *, probe_inputs: dict[str, torch.Tensor], kernel: str = "auto"
    ) -> None:
        self.encoder = encoder
        self.dtype = next(encoder.parameters()).dtype
        self.device = next(encoder.parameters()).device
        self.kernel, self._run = select_kernel(kernel, self.device, self.dtype)
        self._plan: BatchPlan | None = None
        self._lock = threading.Lock()
        self._modules = {name: m for name, m in encoder.named_modules() if isinstance(m, _HOOKED)}
        self._owner: dict[str, tuple[str, str]] = {}  # param name -> (module name, leaf)
        for module_name, module in self._modules.items():
            for leaf, _ in module.named_parameters(recurse=False):
                self._owner[f"{module_name}.{leaf}" if module_name else leaf] = (module_name, leaf)
        self.row_safe = self._probe(probe_inputs)
        for name in self.row_safe:
            module = self._modules[name]
            module.forward = self._routed(name, module, module.forward)

    def _probe(self, inputs: dict[str, torch.Tensor]) -> set[str]:
        """Modules that run once per forward with the batch on their first dimension."""
        rows = int(next(iter(inputs.values())).shape[0])
        seen: dict[str, bool] = {}
        handles = []
        for name, module in self._modules.items():

            def record(mod, args, out, name=name):
                # A leading 1 is a table looked up once for every row (BERT's position ids).
                ok = (
                    isinstance(out, torch.Tensor)
                    and out.dim() >= 2
                    and out.shape[0] in (rows, 1)
                    and len(args) == 1
                )
                seen[name] = seen.get(name, True) and ok

            handles.append(module.register_forward_hook(record))
        try:
            with torch.inference_mode():
                self.encoder(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        return {name for name, ok in seen.items() if ok and _servable(self._modules[name])}

    def _routed(self, name: str, module: nn.Module, forward: Callable) -> Callable:
        def routed(x: torch.Tensor) -> torch.Tensor:
            plan = self._plan
            if plan is None or plan.parts(name) is None:  # no row's diff changes this module
                return forward(x)
            return self._run(name, module, x, plan, forward)

        return routed

    # -- decoding ---------------------------------------------------------------------

    def decode(self, diff: SparseDiff) -> DecodedDiff:
        """The diff in its resident form; refuses tensors it cannot serve per row."""
        params = dict(self.encoder.named_parameters())
        packer = LeafPacker(next(iter(diff.values.values()), torch.empty(0)).dtype)
        modules: dict[str, ModuleDelta] = {}
        factor_bytes = 0
        for name in diff.tensor_names:
            owner = self._owner.get(name)
            if owner is None or owner[0] not in self.row_safe:
                raise UnsupportedDiffError(
                    f"diff tensor {name!r} is not read through a per-row module of the encoder"
                )
            if name not in params or tuple(params[name].shape) != tuple(diff.shapes[name]):
                raise ArtifactError(f"diff tensor {name!r} does not match the encoder")
            module_name, leaf = owner
            delta = modules.setdefault(module_name, ModuleDelta())
            if name in diff.factors:
                if not isinstance(self._modules[module_name], nn.Linear) or leaf != "weight":
                    raise UnsupportedDiffError(
                        f"diff tensor {name!r} has factors but is not a linear layer's weight"
                    )
                u, v = diff.factors[name]
                delta.up = u.to(device=self.device, dtype=self.dtype).contiguous()
                delta.down = v.to(device=self.device, dtype=self.dtype).contiguous()
                factor_bytes += tensor_nbytes(delta.up, delta.down)
            if name in diff.indices:
                span = packer.add(diff.indices[name], diff.values[name], params[name].numel())
                if leaf == "weight":
                    delta.weight_span = span
                else:
                    delta.bias_span = span
        blocks, lows, values = packer.arrays(self.device)
        nbytes = tensor_nbytes(blocks, lows, values) + factor_bytes
        return DecodedDiff(modules, blocks, lows, values, nbytes)

    # -- running ----------------------------------------------------------------------

    def forward(self, inputs: dict[str, torch.Tensor], segments: Sequence[Segment]) -> Any:
        """The encoder's output for the batch, each segment's rows corrected by its diff."""
        rows = int(inputs["input_ids"].shape[0])
        with self._lock:
            self._plan = plan_batch(segments, rows) if segments else None
            try:
                with torch.inference_mode():
                    return self.encoder(**inputs)
            finally:
                self._plan = None


def _servable(module: nn.Module) -> bool:
    """Modules whose forward the kernels reproduce exactly."""
    if isinstance(module, nn.Embedding):
        return module.max_norm is None
    if isinstance(module, nn.LayerNorm):
        return module.elementwise_affine
    return True
