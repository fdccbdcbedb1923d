"""The trainable state of consolidation: one gated diff set per role (shared, each task).

The shared set's element-wise tensors are dense over the whole base tensor while it trains.
A task's residual is sparse: each element-wise tensor lives on a support of sorted flat
positions (its current diff's positions plus candidates, see `candidates`), and its values,
gate logits and optimizer state cover that support only, so T residuals cost O(T·k), not
O(T·N). Factored tensors (rank strategy) are small factors in either role.

Gates are the diff-pruning trainer's stretched hard-concrete gates with the symmetric stretch
l = -r, in their reference (unfused) form: the trainer's fused op gives no gradient to its θ₀
input and needs more memory here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffs.types import SparseDiff
from worker.consolidation import lowrank
from worker.diffprune import gates
from worker.diffprune.config import GATE_LOWER, GATE_UPPER

SHARED = "shared"  # the role of the diff set every task shares
_TENSOR_KEYS = ("w", "alpha", "u", "v", "beta", "mask", "positions")


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

    Element-wise tensors (`entry_names()`): values `w[name]` and gate logits `alpha[name]`,
    dense in the tensor's shape, or, where `positions[name]` (sorted flat int64) is set, 1-D
    over that support of a tensor of shape `shapes[name]`.
    Factored tensors (`factor_names()`, rank strategy): `u[name]` (m x r), `v[name]` (n x r),
    logits `beta[name]` (r).
    After projection `mask[name]` is a bool tensor over `w[name]` (entries) or the components,
    and the gate values are folded into w / u.
    """

    w: dict[str, Tensor] = field(default_factory=dict)
    alpha: dict[str, Tensor] = field(default_factory=dict)
    u: dict[str, Tensor] = field(default_factory=dict)
    v: dict[str, Tensor] = field(default_factory=dict)
    beta: dict[str, Tensor] = field(default_factory=dict)
    mask: dict[str, Tensor] = field(default_factory=dict)
    positions: dict[str, Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def entry_names(self) -> list[str]:
        """Names of the element-wise tensors (one gate per entry)."""
        return list(self.w)

    def factor_names(self) -> list[str]:
        """Names of the factored tensors (one gate per rank-one component)."""
        return list(self.u)

    def is_sparse(self, name: str) -> bool:
        """Whether an element-wise tensor lives on a support of positions (a residual's)."""
        return name in self.positions

    def value_tensors(self) -> list[Tensor]:
        """Trainable values (w, u, v)."""
        return [*self.w.values(), *self.u.values(), *self.v.values()]

    def logit_tensors(self) -> list[Tensor]:
        """Trainable gate logits (alpha, beta)."""
        return [*self.alpha.values(), *self.beta.values()]

    def state_numel(self) -> int:
        """Elements held by the set's trainable tensors and supports (its size, optimizer aside)."""
        tensors = [*self.value_tensors(), *self.logit_tensors(), *self.positions.values()]
        return sum(int(t.numel()) for t in tensors)

    def _gated(self, values: Tensor, logits: Tensor, name: str, mode: str) -> Tensor:
        if mode == "masked":
            return values * self.mask[name].to(values.dtype)
        if mode == "sample":
            return values * gate_sample(logits)
        return values * gate_deterministic(logits)

    def added_to(self, name: str, weight: Tensor, mode: str) -> Tensor:
        """`weight` plus this set's diff of one tensor, differentiably (modes as in `delta`).

        A sparse tensor's gated values are scattered at its positions (index_add on the flat
        view), so neither its values nor its gradient is ever dense.
        """
        if name in self.positions:
            positions = self.positions[name]
            if positions.numel() == 0:
                return weight
            gated = self._gated(self.w[name], self.alpha[name], name, mode)
            return (
                weight.reshape(-1)
                .index_add(0, positions, gated.to(weight.dtype))
                .view(weight.shape)
            )
        return weight + self.delta(name, mode)

    def delta(self, name: str, mode: str) -> Tensor:
        """The dense diff of one tensor: mode 'sample' (phase 1), 'deterministic', or 'masked' (phase 2)."""
        if name in self.positions:
            shape = self.shapes[name]
            zero = self.w[name].new_zeros(math.prod(shape))
            return self.added_to(name, zero, mode).view(shape)
        if name in self.w:
            return self._gated(self.w[name], self.alpha[name], name, mode)
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
            keep = self.mask[name].reshape(-1)
            values = self.w[name].reshape(-1)[keep].float()
            if name in self.positions:
                return self.positions[name][keep], values
            return torch.nonzero(keep).flatten(), values

    def kept_factors(self, name: str) -> tuple[Tensor, Tensor]:
        """After projection: (U m x r', V n x r') of a factored tensor's kept components, gates folded."""
        with torch.no_grad():
            keep = self.mask[name].to(torch.bool)
            return self.u[name][:, keep].float(), self.v[name][:, keep].float()

    def state_dict(self) -> dict[str, dict]:
        """Every tensor (supports and shapes included), detached, for a checkpoint."""
        state: dict[str, dict] = {
            key: {name: t.detach().clone() for name, t in getattr(self, key).items()}
            for key in _TENSOR_KEYS
        }
        state["shapes"] = {name: list(shape) for name, shape in self.shapes.items()}
        return state

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Take over the tensors of `state_dict()` (not copied; supports may differ in size).

        Optimizers over the old tensors must be rebuilt afterwards.
        """
        for key in ("w", "alpha", "u", "v", "beta"):
            setattr(self, key, {n: t.detach().requires_grad_(True) for n, t in state[key].items()})
        self.mask = dict(state["mask"])
        self.positions = dict(state.get("positions", {}))
        self.shapes = {n: tuple(int(d) for d in s) for n, s in state.get("shapes", {}).items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, dict]) -> GatedDiffSet:
        """A set rebuilt from `state_dict()`."""
        diff_set = cls()
        diff_set.load_state_dict(state)
        return diff_set


def _factored_start(
    start: Tensor | None, shape: tuple[int, ...], rank: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Factors (U, V) of rank `rank` warm-started from a dense diff (None: zero)."""
    if start is not None:
        u, v = lowrank.factors_from_dense(start, rank)
        if u.shape[1] < rank:
            u = torch.cat([u, u.new_zeros(u.shape[0], rank - u.shape[1])], 1)
            v = torch.cat([v, v.new_zeros(v.shape[0], rank - v.shape[1])], 1)
    else:
        u = torch.zeros(shape[0], rank)
        v = torch.zeros(shape[1], rank)
    # A zero pair gets no gradient; give V a small random start where the slot is empty.
    empty = (u.norm(dim=0) == 0) & (v.norm(dim=0) == 0)
    if bool(empty.any()):
        noise = torch.randn(v.shape, generator=generator) * 1e-3
        v = torch.where(empty.to(v.device), noise.to(v.device), v)
    return u.float(), v.float()


def _add_factored(
    diff_set: GatedDiffSet, name: str, u: Tensor, v: Tensor, alpha_init: float, device
) -> None:
    diff_set.u[name] = u.to(device).requires_grad_(True)
    diff_set.v[name] = v.to(device).requires_grad_(True)
    diff_set.beta[name] = torch.full((u.shape[1],), alpha_init, device=device)
    diff_set.beta[name].requires_grad_(True)


def new_diff_set(
    base_tensors: dict[str, Tensor],
    *,
    strategy: str,
    rank: int,
    alpha_init: float,
    init: dict[str, Tensor] | None,
    generator: torch.Generator,
) -> GatedDiffSet:
    """A dense gated diff set over the base tensors, warm-started from dense `init` diffs (None: zero)."""
    diff_set = GatedDiffSet()
    for name, theta in base_tensors.items():
        start = init.get(name) if init else None
        if strategy == "rank" and lowrank.is_factored(name, tuple(theta.shape)):
            u, v = _factored_start(start, tuple(theta.shape), rank, generator)
            _add_factored(diff_set, name, u, v, alpha_init, theta.device)
        else:
            w = torch.zeros(theta.shape, device=theta.device)
            if start is not None:
                w.copy_(start)
            diff_set.w[name] = w.requires_grad_(True)
            diff_set.alpha[name] = torch.full(theta.shape, alpha_init, device=theta.device)
            diff_set.alpha[name].requires_grad_(True)
    return diff_set


def current_entries(diff: SparseDiff, name: str) -> tuple[Tensor, Tensor]:
    """(sorted flat positions, fp32 values) of one tensor of a current diff: its sparse view.

    A factored tensor gives its r·(m + n) largest entries of U Vᵀ plus its own entries
    (`SparseDiff.sparse_entries`), so a residual started from a rank-strategy version holds
    at most that version's stored entries plus its candidates, never whole matrices.
    """
    return diff.sparse_entries(name)


def sparse_diff_set(
    base_tensors: dict[str, Tensor],
    *,
    strategy: str,
    rank: int,
    alpha_init: float,
    current: SparseDiff,
    candidates: dict[str, Tensor],
    generator: torch.Generator,
) -> GatedDiffSet:
    """A residual set warm-started from `current`: each element-wise tensor on its current positions
    plus `candidates` (sorted flat positions outside them; values start at zero)."""
    diff_set = GatedDiffSet()
    for name, theta in base_tensors.items():
        shape = tuple(theta.shape)
        if strategy == "rank" and lowrank.is_factored(name, shape):
            start = current.dense(name) if name in current.tensor_names else None
            u, v = _factored_start(start, shape, rank, generator)
            _add_factored(diff_set, name, u, v, alpha_init, theta.device)
            continue
        positions, values = current_entries(current, name)
        extra = candidates.get(name)
        support = (
            positions if extra is None else torch.cat([positions, extra.to("cpu", torch.int64)])
        )
        support, order = torch.sort(support)
        w = torch.cat([values, torch.zeros(support.numel() - values.numel())])[order]
        diff_set.positions[name] = support.to(theta.device)
        diff_set.shapes[name] = shape
        diff_set.w[name] = w.to(theta.device).requires_grad_(True)
        diff_set.alpha[name] = torch.full((support.numel(),), alpha_init, device=theta.device)
        diff_set.alpha[name].requires_grad_(True)
    return diff_set
