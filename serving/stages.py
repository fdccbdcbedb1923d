"""Per-stage time of prediction requests: CPU (`time.thread_time`) and wall seconds.

Stages, in request order: `auth` (key -> principal), `resolve` (task -> served version ->
resident diffs), `tokenise`, `queue_wait` (submitted until its batch starts; wall only),
`forward` and `heads` (each request's share of its batch), `response` (building the JSON).
Accumulators only: a few clock reads and one lock per request and per batch.
"""

from __future__ import annotations

import threading
import time

STAGES = ("auth", "resolve", "tokenise", "queue_wait", "forward", "heads", "response")


def mark() -> tuple[float, float]:
    """Now, as (thread CPU seconds, wall seconds), for `since`."""
    return time.thread_time(), time.perf_counter()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(CPU, wall) seconds of this thread since `start` (a `mark()` taken on this thread)."""
    return time.thread_time() - start[0], time.perf_counter() - start[1]


class StageStats:
    """Totals per stage: requests observed, CPU seconds, wall seconds (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = {stage: [0, 0.0, 0.0] for stage in STAGES}

    def add(self, stage: str, cpu: float, wall: float, *, requests: int = 1) -> None:
        """Add `requests` requests that spent `cpu` and `wall` seconds (in all) in `stage`."""
        with self._lock:
            total = self._totals[stage]
            total[0] += requests
            total[1] += cpu
            total[2] += wall

    def add_request(self, times: dict[str, tuple[float, float]]) -> None:
        """Add one request's (CPU, wall) seconds per stage."""
        with self._lock:
            for stage, (cpu, wall) in times.items():
                total = self._totals[stage]
                total[0] += 1
                total[1] += cpu
                total[2] += wall

    def snapshot(self) -> dict[str, tuple[int, float, float]]:
        """(requests, CPU seconds, wall seconds) per stage so far."""
        with self._lock:
            return {stage: (int(n), cpu, wall) for stage, (n, cpu, wall) in self._totals.items()}
