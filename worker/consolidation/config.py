"""What a consolidation run takes and returns: its config, tasks, outcomes and refusals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from diffs.basemodel import LoadedBase
from diffs.types import SparseDiff
from registry.catalog.consolidation import MERGE_STRATEGIES as MERGE_STRATEGIES  # re-exported
from registry.catalog.consolidation import STRATEGIES
from worker.data import TaskData
from worker.kit.config import ConfigError, MethodConfig, option


class ConsolidationError(ConfigError):
    """A consolidation request that cannot run; `field` names the offending input."""


@dataclass(kw_only=True)
class ConsolidationConfig(MethodConfig):
    """Every hyperparameter of one consolidation run; saved as sorted JSON in the artifacts' meta."""

    error: ClassVar[type[ConfigError]] = ConsolidationError

    strategy: str = option(
        "elementwise",
        "'elementwise' (entry gates) or 'rank' (components), trained; or a training-free merge "
        "of the current diffs: 'ties', 'dare', 'task_arithmetic'",
    )
    budget: int = option(0, "total stored entries: shared once + every residual")
    tolerance: float = option(
        0.5, "accuracy points (metric x 100) a task may lose and still be accepted"
    )
    temperature: float = option(2.0, "task sampling p_i ~ n_i^(1/T)")
    epochs: float = option(1.0, "phase 1, in passes over the summed training sets")
    fix_epochs: float = option(1.0, "phase 2 (masks fixed), in passes over the training sets")
    batch_size: int = option(16, "rows per batch (one task per batch)")
    max_length: int = option(64, "tokens per example, truncated")
    fix_lr: float = option(5e-4, "learning rate of the kept values, phase 2")
    head_lr: float = option(1e-3, "learning rate of the task heads, both phases")
    rank: int = option(8, "max components per factored matrix and per set (rank strategy)")
    balance_roles: bool = option(
        True, "element-wise projection ranks each set's magnitudes relative to its mean"
    )
    max_train_examples: int = option(0, "training rows per task; 0 = all")
    candidate_ratio: float = option(
        1.0,
        "candidate positions of each task's residual beyond its current diff, as a multiple of "
        "its current entries (largest accumulated |gradient|); 0 = current positions only",
    )
    candidate_batches: int = option(
        4, "training batches per task whose accumulated |gradient| picks the candidates"
    )
    merge_weight: float = option(
        1.0, "lambda, the scale of the merged diff (ties, dare, task_arithmetic)"
    )
    # 1.0: a diff is already its task's top-k entries (the trainer's projection is TIES's trim step).
    ties_density: float = option(
        1.0, "ties: fraction of each task's entries kept (top magnitudes) before the sign vote"
    )
    dare_drop: float = option(
        0.9, "dare: probability of dropping each entry; survivors are rescaled by 1/(1 - p)"
    )

    def validate(self) -> None:
        """Raise ConsolidationError naming the first field with an impossible value."""
        super().validate()
        if self.strategy not in STRATEGIES:
            self.fail("strategy", f"strategy must be one of {', '.join(STRATEGIES)}")
        if self.rank < 1:
            self.fail("rank", "rank must be at least 1")
        if not self.temperature > 0:
            self.fail("temperature", "temperature must be positive")
        for name in ("batch_size", "max_length"):
            if int(getattr(self, name)) < 1:
                self.fail(name, f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("budget", "tolerance", "epochs", "fix_epochs", "fix_lr", "head_lr"):
            if getattr(self, name) < 0:
                self.fail(name, f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_train_examples < 0:
            self.fail("max_train_examples", "max_train_examples must be >= 0 (0 = all)")
        for name in ("candidate_ratio", "candidate_batches"):
            if getattr(self, name) < 0:
                self.fail(name, f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.merge_weight > 0 and math.isfinite(self.merge_weight)):
            self.fail("merge_weight", f"merge_weight must be positive, got {self.merge_weight}")
        if not 0 < self.ties_density <= 1:
            self.fail("ties_density", f"ties_density must be in (0, 1], got {self.ties_density}")
        if not 0 <= self.dare_drop < 1:
            self.fail("dare_drop", f"dare_drop must be in [0, 1), got {self.dare_drop}")


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


def validate_request(
    tasks: Sequence[ConsolidationTask], config: ConsolidationConfig, *, base: LoadedBase
) -> None:
    """Reject a run that cannot be done: no tasks, duplicates, another base, a budget out of range."""
    config.validate()
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
    if not 1 <= config.budget <= base.n_params:
        raise ConsolidationError(
            f"budget must be between 1 and the base size {base.n_params}", field="budget"
        )
