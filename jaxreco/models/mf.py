"""Biased matrix factorization (Koren, Bell & Volinsky 2009).

    r̂(u, i) = μ + b_u + b_i + p_u · q_i

``μ`` is a dense scalar initialised to the training mean; ``b_u``, ``b_i`` are ``[rows, 1]``
tables and ``p_u``, ``q_i`` ``[rows, dim]`` tables, all updated row-sparsely. The Frobenius
regulariser λ(‖p_u‖² + ‖q_i‖²) is applied per observed rating by the loss
(``jaxreco.losses.mse_frobenius``), on the rows a batch touches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxreco.models.layers import LookupModel, table


class MF(LookupModel):
    table_features = {"user_embed": ("user",), "item_embed": ("item",),
                      "user_bias": ("user",), "item_bias": ("item",)}
    embedding_tables = ("user_embed", "item_embed")   # the ones the Frobenius term covers

    def __init__(self, num_users: int, num_items: int, *, dim: int, init_std: float = 0.01,
                 global_bias: float = 0.0, rngs: nnx.Rngs):
        self.user_embed = table(rngs.params(), num_users, dim, ("user", "embed"), init_std=init_std)
        self.item_embed = table(rngs.params(), num_items, dim, ("item", "embed"), init_std=init_std)
        self.user_bias = table(rngs.params(), num_users, 1, ("user", None))
        self.item_bias = table(rngs.params(), num_items, 1, ("item", None))
        self.global_bias = nnx.Param(jnp.asarray(global_bias, jnp.float32), axes=())

    def score(self, rows, batch) -> jax.Array:
        p = rows["user_embed"]["user"]
        q = rows["item_embed"]["item"]
        return (self.global_bias[...] + rows["user_bias"]["user"][:, 0]
                + rows["item_bias"]["item"][:, 0] + jnp.sum(p * q, axis=-1))
