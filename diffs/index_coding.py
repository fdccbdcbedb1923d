"""Elias–Fano coding of sorted unique integer sets, vectorised with numpy.

A set of n integers from [0, universe) is split into `low_bits` low bits per element
(packed, big-endian bit order) and the high parts, written in unary as a bitvector with
bit `high[i] + i` set. It takes n * (low_bits + 2) bits at most, within about 0.6 bit per
element of the information-theoretic bound log2 C(universe, n).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class IndexCodingError(ValueError):
    """The coded index stream is malformed; the message names what is wrong."""


@dataclass(frozen=True)
class EliasFano:
    """An Elias–Fano coded index set: the two packed bit streams and its parameters."""

    low: np.ndarray  # uint8, packed low bits
    high: np.ndarray  # uint8, packed unary-coded high parts
    count: int
    universe: int

    @property
    def nbytes(self) -> int:
        """Bytes taken by the two packed streams."""
        return int(self.low.nbytes + self.high.nbytes)


def low_bit_width(count: int, universe: int) -> int:
    """The number of low bits per element Elias–Fano uses for `count` elements of `universe`."""
    if count <= 0 or universe <= count:
        return 0
    return (universe // count).bit_length() - 1


def high_bit_length(count: int, universe: int) -> int:
    """Length in bits of the unary high-part bitvector."""
    if count == 0:
        return 0
    return count + ((universe - 1) >> low_bit_width(count, universe)) + 1


def stream_sizes(count: int, universe: int) -> tuple[int, int]:
    """Exact byte lengths (low, high) of the two streams for `count` elements of `universe`."""
    low_bits = count * low_bit_width(count, universe)
    return (low_bits + 7) // 8, (high_bit_length(count, universe) + 7) // 8


def pack_fields(high: np.ndarray, low: np.ndarray, low_bits: int, universe: int) -> EliasFano:
    """Pack already-split high parts (non-decreasing) and low parts into the two streams."""
    count = len(high)
    positions = high.astype(np.int64) + np.arange(count, dtype=np.int64)
    bitvector = np.zeros(high_bit_length(count, universe), dtype=np.uint8)
    bitvector[positions] = 1
    if low_bits:
        shifts = np.arange(low_bits - 1, -1, -1, dtype=np.int64)
        low_matrix = ((low.astype(np.int64)[:, None] >> shifts) & 1).astype(np.uint8)
        packed_low = np.packbits(low_matrix.reshape(-1))
    else:
        packed_low = np.zeros(0, dtype=np.uint8)
    return EliasFano(low=packed_low, high=np.packbits(bitvector), count=count, universe=universe)


def encode(indices: np.ndarray, universe: int) -> EliasFano:
    """Elias–Fano code strictly increasing integers in [0, universe)."""
    values = np.asarray(indices)
    if values.ndim != 1:
        raise IndexCodingError(f"indices must be one-dimensional, got shape {values.shape}")
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise IndexCodingError(f"indices must be integers, got {values.dtype}")
    values = values.astype(np.int64, copy=False)
    if universe < 0:
        raise IndexCodingError(f"universe must be non-negative, got {universe}")
    if values.size:
        if values[0] < 0 or values[-1] >= universe:
            raise IndexCodingError(f"indices must lie in [0, {universe})")
        if values.size > 1 and not bool(np.all(np.diff(values) > 0)):
            raise IndexCodingError("indices must be strictly increasing (sorted and unique)")
    low_bits = low_bit_width(values.size, universe)
    return pack_fields(values >> low_bits, values & ((1 << low_bits) - 1), low_bits, universe)


def decode(low: np.ndarray, high: np.ndarray, count: int, universe: int) -> np.ndarray:
    """Decode and validate the two streams back to strictly increasing int64 indices."""
    if low.dtype != np.uint8 or high.dtype != np.uint8 or low.ndim != 1 or high.ndim != 1:
        raise IndexCodingError("index streams must be one-dimensional uint8 arrays")
    if count < 0 or universe < 0 or count > universe:
        raise IndexCodingError(f"cannot hold {count} unique indices in a universe of {universe}")
    low_len, high_len = stream_sizes(count, universe)
    if low.size != low_len or high.size != high_len:
        raise IndexCodingError(
            f"index streams have {low.size}+{high.size} bytes, expected {low_len}+{high_len} "
            f"for {count} indices in [0, {universe})"
        )
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    high_bits = high_bit_length(count, universe)
    bits = np.unpackbits(high)
    if bits[high_bits:].any():
        raise IndexCodingError("index stream has nonzero padding bits")
    ones = np.flatnonzero(bits[:high_bits])
    if ones.size != count:
        raise IndexCodingError(f"index stream holds {ones.size} indices, expected {count}")
    high_parts = ones - np.arange(count, dtype=np.int64)
    low_bits = low_bit_width(count, universe)
    if low_bits:
        low_stream = np.unpackbits(low)
        if low_stream[count * low_bits :].any():
            raise IndexCodingError("index stream has nonzero padding bits")
        matrix = low_stream[: count * low_bits].reshape(count, low_bits).astype(np.int64)
        weights = np.int64(1) << np.arange(low_bits - 1, -1, -1, dtype=np.int64)
        values = (high_parts << low_bits) | (matrix @ weights)
    else:
        values = high_parts
    if count > 1 and not bool(np.all(np.diff(values) > 0)):
        raise IndexCodingError("indices are not strictly increasing (unsorted or duplicate)")
    if values[-1] >= universe:
        raise IndexCodingError(f"index {int(values[-1])} is out of bounds [0, {universe})")
    return values
