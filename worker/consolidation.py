"""Consolidation: re-fit several tasks' diffs together under one budget (Xia & Shin 2021).

Tasks T1..Tn on one base are re-fitted as one shared L0-gated diff plus one residual L0-gated
diff and one dense head per task. Training batches come from one task at a time, the task drawn
with temperature sampling over dataset sizes (p_i proportional to n_i^(1/T)). After phase 1 the
shared and all residual diffs are projected together so that their stored entries fit the
budget exactly (the shared part counted once), then the kept values are fine-tuned with the
masks fixed. Task i's model is base + shared + residual_i + head_i.

Warm start: every residual starts at its task's current diff, every head at its current head,
and the shared part at zero, so step 0 reproduces the current versions.

Strategies:
- ``elementwise``: one hard-concrete gate per entry; budget = kept entries.
- ``rank``: see `worker.lowrank` (gated rank-one components, cost m + n each; embedding
  tables and 1-D tensors element-wise).

Artifacts: the shared part and each residual are materialised as the usual sparse format
(for the rank strategy: every entry of a matrix with a kept component, the factors' dense
product); the composed diff shared + residual is what serving and the default download use.
`nnz` in the report always counts stored budget entries (factor entries for factored matrices).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from registry.artifact import VALUE_DTYPES, ArtifactMeta, SparseDiff, build_task_model
from registry.basemodel import LoadedBase
from worker import gates, lowrank, projection
from worker.config import DiffPruneConfig
from worker.data import TaskData
from worker.trainer import (
    Progress,
    TrainingCancelled,
    autocast_for,
    encode_rows,
    evaluate,
    label_tensor,
    prepare_model,
    resolve_device,
)

SHARED = "shared"
Strategy = Literal["elementwise", "rank"]


@dataclass
class ConsolidationConfig:
    """Every hyperparameter of one consolidation run; saved as sorted JSON in the artifacts' meta."""

    strategy: str = "elementwise"
    budget: int = 0  # total stored entries: shared once + every residual
    tolerance: float = 0.5  # accuracy points (metric x 100) a task may lose and still be accepted
    temperature: float = 2.0  # task sampling p_i ~ n_i^(1/T)
    epochs: float = 1.0  # phase 1, in passes over the summed training sets
    fix_epochs: float = 1.0  # phase 2 (masks fixed)
    batch_size: int = 16
    max_length: int = 64
    lr: float = 1e-4  # diff values and factors, phase 1 (AdamW, warmup + linear decay)
    fix_lr: float = 5e-4  # kept values, phase 2
    head_lr: float = 1e-3
    alpha_lr: float = 0.1  # gate logits (plain SGD, constant, like the trainer)
    l0_lambda: float = 1.25e-7  # per parameter, on the expected L0 of every gated set in a step
    alpha_init: float = 5.0
    rank: int = 8  # max components per factored matrix and per set (rank strategy)
    balance_roles: bool = (
        True  # element-wise projection ranks each set's magnitudes relative to its mean
    )
    warmup_fraction: float = 0.1
    max_train_examples: int = 0  # per task; 0 = all
    eval_batch_size: int = 64
    value_dtype: str = "float16"
    checkpoint_every_steps: int = 50
    seed: int = 0
    device: str = ""  # "" = cuda when available, else cpu

    def to_json(self) -> str:
        """Sorted JSON of every field."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        """Every field as a plain dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ConsolidationConfig:
        """A config from a dict, ignoring unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


class ConsolidationError(ValueError):
    """A consolidation request that cannot run; `field` names the offending input."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class ConsolidationTask:
    """One task to consolidate: its data and its current version's diff (warm start, 'before')."""

    name: str
    data: TaskData
    current: SparseDiff


@dataclass
class TaskOutcome:
    """What consolidation produced for one task."""

    name: str
    residual: SparseDiff
    composed: SparseDiff
    nnz: int  # stored budget entries of the residual
    metrics_after: dict[str, Any] = field(default_factory=dict)


@dataclass
class ConsolidationResult:
    """The shared diff, per-task residuals and composed diffs, and the budget accounting."""

    shared: SparseDiff
    shared_nnz: int
    tasks: list[TaskOutcome]
    total_nnz: int
    train_seconds: float
    steps: int
    config: ConsolidationConfig


