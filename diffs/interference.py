"""Interference between task diffs on one base: support overlap, sign agreement, cosine; the
null model and effect-size minimums that say which pairs overlap and agree beyond chance;
consolidation groups.

Definitions, for diffs i and j with supports S (stored positions: tensor and flat index) and
values v:

- `jaccard` = |Si ∩ Sj| / |Si ∪ Sj|;
- `sign_agreement` = the fraction of shared positions where vi · vj > 0 (a stored zero, an
  fp16 underflow, agrees with nothing); NaN when the diffs share no position;
- `cosine` = vi · vj / (|vi| |vj|) of the diffs as vectors over all positions;
- on the diagonal all three are 1 (NaN for an empty diff).

A factored tensor (format v2, U Vᵀ of rank r, m x n) counts by its sparse view
(`SparseDiff.sparse_entries`): the r·(m + n) largest-magnitude positions of U Vᵀ, as many as
it stores, plus its own entries. Counting every nonzero of U Vᵀ would make each rank diff's
support whole matrices, and the Jaccard of any two rank diffs about 1 by construction.

Computed on the sorted indices without densifying: each tensor's positions are cut into
chunks of `CHUNK_POSITIONS`; in a chunk, the tasks' slices are sorted together by (position,
entry) packed in one int64 (in cache), so the entries of one position sit side by side, and
every pair of tasks at one position adds to the three T x T sums. Work is O(entries log
entries-per-chunk + shared pairs); memory O(entries). `bench/interference.py` times it.

A pair is constructive (may share a consolidation group) when it beats the null model at the
family-wise level `alpha` and reaches both effect-size minimums: sign agreement >= 0.55 and
overlap lift >= 2 by default (the `consolidation_group_*` Settings fields). With 10^5 shared
positions a 50.8% agreement is significant over 100 tasks, so the tests alone barely filter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from settings import Settings

if TYPE_CHECKING:
    from diffs.types import SparseDiff

CHUNK_POSITIONS = 1 << 18
_ENTRY_BITS = 32  # a chunk's entry ids (< 2**32) sit below its positions in one sort key
_ENTRY_MASK = (1 << _ENTRY_BITS) - 1
# The group thresholds' defaults are the Settings fields' (`consolidation_group_*`).
_GROUP_FIELDS = Settings.model_fields
DEFAULT_ALPHA = _GROUP_FIELDS["consolidation_group_alpha"].default
DEFAULT_MIN_SIGN_AGREEMENT = _GROUP_FIELDS["consolidation_group_min_sign_agreement"].default
DEFAULT_MIN_OVERLAP_LIFT = _GROUP_FIELDS["consolidation_group_min_overlap_lift"].default


class InterferenceError(ValueError):
    """Diffs that cannot be compared (different bases, shapes or names); the message says why."""


@dataclass(frozen=True)
class InterferenceMatrix:
    """Pairwise interference of T diffs on one base (T x T arrays; row and column = `names`)."""

    names: list[str]
    n_params: int  # N, the base's parameter count (the null model's universe)
    support: np.ndarray  # (T,) int64: positions each diff changes
    shared: np.ndarray  # (T, T) int64: positions both change (diagonal: support)
    agreeing: np.ndarray  # (T, T) int64: shared positions whose signs agree
    jaccard: np.ndarray  # (T, T) float64
    sign_agreement: np.ndarray  # (T, T) float64, NaN where nothing is shared
    cosine: np.ndarray  # (T, T) float64

    @property
    def expected_shared(self) -> np.ndarray:
        """E|Si ∩ Sj| = ki kj / N for independent uniformly random supports of the same sizes."""
        k = self.support.astype(np.float64)
        return np.outer(k, k) / max(self.n_params, 1)

    @property
    def overlap_lift(self) -> np.ndarray:
        """Shared positions over what independent random supports would share (1 = chance)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.shared / self.expected_shared

    def to_json(self) -> dict[str, Any]:
        """JSON-ready lists; NaN becomes None."""

        def rows(array: np.ndarray) -> list[list[float | None]]:
            return [[None if math.isnan(x) else float(x) for x in row] for row in array.tolist()]

        return {
            "tasks": list(self.names),
            "n_params": int(self.n_params),
            "support": [int(x) for x in self.support],
            "shared": self.shared.astype(int).tolist(),
            "jaccard": rows(self.jaccard),
            "sign_agreement": rows(self.sign_agreement),
            "cosine": rows(self.cosine),
            "overlap_lift": rows(self.overlap_lift),
        }


