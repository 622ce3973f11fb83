"""Train / validation / test splits of an :class:`Interactions` table.

Every split is a deterministic function of the data and a seed, and its sha256 is recorded
so two runs can prove they saw the same rows.
"""

from __future__ import annotations

import numpy as np

from jaxreco.data.dataset import DataError, Interactions, array_sha256


def random_split(x: Interactions, *, test_fraction: float, val_fraction: float,
                 seed: int) -> dict[str, Interactions]:
    """Uniformly random split: ``test_fraction`` of all rows go to test, then
    ``val_fraction`` of all rows are carved from the remainder for validation.

    Row order within each split is the original order, so the split depends only on
    ``(len(x), fractions, seed)``.
    """
    _check_fractions(test_fraction, val_fraction)
    n = len(x)
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val],
             "train": perm[n_test + n_val:]}
    return {k: x.take(np.sort(v)) for k, v in parts.items()}


def split_sha256(splits: dict[str, Interactions]) -> dict[str, str]:
    """sha256 of each split's columns."""
    return {k: array_sha256(v.columns()) for k, v in splits.items()}


# ----------------------------------------------------------------------------- split codes
# The streaming ``prepare`` assigns each row a split code with the functions below, one
# block of rows at a time; the ``*_split`` functions apply the same rules to a whole table.
TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "val", "test")


def _check_fractions(test_fraction: float, val_fraction: float) -> None:
    for name, v in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= v < 1.0:
            raise DataError(f"split.{name}={v!r}: must be in [0, 1)")
    if test_fraction + val_fraction >= 1.0:
        raise DataError(f"split.test_fraction + split.val_fraction = "
                        f"{test_fraction + val_fraction}: must be < 1")


def random_codes(n: int, *, test_fraction: float, val_fraction: float,
                 rng: np.random.Generator) -> np.ndarray:
    """int8 codes with exactly ``round(n*f)`` test and val rows, uniformly placed."""
    _check_fractions(test_fraction, val_fraction)
    perm = rng.permutation(n)
    n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
    codes = np.zeros(n, np.int8)
    codes[perm[:n_test]] = TEST
    codes[perm[n_test:n_test + n_val]] = VAL
    return codes


def temporal_cutoffs(timestamps: np.ndarray, *, test_fraction: float,
                     val_fraction: float) -> tuple[int, int]:
    """``(val_cut, test_cut)``: rows with ``t > test_cut`` are test, ``val_cut < t <= test_cut``
    val, the rest train. Cut-offs are order statistics, so ties stay on one side and the
    fractions are met up to the number of rows sharing the cut-off timestamp."""
    _check_fractions(test_fraction, val_fraction)
    ts = np.sort(np.asarray(timestamps))
    n = len(ts)
    if n == 0:
        raise DataError("temporal split of an empty table")
    k_test = min(n - 1, max(0, n - int(round(n * test_fraction)) - 1))
    k_val = min(n - 1, max(0, n - int(round(n * (test_fraction + val_fraction))) - 1))
    return int(ts[k_val]), int(ts[k_test])


def temporal_codes(timestamps: np.ndarray, val_cut: int, test_cut: int) -> np.ndarray:
    codes = np.zeros(len(timestamps), np.int8)
    codes[timestamps > val_cut] = VAL
    codes[timestamps > test_cut] = TEST
    return codes


TIE_BREAKS = ("first", "last")


