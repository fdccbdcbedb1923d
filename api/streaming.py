"""Streaming stored blobs over HTTP: single byte ranges (RFC 9110) and fail-before-status reads."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

# Units are case-insensitive; 19 digits hold any file size (and bound the int parse).
_RANGE_RE = re.compile(r"^bytes=\s*(\d{0,19})-(\d{0,19})$", re.IGNORECASE)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """`bytes=a-b` / `bytes=a-` / `bytes=-n` -> [start, end); None when not satisfiable.

    Only single byte ranges are served; callers ignore other Range forms (see `wants_range`).
    """
    match = _RANGE_RE.match(header.strip())
    if not match or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":
        length = int(last)
        if length == 0:
            return None
        return max(0, size - length), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or end <= start:
        return None
    return start, end


def wants_range(header: str | None) -> bool:
    """Whether to serve a range: single `bytes=` ranges only, else the whole file (RFC 9110)."""
    if not header:
        return False
    value = header.strip()
    # A malformed single range is ignored (the whole file), as RFC 9110 allows.
    return "," not in value and _RANGE_RE.match(value) is not None


def range_applies(if_range: str | None, etag: str) -> bool:
    """Whether a Range may be served under `If-Range` (RFC 9110 13.1.5): absent, or the ETag.

    Only a strong match counts; a weak tag or an HTTP date never does (no Last-Modified is
    sent), so the caller answers 200 with the whole current representation.
    """
    return if_range is None or if_range.strip() == etag


def started(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Pull the first chunk now, so a missing or corrupt blob fails before the status goes out."""
    first = next(chunks, b"")
    return itertools.chain([first], chunks)
