"""User and item features, computed from the training split only, and the leakage check.

Features (one row per index, written as ``user_features.parquet`` / ``item_features.parquet``):

* item: ``popularity`` (train interactions), ``pop_bucket`` = ``floor(log2(1 + popularity))``,
  ``category`` (index into ``metadata["category_vocab"]``, -1 unknown), ``price`` (NaN
  unknown), ``price_bucket`` (equal-frequency bucket of price over items, -1 unknown).
* user: ``history_len`` (train interactions), ``last_ts`` (latest train timestamp, -1 none),
  ``recency_days`` = ``(reference_ts - last_ts) / 86400`` with ``reference_ts`` the latest
  train timestamp of all (NaN for users without train rows).

Anything an evaluation row could leak into is computed from train rows, so
:func:`check_leakage` can recompute every count from the train split alone and compare.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from jaxreco.data.dataset import DataError


class FeatureAccumulator:
    """Streams train blocks into per-user and per-item aggregates."""

    def __init__(self, num_users: int, num_items: int):
        self.user_count = np.zeros(num_users, np.int64)
        self.user_last = np.full(num_users, -1, np.int64)
        self.item_count = np.zeros(num_items, np.int64)

    def add(self, user: np.ndarray, item: np.ndarray, timestamp: np.ndarray | None) -> None:
        nu, ni = len(self.user_count), len(self.item_count)
        self.user_count += np.bincount(user, minlength=nu)
        self.item_count += np.bincount(item, minlength=ni)
        if timestamp is not None and len(user):
            if np.all(user[1:] >= user[:-1]):        # grouped: O(n) segment max
                starts = np.flatnonzero(np.concatenate([[True], user[1:] != user[:-1]]))
                mx = np.maximum.reduceat(timestamp, starts)
                u = user[starts]
                self.user_last[u] = np.maximum(self.user_last[u], mx)
            else:
                np.maximum.at(self.user_last, user, timestamp)

    def finish(self, *, item_category: np.ndarray | None = None,
               item_price: np.ndarray | None = None,
               price_buckets: int = 10) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        ni = len(self.item_count)
        ref = self.user_last.max() if len(self.user_last) else -1
        has = self.user_last >= 0
        recency = np.full(len(self.user_last), np.nan, np.float32)
        recency[has] = (ref - self.user_last[has]) / 86400.0
        user = {"history_len": self.user_count.astype(np.int32), "last_ts": self.user_last,
                "recency_days": recency}
        item = {"popularity": self.item_count.astype(np.int32),
                "pop_bucket": np.floor(np.log2(1 + self.item_count)).astype(np.int8),
                "category": (np.full(ni, -1, np.int32) if item_category is None
                             else np.asarray(item_category, np.int32)),
                "price": (np.full(ni, np.nan, np.float32) if item_price is None
                          else np.asarray(item_price, np.float32))}
        item["price_bucket"] = price_bucket(item["price"], price_buckets)
        return user, item


def price_bucket(price: np.ndarray, buckets: int) -> np.ndarray:
    """Equal-frequency buckets ``0..buckets-1`` over known prices; -1 where NaN."""
    out = np.full(len(price), -1, np.int8)
    known = ~np.isnan(price)
    if known.any() and buckets > 1:
        edges = np.quantile(price[known], np.linspace(0, 1, buckets + 1)[1:-1])
        out[known] = np.searchsorted(edges, price[known], side="right")
    elif known.any():
        out[known] = 0
    return out


def check_leakage(groups: Iterable[tuple[dict[str, np.ndarray],
                                         list[tuple[str, dict[str, np.ndarray]]]]], *,
                  user_features: dict[str, np.ndarray], item_features: dict[str, np.ndarray],
                  split_kind: str, cutoffs: tuple[int, int] | None = None,
                  pairs_unique: bool = False) -> dict[str, int]:
    """Raises DataError if an evaluation interaction fed a training feature.

    ``groups`` yields ``(train_block, [(split_name, eval_block), ...])`` per shard group;
    a user's rows of every split must be in one group (``prepare`` shards by user range,
    an in-memory check passes one group). Blocks are ``{"user", "item", "timestamp"?}``.

    Checks: (1) every count feature equals its recomputation from train rows alone;
    (2) every user's ``last_ts`` is their latest *train* timestamp; (3) temporal split: no
    train row after the validation cut-off, no evaluation row at or before its cut-off;
    leave-last-out: no user has a train row later than their evaluation rows; (4) with
    ``pairs_unique`` (data were de-duplicated), no evaluation (user, item) pair is in train.

    Returns counts of what was checked.
    """
    nu, ni = len(user_features["history_len"]), len(item_features["popularity"])
    acc = FeatureAccumulator(nu, ni)
    n_train = n_eval = 0
    deferred: list[tuple[str, dict[str, np.ndarray]]] = []
    for train, evals in groups:
        acc.add(train["user"], train["item"], train.get("timestamp"))
        n_train += len(train["user"])
        tkeys = None
        if pairs_unique:
            tkeys = np.sort(train["user"].astype(np.int64) * ni + train["item"])
        for split, b in evals:
            n_eval += len(b["user"])
            deferred.append((split, {k: b[k] for k in ("user", "timestamp") if k in b}))
            if tkeys is not None and len(tkeys):
                keys = b["user"].astype(np.int64) * ni + b["item"]
                at = np.minimum(np.searchsorted(tkeys, keys), len(tkeys) - 1)
                hit = tkeys[at] == keys
                if hit.any():
                    k = int(np.flatnonzero(hit)[0])
                    raise DataError(f"leakage: {split} pair user={int(b['user'][k])}, "
                                    f"item={int(b['item'][k])} is also in train")
    for name, want, got in (("history_len", user_features["history_len"], acc.user_count),
                            ("popularity", item_features["popularity"], acc.item_count)):
        diff = np.flatnonzero(np.asarray(want, np.int64) != got)
        if len(diff):
            k = int(diff[0])
            raise DataError(f"leakage: feature {name}[{k}] = {int(want[k])} but the train split "
                            f"alone gives {int(got[k])} ({len(diff)} indices differ): it was "
                            "computed from rows outside train")
    if "last_ts" in user_features:
        diff = np.flatnonzero(user_features["last_ts"] != acc.user_last)
        if len(diff):
            k = int(diff[0])
            raise DataError(f"leakage: user_features.last_ts[{k}] = "
                            f"{int(user_features['last_ts'][k])} but the latest train timestamp "
                            f"of user {k} is {int(acc.user_last[k])}")
    for split, b in deferred:
        ts = b.get("timestamp")
        if ts is None or not len(ts):
            continue
        if split_kind == "temporal" and cutoffs is not None:
            limit = cutoffs[1] if split == "test" else cutoffs[0]
            if ts.min() <= limit:
                raise DataError(f"leakage: {split} row at t={int(ts.min())} is not after the "
                                f"cut-off {limit}")
        if split_kind == "leave_last_out":
            late = acc.user_last[b["user"]] > ts
            if late.any():
                k = int(np.flatnonzero(late)[0])
                raise DataError(f"leakage: user {int(b['user'][k])} has a train row at "
                                f"t={int(acc.user_last[b['user'][k]])}, after its {split} "
                                f"row at t={int(ts[k])}")
    if split_kind == "temporal" and cutoffs is not None and n_train:
        if acc.user_last.max() > cutoffs[0]:
            raise DataError(f"leakage: a train row at t={int(acc.user_last.max())} is after the "
                            f"validation cut-off {cutoffs[0]}")
    return {"train_rows_checked": n_train, "eval_rows_checked": n_eval}
