"""The one checkpoint format: a torch.save'd dict with a format version and the run's config.

A method's run state (`state_dict()`) is stored beside `version` and `config`; loading checks
both (only the config's `resumable_changes` may differ) and uses `weights_only=True`.
"""

from __future__ import annotations

import io
from typing import Any, Protocol

import torch

from worker.kit.config import MethodConfig

CHECKPOINT_VERSION = 1


class CheckpointIO(Protocol):
    """Where a run keeps its resumable state (object store, file, memory)."""

    def load(self) -> bytes | None:
        """The last saved state, or None when there is none."""

    def save(self, data: bytes) -> None:
        """Replace the saved state."""


def save_checkpoint(target: CheckpointIO, state: dict[str, Any], config: MethodConfig) -> None:
    """Write a run's state with the format version and its config."""
    buffer = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, "config": config.to_dict(), **state}, buffer)
    target.save(buffer.getvalue())


def load_checkpoint(
    source: CheckpointIO | None, config: MethodConfig, *, map_location: Any = None
) -> dict[str, Any] | None:
    """The saved state (checked against `config`), or None when there is none."""
    if source is None:
        return None
    data = source.load()
    if not data:
        return None
    state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    check_resumable(state, config)
    return state


def check_resumable(state: dict[str, Any], config: MethodConfig) -> None:
    """Refuse a checkpoint written by another format version or a different configuration."""
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint version {state.get('version')!r} is not {CHECKPOINT_VERSION}")
    free = config.resumable_changes
    saved = {k: v for k, v in state["config"].items() if k not in free}
    current = {k: v for k, v in config.to_dict().items() if k not in free}
    changed = sorted(k for k in current if saved.get(k) != current[k])
    if changed:
        raise ValueError(f"checkpoint was written with a different config: {', '.join(changed)}")