def pairwise_interference(
    diffs: Sequence[SparseDiff], names: Sequence[str] | None = None
) -> InterferenceMatrix:
    """Jaccard, sign agreement and cosine of every pair of `diffs` (all on one base)."""
    names = [str(i) for i in range(len(diffs))] if names is None else [str(n) for n in names]
    if len(names) != len(diffs):
        raise InterferenceError(f"{len(names)} names for {len(diffs)} diffs")
    if len(set(names)) != len(names):
        raise InterferenceError("names must be unique")
    if not diffs:
        raise InterferenceError("need at least one diff")
    numels = _check_one_base(diffs, names)
    support, squares, shared, agreeing, dots = _sums(numels, [_tensor_entries(d) for d in diffs])
    shared += shared.T
    agreeing += agreeing.T
    dots += dots.T
    np.fill_diagonal(shared, support)
    np.fill_diagonal(agreeing, support)
    np.fill_diagonal(dots, squares)
    with np.errstate(divide="ignore", invalid="ignore"):
        union = support[:, None] + support[None, :] - shared
        jaccard = np.where(union > 0, shared / np.maximum(union, 1), np.nan)
        sign_agreement = np.where(shared > 0, agreeing / np.maximum(shared, 1), np.nan)
        norms = np.sqrt(squares)
        cosine = dots / np.outer(norms, norms)
    cosine[~np.isfinite(cosine)] = np.nan
    np.fill_diagonal(cosine, np.where(squares > 0, 1.0, np.nan))
    return InterferenceMatrix(
        names=names,
        n_params=int(diffs[0].meta.n_params),
        support=support,
        shared=shared,
        agreeing=agreeing,
        jaccard=jaccard,
        sign_agreement=sign_agreement,
        cosine=np.clip(cosine, -1.0, 1.0),
    )


def _check_one_base(diffs: Sequence[SparseDiff], names: list[str]) -> dict[str, int]:
    """Sizes of the tensors the diffs change, by name; refuses mixed bases and shapes."""
    first = diffs[0].meta
    shapes: dict[str, tuple[int, ...]] = {}
    for name, diff in zip(names, diffs, strict=True):
        meta = diff.meta
        if (meta.base_fingerprint, meta.n_params) != (first.base_fingerprint, first.n_params):
            raise InterferenceError(
                f"the diffs are on different bases: {names[0]!r} is on {first.base_name!r} "
                f"(fingerprint {first.base_fingerprint[:12]}…), {name!r} on {meta.base_name!r} "
                f"(fingerprint {meta.base_fingerprint[:12]}…)"
            )
        for tensor in diff.tensor_names:
            shape = tuple(diff.shapes[tensor])
            if shapes.setdefault(tensor, shape) != shape:
                raise InterferenceError(
                    f"tensor {tensor!r} has shape {shapes[tensor]} in one diff and {shape} in "
                    f"{name!r}"
                )
    return {tensor: math.prod(shape) for tensor, shape in sorted(shapes.items())}


