"""Fold-in: a user vector solved at request time from a shopper's items, for dot-product
(iALS) models, so a session changes the answer without retraining.

With the item table ``Q`` (and item bias ``b``) fixed, the user ``u`` whose positives are the
set ``H`` (an anonymous shopper's session items; a known user's training items ∪ session
items, each counted once) gets exactly the row the iALS trainer's user half-step would give
it (:func:`jaxreco.train.ials._solve_side`, called here, not re-implemented)::

    p = (Σ_{i∈H} q_i q_iᵀ + α₀ G + λ (|H| + α₀|I|)^ν I)⁻¹ (Σ_{i∈H} (1 − b_i) q_i − α₀ Q_wᵀ b)

with ``G = Q_wᵀ Q`` the item Gram (``Q_w`` = rows of ``Q`` scaled by the unobserved weight
``w_i`` when ``optimizer.unobserved_exponent`` β > 0, else ``Q``), ``α₀`` =
``optimizer.unobserved_weight``, ``λ`` = ``model.reg``, ``ν`` = ``optimizer.reg_exponent``.
Each session item weighs 1 (the trainer's ``optimizer.recency_weight`` confidences are not
applied at request time). The scores are ``p · q_i + b_i``.

``G`` and ``Q_wᵀ b`` do not depend on the shopper: the export computes them once
(:meth:`FoldIn.gram`, :meth:`FoldIn.rhs0`) and the SavedModel solves one ``d × d`` Cholesky
per request (:mod:`jaxreco.export`); :func:`fold_in` is the JAX reference it is tested against.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxreco.train import ials

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class FoldIn:
    """What fold-in needs from a trained dot model: the item vectors ``[I, d]``, the item
    bias ``[I]`` (or None), the unobserved weights ``w_i`` ``[I]`` (or None: uniform) and
    the trainer's ``α₀``, ``λ``, ``ν``."""

    item_vectors: np.ndarray
    item_bias: np.ndarray | None
    col_weight: np.ndarray | None
    alpha0: float
    reg: float
    nu: float

    def __post_init__(self):
        q = np.asarray(self.item_vectors, np.float32)
        if q.ndim != 2 or q.shape[0] < 1:
            raise ValueError(f"fold-in item_vectors must be [num_items, d]; got {q.shape}")
        for name in ("item_bias", "col_weight"):
            v = getattr(self, name)
            if v is not None and np.asarray(v).shape != (q.shape[0],):
                raise ValueError(f"fold-in {name} must have shape [{q.shape[0]}]; got "
                                 f"{np.asarray(v).shape}")
        if not (self.alpha0 >= 0 and self.reg >= 0 and np.isfinite(self.nu)):
            raise ValueError(f"fold-in needs alpha0 >= 0, reg >= 0 and a finite nu; got "
                             f"alpha0={self.alpha0}, reg={self.reg}, nu={self.nu}")

    @property
    def num_items(self) -> int:
        return int(self.item_vectors.shape[0])

    def _qw(self) -> np.ndarray:
        q = np.asarray(self.item_vectors, np.float64)
        return q if self.col_weight is None else q * np.asarray(self.col_weight, np.float64)[:, None]

    def gram(self) -> np.ndarray:
        """``G = Q_wᵀ Q`` (float32 ``[d, d]``), computed in float64."""
        return (self._qw().T @ np.asarray(self.item_vectors, np.float64)).astype(np.float32)

    def rhs0(self) -> np.ndarray:
        """``α₀ Q_wᵀ b`` (float32 ``[d]``; zeros without an item bias)."""
        if self.item_bias is None:
            return np.zeros(self.item_vectors.shape[1], np.float32)
        return (self.alpha0 * self._qw().T @ np.asarray(self.item_bias, np.float64)).astype(
            np.float32)


def _histories(histories: Sequence[Sequence[int]], num_items: int) -> list[np.ndarray]:
    out = []
    for r, h in enumerate(histories):
        h = np.unique(np.asarray(h, np.int64))
        if h.size and (h[0] < 0 or h[-1] >= num_items):
            raise ValueError(f"fold-in history {r} has item indices outside [0, {num_items}): "
                             f"[{h[0]}, {h[-1]}]")
        out.append(h)
    return out


def fold_in(f: FoldIn, histories: Sequence[Sequence[int]]) -> np.ndarray:
    """User vectors ``[B, d]`` (float32) for ``B`` item-index histories (duplicates count
    once); a row with an empty history gets zeros. Calls the trainer's row solve."""
    hs = _histories(histories, f.num_items)
    B, d = len(hs), int(f.item_vectors.shape[1])
    rows = np.concatenate([np.full(len(h), r, np.int64) for r, h in enumerate(hs)] or
                          [np.zeros(0, np.int64)])
    cols = np.concatenate(hs or [np.zeros(0, np.int64)])
    if not len(rows):
        return np.zeros((B, d), np.float32)
    side = ials.group_rows(rows, cols, B, f.num_items, pad_row=B, dim=d)
    data = ials.epoch_data(side, side)["users"]
    q = jnp.asarray(f.item_vectors, jnp.float32)
    bias = None if f.item_bias is None else jnp.asarray(f.item_bias, jnp.float32)
    w = None if f.col_weight is None else jnp.asarray(f.col_weight, jnp.float32)
    x, _ = _solve(jnp.zeros((B + 1, d), jnp.float32), q, data, bias, w, B, f.num_items,
                  float(f.alpha0), float(f.reg), float(f.nu))
    return np.asarray(x[:B])


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _solve(x, q, data, bias, w, num_rows, num_cols, alpha0, reg, nu):
    return ials._solve_side(x, q, data, num_rows, num_cols, alpha0=alpha0, reg=reg, nu=nu,
                            with_loss=False, y_bias=bias, col_weight=w)


def scores(f: FoldIn, user_vectors: np.ndarray) -> np.ndarray:
    """``p · q_i + b_i`` for every item: float32 ``[B, I]``."""
    s = jnp.matmul(jnp.asarray(user_vectors, jnp.float32),
                   jnp.asarray(f.item_vectors, jnp.float32).T, precision=HIGHEST)
    if f.item_bias is not None:
        s = s + jnp.asarray(f.item_bias, jnp.float32)[None, :]
    return np.asarray(s)