def accept(metric_before: float, metric_after: float, tolerance_points: float) -> bool:
    """Whether a task's new metric stays within `tolerance_points` (x100 scale) of its current one."""
    return (metric_before - metric_after) * 100.0 <= tolerance_points + 1e-9


def task_sampling_probabilities(sizes: Sequence[int], temperature: float) -> list[float]:
    """p_i proportional to n_i^(1/T)."""
    if temperature <= 0:
        raise ConsolidationError("temperature must be positive", field="temperature")
    weights = [max(n, 1) ** (1.0 / temperature) for n in sizes]
    total = sum(weights)
    return [w / total for w in weights]


# --- gate math (the trainer's hard-concrete gates, symmetric stretch l = -r) ---------------------
# The reference (unfused) forms: consolidation gates two diff sets per step and needs the
# gradient of both, which the trainer's fused single-tensor op does not give to its θ₀ input.

GATE_LOWER, GATE_UPPER = DiffPruneConfig.gate_lower, DiffPruneConfig.gate_upper


def _gate_sample(alpha: Tensor) -> Tensor:
    """A stochastic stretched hard-concrete gate per logit (global torch RNG)."""
    bits = gates.sample_noise_bits(alpha.numel(), device=alpha.device)
    noise = gates.logistic_from_bits(bits).view(alpha.shape)
    return gates.stochastic_gate(alpha, noise, GATE_LOWER, GATE_UPPER)


def _gate_deterministic(alpha: Tensor) -> Tensor:
    """The deterministic gate used for projection and evaluation."""
    return gates.deterministic_gate(alpha, GATE_LOWER, GATE_UPPER)


def _gate_l0_sum(alpha: Tensor) -> Tensor:
    """Sum of P(gate != 0) over the logits (expected L0)."""
    return gates.prob_nonzero(alpha, GATE_LOWER, GATE_UPPER).sum()


# --- the trainable state ------------------------------------------------------------------------


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
                return w * _gate_sample(self.alpha[name])
            return w * _gate_deterministic(self.alpha[name])
        u, v = self.u[name], self.v[name]
        if mode == "masked":
            gate = self.mask[name].to(u.dtype)
        elif mode == "sample":
            gate = _gate_sample(self.beta[name])
        else:
            gate = _gate_deterministic(self.beta[name])
        return lowrank.lowrank_product(u, v, gate)

    def _device(self) -> torch.device:
        tensors = self.value_tensors()
        return tensors[0].device if tensors else torch.device("cpu")

    def expected_l0(self) -> Tensor:
        """Expected stored entries under the gates (a factored component costs m + n)."""
        total = torch.zeros((), device=self._device())
        for alpha in self.alpha.values():
            total = total + _gate_l0_sum(alpha)
        for name, beta in self.beta.items():
            cost = self.u[name].shape[0] + self.v[name].shape[0]
            total = total + _gate_l0_sum(beta) * cost
        return total

    def stored_entries(self) -> int:
        """Stored budget entries after projection."""
        total = sum(int(self.mask[name].sum()) for name in self.w)
        for name in self.u:
            total += int(self.mask[name].sum()) * (self.u[name].shape[0] + self.v[name].shape[0])
        return total

    def state(self) -> dict[str, dict[str, Tensor]]:
        """Every tensor, detached, for a checkpoint."""
        return {
            key: {name: t.detach().clone() for name, t in getattr(self, key).items()}
            for key in ("w", "alpha", "u", "v", "beta", "mask")
        }

    def load_state(self, state: dict[str, dict[str, Tensor]]) -> None:
        """Restore tensors from `state()` in place (keeps optimizer references valid)."""
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


# --- projection to the budget -------------------------------------------------------------------


