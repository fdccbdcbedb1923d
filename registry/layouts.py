"""Layouts of a version (`layout_of`, the one rule, read off the row; no migration), and the
diff or bytes a version stands for:

- `SINGLE`: one stored diff (a trained version);
- `COMPOSED_ON_REQUEST` (`artifact_id == residual_artifact_id`, `shared_artifact_id` set): the
  version stores only its residual and references the run's shared artifact, stored once; the
  composed artifact's sha256 and size are recorded in its config at publish
  (`COMPOSED_SHA256_KEY`, `COMPOSED_SIZE_KEY`), so listings and ETags need no composing.

A version composed on request is composed by `diffs.compose` (`compose_diffs`,
`compose_artifact_bytes`).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from diffs.compose import compose_artifact_bytes, compose_diffs

# torch and the artifact format are imported where used: layouts and digests are read on light
# paths (the API's version listings, the scheduler) that must not import torch.
if TYPE_CHECKING:
    from diffs.types import SparseDiff
    from registry.models import TaskVersion
    from registry.stores.base import ObjectStore

Layout = Literal["single", "composed_on_request"]
SINGLE: Layout = "single"
COMPOSED_ON_REQUEST: Layout = "composed_on_request"
COMPOSED_SHA256_KEY = "composed_sha256"
COMPOSED_SIZE_KEY = "composed_size_bytes"
COMPOSED_CACHE_BYTES = 64 * 2**20  # composed artifacts the API keeps for 304s, ranges and /parts


class Digest(NamedTuple):
    """What a download returns, by identity: its sha256 and its size in bytes."""

    sha256: str
    size_bytes: int


def layout_of(version: TaskVersion) -> Layout:
    """Which layout a version row has: COMPOSED_ON_REQUEST or SINGLE."""
    if (
        version.shared_artifact_id is not None
        and version.residual_artifact_id is not None
        and version.artifact_id == version.residual_artifact_id
    ):
        return COMPOSED_ON_REQUEST
    return SINGLE


def download_digest(version: TaskVersion) -> Digest | None:
    """sha256 and size of what a version's download returns, from the row; None if never recorded.

    None only for a version composed on request that was published before its composed
    artifact's digest was recorded: only composing it tells.
    """
    if layout_of(version) != COMPOSED_ON_REQUEST:
        return Digest(version.artifact.sha256, int(version.artifact.size_bytes))
    config = version.config or {}
    sha256, size = config.get(COMPOSED_SHA256_KEY), config.get(COMPOSED_SIZE_KEY)
    if isinstance(sha256, str) and isinstance(size, int) and not isinstance(size, bool):
        return Digest(sha256, size)
    return None


def version_diff(
    store: ObjectStore,
    version: TaskVersion,
    *,
    expected_fingerprint: str | None = None,
    base_shapes: dict[str, tuple[int, ...]] | None = None,
    cache: ComposedCache | None = None,
) -> SparseDiff:
    """The diff a version stands for: its stored blob, or its shared + residual composed.

    With `cache`, a composed diff is read through the download's bytes (`version_diff_bytes`),
    so repeated reads of one version compose once.
    """
    from diffs.read import loads_artifact

    def read(artifact: Any) -> SparseDiff:
        """Fetch (sha256-verified) and validate one stored artifact."""
        return loads_artifact(
            store.get(artifact.object_key, sha256=artifact.sha256),
            expected_fingerprint=expected_fingerprint,
            base_shapes=base_shapes,
        )

    if layout_of(version) != COMPOSED_ON_REQUEST:
        return read(version.artifact)
    if cache is not None:
        return loads_artifact(
            version_diff_bytes(store, version, cache=cache),
            expected_fingerprint=expected_fingerprint,
            base_shapes=base_shapes,
        )
    return compose_diffs(read(version.shared_artifact), read(version.artifact))


def version_diff_bytes(
    store: ObjectStore, version: TaskVersion, *, cache: ComposedCache | None = None
) -> bytes:
    """The artifact bytes a version's download returns: stored, or composed (checked, cached).

    Composed bytes are checked against the digest recorded at publish (ArtifactError if they
    differ) and kept in `cache` by the parts' sha256s.
    """
    if layout_of(version) != COMPOSED_ON_REQUEST:
        return store.get(version.artifact.object_key, sha256=version.artifact.sha256)
    shared, residual = version.shared_artifact, version.artifact
    key = (shared.sha256, residual.sha256)
    data = cache.get(key) if cache is not None else None
    if data is None:
        data = compose_artifact_bytes(
            store.get(shared.object_key, sha256=shared.sha256),
            store.get(residual.object_key, sha256=residual.sha256),
        )
        if cache is not None:
            cache.put(key, data)
    _check_recorded_digest(version, data)  # also on a hit: another version may share the parts
    return data


def _check_recorded_digest(version: TaskVersion, data: bytes) -> None:
    """Refuse composed bytes that differ from the digest the version recorded at publish."""
    from diffs.types import ArtifactError

    recorded = download_digest(version)
    if recorded is None:
        return
    actual = Digest(hashlib.sha256(data).hexdigest(), len(data))
    if actual != recorded:
        raise ArtifactError(
            f"the composed diff is {actual.size_bytes} bytes with sha256 {actual.sha256[:12]}…, "
            f"but {recorded.size_bytes} bytes with sha256 {recorded.sha256[:12]}… were recorded"
        )


class ComposedCache:
    """Composed artifacts by (shared sha256, residual sha256), least recently used dropped first.

    Bounded by `max_bytes` in all; an artifact larger than that is not kept. Thread-safe.
    """

    def __init__(self, max_bytes: int = COMPOSED_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> bytes | None:
        """The cached bytes under `key` (now the most recently used), or None."""
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[str, str], data: bytes) -> None:
        """Keep `data` under `key`, dropping the least recently used past `max_bytes`."""
        if len(data) > self.max_bytes:
            return
        with self._lock:
            previous = self._items.pop(key, None)
            self.nbytes -= len(previous) if previous is not None else 0
            self._items[key] = data
            self.nbytes += len(data)
            while self.nbytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.nbytes -= len(dropped)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
