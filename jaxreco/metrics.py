"""Offline metrics as mergeable sufficient statistics.

Each metric is computed from sums accumulated over (possibly padded, possibly sharded)
batches, so evaluating in chunks and merging gives exactly the full-data value.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def regression_sums(pred: jax.Array, target: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Sums for RMSE/MAE over the rows where ``mask`` is true."""
    m = mask.astype(jnp.float32)
    err = (pred - target) * m
    return {"se": jnp.sum(err * err), "ae": jnp.sum(jnp.abs(err)), "n": jnp.sum(m)}


def merge(a: Mapping[str, np.ndarray] | None, b: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds two dicts of sums (``a`` may be None)."""
    b = {k: np.asarray(v, np.float64) for k, v in b.items()}
    return b if a is None else {k: a[k] + b[k] for k in b}


def regression_metrics(sums: Mapping[str, np.ndarray]) -> dict[str, float]:
    """RMSE and MAE from :func:`regression_sums`."""
    n = float(sums["n"])
    if n == 0:
        raise ValueError("no examples to evaluate")
    return {"rmse": float(np.sqrt(sums["se"] / n)), "mae": float(sums["ae"] / n), "count": n}


# ----------------------------------------------------------------------------- ranking
def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(k) + 2.0)


def ranking_sums(scores: jax.Array, cand_mask: jax.Array, rel_idx: jax.Array,
                 rel_mask: jax.Array, ks: tuple[int, ...]) -> dict[str, jax.Array]:
    """Sums of HR@K, NDCG@K, Recall@K and MRR over a chunk of ranking queries.

    One code path for both protocols: each query (row) ranks its candidates ``scores[q, :]``
    where ``cand_mask`` is true; the relevant candidates are ``rel_idx[q, t]`` where
    ``rel_mask[q, t]``. Full ranking: candidates are all items minus the user's training
    items; sampled ranking (NCF): the held-out item plus its fixed negatives.

    The 0-based position of a relevant item ``r`` is

        pos_r = #{non-relevant candidates j : s_j ≥ s_r} + #{relevant r' ranked before r},

    i.e. ties with non-relevant candidates are broken against the relevant item
    (pessimistic: a constant model scores HR@K = 0, not 1), and ties among relevant
    items by their order in ``rel_idx``. Then with ``R`` the relevant set and
    ``hit_r = [pos_r < K]``:

        HR@K = [Σ_r hit_r > 0],  Recall@K = Σ_r hit_r / |R|,
        NDCG@K = Σ_r hit_r / log2(pos_r + 2) / Σ_{k < min(|R|, K)} 1 / log2(k + 2),
        MRR = 1 / (min_r pos_r + 1).

    Queries with no relevant item are skipped (``n`` counts the others). K larger than
    the candidate list is allowed (every relevant item is then a hit).
    """
    q, t = rel_idx.shape
    rel_mask = rel_mask & jnp.take_along_axis(cand_mask, rel_idx, axis=1)
    s_rel = jnp.take_along_axis(scores, rel_idx, axis=1)                       # [Q, T]
    is_rel = jnp.zeros(scores.shape, bool).at[jnp.arange(q)[:, None], rel_idx].max(rel_mask)
    nonrel = cand_mask & ~is_rel
    above = jnp.sum(nonrel[:, None, :] & (scores[:, None, :] >= s_rel[:, :, None]), axis=-1)
    ti = jnp.arange(t)
    before = (s_rel[:, None, :] > s_rel[:, :, None]) | (
        (s_rel[:, None, :] == s_rel[:, :, None]) & (ti[None, None, :] < ti[None, :, None]))
    before = jnp.sum(before & rel_mask[:, None, :], axis=-1)
    pos = above + before                                                        # [Q, T]
    n_rel = jnp.sum(rel_mask, axis=1)
    valid = n_rel > 0
    out = {"n": jnp.sum(valid.astype(jnp.float32))}
    kmax = max(ks)
    disc = jnp.asarray(_discounts(kmax), jnp.float32)
    idcg_table = jnp.cumsum(disc)
    gain = jnp.where(rel_mask, 1.0 / jnp.log2(pos.astype(jnp.float32) + 2.0), 0.0)
    for k in ks:
        hit = rel_mask & (pos < k)
        nhit = jnp.sum(hit, axis=1).astype(jnp.float32)
        idcg = idcg_table[jnp.clip(jnp.minimum(n_rel, k) - 1, 0, kmax - 1)]
        dcg = jnp.sum(jnp.where(hit, gain, 0.0), axis=1)
        out[f"hr@{k}"] = jnp.sum(jnp.where(valid, (nhit > 0).astype(jnp.float32), 0.0))
        out[f"recall@{k}"] = jnp.sum(jnp.where(valid, nhit / jnp.maximum(n_rel, 1), 0.0))
        out[f"ndcg@{k}"] = jnp.sum(jnp.where(valid, dcg / idcg, 0.0))
    best = jnp.min(jnp.where(rel_mask, pos, jnp.iinfo(jnp.int32).max), axis=1)
    out["mrr"] = jnp.sum(jnp.where(valid, 1.0 / (best.astype(jnp.float32) + 1.0), 0.0))
    return out


def top_k_candidates(scores: jax.Array, cand_mask: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``(indices [Q, k], valid [Q, k])``: each query's top-``k`` candidates (for coverage);
    ``valid`` is false where the query has fewer than ``k`` candidates."""
    k = min(k, scores.shape[1])
    vals, idx = jax.lax.top_k(jnp.where(cand_mask, scores, -jnp.inf), k)
    return idx, jnp.isfinite(vals)


def ranking_metrics(sums: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Means of :func:`ranking_sums` over the queries that have a relevant item."""
    n = float(sums["n"])
    if n == 0:
        raise ValueError("no ranking query has a relevant item")
    return {**{k: float(v) / n for k, v in sums.items() if k != "n"}, "count": n}


def coverage(top_items: np.ndarray, valid: np.ndarray, num_items: int,
             ks: tuple[int, ...]) -> dict[str, float]:
    """Item coverage@K: the fraction of the catalogue in at least one query's top-K."""
    out = {}
    for k in ks:
        items = top_items[:, :k][valid[:, :k]]
        out[f"coverage@{k}"] = float(len(np.unique(items))) / num_items
    return out


# ----------------------------------------------------------------------------- pointwise
def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC = P(s_pos > s_neg) + ½ P(s_pos = s_neg) (Mann–Whitney U with mid-ranks)."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels) > 0
    npos = int(labels.sum())
    nneg = len(labels) - npos
    if npos == 0 or nneg == 0:
        return float("nan")
    _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mid = np.cumsum(counts) - (counts - 1) / 2.0          # 1-based mid-rank of each value
    r = mid[inv]
    return float((r[labels].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


def pointwise_metrics(logits: np.ndarray, labels: np.ndarray, *, bins: int = 10) -> dict[str, float]:
    """AUC, logloss and calibration of click logits ``z`` against 0/1 ``labels``.

    logloss = mean(log(1 + e^z) − y z) (stable form of −y log p − (1−y) log(1−p));
    calibration: mean predicted CTR p̄, observed CTR ȳ, their ratio p̄/ȳ, and the expected
    calibration error Σ_b (n_b/n) |p̄_b − ȳ_b| over ``bins`` equal-width bins of p.
    """
    z = np.asarray(logits, np.float64)
    y = (np.asarray(labels) > 0).astype(np.float64)
    if len(z) == 0:
        raise ValueError("no examples to evaluate")
    p = 1.0 / (1.0 + np.exp(-z))
    b = np.minimum((p * bins).astype(np.int64), bins - 1)
    nb = np.bincount(b, minlength=bins)
    pb = np.bincount(b, p, minlength=bins)
    yb = np.bincount(b, y, minlength=bins)
    ece = float(np.sum(np.abs(pb - yb)) / len(z))
    return {"auc": auc(z, y), "logloss": float(np.mean(np.logaddexp(0.0, z) - y * z)),
            "pred_ctr": float(p.mean()), "obs_ctr": float(y.mean()),
            "calibration": float(p.mean() / max(y.mean(), 1e-12)), "ece": ece,
            "count": float(len(z))}
