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