def project_to_budget(
    diff_sets: dict[str, GatedDiffSet], budget: int, *, balance_roles: bool = False
) -> int:
    """Keep exactly `budget` stored entries over all sets (shared once), fold gates; returns entries kept.

    Scores are the deterministic-gate diff magnitudes (with `balance_roles`, each set's
    magnitudes divided by that set's mean nonzero magnitude, so a task whose diff is small
    overall is not starved by tasks with larger values); a factored component scores
    ||g u v^T||_F / sqrt(m + n). Element-wise only: the trainer's global top-k (ties by
    position in the order of the keys "role/tensor" sorted). With factored
    components: a greedy knapsack that fills the remainder with cost-1 entries.
    """
    with torch.no_grad():
        entry_keys: list[tuple[str, str]] = []
        entry_magnitudes: list[Tensor] = []
        component_keys: list[tuple[str, str]] = []
        component_scores: list[Tensor] = []
        for role, diff_set in diff_sets.items():
            for name in sorted(diff_set.w):
                gate = _gate_deterministic(diff_set.alpha[name])
                diff_set.w[name].mul_(gate)  # fold the deterministic gate into the values
                entry_keys.append((role, name))
                entry_magnitudes.append(diff_set.w[name].abs())
            for name in sorted(diff_set.u):
                gate = _gate_deterministic(diff_set.beta[name])
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
    keep = lowrank.knapsack_topk(all_scores, all_costs, budget)
    offset = 0
    for (role, name), scores in zip(component_keys, component_scores, strict=True):
        diff_sets[role].mask[name] = keep[offset : offset + scores.numel()].to(scores.device)
        offset += scores.numel()
    for (role, name), magnitude in zip(entry_keys, entry_magnitudes, strict=True):
        chunk = keep[offset : offset + magnitude.numel()]
        diff_sets[role].mask[name] = chunk.view(magnitude.shape).to(magnitude.device)
        offset += magnitude.numel()


# --- artifacts ----------------------------------------------------------------------------------


def materialise(
    diff_sets: Sequence[GatedDiffSet], base_tensors: dict[str, Tensor]
) -> tuple[dict, dict]:
    """Sparse (indices, values) of the sum of masked sets: the union of their stored positions."""
    indices: dict[str, Tensor] = {}
    values: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, theta in base_tensors.items():
            position_masks = []
            total = torch.zeros(theta.numel(), device=theta.device)
            for diff_set in diff_sets:
                if name in diff_set.w:
                    mask = diff_set.mask[name].flatten()
                    if not bool(mask.any()):
                        continue
                    position_masks.append(mask)
                    total += (diff_set.w[name] * diff_set.mask[name]).flatten()
                elif name in diff_set.u and bool(diff_set.mask[name].any()):
                    position_masks.append(
                        torch.ones(theta.numel(), dtype=torch.bool, device=theta.device)
                    )
                    total += diff_set.delta(name, "masked").flatten()
            if not position_masks:
                continue
            union = torch.stack(position_masks).any(dim=0)
            idx = torch.nonzero(union).flatten()
            indices[name] = idx.cpu()
            values[name] = total[idx].cpu()
    return indices, values


