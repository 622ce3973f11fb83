"""Numpy-only pieces of the complete-the-cart scenario, shared by the trainer
(:mod:`jaxreco.complement`, which has JAX) and the server (:mod:`jaxreco.serve.complete`,
which must not import JAX): the trained :class:`BasketModel` (its file, its scores, the exact
per-cart-item decomposition of a score), co-purchase statistics as exported with a model
(:class:`CoPurchaseStats`), and the category rules (prefer other categories than the cart's,
one item per category).

Files a model version may carry under ``assets.extra/`` (written by :mod:`jaxreco.export`):

* :data:`COMPLEMENT_FILE` -- a trained :class:`BasketModel` (``jaxreco-export --complement``);
* :data:`CO_PURCHASE_FILE` -- co-purchase counts of the training baskets (CSR, each item's
  most frequent partners), baskets per item and the number of baskets: written whenever the
  training data has baskets (an ``order_id`` column).
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

COMPLEMENT_FILE = "complement.npz"
CO_PURCHASE_FILE = "co_purchase.npz"


class ComplementError(ValueError):
    """Bad basket data or a bad complement file; the message names what was wrong."""


def _load_npz(path, what: str, need: set[str]):
    """``np.load(path)`` holding at least the arrays ``need``; a ComplementError naming the
    file and what is missing otherwise."""
    try:
        z = np.load(path, allow_pickle=False)
        files = set(z.files)
    except (OSError, ValueError) as e:
        raise ComplementError(f"cannot read {what} {path}: {e}") from e
    if not need <= files:
        raise ComplementError(f"{path}: not {what}; missing arrays {sorted(need - files)}")
    return z


@dataclasses.dataclass
class BasketModel:
    """The trained complement model: numpy ``ctx [I, d]``, ``out [I, d]``, ``bias [I]``,
    and the pairwise part ``nbr int32 [I, P]`` (padding ``I``) with weights ``w [I, P]``."""

    ctx: np.ndarray
    out: np.ndarray
    bias: np.ndarray
    nbr: np.ndarray
    w: np.ndarray
    item_ids: np.ndarray
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.bias)

    def scores(self, carts: Sequence[np.ndarray], users=None) -> np.ndarray:
        """``[n, num_items]`` scores of every item for each cart (item indices)."""
        n, I = len(carts), self.num_items
        q = np.stack([self.ctx[np.asarray(c, np.int64)].mean(0) if len(c) else
                      np.zeros(self.ctx.shape[1], np.float32) for c in carts])
        s = q @ self.out.T + self.bias
        pair = np.zeros((n, I + 1), np.float32)
        for r, c in enumerate(carts):
            c = np.asarray(c, np.int64)
            np.add.at(pair[r], self.nbr[c].ravel(), self.w[c].ravel())
        return s + pair[:, :I]

    def contributions(self, cart: np.ndarray, item: int) -> np.ndarray:
        """Per cart item ``j``: its share of ``s(item | cart) - b_item``
        (``o_item · e_j / |C|`` plus ``w_j,item``); they sum to that difference."""
        cart = np.asarray(cart, np.int64)
        f = self.ctx[cart] @ self.out[item] / max(1, len(cart))
        p = np.where(self.nbr[cart] == item, self.w[cart], 0.0).sum(1)
        return (f + p).astype(np.float64)

    def to_bytes(self) -> bytes:
        f = io.BytesIO()
        np.savez(f, kind=np.array("basket_softmax"), ctx=self.ctx, out=self.out,
                 bias=self.bias, nbr=self.nbr, w=self.w, item_ids=self.item_ids.astype(str),
                 info=np.array(json.dumps(self.info)))
        return f.getvalue()

    def save(self, path: str | Path) -> Path:
        Path(path).write_bytes(self.to_bytes())
        return Path(path)

    def reindexed(self, item_ids: Sequence[str]) -> "BasketModel":
        """The model over another item vocabulary (an export's), matched by raw id: items
        it never saw get zero vectors, no partners and the lowest bias less 10."""
        item_ids = np.asarray(item_ids).astype(str)
        if np.array_equal(item_ids, self.item_ids):
            return self
        index = {s: i for i, s in enumerate(self.item_ids)}
        src = np.asarray([index.get(s, -1) for s in item_ids], np.int64)
        known = src >= 0
        if not known.any():
            raise ComplementError("the complement model shares no item id with this export's "
                                  f"vocabulary (e.g. {item_ids[:3].tolist()} vs "
                                  f"{self.item_ids[:3].tolist()}): trained on another dataset?")
        n, d, p = len(item_ids), self.ctx.shape[1], self.nbr.shape[1]
        to_new = np.full(self.num_items + 1, n, np.int64)       # old index -> new, pad -> n
        to_new[src[known]] = np.flatnonzero(known)
        ctx = np.zeros((n, d), np.float32)
        out = np.zeros((n, d), np.float32)
        bias = np.full(n, float(self.bias.min()) - 10.0, np.float32)
        nbr = np.full((n, p), n, np.int64)
        w = np.zeros((n, p), np.float32)
        ctx[known], out[known], bias[known] = self.ctx[src[known]], self.out[src[known]], \
            self.bias[src[known]]
        nbr[known] = to_new[self.nbr[src[known]]]
        w[known] = np.where(nbr[known] < n, self.w[src[known]], 0.0)
        return BasketModel(ctx, out, bias, nbr, w, item_ids,
                           {**self.info, "reindexed_unknown_items": int((~known).sum())})

    @classmethod
    def load(cls, path: str | Path) -> "BasketModel":
        z = _load_npz(path, "complement model",
                      {"kind", "ctx", "out", "bias", "nbr", "w", "item_ids"})
        if str(z["kind"]) != "basket_softmax":
            raise ComplementError(f"{path}: kind={str(z['kind'])!r}, expected 'basket_softmax'")
        ctx, out, bias, nbr, w = z["ctx"], z["out"], z["bias"], z["nbr"], z["w"]
        n = len(z["item_ids"])
        if (ctx.shape[0] != n or out.shape != ctx.shape or bias.shape != (n,)
                or nbr.shape[0] != n or w.shape != nbr.shape):
            raise ComplementError(f"{path}: shapes disagree: ctx {ctx.shape}, out {out.shape}, "
                                  f"bias {bias.shape}, nbr {nbr.shape}, w {w.shape}, "
                                  f"{n} item ids")
        if nbr.size and (nbr.min() < 0 or nbr.max() > n):
            raise ComplementError(f"{path}: nbr holds indices outside [0, {n}]")
        info = json.loads(str(z["info"])) if "info" in z.files else {}
        return cls(ctx.astype(np.float32), out.astype(np.float32), bias.astype(np.float32),
                   nbr.astype(np.int64), w.astype(np.float32), z["item_ids"].astype(str), info)


@dataclasses.dataclass
class CoPurchaseStats:
    """Co-purchase counts as CSR ``(indptr [I+1], indices, counts)`` (row ``i``: the items
    bought with ``i`` and in how many baskets), ``freq [I]`` baskets holding each item and
    ``num_baskets``; :meth:`scores` ranks by lift (positive PMI summed over the cart, ties
    by popularity), the best co-purchase baseline of experiments/instacart_complement."""

    indptr: np.ndarray
    indices: np.ndarray
    counts: np.ndarray
    freq: np.ndarray
    num_baskets: int

    @property
    def num_items(self) -> int:
        return len(self.freq)

    min_count: int = 3   # pairs seen fewer times score 0 (chosen on validation baskets)

    def pmi(self) -> np.ndarray:
        """Positive PMI ``max(0, log(n_ij N / (n_i n_j)))`` per stored pair seen at least
        ``min_count`` times (0 otherwise)."""
        if getattr(self, "_pmi", None) is None:
            rows = np.repeat(np.arange(self.num_items), np.diff(self.indptr))
            with np.errstate(divide="ignore"):
                v = np.log(self.counts * float(self.num_baskets)
                           / np.maximum(self.freq[rows] * self.freq[self.indices], 1.0))
            self._pmi = np.where(self.counts >= self.min_count, np.maximum(v, 0.0), 0.0)
        return self._pmi

    def scores(self, carts: Sequence[np.ndarray], users=None) -> np.ndarray:
        pmi = self.pmi()
        out = np.zeros((len(carts), self.num_items))
        for r, c in enumerate(carts):
            for j in np.asarray(c, np.int64):
                lo, hi = self.indptr[j], self.indptr[j + 1]
                out[r, self.indices[lo:hi]] += pmi[lo:hi]
        return out + 1e-6 * self.freq / max(1.0, float(self.freq.max()))

    def contributions(self, cart: np.ndarray, item: int) -> np.ndarray:
        """Per cart item: its PMI term with ``item`` (they sum to the score less the
        popularity tie-break)."""
        pmi = self.pmi()
        out = np.zeros(len(cart))
        for r, j in enumerate(np.asarray(cart, np.int64)):
            lo, hi = self.indptr[j], self.indptr[j + 1]
            hit = np.flatnonzero(self.indices[lo:hi] == item)
            out[r] = pmi[lo + hit[0]] if hit.size else 0.0
        return out

    def pair_count(self, j: int, i: int) -> int:
        lo, hi = self.indptr[j], self.indptr[j + 1]
        hit = np.flatnonzero(self.indices[lo:hi] == i)
        return int(self.counts[lo + hit[0]]) if hit.size else 0

    @classmethod
    def from_lines(cls, basket: np.ndarray, item: np.ndarray, num_items: int,
                   co_counts: tuple[np.ndarray, np.ndarray, np.ndarray]) -> "CoPurchaseStats":
        """From order lines ``(basket id, item index)`` and their co-purchase CSR (as
        :func:`jaxreco.export.co_purchase_counts` gives)."""
        pairs = np.unique(np.stack([np.asarray(basket, np.int64), np.asarray(item, np.int64)],
                                   1), axis=0)
        freq = np.bincount(pairs[:, 1], minlength=num_items).astype(np.float64)
        indptr, indices, counts = co_counts
        return cls(np.asarray(indptr, np.int64), np.asarray(indices, np.int64),
                   np.asarray(counts, np.float64), freq, int(len(np.unique(pairs[:, 0]))))

    def to_bytes(self) -> bytes:
        f = io.BytesIO()
        np.savez(f, indptr=self.indptr, indices=self.indices.astype(np.int32),
                 counts=self.counts.astype(np.int32), freq=self.freq.astype(np.int64),
                 num_baskets=np.int64(self.num_baskets))
        return f.getvalue()

    def save(self, path: str | Path) -> Path:
        Path(path).write_bytes(self.to_bytes())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "CoPurchaseStats":
        z = _load_npz(path, "co-purchase statistics",
                      {"indptr", "indices", "counts", "freq", "num_baskets"})
        s = cls(z["indptr"].astype(np.int64), z["indices"].astype(np.int64),
                z["counts"].astype(np.float64), z["freq"].astype(np.float64),
                int(z["num_baskets"]))
        n = s.num_items
        if (s.indptr.shape != (n + 1,) or s.indptr[-1] != len(s.indices)
                or len(s.counts) != len(s.indices)
                or (len(s.indices) and (s.indices.min() < 0 or s.indices.max() >= n))):
            raise ComplementError(f"{path}: inconsistent CSR for {n} items")
        return s


def prefer_other_categories(scores: np.ndarray, carts: Iterable[np.ndarray],
                            item_category: np.ndarray) -> np.ndarray:
    """Scores re-ordered so that, per row, every item of a category absent from the cart
    comes before every item of a category in the cart (order kept within each group).
    ``item_category`` int [num_items], -1 = unknown (never treated as the cart's)."""
    out = np.array(scores, np.float64)
    span = np.nanmax(np.abs(out[np.isfinite(out)])) if np.isfinite(out).any() else 1.0
    for r, c in enumerate(carts):
        cats = np.unique(item_category[np.asarray(c, np.int64)])
        cats = cats[cats >= 0]
        if cats.size:
            same = np.isin(item_category, cats)
            out[r, same] -= 4.0 * span + 1.0
    return out


def one_per_category(order: np.ndarray, item_category: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` items of ``order`` (best first) keeping only the best of each category
    (items of unknown category, -1, each count as their own)."""
    seen: set[int] = set()
    out = []
    for i in order:
        c = int(item_category[i])
        if c >= 0:
            if c in seen:
                continue
            seen.add(c)
        out.append(int(i))
        if len(out) == k:
            break
    return np.asarray(out, np.int64)
