"""What a running training method reports, and how it is stopped."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Progress:
    """Where a training run is: optimizer step (1-based, over both phases) and loss."""

    step: int
    total_steps: int
    loss: float
    expected_nnz: float
    phase: str  # "prune" (gated diff), "fix" (mask fixed) or "evaluate"


class TrainingCancelled(Exception):
    """Raised when `should_stop()` turns true; nothing is returned or published."""
