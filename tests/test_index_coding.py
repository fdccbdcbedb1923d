"""Elias–Fano coding of sorted unique index sets round-trips exactly and rejects bad streams."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffs.index_coding import (
    IndexCodingError,
    decode,
    encode,
    low_bit_width,
    pack_fields,
    stream_sizes,
)


@st.composite
def index_sets(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """A universe and a sorted unique subset of it: empty, single, full, boundaries, random."""
    universe = draw(st.integers(min_value=0, max_value=5000))
    kind = draw(st.sampled_from(["random", "empty", "full", "ends", "dense-run"]))
    if universe == 0 or kind == "empty":
        return np.zeros(0, dtype=np.int64), universe
    if kind == "full":
        return np.arange(universe, dtype=np.int64), universe
    if kind == "ends":
        return np.unique(np.array([0, universe - 1], dtype=np.int64)), universe
    if kind == "dense-run":
        start = draw(st.integers(0, universe - 1))
        stop = draw(st.integers(start + 1, universe))
        return np.arange(start, stop, dtype=np.int64), universe
    members = draw(st.sets(st.integers(0, universe - 1), max_size=min(universe, 300)))
    return np.array(sorted(members), dtype=np.int64), universe


def roundtrip(indices: np.ndarray, universe: int) -> np.ndarray:
    """Encode then decode through the public functions."""
    coded = encode(indices, universe)
    assert (coded.low.size, coded.high.size) == stream_sizes(indices.size, universe)
    return decode(coded.low, coded.high, indices.size, universe)


@settings(max_examples=300, deadline=None)
@given(index_sets())
def test_any_sorted_unique_index_set_round_trips_exactly(case):
    indices, universe = case
    decoded = roundtrip(indices, universe)
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, indices)


@settings(max_examples=100, deadline=None)
@given(index_sets())
def test_coded_size_stays_within_two_bits_per_index_of_the_bound(case):
    indices, universe = case
    n = indices.size
    if n == 0:
        assert encode(indices, universe).nbytes == 0
        return
    bound_bits = (
        math.lgamma(universe + 1) - math.lgamma(n + 1) - math.lgamma(universe - n + 1)
    ) / (math.log(2))
    # Elias–Fano: n*low_bits + n + universe/2^low_bits + 1 bits, plus byte padding of two streams.
    assert encode(indices, universe).nbytes * 8 <= bound_bits + 2 * n + 1 + 16


def test_large_universe_round_trips_with_wide_low_parts():
    universe = 3 * 2**40
    indices = np.array([0, 7, 2**33 + 5, universe - 1], dtype=np.int64)
    assert low_bit_width(4, universe) > 32
    np.testing.assert_array_equal(roundtrip(indices, universe), indices)


@pytest.mark.parametrize(
    ("indices", "universe", "message"),
    [
        ([3, 2], 10, "strictly increasing"),
        ([2, 2], 10, "strictly increasing"),
        ([0, 10], 10, r"\[0, 10\)"),
        ([-1, 4], 10, r"\[0, 10\)"),
        ([[1, 2]], 10, "one-dimensional"),
    ],
)
def test_encoder_rejects_sets_that_are_not_sorted_unique_and_in_bounds(indices, universe, message):
    with pytest.raises(IndexCodingError, match=message):
        encode(np.array(indices, dtype=np.int64), universe)


def test_decoder_rejects_unsorted_and_duplicate_low_parts():
    low_bits = low_bit_width(2, 1000)  # same high part, low parts going down / repeating
    for low in ([5, 3], [4, 4]):
        coded = pack_fields(np.array([1, 1]), np.array(low), low_bits, 1000)
        with pytest.raises(IndexCodingError, match="strictly increasing"):
            decode(coded.low, coded.high, 2, 1000)


def test_decoder_rejects_index_past_the_universe():
    low_bits = low_bit_width(2, 100)  # (100-1) >> 5 = 3, so high 3 with low 31 is 127
    coded = pack_fields(np.array([0, 3]), np.array([0, 31]), low_bits, 100)
    with pytest.raises(IndexCodingError, match="out of bounds"):
        decode(coded.low, coded.high, 2, 100)


def test_decoder_rejects_wrong_count_lengths_and_padding():
    coded = encode(np.array([1, 50, 99]), 100)
    with pytest.raises(IndexCodingError, match="expected"):
        decode(coded.low, coded.high, 4, 100)
    with pytest.raises(IndexCodingError, match="bytes"):
        decode(coded.low[:-1], coded.high, 3, 100)
    high = coded.high.copy()
    high[-1] |= 1  # a set bit in the padding past the bitvector
    with pytest.raises(IndexCodingError, match="padding|holds"):
        decode(coded.low, high, 3, 100)
    with pytest.raises(IndexCodingError, match="uint8"):
        decode(coded.low.astype(np.int32), coded.high, 3, 100)
    with pytest.raises(IndexCodingError, match="cannot hold"):
        decode(coded.low, coded.high, 101, 100)
