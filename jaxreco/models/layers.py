"""Building blocks shared by the models.

Embedding tables are :class:`Table` variables, a subclass of ``nnx.Param`` the trainer
recognises: it never differentiates or updates a whole table, only the rows a batch looks
up (see ``jaxreco.optim``). Every parameter carries ``axes``: logical axis names (``user``,
``item``, ``embed``, ``mlp``, ...) that ``conf/mesh/*.yaml`` maps onto mesh axes.

A model exposes

* ``table_features``: ``{table attribute: (batch features whose ids index it, ...)}``;
* ``score(rows, batch)``: predictions from the looked-up rows
  ``rows[table][feature] -> [batch, dim]`` and the model's dense parameters.

so the same ``score`` serves training (rows gathered by the trainer, which then updates
only those rows) and inference (``__call__`` gathers from the full tables).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx


class Table(nnx.Param):
    """An embedding table ``[rows, dim]``, updated row-sparsely by the trainer."""


def table(key: jax.Array, num_rows: int, dim: int, axes: tuple[str, str], *,
          init_std: float = 0.0) -> Table:
    """A ``Table`` of ``N(0, init_std^2)`` rows (zeros when ``init_std == 0``)."""
    if num_rows <= 0 or dim <= 0:
        raise ValueError(f"table shape ({num_rows}, {dim}) must be positive")
    value = (jax.random.normal(key, (num_rows, dim), jnp.float32) * init_std
             if init_std else jnp.zeros((num_rows, dim), jnp.float32))
    return Table(value, axes=axes)


def gather_rows(tables: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                table_features: Mapping[str, tuple[str, ...]]) -> dict[str, dict[str, jax.Array]]:
    """``rows[t][f] = tables[t][batch[f]]`` for every table and each feature indexing it."""
    return {t: {f: jnp.take(tables[t], batch[f], axis=0) for f in feats}
            for t, feats in table_features.items()}


def present_features(table_features: Mapping[str, tuple[str, ...]],
                     batch: Mapping[str, jax.Array]) -> dict[str, tuple[str, ...]]:
    """``table_features`` restricted to the features ``batch`` has (e.g. no ``neg_*`` ones
    at inference), dropping tables none of whose features are present."""
    out = {t: tuple(f for f in feats if f in batch) for t, feats in table_features.items()}
    return {t: f for t, f in out.items() if f}


class LookupModel(nnx.Module):
    """Mixin: ``model(batch)`` = ``model.score(gathered rows, batch)``."""

    table_features: dict[str, tuple[str, ...]] = {}

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        tables = {t: getattr(self, t)[...] for t in self.table_features}
        return self.score(gather_rows(tables, batch, present_features(self.table_features, batch)),
                          batch)

    def score(self, rows, batch):  # pragma: no cover - abstract
        raise NotImplementedError
