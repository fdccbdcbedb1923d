"""Dynamic batching: concurrent predict requests gathered into mixed batches on one runner thread.

A batch closes at `max_requests` requests, at `max_rows` rows, or `max_wait_s` after its first
request arrived. The queue is bounded: a full queue refuses at once (the API answers 503).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serving.stages import mark, since

if TYPE_CHECKING:
    from serving.engine import Predictor, PreparedRequest
    from serving.stages import StageStats


class QueueFullError(RuntimeError):
    """The batcher's queue is full; the caller should retry after `retry_after_s`."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the prediction queue is full; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class _Waiting:
    request: PreparedRequest
    future: Future
    queued_at: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Owns the predictor's base through one runner thread; `submit` never blocks."""

    def __init__(
        self,
        predictor: Predictor,
        *,
        max_requests: int = 32,
        max_rows: int = 64,
        max_wait_s: float = 0.002,
        max_queue: int = 256,
        retry_after_s: int = 1,
        stages: StageStats | None = None,
    ) -> None:
        self.predictor = predictor
        self.max_requests = max(1, max_requests)
        self.max_rows = max(1, max_rows)
        self.max_wait_s = max(0.0, max_wait_s)
        self.max_queue = max(1, max_queue)
        self.retry_after_s = retry_after_s
        self.stages = stages  # queue_wait, forward, heads of each request, if given
        self._queue: deque[_Waiting] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.batches = 0
        self.batched_requests = 0
        self.batched_rows = 0
        self.rejected = 0

    def submit(self, request: PreparedRequest) -> Future:
        """Queue a request; its future gets the predictions. Raises QueueFullError when full."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if len(self._queue) >= self.max_queue:
                self.rejected += 1
                raise QueueFullError(self.retry_after_s)
            self._queue.append(_Waiting(request, future))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run_forever, name="diffbank-model-runner", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return future

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        """Stop the runner after the batch in progress; waiting requests fail."""
        with self._cond:
            self._closed = True
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for item in waiting:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(RuntimeError("the batcher was closed"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # -- the runner thread -----------------------------------------------------------

    def _run_forever(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Waiting] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            batch = [self._queue.popleft()]
            rows = batch[0].request.rows
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_requests:
                if self._queue:
                    if rows + self._queue[0].request.rows > self.max_rows:
                        break
                    item = self._queue.popleft()
                    batch.append(item)
                    rows += item.request.rows
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
        return [item for item in batch if item.future.set_running_or_notify_cancel()]

    def _run(self, batch: list[_Waiting]) -> None:
        if not batch:
            return
        self.batches += 1
        self.batched_requests += len(batch)
        self.batched_rows += sum(item.request.rows for item in batch)
        start = mark()
        before = _forward_time(self.predictor)
        try:
            answers: list[Any] = self.predictor.run_batch([item.request for item in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            # One bad request must not fail the others: run each alone to find it.
            for item in batch:
                try:
                    item.future.set_result(self.predictor.run_batch([item.request])[0])
                except Exception as alone:
                    item.future.set_exception(alone)
            return
        if self.stages is not None:
            self._record(batch, start, before)
        for item, answer in zip(batch, answers, strict=True):
            item.future.set_result(answer)

    def _record(
        self, batch: list[_Waiting], start: tuple[float, float], before: tuple[float, float] | None
    ) -> None:
        """Stage times of a batch run: each request's wait, and the batch's forward and heads."""
        cpu, wall = since(start)
        n = len(batch)
        stages = self.stages
        assert stages is not None
        stages.add("queue_wait", 0.0, sum(start[1] - item.queued_at for item in batch), requests=n)
        after = _forward_time(self.predictor)
        if before is None or after is None:  # no split exposed: the whole run counts as forward
            stages.add("forward", cpu, wall, requests=n)
            return
        forward_cpu, forward_wall = after[0] - before[0], after[1] - before[1]
        stages.add("forward", forward_cpu, forward_wall, requests=n)
        stages.add("heads", max(0.0, cpu - forward_cpu), max(0.0, wall - forward_wall), requests=n)


def _forward_time(predictor: Any) -> tuple[float, float] | None:
    """Cumulative (CPU, wall) seconds of the predictor's encoder forwards, if it exposes them.

    `Predictor.stage_times["forward"]`, when the engine keeps it; the rest of a batch run
    (heads, decoding the answers) is then counted as heads.
    """
    times = getattr(predictor, "stage_times", None)
    if not times:
        return None
    forward = times.get("forward")
    return (float(forward[0]), float(forward[1])) if forward is not None else None