def _tensor_entries(diff: SparseDiff) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per tensor: sorted flat positions (int64) and values; a factored tensor's sparse view.

    A factored tensor gives `SparseDiff.sparse_entries` (its r·(m + n) largest entries of
    U Vᵀ plus its own entries); an entry-only tensor is read in place, without an fp32 copy.
    """
    entries = {}
    for tensor in diff.tensor_names:
        if tensor in diff.factors:
            index, values = diff.sparse_entries(tensor)
            entries[tensor] = (index.numpy(), values.numpy())
            continue
        entries[tensor] = (diff.indices[tensor].numpy(), _numpy_values(diff.values[tensor]))
    return entries


def _numpy_values(values: Any) -> np.ndarray:
    """A CPU value tensor as numpy without a copy (bfloat16, which numpy lacks, as float32)."""
    try:
        return values.numpy()
    except TypeError:
        return values.float().numpy()


def _sums(
    numels: dict[str, int], entries: list[dict[str, tuple[np.ndarray, np.ndarray]]]
) -> tuple[np.ndarray, ...]:
    """Support, squared norms, and the upper-triangle sums over shared positions: counts,
    agreeing counts, value products; chunk by chunk of each tensor's positions."""
    count = len(entries)
    support = np.zeros(count, np.int64)
    squares = np.zeros(count, np.float64)
    keys, products = [], []
    for tensor, numel in numels.items():
        # a holder without entries (U Vᵀ == 0) would make reduceat read its neighbour's sum
        holders = [
            (t, e[tensor]) for t, e in enumerate(entries) if tensor in e and e[tensor][0].size
        ]
        if numel <= CHUNK_POSITIONS:
            chunks = [(0, holders)]
        else:  # each holder's slice of each chunk of positions
            bounds = list(range(0, numel, CHUNK_POSITIONS)) + [numel]
            cuts = [np.searchsorted(index, bounds).tolist() for _, (index, _) in holders]
            chunks = [
                (
                    bounds[c],
                    [
                        (t, (index[cut[c] : cut[c + 1]], values[cut[c] : cut[c + 1]]))
                        for (t, (index, values)), cut in zip(holders, cuts, strict=True)
                        if cut[c + 1] > cut[c]
                    ],
                )
                for c in range(len(bounds) - 1)
            ]
        for start, parts in chunks:
            if not parts:
                continue
            members = np.array([t for t, _ in parts])
            sizes = np.array([index.size for _, (index, _) in parts])
            data = np.concatenate([values for _, (_, values) in parts], dtype=np.float32)
            support[members] += sizes
            squares[members] += np.add.reduceat(data * data, np.cumsum(sizes) - sizes)
            if members.size < 2:
                continue
            # Sort (position, entry) packed in one int64: the entries of one position become
            # adjacent, in entry order, so the task of the first of a pair is the lower one.
            packed = np.concatenate([index for _, (index, _) in parts])
            if numel > _ENTRY_MASK >> 1:  # positions past 2**31 would overflow the key
                packed -= start
            packed <<= _ENTRY_BITS
            packed |= np.arange(data.size)
            packed.sort()
            first, second = _same_position_pairs(packed >> _ENTRY_BITS)
            if first.size:
                first = packed[first] & _ENTRY_MASK
                second = packed[second] & _ENTRY_MASK
                task_of_entry = np.repeat(members, sizes)
                keys.append(task_of_entry[first] * count + task_of_entry[second])
                products.append(data[first] * data[second])
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    product = np.concatenate(products) if products else np.zeros(0, np.float32)
    # One count of (pair, agrees) gives both the shared and the agreeing positions.
    counted = np.bincount(key * 2 + (product > 0), minlength=2 * count * count)
    shape = (count, count)
    shared = (counted[0::2] + counted[1::2]).reshape(shape)
    agreeing = counted[1::2].reshape(shape)
    dots = np.bincount(key, weights=product, minlength=count * count).reshape(shape)
    return support, squares, shared, agreeing, dots


