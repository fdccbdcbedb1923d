"""Projection of the fitted diff sets to the budget: exactly `budget` stored entries in all.

Element-wise only: the trainer's global top-k over every set's deterministic-gate magnitudes.
With factored components (rank strategy): one greedy knapsack over components (cost m + n)
and entries (cost 1), which the cost-1 entries fill exactly. A set's element-wise tensor is
ranked over what it holds: the dense shared tensor's every entry, a residual's support only
(positions outside a support hold no diff), so the ranking costs O(N + T·k).
"""

from __future__ import annotations

import torch
from torch import Tensor

from worker.consolidation import lowrank
from worker.consolidation.state import GatedDiffSet, gate_deterministic
from worker.diffprune import projection


def project_to_budget(
    diff_sets: dict[str, GatedDiffSet], budget: int, *, balance_roles: bool = False
) -> int:
    """Keep exactly `budget` stored entries over all sets (shared once), fold gates; returns entries kept.

    Scores are the deterministic-gate diff magnitudes (with `balance_roles`, each set's
    magnitudes divided by that set's mean nonzero magnitude, so a task whose diff is small
    overall is not starved by tasks with larger values); a factored component scores
    ||g u v^T||_F / sqrt(m + n). Element-wise only: the trainer's global top-k (ties by
    position in the order of the keys "role/tensor" sorted; a sparse tensor's entries in
    the order of its positions). With factored components: a greedy knapsack that fills the
    remainder with cost-1 entries. Masks lie over each set's `w` (dense or support).
    """
    with torch.no_grad():
        entry_keys: list[tuple[str, str]] = []
        entry_magnitudes: list[Tensor] = []
        component_keys: list[tuple[str, str]] = []
        component_scores: list[Tensor] = []
        for role, diff_set in diff_sets.items():
            for name in sorted(diff_set.w):
                gate = gate_deterministic(diff_set.alpha[name])
                diff_set.w[name].mul_(gate)  # fold the deterministic gate into the values
                entry_keys.append((role, name))
                entry_magnitudes.append(diff_set.w[name].abs())
            for name in sorted(diff_set.u):
                gate = gate_deterministic(diff_set.beta[name])
                diff_set.u[name].mul_(gate)
                component_keys.append((role, name))
                component_scores.append(
                    lowrank.component_scores(
                        diff_set.u[name], diff_set.v[name], torch.ones_like(gate)
                    )
                )
        if not component_keys:
            scale = _role_scales(entry_keys, entry_magnitudes) if balance_roles else {}
            named = {
                f"{role}/{name}": mag / scale.get(role, 1.0)
                for (role, name), mag in zip(entry_keys, entry_magnitudes, strict=True)
            }
            kept = projection.global_topk(named, budget)
            for role, name in entry_keys:
                mask = torch.zeros(diff_sets[role].w[name].numel(), dtype=torch.bool)
                mask[kept[f"{role}/{name}"].cpu()] = True
                diff_sets[role].mask[name] = mask.view(diff_sets[role].w[name].shape).to(
                    diff_sets[role].w[name].device
                )
        else:
            _knapsack_masks(
                diff_sets, entry_keys, entry_magnitudes, component_keys, component_scores, budget
            )
        for diff_set in diff_sets.values():
            for name in diff_set.w:
                diff_set.w[name].mul_(diff_set.mask[name])
            for name in diff_set.u:
                diff_set.u[name].mul_(diff_set.mask[name])
        return sum(diff_set.stored_entries() for diff_set in diff_sets.values())


def _role_scales(keys: list[tuple[str, str]], magnitudes: list[Tensor]) -> dict[str, float]:
    """Mean nonzero magnitude of each role's entries (1.0 for a role with none)."""
    totals: dict[str, list[float]] = {}
    for (role, _), mag in zip(keys, magnitudes, strict=True):
        entry = totals.setdefault(role, [0.0, 0.0])
        entry[0] += float(mag.sum())
        entry[1] += float((mag > 0).sum())
    return {
        role: (total / count if count else 1.0) or 1.0 for role, (total, count) in totals.items()
    }


def _knapsack_masks(
    diff_sets: dict[str, GatedDiffSet],
    entry_keys: list[tuple[str, str]],
    entry_magnitudes: list[Tensor],
    component_keys: list[tuple[str, str]],
    component_scores: list[Tensor],
    budget: int,
) -> None:
    """Masks from one greedy knapsack over factored components (cost m + n) and entries (cost 1)."""
    costs = [
        torch.full(
            (scores.numel(),),
            lowrank.component_cost(
                (diff_sets[role].u[name].shape[0], diff_sets[role].v[name].shape[0])
            ),
            dtype=torch.int64,
        )
        for (role, name), scores in zip(component_keys, component_scores, strict=True)
    ]
    flat_entries = [m.flatten().cpu() for m in entry_magnitudes]
    all_scores = torch.cat([s.cpu() for s in component_scores] + flat_entries)
    all_costs = torch.cat(costs + [torch.ones(m.numel(), dtype=torch.int64) for m in flat_entries])
    keep = knapsack_topk(all_scores, all_costs, budget)
    offset = 0
    for (role, name), scores in zip(component_keys, component_scores, strict=True):
        diff_sets[role].mask[name] = keep[offset : offset + scores.numel()].to(scores.device)
        offset += scores.numel()
    for (role, name), magnitude in zip(entry_keys, entry_magnitudes, strict=True):
        chunk = keep[offset : offset + magnitude.numel()]
        diff_sets[role].mask[name] = chunk.view(magnitude.shape).to(magnitude.device)
        offset += magnitude.numel()


def knapsack_topk(scores: Tensor, costs: Tensor, budget: int) -> Tensor:
    """Keep items by descending score (ties: lower index first) while they fit; exact when cost-1 items remain.

    Greedy over all items at once: an item that no longer fits is skipped and later, cheaper
    items still fill the remainder. Returns a bool mask over the items.
    """
    if scores.numel() != costs.numel():
        raise ValueError("scores and costs must have the same length")
    order = _stable_descending(scores)
    sorted_costs = costs[order].to(torch.int64)
    keep_sorted = torch.zeros_like(sorted_costs, dtype=torch.bool)
    big = sorted_costs > 1
    # Cost-1 items never overshoot, so only the expensive ones need the sequential greedy.
    used = 0
    big_positions = torch.nonzero(big).flatten().tolist()
    one_positions = torch.nonzero(~big).flatten()
    # Walk expensive items in order; cost-1 items ahead of each expensive item are taken first.
    ones_taken = 0
    for pos in big_positions:
        ones_before = int(torch.searchsorted(one_positions, pos))
        take_ones = min(ones_before - ones_taken, budget - used)
        used += take_ones
        ones_taken += take_ones
        if used >= budget:
            break
        cost = int(sorted_costs[pos])
        if used + cost <= budget:
            keep_sorted[pos] = True
            used += cost
    remaining = budget - used
    if remaining > 0:
        ones_taken = min(ones_taken + remaining, one_positions.numel())
    keep_sorted[one_positions[:ones_taken]] = True
    mask = torch.zeros_like(keep_sorted)
    mask[order] = keep_sorted
    return mask


def _stable_descending(scores: Tensor) -> Tensor:
    """Indices sorting scores descending, ties by ascending index (deterministic)."""
    return torch.sort(scores.float(), descending=True, stable=True).indices