def leave_last_out_codes(user: np.ndarray, timestamp: np.ndarray | None, *, num_val: int = 1,
                         num_test: int = 1, min_train: int = 1,
                         arrival: np.ndarray | None = None,
                         tie_break: str = "first") -> np.ndarray:
    """Per user, the last ``num_test`` interactions are test and the ``num_val`` before them
    are val. Users with fewer than ``num_test + num_val + min_train`` interactions stay
    entirely in train.

    "Last" is by timestamp. Rows of one user with the same timestamp are ordered by
    ``arrival`` (their position in the source; default: the row order here):

    * ``tie_break="first"``: the row that comes *first* in the source counts as the latest,
      i.e. the user's rows are stably sorted by timestamp, newest first, and the first
      ``num_test`` of that order are test. This is how the NCF files (He et al. 2017,
      ``ml-1m.test.rating``) were cut from ``ratings.dat``: 2,544 of the 6,040 ML-1M users
      rated several movies in their last second, and for those users the held-out movie
      is the first of them in the file.
    * ``tie_break="last"``: the row that comes last in the source counts as the latest.

    Without timestamps the row order (``arrival``) is the time order: the last rows are
    the latest, whatever ``tie_break``.

    O(n log n) in general; O(n) when ``user`` is grouped (sorted) and timestamps are given,
    as in ``prepare``.
    """
    if tie_break not in TIE_BREAKS:
        raise DataError(f"split.tie_break={tie_break!r}: must be one of {TIE_BREAKS}")
    n = len(user)
    codes = np.zeros(n, np.int8)
    if n == 0:
        return codes
    user = np.asarray(user)
    pos = np.arange(n, dtype=np.int64) if arrival is None else np.asarray(arrival, np.int64)
    if len(pos) != n:
        raise DataError(f"leave_last_out: {len(pos)} arrival positions for {n} rows")
    if timestamp is None:
        t = np.zeros(n, np.int64)
        second = pos
    else:
        t = np.asarray(timestamp, np.int64)
        second = -pos if tie_break == "first" else pos
        if bool(np.all(user[1:] >= user[:-1])):  # grouped by user, as in ``prepare``
            return _leave_last_out_grouped(user, t, second, num_val, num_test, min_train)
    # ascending (user, timestamp, tie key): each user's latest row is the last of its group
    order = np.lexsort((second, t, user))
    u = user[order]
    starts = np.flatnonzero(np.concatenate([[True], u[1:] != u[:-1]]))
    ends = np.concatenate([starts[1:], [n]])
    size = ends - starts
    pos_from_end = np.repeat(ends, size) - np.arange(n) - 1  # 0 = user's last row
    eligible = np.repeat(size >= num_test + num_val + min_train, size)
    c = np.zeros(n, np.int8)
    c[eligible & (pos_from_end < num_test)] = TEST
    c[eligible & (pos_from_end >= num_test) & (pos_from_end < num_test + num_val)] = VAL
    codes[order] = c
    return codes


def _leave_last_out_grouped(user, t, second, num_val, num_test, min_train) -> np.ndarray:
    """O(n) version for rows grouped by user: pick each user's latest remaining row (largest
    ``(t, second)``) ``num_test + num_val`` times with segment reductions instead of a sort."""
    n = len(user)
    starts = np.flatnonzero(np.concatenate([[True], user[1:] != user[:-1]]))
    size = np.diff(np.concatenate([starts, [n]]))
    eligible = size >= num_test + num_val + min_train
    codes = np.zeros(n, np.int8)
    taken = np.zeros(n, bool)
    idx = np.arange(n, dtype=np.int64)
    lowest = np.iinfo(np.int64).min
    for step in range(num_test + num_val):
        masked = np.where(taken, lowest, t)
        at_max = (masked == np.repeat(np.maximum.reduceat(masked, starts), size)) & ~taken
        key = np.where(at_max, second, lowest)
        best = key == np.repeat(np.maximum.reduceat(key, starts), size)
        # ``second`` is unique within a user unless arrival repeats; then the later row wins
        last = np.maximum.reduceat(np.where(best & at_max, idx, -1), starts)[eligible]
        codes[last] = TEST if step < num_test else VAL
        taken[last] = True
    return codes


def _by_codes(x: Interactions, codes: np.ndarray) -> dict[str, Interactions]:
    return {name: x.take(np.flatnonzero(codes == i)) for i, name in enumerate(SPLIT_NAMES)}


def temporal_split(x: Interactions, *, test_fraction: float,
                   val_fraction: float) -> dict[str, Interactions]:
    """Global time cut-off: test is the latest ``test_fraction`` of rows, val the
    ``val_fraction`` before it, so nothing in train happened after anything in test."""
    if x.timestamp is None:
        raise DataError(f"{x.name}: temporal split needs timestamps; this dataset has none")
    vc, tc = temporal_cutoffs(x.timestamp, test_fraction=test_fraction,
                              val_fraction=val_fraction)
    return _by_codes(x, temporal_codes(x.timestamp, vc, tc))


def leave_last_out_split(x: Interactions, *, num_val: int = 1, num_test: int = 1,
                         min_train: int = 1, tie_break: str = "first") -> dict[str, Interactions]:
    """Leave-last-out per user (see :func:`leave_last_out_codes`; ties by row order)."""
    return _by_codes(x, leave_last_out_codes(x.user, x.timestamp, num_val=num_val,
                                             num_test=num_test, min_train=min_train,
                                             tie_break=tie_break))
