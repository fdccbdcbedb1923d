"""The safetensors container of an artifact: canonical bytes with a whole-file sha256 (the digest's
own 64 characters read as zeros), its header parsed with bounds checked, its tensors loaded."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import torch

from diffs.types import MAX_HEADER_BYTES, ArtifactError

DIGEST_PLACEHOLDER = "0" * 64


def digest_slot(data: bytes | bytearray, header_end: int, digest: str) -> int:
    """Offset of the digest's value inside the raw header, or -1 when it is not there once."""
    needle = b'"sha256":"' + digest.encode("ascii") + b'"'
    first = data.find(needle, 8, header_end)
    if first < 0 or data.find(needle, first + 1, header_end) >= 0:
        return -1
    return first + len(b'"sha256":"')


def file_digest(data: bytes | bytearray, slot: int) -> str:
    """sha256 of the file with the 64 digest characters at `slot` read as zeros."""
    digest = hashlib.sha256(memoryview(data)[:slot])
    digest.update(DIGEST_PLACEHOLDER.encode("ascii"))
    digest.update(memoryview(data)[slot + 64 :])
    return digest.hexdigest()


def _canonical_header(blob: bytes) -> bytearray:
    """The same safetensors file under a canonical header: metadata keys sorted, tensors by offset."""
    # safetensors writes its metadata map in a random order: the same diff must give the same
    # bytes (content keys, ETags, ranged downloads of a diff composed on request).
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    ordered: dict[str, Any] = {}
    if "__metadata__" in header:
        ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    ordered.update(sorted(header.items(), key=lambda item: item[1]["data_offsets"]))
    raw = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return bytearray(struct.pack("<Q", len(raw)) + raw + blob[8 + header_len :])


def pack_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialise tensors and metadata to safetensors bytes with a whole-file `sha256` digest."""
    from safetensors.torch import save

    blob = _canonical_header(save(tensors, metadata=dict(metadata, sha256=DIGEST_PLACEHOLDER)))
    (header_len,) = struct.unpack("<Q", blob[:8])
    slot = digest_slot(blob, 8 + header_len, DIGEST_PLACEHOLDER)
    if slot < 0:
        raise ArtifactError("metadata must not contain the digest placeholder")
    blob[slot : slot + 64] = file_digest(blob, slot).encode("ascii")
    return bytes(blob)


def parse_header(data: bytes | memoryview) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header and the offset where tensor data starts."""
    if len(data) < 8:
        raise ArtifactError(
            f"truncated file: {len(data)} bytes, too short for a safetensors header"
        )
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise ArtifactError(
            f"truncated file or bad header length: header claims {header_len} bytes, "
            f"file has {len(data)}"
        )
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"bad header JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ArtifactError("bad header JSON: not an object")
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise ArtifactError(f"bad header JSON: tensor {name!r} has no valid data_offsets")
        data_end = max(data_end, offsets[1])
    available = len(data) - (8 + header_len)
    if available < data_end:
        raise ArtifactError(
            f"truncated file: tensor data needs {data_end} bytes after the header, "
            f"only {available} present"
        )
    return header, 8 + header_len


def load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, with safetensors' own errors turned into ArtifactError."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # SafetensorError and friends: the file is not valid safetensors
        raise ArtifactError(f"corrupt safetensors data: {exc}") from None
