"""Per-process caches of the predict path: key -> principal, (tenant, task, version) -> served
version. One mechanism invalidates both: the registry's change epoch (`registry.catalog.epoch`).

Every revoke/publish/activate/delete bumps the epoch in its own transaction; an `EpochWatch`
re-reads it at most every `check_s` (one primary-key SELECT) and, when it moved, starts a new
generation: entries of older generations are never served again. An entry is tagged with the
generation read BEFORE its rows were loaded, so a row read just before a change can live at
most until the next re-read. A change therefore applies in every process within `check_s`
(plus one SELECT), and at once in the process that committed it (`watch_local_changes`).
Absent answers (unknown key, unknown task) are never cached: creating things needs no bump.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class EpochWatch:
    """The registry's change epoch as this process last read it, re-read at most every `check_s`."""

    def __init__(
        self,
        read_epoch: Callable[[], int],
        *,
        check_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read_epoch = read_epoch
        self.check_s = max(0.0, check_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._epoch: int | None = None
        self._generation = 0
        self._checked_at = -math.inf  # when the last read began
        self._expiries = 0
        self.reads = 0

    def fresh_generation(self) -> int | None:
        """The current generation if the epoch was read within `check_s`; None if due (no I/O)."""
        if self._clock() - self._checked_at < self.check_s:
            return self._generation
        return None

    def generation(self) -> int:
        """The current generation, re-reading the epoch first when due (may query the DB)."""
        generation = self.fresh_generation()
        if generation is not None:
            return generation
        with self._lock:
            if self._clock() - self._checked_at < self.check_s:
                return self._generation
            began, expiries = self._clock(), self._expiries
            epoch = self._read_epoch()
            self.reads += 1
            if epoch != self._epoch:
                self._epoch = epoch
                self._generation += 1
            if expiries == self._expiries:  # an expire() during the read forces another one
                self._checked_at = began
            return self._generation

    def expire(self) -> None:
        """Re-read the epoch before the next cached answer (a change committed here)."""
        self._expiries += 1
        self._checked_at = -math.inf


class EpochCache(Generic[K, V]):
    """Values loaded from the registry, valid while the watch's generation stays the same."""

    def __init__(self, watch: EpochWatch, *, max_entries: int = 100_000) -> None:
        self._watch = watch
        self.max_entries = max(1, max_entries)
        self._lock = threading.Lock()
        self._entries: dict[K, V] = {}
        self._generation = -1
        self.hits = 0
        self.misses = 0

    def peek(self, key: K) -> V | None:
        """The cached value if it is current and the epoch needs no re-read; never blocks."""
        generation = self._watch.fresh_generation()
        if generation is None or generation != self._generation:
            return None
        value = self._entries.get(key)
        if value is not None:
            self.hits += 1
        return value

    def get(self, key: K, load: Callable[[], V | None]) -> V | None:
        """The current cached value, else `load()` (cached unless None); may query the DB."""
        generation = self._watch.generation()
        if generation == self._generation:
            value = self._entries.get(key)
            if value is not None:
                self.hits += 1
                return value
        self.misses += 1
        value = load()
        if value is not None:
            self._store(generation, key, value)
        return value

    def _store(self, generation: int, key: K, value: V) -> None:
        with self._lock:
            if generation < self._generation:
                return  # loaded before a change this cache already knows of
            if generation > self._generation:
                self._entries.clear()
                self._generation = generation
            if key not in self._entries and len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]  # the oldest insertion
            self._entries[key] = value

    def __len__(self) -> int:
        return len(self._entries)
