"""The trainable state of consolidation: one gated diff set per role (shared, each task).

Gates are the diff-pruning trainer's stretched hard-concrete gates with the symmetric stretch
l = -r, in their reference (unfused) form: consolidation gates two diff sets per step and needs
the gradient of both, which the trainer's fused single-tensor op does not give to its θ₀ input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from registry.artifact import SparseDiff
from worker.consolidation import lowrank
from worker.diffprune import gates
from worker.diffprune.config import GATE_LOWER, GATE_UPPER

SHARED = "shared"  # the role of the diff set every task shares


def gate_sample(alpha: Tensor) -> Tensor:
    """A stochastic stretched hard-concrete gate per logit (global torch RNG)."""
    bits = gates.sample_noise_bits(alpha.numel(), device=alpha.device)
    noise = gates.logistic_from_bits(bits).view(alpha.shape)
    return gates.stochastic_gate(alpha, noise, GATE_LOWER, GATE_UPPER)


def gate_deterministic(alpha: Tensor) -> Tensor:
    """The deterministic gate used for projection and evaluation."""
    return gates.deterministic_gate(alpha, GATE_LOWER, GATE_UPPER)


def gate_l0_sum(alpha: Tensor) -> Tensor:
    """Sum of P(gate != 0) over the logits (expected L0)."""
    return gates.prob_nonzero(alpha, GATE_LOWER, GATE_UPPER).sum()


@dataclass
class GatedDiffSet:
    """One role's trainable diff (the shared part or one task's residual).

    Element-wise tensors: values `w[name]` and gate logits `alpha[name]` (same shape).
    Factored tensors (rank strategy): `u[name]` (m x r), `v[name]` (n x r), logits `beta[name]` (r).
    After projection `mask[name]` is a bool tensor (entry- or component-wise) and the gate
    values are folded into w / u.
    """

    w: dict[str, Tensor] = field(default_factory=dict)
    alpha: dict[str, Tensor] = field(default_factory=dict)
    u: dict[str, Tensor] = field(default_factory=dict)
    v: dict[str, Tensor] = field(default_factory=dict)
    beta: dict[str, Tensor] = field(default_factory=dict)
    mask: dict[str, Tensor] = field(default_factory=dict)

    def value_tensors(self) -> list[Tensor]:
        """Trainable values (w, u, v)."""
        return [*self.w.values(), *self.u.values(), *self.v.values()]

    def logit_tensors(self) -> list[Tensor]:
        """Trainable gate logits (alpha, beta)."""
        return [*self.alpha.values(), *self.beta.values()]

    def delta(self, name: str, mode: str) -> Tensor:
        """The dense diff of one tensor: mode 'sample' (phase 1), 'deterministic', or 'masked' (phase 2)."""
        if name in self.w:
            w = self.w[name]
            if mode == "masked":
                return w * self.mask[name]
            if mode == "sample":
                return w * gate_sample(self.alpha[name])
            return w * gate_deterministic(self.alpha[name])
        u, v = self.u[name], self.v[name]
        if mode == "masked":
            gate = self.mask[name].to(u.dtype)
        elif mode == "sample":
            gate = gate_sample(self.beta[name])
        else:
            gate = gate_deterministic(self.beta[name])
        return lowrank.lowrank_product(u, v, gate)

    def _device(self) -> torch.device:
        tensors = self.value_tensors()
        return tensors[0].device if tensors else torch.device("cpu")

    def expected_l0(self) -> Tensor:
        """Expected stored entries under the gates (a factored component costs m + n)."""
        total = torch.zeros((), device=self._device())
        for alpha in self.alpha.values():
            total = total + gate_l0_sum(alpha)
        for name, beta in self.beta.items():
            cost = self.u[name].shape[0] + self.v[name].shape[0]
            total = total + gate_l0_sum(beta) * cost
        return total

    def stored_entries(self) -> int:
        """Stored budget entries after projection."""
        total = sum(int(self.mask[name].sum()) for name in self.w)
        for name in self.u:
            total += int(self.mask[name].sum()) * (self.u[name].shape[0] + self.v[name].shape[0])
        return total

    def kept_entries(self, name: str) -> tuple[Tensor, Tensor]:
        """After projection: (sorted flat int64 positions, fp32 values) of an element-wise tensor."""
        with torch.no_grad():
            positions = torch.nonzero(self.mask[name].flatten()).flatten()
            return positions, self.w[name].flatten()[positions].float()

    def kept_factors(self, name: str) -> tuple[Tensor, Tensor]:
        """After projection: (U m x r', V n x r') of a factored tensor's kept components, gates folded."""
        with torch.no_grad():
            keep = self.mask[name].to(torch.bool)
            return self.u[name][:, keep].float(), self.v[name][:, keep].float()

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """Every tensor, detached, for a checkpoint."""
        return {
            key: {name: t.detach().clone() for name, t in getattr(self, key).items()}
            for key in ("w", "alpha", "u", "v", "beta", "mask")
        }

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        """Restore tensors from `state_dict()` in place (keeps optimizer references valid)."""
        for key in ("w", "alpha", "u", "v", "beta"):
            for name, tensor in getattr(self, key).items():
                with torch.no_grad():
                    tensor.copy_(state[key][name])
        self.mask = dict(state["mask"])


def new_diff_set(
    base_tensors: dict[str, Tensor],
    *,
    strategy: str,
    rank: int,
    alpha_init: float,
    init: dict[str, Tensor] | None,
    generator: torch.Generator,
) -> GatedDiffSet:
    """A gated diff set over the base tensors, warm-started from dense `init` diffs (None: zero)."""
    diff_set = GatedDiffSet()
    for name, theta in base_tensors.items():
        start = init.get(name) if init else None
        if strategy == "rank" and lowrank.is_factored(name, tuple(theta.shape)):
            if start is not None:
                u, v = lowrank.factors_from_dense(start, rank)
                if u.shape[1] < rank:
                    u = torch.cat([u, u.new_zeros(u.shape[0], rank - u.shape[1])], 1)
                    v = torch.cat([v, v.new_zeros(v.shape[0], rank - v.shape[1])], 1)
            else:
                u = torch.zeros(theta.shape[0], rank, device=theta.device)
                v = torch.zeros(theta.shape[1], rank, device=theta.device)
            # A zero pair gets no gradient; give V a small random start where the slot is empty.
            empty = (u.norm(dim=0) == 0) & (v.norm(dim=0) == 0)
            if bool(empty.any()):
                noise = torch.randn(v.shape, generator=generator) * 1e-3
                v = torch.where(empty.to(v.device), noise.to(v.device), v)
            diff_set.u[name] = u.float().requires_grad_(True)
            diff_set.v[name] = v.float().requires_grad_(True)
            diff_set.beta[name] = torch.full((rank,), alpha_init, device=theta.device)
            diff_set.beta[name].requires_grad_(True)
        else:
            w = torch.zeros(theta.shape, device=theta.device)
            if start is not None:
                w.copy_(start)
            diff_set.w[name] = w.requires_grad_(True)
            diff_set.alpha[name] = torch.full(theta.shape, alpha_init, device=theta.device)
            diff_set.alpha[name].requires_grad_(True)
    return diff_set


def dense_deltas(diff: SparseDiff, shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """The dense fp32 diff tensors of a sparse artifact (only tensors with entries)."""
    out: dict[str, Tensor] = {}
    for name, indices in diff.indices.items():
        dense = torch.zeros(math.prod(shapes[name]))
        dense[indices] = diff.values[name].float()
        out[name] = dense.view(shapes[name])
    return out
