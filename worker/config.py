"""`DiffPruneConfig`: every hyperparameter of one diff-pruning run, saved as sorted JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

VALUE_DTYPES = ("float16", "bfloat16", "float32")

# The phase-2 step size measured best at density 0.005 with 32 phase-2 steps (500 rows, batch 32,
# 2 epochs) on all-MiniLM-L6-v2; `fix_lr_for` scales it to other densities and to shorter runs.
FIX_LR_REFERENCE = 5e-3
FIX_STEPS_REFERENCE = 32
FIX_DENSITY_REFERENCE = 0.005
FIX_LR_BOUNDS = (1e-3, 2e-2)


@dataclass
class DiffPruneConfig:
    """Hyperparameters of structured diff pruning (phase 1: L0-gated diff; phase 2: fixed mask).

    Defaults are chosen for all-MiniLM-L6-v2 on small tasks (a few thousand rows): one epoch
    of gated training, projection to `density`, then five epochs fine-tuning the kept values
    with a large step (most of the accuracy is won in phase 2; see bench/accuracy.py). That
    step is chosen per run from the density and the phase-2 length unless `fix_lr` is set.
    """

    epochs: int = 1  # phase 1: gated diff training
    # Phase 2: fine-tune the kept values with the mask fixed. A 0.5% diff needs the steps:
    # with two epochs it underfits its training rows (0.90 against full finetuning's 0.99)
    # and trails full finetuning by 1.7 points; with five it fits them (0.98) and comes within
    # 0.2 points, while full finetuning gains nothing from the extra epochs (bench/accuracy.py).
    fix_epochs: int = 5
    batch_size: int = 32
    grad_accum: int = 1
    max_length: int = 128
    lr: float = 1e-4  # diff weights w (AdamW, warmup + linear decay)
    fix_lr: float | None = None  # kept values in phase 2; None = `fix_lr_for` (density, length)
    head_lr: float = 3e-3  # the dense task head, both phases
    alpha_lr: float = 0.1  # gate logits α and α_g (plain SGD, constant; no optimizer state)
    alpha_init: float = 5.0
    l0_lambda: float = 1.25e-7  # penalty per expected nonzero (Guo et al. 2021)
    structured: bool = True  # per-tensor scalar gate z_g on top of the entry gates
    gate_lower: float = -1.5  # stretch interval (l, r) of the hard-concrete gate
    gate_upper: float = 1.5
    density: float = 0.005  # kept fraction of the base parameters after projection
    warmup: float = 0.1  # fraction of each phase's steps spent warming the lr up
    weight_decay: float = 0.0  # head only; the diff is regularised by the L0 penalty
    seed: int = 0
    value_dtype: str = "float16"  # dtype of the stored diff values
    device: str = ""  # "" = cuda when available, else cpu
    compile_gates: bool = True  # torch.compile the fused gate kernels (eager fallback)
    eval_batch_size: int = 64
    checkpoint_every: int = 50  # optimizer steps between checkpoints (with a CheckpointIO)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field with an impossible value."""
        positive_ints = ("batch_size", "grad_accum", "max_length", "eval_batch_size")
        for name in positive_ints:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("epochs", "fix_epochs"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.epochs + self.fix_epochs < 1:
            raise ValueError("epochs + fix_epochs must be at least 1")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        for name in ("lr", "head_lr", "alpha_lr", "l0_lambda", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.fix_lr is not None and not self.fix_lr > 0:
            raise ValueError(f"fix_lr must be > 0 (or None to choose it), got {self.fix_lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if not self.gate_lower < 0.0 < 1.0 < self.gate_upper:
            raise ValueError("gate_lower < 0 and gate_upper > 1 are required (stretched gate)")
        if self.value_dtype not in VALUE_DTYPES:
            raise ValueError(f"value_dtype must be one of {VALUE_DTYPES}, got {self.value_dtype!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {self.checkpoint_every}")

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (JSON types only)."""
        return asdict(self)

    def to_json(self) -> str:
        """The config as sorted JSON, as stored in the artifact meta."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiffPruneConfig:
        """A config from a dict; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DiffPruneConfig fields: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> DiffPruneConfig:
        """Inverse of `to_json`."""
        return cls.from_dict(json.loads(text))


def fix_lr_for(config: DiffPruneConfig, fix_steps: int) -> float:
    """The phase-2 step size: `config.fix_lr`, else the reference scaled to density and length.

    Fewer kept entries each carry more of the change, so the step grows as 1/sqrt(density)
    from the reference (5e-3 at density 0.005); a phase 2 shorter than 32 steps must move them
    as far in fewer steps, so the step also grows as 1/sqrt(steps) below 32. Longer runs keep
    the reference step. Clamped to [1e-3, 2e-2]. Measured in bench/accuracy.py: 1e-2 is best
    at 0.1% and on a 128-row task (8 steps); at 0.5%, 5e-3 beat the smaller steps that a
    1/sqrt(steps) decay gives longer runs (80 steps: 0.8728 against 0.8706 with 3.2e-3, 4 seeds;
    126 steps: +0.25 points over 2.5e-3).
    """
    if config.fix_lr is not None:
        return config.fix_lr
    shortness = max(1.0, FIX_STEPS_REFERENCE / max(1, fix_steps))
    scale = math.sqrt(shortness * FIX_DENSITY_REFERENCE / config.density)
    low, high = FIX_LR_BOUNDS
    return min(high, max(low, FIX_LR_REFERENCE * scale))
