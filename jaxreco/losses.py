"""Loss functions: pure, batch-mean, and explicit about their regularisers."""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp


def frobenius_rows(rows: Mapping[str, Mapping[str, jax.Array]], tables: Sequence[str]) -> jax.Array:
    """Per-example ``Σ_t ‖row_t‖²`` over the given tables' looked-up rows: ``[batch]``."""
    terms = [jnp.sum(r * r, axis=-1) for t in tables for r in rows[t].values()]
    return sum(terms)


def mse_frobenius(pred: jax.Array, target: jax.Array, rows, *, embedding_tables: Sequence[str],
                  bias_tables: Sequence[str] = (), reg: float, bias_reg: float = 0.0) -> jax.Array:
    """Mean over the batch of ``(r̂ − r)² + λ(‖p_u‖² + ‖q_i‖²) + λ_b(b_u² + b_i²)``.

    The Frobenius penalty is applied per observed rating to the rows that rating touches,
    the form SGD matrix factorization optimises (Koren et al. 2009); frequent users and items
    are therefore regularised more, which is what makes it work on skewed rating data.
    """
    per_example = jnp.square(pred - target) + reg * frobenius_rows(rows, embedding_tables)
    if bias_tables and bias_reg:
        per_example = per_example + bias_reg * frobenius_rows(rows, bias_tables)
    return jnp.mean(per_example)


def bce_with_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example binary cross-entropy ``log(1 + e^z) − y z`` from logits (stable)."""
    return jax.nn.softplus(logits) - labels * logits


def bpr(pos_logits: jax.Array, neg_logits: jax.Array) -> jax.Array:
    """Per-pair BPR loss ``−log σ(s⁺ − s⁻) = softplus(s⁻ − s⁺)`` (Rendle et al. 2009)."""
    return jax.nn.softplus(neg_logits - pos_logits)


def sampled_implicit(pos: jax.Array, neg: jax.Array, kind: str) -> jax.Array:
    """Per-positive loss from ``pos [B]`` and ``neg [B, k]`` logits of sampled negatives.

    ``bce``: the NCF pointwise log loss, ``ℓ(s⁺, 1) + Σ_j ℓ(s⁻_j, 0)`` (each positive with
    its ``k`` negatives); ``bpr``: ``Σ_j −log σ(s⁺ − s⁻_j)``.
    """
    if kind == "bce":
        return bce_with_logits(pos, 1.0) + jnp.sum(bce_with_logits(neg, 0.0), axis=-1)
    if kind == "bpr":
        return jnp.sum(bpr(pos[:, None], neg), axis=-1)
    raise ValueError(f"task.loss={kind!r}: must be 'bce' or 'bpr'")