def make_artifact(
    indices: dict[str, Tensor],
    values: dict[str, Tensor],
    *,
    template: ArtifactMeta,
    head: dict[str, Tensor],
    shapes: dict[str, tuple[int, ...]],
    n_params: int,
    config: ConsolidationConfig,
    extra: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> SparseDiff:
    """A SparseDiff of the usual format with consolidation lineage in meta.extra."""
    nnz = sum(int(t.numel()) for t in indices.values())
    value_dtype = VALUE_DTYPES[config.value_dtype]
    meta = dataclasses.replace(
        template,
        density=nnz / n_params,
        nnz=nnz,
        value_dtype=config.value_dtype,
        config=config.to_dict(),
        metrics=dict(metrics or {}),
        extra={**dict(template.extra or {}), "consolidation": extra},
    )
    return SparseDiff(
        indices=dict(indices),
        values={name: v.to(value_dtype) for name, v in values.items()},
        shapes={name: tuple(shapes[name]) for name in indices},
        head={name: t.detach().float().cpu().clone() for name, t in head.items()},
        meta=meta,
    )


# --- the fit ------------------------------------------------------------------------------------


@dataclass
class _Models:
    """One classification model per task sharing a single frozen encoder."""

    models: list[torch.nn.Module]
    prefix: str
    base_tensors: dict[str, Tensor]
    heads: list[dict[str, Tensor]]


def _build_models(
    tasks: Sequence[ConsolidationTask], base: LoadedBase, device: torch.device
) -> _Models:
    """Task models sharing one frozen encoder (on CPU the cached base's own storage);
    heads are trainable copies of the current versions' heads."""
    models: list[torch.nn.Module] = []
    heads: list[dict[str, Tensor]] = []
    shared_encoder = None
    prefix = ""
    for task in tasks:
        model = prepare_model(base, task.data, device, share_base=shared_encoder is None)
        prefix = model.base_model_prefix
        if shared_encoder is None:
            shared_encoder = model.base_model
        else:
            setattr(model, prefix, shared_encoder)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        head: dict[str, Tensor] = {}
        for name, parameter in model.named_parameters():
            if name.startswith(prefix + "."):
                continue
            start = task.current.head.get(name)
            if start is None or tuple(start.shape) != tuple(parameter.shape):
                raise ConsolidationError(
                    f"task {task.name!r}: current version has no head tensor {name!r} "
                    f"of shape {tuple(parameter.shape)}",
                    field="tasks",
                )
            head[name] = start.detach().float().to(device).clone().requires_grad_(True)
        models.append(model)
        heads.append(head)
    assert shared_encoder is not None
    base_tensors = {name: p.detach() for name, p in shared_encoder.named_parameters()}
    return _Models(models=models, prefix=prefix, base_tensors=base_tensors, heads=heads)


def _task_loss(
    models: _Models,
    index: int,
    shared: GatedDiffSet,
    residual: GatedDiffSet,
    mode: str,
    batch: dict,
) -> Tensor:
    """Task `index`'s loss with encoder weights base + shared + residual."""
    params = {
        f"{models.prefix}.{name}": theta + shared.delta(name, mode) + residual.delta(name, mode)
        for name, theta in models.base_tensors.items()
    }
    params.update(models.heads[index])
    model = models.models[index]
    model.train()
    outputs = torch.func.functional_call(model, params, args=(), kwargs=batch, strict=False)
    return outputs.loss


def _linear_schedule(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """Warmup then linear decay to zero, as a LambdaLR factor."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def _phase_steps(sizes: Sequence[int], epochs: float, batch_size: int) -> int:
    """Steps of a phase: `epochs` passes over the summed training sets."""
    return max(1, math.ceil(epochs * sum(sizes) / batch_size)) if epochs > 0 else 0


def _rows_for_draw(n: int, draw: int, batch_size: int, seed: int, task_index: int) -> Tensor:
    """Rows of a task's `draw`-th batch: consecutive slices of a seeded per-pass permutation."""
    per_pass = max(1, math.ceil(n / batch_size))
    pass_index, slot = divmod(draw, per_pass)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + task_index * 7_919 + pass_index)
    order = torch.randperm(n, generator=generator)
    return order[slot * batch_size : (slot + 1) * batch_size]


def validate_request(
    tasks: Sequence[ConsolidationTask], config: ConsolidationConfig, *, base: LoadedBase
) -> None:
    """Reject a run that cannot be done: no tasks, duplicates, another base, a budget out of range."""
    if not tasks:
        raise ConsolidationError("at least one task is needed", field="tasks")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConsolidationError("a task is listed twice", field="tasks")
    for task in tasks:
        if task.current.meta.base_fingerprint != base.fingerprint:
            raise ConsolidationError(
                f"task {task.name!r} is on another base than {base.name!r}", field="tasks"
            )
    if config.strategy not in ("elementwise", "rank"):
        raise ConsolidationError("strategy must be 'elementwise' or 'rank'", field="strategy")
    if not 1 <= config.budget <= base.n_params:
        raise ConsolidationError(
            f"budget must be between 1 and the base size {base.n_params}", field="budget"
        )
    if config.rank < 1:
        raise ConsolidationError("rank must be at least 1", field="rank")


def consolidate(
    tasks: Sequence[ConsolidationTask],
    config: ConsolidationConfig,
    *,
    base: LoadedBase,
    run_id: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    checkpoint: Any | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ConsolidationResult:
    """Re-fit `tasks` as shared + residual gated diffs under `config.budget` and build their artifacts.

    `checkpoint` is a `worker.trainer.CheckpointIO` (load/save bytes); `should_stop` turning true
    raises `worker.trainer.TrainingCancelled`. Evaluation is left to `evaluate_diff`.
    """
    validate_request(tasks, config, base=base)
    started = time.monotonic()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = resolve_device(config.device)
    models = _build_models(tasks, base, device)
    shapes = {name: tuple(t.shape) for name, t in models.base_tensors.items()}
    sets: dict[str, GatedDiffSet] = {
        SHARED: new_diff_set(
            models.base_tensors,
            strategy=config.strategy,
            rank=config.rank,
            alpha_init=config.alpha_init,
            init=None,
            generator=generator,
        )
    }
    for task in tasks:
        sets[task.name] = new_diff_set(
            models.base_tensors,
            strategy=config.strategy,
            rank=config.rank,
            alpha_init=config.alpha_init,
            init=dense_deltas(task.current, shapes),
            generator=generator,
        )
    sizes = [len(t.data.train.texts) for t in tasks]
    if config.max_train_examples:
        sizes = [min(n, config.max_train_examples) for n in sizes]
    labels = [label_tensor(t.data.train, t.data.task_type) for t in tasks]
    probabilities = torch.tensor(task_sampling_probabilities(sizes, config.temperature))
    fit_steps = _phase_steps(sizes, config.epochs, config.batch_size)
    fix_steps = _phase_steps(sizes, config.fix_epochs, config.batch_size)
    total_steps = fit_steps + fix_steps
    choices = torch.multinomial(
        probabilities, max(1, total_steps), replacement=True, generator=generator
    )
    draws = [0] * len(tasks)
    step = 0
    phase = "prune"
    saved = _load_checkpoint(checkpoint)
    if saved is not None:
        for role, diff_set in sets.items():
            diff_set.load_state(saved["sets"][role])
        for head, state in zip(models.heads, saved["heads"], strict=True):
            with torch.no_grad():
                for name, tensor in head.items():
                    tensor.copy_(state[name])
        step, phase, draws = (
            int(saved["step"]),
            str(saved["phase"]),
            [int(d) for d in saved["draws"]],
        )
        torch.set_rng_state(saved["torch_rng"])
    optimizers, scheduler = _optimizers(sets, models, config, phase, fit_steps, fix_steps)
    if saved is not None:
        for optimizer, state in zip(optimizers, saved["optimizers"], strict=True):
            optimizer.load_state_dict(state)
        scheduler.load_state_dict(saved["scheduler"])
    n_params = sum(t.numel() for t in models.base_tensors.values())
    penalty_scale = config.l0_lambda
    while step < total_steps:
        if should_stop is not None and should_stop():
            raise TrainingCancelled(f"consolidation run {run_id} cancelled at step {step}")
        if phase == "prune" and step >= fit_steps:
            project_to_budget(sets, config.budget, balance_roles=config.balance_roles)
            phase = "fix"
            optimizers, scheduler = _optimizers(sets, models, config, phase, fit_steps, fix_steps)
        index = int(choices[step])
        rows = _rows_for_draw(sizes[index], draws[index], config.batch_size, config.seed, index)
        draws[index] += 1
        batch = encode_rows(
            base.tokenizer, tasks[index].data.train, rows, config.max_length, device
        )
        batch["labels"] = labels[index][rows].to(device)
        residual = sets[tasks[index].name]
        mode = "sample" if phase == "prune" else "masked"
        with autocast_for(device):
            loss = _task_loss(models, index, sets[SHARED], residual, mode, batch).float()
        total = loss
        if phase == "prune":
            expected = sets[SHARED].expected_l0() + residual.expected_l0()
            total = loss + penalty_scale * expected
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        total.backward()
        for optimizer in optimizers:
            optimizer.step()
        scheduler.step()
        step += 1
        if progress is not None:
            progress(
                Progress(step, total_steps, float(loss.detach()), _expected_nnz(sets, phase), phase)
            )
        if checkpoint is not None and (
            step % config.checkpoint_every_steps == 0 or step == total_steps
        ):
            _save_checkpoint(checkpoint, sets, models, optimizers, scheduler, step, phase, draws)
    if phase == "prune":  # no phase 2 configured
        project_to_budget(sets, config.budget, balance_roles=config.balance_roles)
    return _build_result(
        tasks, sets, models, shapes, n_params, config, run_id, started, total_steps
    )


def _expected_nnz(sets: dict[str, GatedDiffSet], phase: str) -> float:
    """Expected stored entries under the gates (phase 1) or the stored entries (phase 2)."""
    with torch.no_grad():
        if phase == "prune":
            return float(sum(float(s.expected_l0()) for s in sets.values()))
        return float(sum(s.stored_entries() for s in sets.values()))


def _optimizers(
    sets: dict[str, GatedDiffSet],
    models: _Models,
    config: ConsolidationConfig,
    phase: str,
    fit_steps: int,
    fix_steps: int,
) -> tuple[list[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on values + heads (warmup, linear decay); plain SGD on gate logits in phase 1."""
    values = [t for s in sets.values() for t in s.value_tensors()]
    heads = [t for head in models.heads for t in head.values()]
    value_lr = config.lr if phase == "prune" else config.fix_lr
    main = torch.optim.AdamW(
        [{"params": values, "lr": value_lr}, {"params": heads, "lr": config.head_lr}],
        weight_decay=0.0,
    )
    steps = fit_steps if phase == "prune" else fix_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        main, _linear_schedule(max(1, steps), config.warmup_fraction)
    )
    optimizers: list[torch.optim.Optimizer] = [main]
    if phase == "prune":
        logits = [t for s in sets.values() for t in s.logit_tensors()]
        optimizers.append(torch.optim.SGD(logits, lr=config.alpha_lr))
    return optimizers, scheduler


def _save_checkpoint(checkpoint, sets, models, optimizers, scheduler, step, phase, draws) -> None:
    """Serialise the whole fit state through the CheckpointIO."""
    state = {
        "step": step,
        "phase": phase,
        "draws": list(draws),
        "sets": {role: s.state() for role, s in sets.items()},
        "heads": [{n: t.detach().clone() for n, t in head.items()} for head in models.heads],
        "optimizers": [o.state_dict() for o in optimizers],
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    checkpoint.save(buffer.getvalue())


def _load_checkpoint(checkpoint) -> dict | None:
    """The saved fit state, or None when there is no checkpoint."""
    if checkpoint is None:
        return None
    data = checkpoint.load()
    if not data:
        return None
    return torch.load(io.BytesIO(data), weights_only=True)


def _build_result(
    tasks, sets, models, shapes, n_params, config, run_id, started, steps
) -> ConsolidationResult:
    """Artifacts of the fitted sets: the shared diff, and per task its residual and composed diff."""
    shared_set = sets[SHARED]
    lineage = {"run_id": run_id, "strategy": config.strategy, "budget": config.budget}
    template = tasks[0].current.meta
    indices, values = materialise([shared_set], models.base_tensors)
    shared = make_artifact(
        indices,
        values,
        template=template,
        head={},
        shapes=shapes,
        n_params=n_params,
        config=config,
        extra={**lineage, "role": "shared", "stored_entries": shared_set.stored_entries()},
    )
    outcomes = []
    for task, head in zip(tasks, models.heads, strict=True):
        residual_set = sets[task.name]
        entries = residual_set.stored_entries()
        common = {
            **lineage,
            "task": task.name,
            "stored_entries": entries,
            "shared_stored_entries": shared_set.stored_entries(),
        }
        r_idx, r_val = materialise([residual_set], models.base_tensors)
        residual = make_artifact(
            r_idx,
            r_val,
            template=task.current.meta,
            head=head,
            shapes=shapes,
            n_params=n_params,
            config=config,
            extra={**common, "role": "residual"},
        )
        c_idx, c_val = materialise([shared_set, residual_set], models.base_tensors)
        composed = make_artifact(
            c_idx,
            c_val,
            template=task.current.meta,
            head=head,
            shapes=shapes,
            n_params=n_params,
            config=config,
            extra={**common, "role": "composed"},
        )
        outcomes.append(
            TaskOutcome(name=task.name, residual=residual, composed=composed, nnz=entries)
        )
    total = shared_set.stored_entries() + sum(o.nnz for o in outcomes)
    return ConsolidationResult(
        shared=shared,
        shared_nnz=shared_set.stored_entries(),
        tasks=outcomes,
        total_nnz=total,
        train_seconds=time.monotonic() - started,
        steps=steps,
        config=config,
    )


def evaluate_diff(
    diff: SparseDiff, data: TaskData, *, base: LoadedBase, config: ConsolidationConfig
) -> dict:
    """Validation metrics of base + diff + its head (the trainer's evaluate)."""
    model = build_task_model(base, diff).to(resolve_device(config.device))
    return evaluate(
        model,
        data.validation,
        tokenizer=base.tokenizer,
        task_type=data.task_type,
        num_labels=data.num_labels,
        max_length=config.max_length,
        batch_size=config.eval_batch_size,
    )
