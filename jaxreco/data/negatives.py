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

from typing import Callable

import numpy as np

from jaxreco.data.dataset import DataError


class Sampler:
    """Draws item ids uniformly or from fixed weights (inverse-CDF by binary search).

    ``kind="popularity"`` weighs item ``i`` by ``train_counts[i] + 1`` (the fixed evaluation
    negatives), or by ``weights`` when given (training negatives: ``count ** pop_alpha``).
    ``index_dtype`` is the integer type of uniform draws (it selects numpy's bounded-integer
    algorithm, so a stream is reproduced only with the same type).
    """

    def __init__(self, num_items: int, kind: str = "uniform",
                 train_counts: np.ndarray | None = None, *, weights: np.ndarray | None = None,
                 index_dtype=np.int32):
        if kind not in ("uniform", "popularity"):
            raise DataError(f"negatives.sampler={kind!r}: must be 'uniform' or 'popularity'")
        self.num_items = num_items
        self.kind = kind
        self.index_dtype = index_dtype
        self.cdf = None
        if kind == "popularity":
            if weights is None:
                if train_counts is None:
                    raise DataError("popularity negatives need item train counts")
                weights = np.asarray(train_counts, np.float64) + 1.0
            w = np.asarray(weights, np.float64)
            self.cdf = np.cumsum(w) / w.sum()

    def draw(self, rng: np.random.Generator, shape) -> np.ndarray:
        if self.cdf is None:
            return rng.integers(0, self.num_items, size=shape,
                                dtype=self.index_dtype).astype(np.int32, copy=False)
        r = rng.random(size=shape)
        return np.minimum(np.searchsorted(self.cdf, r, side="right"),
                          self.num_items - 1).astype(np.int32)


class TrainingNegatives:
    """``k`` sampled negatives per training positive (SGD with BCE/BPR).

    Items are drawn uniformly or ∝ ``train count ** pop_alpha`` (``sampler``); with
    ``exclude_positives`` a draw that is a train positive of its user is redrawn, up to 20
    times, checking only the redrawn slots again. Draws depend only on the ``rng`` given, so
    a caller that seeds it from ``(seed, step, shard)`` draws the same negatives on resume.
    """

    def __init__(self, user: np.ndarray, item: np.ndarray, num_items: int, *,
                 sampler: str = "uniform", pop_alpha: float = 1.0,
                 exclude_positives: bool = True):
        self.num_items = int(num_items)
        self.positives = PositiveSet(
            np.unique(np.asarray(user, np.int64) * self.num_items + item))
        counts = np.bincount(item, minlength=self.num_items).astype(np.float64)
        self.sampler = Sampler(self.num_items, sampler,
                               weights=counts ** float(pop_alpha) if sampler == "popularity"
                               else None, index_dtype=np.int64)
        self.exclude_positives = bool(exclude_positives)

    def draw(self, users: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """int32 ``[len(users) * k]``: ``k`` negatives for each user, row-major."""
        ni = self.num_items
        neg = self.sampler.draw(rng, len(users) * k)
        if self.exclude_positives:
            uu = np.repeat(np.asarray(users, np.int64), k)
            bad = np.flatnonzero(self.positives.contains(uu * ni + neg))
            for _ in range(20):            # only the redrawn slots are checked again
                if not len(bad):
                    break
                neg[bad] = self.sampler.draw(rng, len(bad))
                bad = bad[self.positives.contains(uu[bad] * ni + neg[bad])]
        return neg.astype(np.int32, copy=False)


class PositiveSet:
    """Membership test for ``user * num_items + item`` keys, fast for many queries.

    A byte table indexed by a multiplicative hash of the key filters out almost every
    query with one independent memory load (no dependent binary-search chain); the few that
    hit the table are checked exactly by binary search in the sorted keys.
    """

    _MUL = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, keys: np.ndarray):
        self.keys = np.asarray(keys, np.int64)
        bits = int(np.clip(np.ceil(np.log2(max(len(self.keys), 1) * 32)), 10, 28))
        self.shift = np.uint64(64 - bits)
        self.table = np.zeros(1 << bits, np.bool_)
        self.table[self._hash(self.keys)] = True

    def _hash(self, k: np.ndarray) -> np.ndarray:
        return ((k.astype(np.uint64) * self._MUL) >> self.shift).astype(np.intp)

    def contains(self, k: np.ndarray) -> np.ndarray:
        out = self.table[self._hash(k)]
        maybe = np.flatnonzero(out)
        if len(maybe) and len(self.keys):
            q = k.reshape(-1)[maybe] if k.ndim > 1 else k[maybe]
            at = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
            flat = out.reshape(-1)
            flat[maybe] = self.keys[at] == q
        return out


def sample_negatives(users: np.ndarray, pos_keys: np.ndarray, *, num_items: int, n: int,
                     sampler: Sampler, rng: np.random.Generator,
                     positives_per_user: np.ndarray | None = None,
                     user_name: Callable[[int], str] | None = None,
                     block: int = 1 << 18) -> np.ndarray:
    """int32 ``[len(users), n]`` negatives, distinct and sorted per row, never a positive.

    Each row starts with ``n`` draws; a slot holding a positive of the user or repeating
    another slot of its row is redrawn, until none is. For a uniform sampler that yields a
    uniformly random ``n``-subset of the user's non-positive items (the procedure is
    symmetric in the items); for popularity weights it is successive weighted sampling
    without replacement.

    Args:
      users: user index of each evaluation row.
      pos_keys: sorted unique ``user * num_items + item`` (int64) of *all* the positives of
        (at least) these users, across every split.
      positives_per_user: optional counts, to fail early for users who have fewer than ``n``
        non-positive items to draw from.
      user_name: the raw id of a user index, for messages (default: the index).
    """
    name = user_name or (lambda u: f"index {u}")
    users = np.asarray(users, np.int64)
    out = np.empty((len(users), n), np.int32)
    if n == 0 or len(users) == 0:
        return out
    if positives_per_user is not None:
        short = num_items - positives_per_user[users] < n
        if short.any():
            u = int(users[np.flatnonzero(short)[0]])
            free = num_items - int(positives_per_user[u])
            raise DataError(f"negatives.num={n}: user {name(u)} has only {free} items it never "
                            f"interacted with (of {num_items}), too few to draw {n} negatives "
                            f"from; lower negatives.num (this user allows at most {free}; 0 "
                            "samples none)")
    pos = PositiveSet(pos_keys)
    for lo in range(0, len(users), block):
        u = users[lo:lo + block]
        cand = sampler.draw(rng, (len(u), n))
        rows = np.arange(len(u))
        for tries in range(1000):
            sub = cand[rows]
            sub.sort(axis=1)
            bad = pos.contains(u[rows, None] * num_items + sub)
            bad[:, 1:] |= sub[:, 1:] == sub[:, :-1]
            cand[rows] = sub
            hit = bad.any(axis=1)
            if not hit.any():
                break
            rows, bad = rows[hit], bad[hit]
            sub = cand[rows]
            sub[bad] = sampler.draw(rng, int(bad.sum()))
            cand[rows] = sub
        else:
            raise DataError(f"negatives: could not draw {n} distinct non-positive items for "
                            f"user {name(int(u[rows[0]]))}; the sampler's support is too "
                            "small — lower negatives.num")
        out[lo:lo + block] = cand
    return out
