"""Reasons for each pick: the exact decomposition of a dot / iALS model's score over the
shopper's items (as ``implicit``'s ALS ``explain``), numpy only (the server imports it).

For a history ``H`` (a shopper's items, each once, weight 1, as request-time fold-in
:mod:`jaxreco.foldin` and the trainer's user solve use them) the user vector is
``p = W (Σ_{j∈H} (1 − b_j) q_j − r₀)`` with

    W = (Σ_{j∈H} q_j q_jᵀ + α₀ G + λ (|H| + α₀|I|)^ν I)⁻¹,   G = Q_wᵀ Q,   r₀ = α₀ Q_wᵀ b

(the regularised, weighted Gram of the user's items; ``G``, ``r₀`` as the export stores
them). So the score of item ``t`` splits exactly into one term per history item and a base::

    s_t = q_tᵀ p + b_t = Σ_{j∈H} (1 − b_j) q_tᵀ W q_j  +  (b_t − q_tᵀ W r₀)

and the contributions sum to the score (up to float rounding). This is the score of the
fold-in user vector: what ``/recommend`` serves for a session of events; for a known user
without a session the server ranks by the trained vector, which the trainer solved the same
way but against the item table of the previous half-step, so the two differ slightly (the
answer gives the fold-in score the contributions sum to).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class FoldInExplainer:
    """Item vectors ``q [I, d]``, bias ``b [I]`` (zeros without), ``G [d, d]``, ``r₀ [d]``
    and the trainer's ``α₀``, ``λ``, ``ν`` (module docstring)."""

    q: np.ndarray
    bias: np.ndarray
    gram: np.ndarray
    rhs0: np.ndarray
    alpha0: float
    reg: float
    nu: float

    @classmethod
    def from_foldin(cls, f) -> "FoldInExplainer":
        """From a :class:`jaxreco.foldin.FoldIn` (the trainer's side)."""
        q = np.asarray(f.item_vectors, np.float64)
        b = np.zeros(len(q)) if f.item_bias is None else np.asarray(f.item_bias, np.float64)
        return cls(q, b, np.asarray(f.gram(), np.float64), np.asarray(f.rhs0(), np.float64),
                   float(f.alpha0), float(f.reg), float(f.nu))

    def weight_matrix(self, history: np.ndarray) -> np.ndarray:
        """``W`` for the history (item indices, each once)."""
        qh = self.q[history]
        d = self.q.shape[1]
        lam = self.reg * (len(history) + self.alpha0 * len(self.q)) ** self.nu
        a = qh.T @ qh + self.alpha0 * self.gram + lam * np.eye(d)
        return np.linalg.inv(a)

    def explain(self, history: Sequence[int], items: Sequence[int]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(scores [m], base [m], contributions [m, |H|])`` of ``items`` given the history
        (distinct item indices; column ``j`` of the contributions is ``history[j]``)."""
        h = np.asarray(history, np.int64).reshape(-1)
        if len(np.unique(h)) != len(h):
            raise ValueError("explain: the history must list each item once")
        t = np.asarray(items, np.int64)
        if h.size == 0:
            base = self.bias[t].copy()
            return base, base, np.zeros((len(t), 0))
        w = self.weight_matrix(h)
        qt_w = self.q[t] @ w                                        # [m, d]
        contrib = (qt_w @ self.q[h].T) * (1.0 - self.bias[h])[None, :]
        base = self.bias[t] - qt_w @ self.rhs0
        return base + contrib.sum(1), base, contrib


def top_contributions(ids: Sequence[str], contrib: np.ndarray, top: int = 3) -> list[dict]:
    """The ``top`` history items by contribution (largest first) as ``{"item", "contribution"}``."""
    order = np.argsort(-contrib, kind="stable")[:top]
    return [{"item": str(ids[j]), "contribution": float(contrib[j])} for j in order]
