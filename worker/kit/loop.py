"""What every training loop does around its steps: stop when asked, report progress, and
checkpoint every `checkpoint_every` steps and after the last."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from worker.kit.checkpoint import CheckpointIO, save_checkpoint
from worker.kit.config import MethodConfig
from worker.kit.progress import Progress, TrainingCancelled


class RunState(Protocol):
    """A method's run state as the loop control sees it."""

    step: int  # finished optimizer steps

    def progress(self, total_steps: int) -> Progress:
        """Where the run is."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps to resume the run."""


@dataclass
class LoopControl:
    """The hooks of one run of `total_steps` steps (each optional)."""

    config: MethodConfig
    total_steps: int
    progress: Callable[[Progress], None] | None = None
    checkpoint: CheckpointIO | None = None
    should_stop: Callable[[], bool] | None = None

    def check_stop(self, message: str) -> None:
        """Raise `TrainingCancelled(message)` when the run has been asked to stop."""
        if self.should_stop is not None and self.should_stop():
            raise TrainingCancelled(message)

    def report(self, state: RunState) -> None:
        """Tell `progress` where the run is."""
        if self.progress is not None:
            self.progress(state.progress(self.total_steps))

    def step_done(self, state: RunState) -> None:
        """After a step: report it, and save a checkpoint when one is due."""
        self.report(state)
        due = state.step % self.config.checkpoint_every == 0 or state.step == self.total_steps
        if self.checkpoint is not None and due:
            save_checkpoint(self.checkpoint, state.state_dict(), self.config)