def _same_position_pairs(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (a, b), a < b, of indices into sorted `positions` with equal values."""
    same_next = positions[1:] == positions[:-1]
    first = np.flatnonzero(same_next)
    firsts, seconds, gap = [], [], 1
    while first.size:
        firsts.append(first)
        seconds.append(first + gap)
        first = first[first + gap < same_next.size]
        first = first[same_next[first + gap]]
        gap += 1
    if not firsts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(firsts), np.concatenate(seconds)


# ---------------------------------------------------------------- null model and groups


def constructive_pairs(
    matrix: InterferenceMatrix,
    *,
    alpha: float = DEFAULT_ALPHA,
    min_sign_agreement: float = DEFAULT_MIN_SIGN_AGREEMENT,
    min_overlap_lift: float = DEFAULT_MIN_OVERLAP_LIFT,
) -> np.ndarray:
    """(T, T) bool: pairs that overlap and agree in sign beyond chance, by a margin.

    Null model: independent uniformly random supports of the observed sizes (the shared count
    is hypergeometric) and independent signs (agreeing positions are Binomial(shared, 1/2)).
    A pair passes when both upper-tail p-values are below `alpha` over the number of pairs
    (Bonferroni) and both effects are large enough: sign agreement >= `min_sign_agreement`
    and overlap lift (shared / expected shared) >= `min_overlap_lift`. Significance alone
    barely filters large diffs: with 10^5 shared positions, 50.8% agreement passes for T = 100.
    """
    from scipy.stats import binom, hypergeom

    count = len(matrix.names)
    pairs = max(count * (count - 1) // 2, 1)
    k = matrix.support
    overlap_p = hypergeom.sf(matrix.shared - 1, matrix.n_params, k[:, None], k[None, :])
    agreement_p = binom.sf(matrix.agreeing - 1, matrix.shared, 0.5)
    passed = (overlap_p < alpha / pairs) & (agreement_p < alpha / pairs) & (matrix.shared > 0)
    with np.errstate(invalid="ignore"):  # NaN (nothing shared) passes no minimum
        passed &= matrix.sign_agreement >= min_sign_agreement
        passed &= matrix.overlap_lift >= min_overlap_lift
    np.fill_diagonal(passed, False)
    return passed


def consolidation_groups(
    matrix: InterferenceMatrix,
    *,
    max_size: int,
    alpha: float = DEFAULT_ALPHA,
    min_sign_agreement: float = DEFAULT_MIN_SIGN_AGREEMENT,
    min_overlap_lift: float = DEFAULT_MIN_OVERLAP_LIFT,
) -> list[list[str]]:
    """Groups of >= 2 tasks in which every pair overlaps and agrees beyond chance, by a margin.

    Complete linkage with a size cap: pairs are taken strongest first (Jaccard discounted by
    sign conflicts, J·(2a - 1)), and two groups merge only when every cross pair passes
    `constructive_pairs` and the union has at most `max_size` tasks. Groups come in the order
    of their first task; tasks in a group keep the matrix order.
    """
    if max_size < 2:
        return []
    passed = constructive_pairs(
        matrix,
        alpha=alpha,
        min_sign_agreement=min_sign_agreement,
        min_overlap_lift=min_overlap_lift,
    )
    strength = matrix.jaccard * (2 * matrix.sign_agreement - 1)
    candidates = sorted(
        (-strength[i, j], i, j) for i, j in zip(*np.nonzero(np.triu(passed)), strict=True)
    )
    group_of = list(range(len(matrix.names)))
    members: dict[int, list[int]] = {i: [i] for i in group_of}
    for _, i, j in candidates:
        a, b = group_of[i], group_of[j]
        if a == b or len(members[a]) + len(members[b]) > max_size:
            continue
        if not passed[np.ix_(members[a], members[b])].all():
            continue
        keep, gone = min(a, b), max(a, b)
        members[keep] = sorted(members[keep] + members.pop(gone))
        for t in members[keep]:
            group_of[t] = keep
    return [
        [matrix.names[t] for t in group] for _, group in sorted(members.items()) if len(group) > 1
    ]


def settings_groups(matrix: InterferenceMatrix, settings: Settings) -> list[list[str]]:
    """`consolidation_groups` with the grouping limits of `settings` (the API's and the policy's)."""
    return consolidation_groups(
        matrix,
        max_size=settings.consolidation_group_max_tasks,
        alpha=settings.consolidation_group_alpha,
        min_sign_agreement=settings.consolidation_group_min_sign_agreement,
        min_overlap_lift=settings.consolidation_group_min_overlap_lift,
    )
