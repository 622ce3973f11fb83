"""Biased MF: forward formula, loss gradient against finite differences, a learning step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreco import losses, optim
from jaxreco.models.layers import gather_rows
from jaxreco.models.mf import MF
from jaxreco.sharding import make_mesh
from jaxreco.embedding import ShardedTables
from jaxreco.train.state import create_state, table_axes
from jaxreco.train.step import make_train_step

def _model():
    m = MF(7, 5, dim=3, init_std=0.5, global_bias=3.0, rngs=nnx.Rngs(0))
    m.user_bias[...] = jnp.arange(7, dtype=jnp.float32)[:, None] * 0.1
    m.item_bias[...] = -jnp.arange(5, dtype=jnp.float32)[:, None] * 0.2
    return m


BATCH = {"user": jnp.array([0, 3, 6, 3]), "item": jnp.array([4, 1, 0, 1]),
         "rating": jnp.array([4.0, 2.0, 5.0, 3.0])}


def test_forward_is_biased_dot_product():
    m = _model()
    u, i = np.asarray(BATCH["user"]), np.asarray(BATCH["item"])
    p, q = np.asarray(m.user_embed[...]), np.asarray(m.item_embed[...])
    want = 3.0 + 0.1 * u - 0.2 * i + (p[u] * q[i]).sum(1)
    np.testing.assert_allclose(m(BATCH), want, rtol=1e-6)


_M = _model()


@jax.jit
def _loss_of_tables(tables, reg):
    m = _M
    rows = gather_rows(tables, BATCH, MF.table_features)
    pred = m.score(rows, BATCH)
    return losses.mse_frobenius(pred, BATCH["rating"], rows, embedding_tables=MF.embedding_tables,
                                bias_tables=("user_bias", "item_bias"), reg=reg, bias_reg=0.01)


def test_gradient_matches_finite_differences():
    m = _model()
    tables = {t: getattr(m, t)[...] for t in MF.table_features}
    reg = 0.05
    g = jax.grad(_loss_of_tables)(tables, reg)
    eps = 1e-2
    rng = np.random.default_rng(0)
    for t in ("user_embed", "item_embed", "user_bias", "item_bias"):
        for _ in range(4):
            r = int(rng.integers(tables[t].shape[0])); c = int(rng.integers(tables[t].shape[1]))
            plus = dict(tables); plus[t] = tables[t].at[r, c].add(eps)
            minus = dict(tables); minus[t] = tables[t].at[r, c].add(-eps)
            fd = (_loss_of_tables(plus, reg) - _loss_of_tables(minus, reg)) / (2 * eps)
            np.testing.assert_allclose(g[t][r, c], fd, rtol=2e-2, atol=2e-4)


def test_frobenius_term_is_per_observed_rating():
    m = _model()
    rows = gather_rows({t: getattr(m, t)[...] for t in MF.table_features}, BATCH, MF.table_features)
    p, q = np.asarray(m.user_embed[...]), np.asarray(m.item_embed[...])
    u, i = np.asarray(BATCH["user"]), np.asarray(BATCH["item"])
    want = ((p[u] ** 2).sum(1) + (q[i] ** 2).sum(1))
    np.testing.assert_allclose(losses.frobenius_rows(rows, MF.embedding_tables), want, rtol=1e-6)


def test_train_step_lowers_loss_and_only_touches_batch_rows():
    mesh = make_mesh({"data": 1, "model": 1}, jax.devices()[:1])
    rules = {"batch": "data", "user": "model", "item": "model", "embed": None}
    row_opt = optim.row_optimizer("lazy_adam", lr=0.05)
    tx = optim.dense_optimizer("adam", 0.01)
    graphdef, state, _ = create_state(_model, row_opt, tx, mesh, rules)
    before = {t: np.asarray(v) for t, v in state.table_values().items()}

    def loss_fn(model, rows, batch):
        pred = model.score(rows, batch)
        return losses.mse_frobenius(pred, batch["rating"], rows,
                                    embedding_tables=MF.embedding_tables, reg=0.0), {}

    tables = ShardedTables(mesh, rules, table_axes(state.tables), MF.table_features, row_opt)
    step = jax.jit(make_train_step(graphdef, tables, loss_fn, tx))
    state, m0 = step(state, BATCH)
    for _ in range(30):
        state, m = step(state, BATCH)
    assert float(m["loss"]) < 0.1 * float(m0["loss"])
    after = state.table_values()
    untouched_users = np.setdiff1d(np.arange(7), np.asarray(BATCH["user"]))
    np.testing.assert_array_equal(after["user_embed"][untouched_users],
                                  before["user_embed"][untouched_users])
    assert int(state.step) == 31
