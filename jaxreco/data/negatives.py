"""Fixed evaluation negatives: sampled once at ``prepare`` time and stored with the split.

Sampled-metric evaluation (HR@K / NDCG@K over "the positive plus N negatives") is only
comparable across runs and models when every run ranks the same candidates. So the
candidates are drawn once, from a seed, and written next to the split; the evaluator reads
them rather than sampling its own.

For each evaluation row (user ``u``, positive item ``i``) we draw ``N`` distinct items that
``u`` never interacted with in any split: a negative is never a positive. Items are drawn
uniformly, or with probability proportional to ``train_count + 1`` (popularity-weighted;
the ``+1`` keeps every item drawable). Rejection sampling is vectorised over a block of
rows: draw ``M > N`` candidates per row, reject positives (binary search in the sorted
``user * num_items + item`` keys) and repeats within the row, keep the first ``N`` survivors
in draw order, and redraw only for the rare rows left short.
"""

from __future__ import annotations

import numpy as np

from jaxreco.data.dataset import DataError


class Sampler:
    """Draws item ids uniformly or from fixed weights (inverse-CDF by binary search)."""

    def __init__(self, num_items: int, kind: str = "uniform",
                 train_counts: np.ndarray | None = None):
        if kind not in ("uniform", "popularity"):
            raise DataError(f"negatives.sampler={kind!r}: must be 'uniform' or 'popularity'")
        self.num_items = num_items
        self.kind = kind
        self.cdf = None
        if kind == "popularity":
            if train_counts is None:
                raise DataError("popularity negatives need item train counts")
            w = np.asarray(train_counts, np.float64) + 1.0
            self.cdf = np.cumsum(w) / w.sum()

    def draw(self, rng: np.random.Generator, shape) -> np.ndarray:
        if self.cdf is None:
            return rng.integers(0, self.num_items, size=shape, dtype=np.int32)
        r = rng.random(size=shape)
        return np.minimum(np.searchsorted(self.cdf, r, side="right"),
                          self.num_items - 1).astype(np.int32)


def _first_valid(cand: np.ndarray, users: np.ndarray, pos_keys: np.ndarray,
                 num_items: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(chosen [rows, n], ok [rows]) — the first n distinct non-positive draws per row."""
    keys = users[:, None].astype(np.int64) * num_items + cand
    at = np.searchsorted(pos_keys, keys)
    is_pos = pos_keys[np.minimum(at, len(pos_keys) - 1)] == keys if len(pos_keys) else \
        np.zeros(keys.shape, bool)
    order = np.argsort(cand, axis=1, kind="stable")
    s = np.take_along_axis(cand, order, axis=1)
    dup_sorted = np.zeros(cand.shape, bool)
    dup_sorted[:, 1:] = s[:, 1:] == s[:, :-1]          # later repeats (stable sort)
    dup = np.zeros(cand.shape, bool)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    valid = ~is_pos & ~dup
    ok = valid.sum(1) >= n
    first = np.argsort(~valid, axis=1, kind="stable")[:, :n]
    return np.take_along_axis(cand, first, axis=1), ok


def sample_negatives(users: np.ndarray, pos_keys: np.ndarray, *, num_items: int, n: int,
                     sampler: Sampler, rng: np.random.Generator,
                     positives_per_user: np.ndarray | None = None,
                     block: int = 65536) -> np.ndarray:
    """int32 ``[len(users), n]`` negatives, distinct per row, never a positive of the user.

    Args:
      users: user index of each evaluation row.
      pos_keys: sorted unique ``user * num_items + item`` (int64) of *all* the positives of
        (at least) these users, across every split.
      positives_per_user: optional counts, to fail early for users who have fewer than ``n``
        non-positive items to draw from.
    """
    users = np.asarray(users, np.int64)
    out = np.empty((len(users), n), np.int32)
    if n == 0 or len(users) == 0:
        return out
    if positives_per_user is not None:
        short = num_items - positives_per_user[users] < n
        if short.any():
            u = int(users[np.flatnonzero(short)[0]])
            raise DataError(f"negatives.num={n}: user index {u} has only "
                            f"{num_items - int(positives_per_user[u])} non-positive items among "
                            f"{num_items}; lower negatives.num or filter such users")
    m = max(2 * n, n + 16)
    for lo in range(0, len(users), block):
        u = users[lo:lo + block]
        cand = sampler.draw(rng, (len(u), m))
        chosen, ok = _first_valid(cand, u, pos_keys, num_items, n)
        out[lo:lo + block] = chosen
        rows = np.flatnonzero(~ok)
        pool = cand[rows]
        tries = 0
        while len(rows):
            tries += 1
            if tries > 30:
                raise DataError(f"negatives: could not draw {n} distinct non-positive items for "
                                f"user index {int(u[rows[0]])} after 30 tries; the sampler's "
                                "support is too small — lower negatives.num")
            pool = np.concatenate([pool, sampler.draw(rng, (len(rows), m))], 1)
            chosen, ok_r = _first_valid(pool, u[rows], pos_keys, num_items, n)
            out[lo + rows[ok_r]] = chosen[ok_r]
            rows, pool = rows[~ok_r], pool[~ok_r]
    return out
