"""EmbedMLP: every combiner overfits a tiny set; the three scoring layouts agree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxreco import losses
from jaxreco.models import build
from jaxreco.models.embed_mlp import COMBINERS, EmbedMLP
from jaxreco.train.state import split_model

SIDE = {"category": 4}
CTX = {"position": 3}


def _tiny(n=48, seed=0):
    rng = np.random.default_rng(seed)
    pair = rng.choice(8 * 12, n, replace=False)           # distinct (user, item) pairs
    b = {"user": pair // 12, "item": pair % 12, "position": rng.integers(0, 3, n)}
    b["category"] = b["item"] % 4
    y = rng.integers(0, 2, n).astype(np.float32)          # arbitrary labels: memorise them
    return {k: jnp.asarray(v, jnp.int32) for k, v in b.items()}, jnp.asarray(y)


@pytest.mark.parametrize("combiner", COMBINERS)
def test_each_combiner_overfits_a_tiny_set(combiner):
    batch, y = _tiny()
    # linear (logistic regression) needs context to separate repeated (user, item) pairs;
    # every model sees the same features
    m = EmbedMLP(8, 12, combiner=combiner, dim=8, mf_dim=8, mlp_dims=(32, 16),
                 side_features=SIDE, context_features=CTX, init_std=0.1, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(m, optax.adam(0.05), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt):
        def f(m):
            return jnp.mean(losses.bce_with_logits(m(batch), y))
        loss, g = nnx.value_and_grad(f)(m)
        opt.update(m, g)
        return loss

    for _ in range(400):
        loss = step(m, opt)
    acc = float(jnp.mean((m(batch) > 0) == (y > 0)))
    # 48 random labels on distinct (user, item) pairs: the factorised models memorise them;
    # logistic regression (first-order terms only) can separate just part of them
    floor = {"linear": 0.75}.get(combiner, 1.0)
    assert acc >= floor, (combiner, acc, float(loss))


@pytest.mark.parametrize("combiner", ["dot", "gmf", "mlp", "both", "linear"])
def test_point_rows_all_layouts_agree(combiner):
    m = EmbedMLP(5, 7, combiner=combiner, dim=4, mf_dim=3, mlp_dims=(6, 4), side_features=SIDE,
                 init_std=0.3, heads=("click", "rating"), rngs=nnx.Rngs(1))
    # non-zero biases so every term is exercised
    m.user_bias[...] = jnp.arange(5.0)[:, None] * 0.1
    items = jnp.arange(7)
    it = m.item_repr({"item_mf": {"item": m.item_mf[...]} if m.use_mf else {},
                      "item_embed": {"item": m.item_embed[...]} if m.use_mlp else {},
                      "category_embed": {"category": m.category_embed[items % 4]} if m.use_mlp else {},
                      "item_bias": {"item": m.item_bias[...]},
                      "category_bias": {"category": m.category_bias[items % 4]}})
    users = jnp.arange(5)
    ur = m.user_repr({"user_mf": {"user": m.user_mf[...]} if m.use_mf else {},
                      "user_embed": {"user": m.user_embed[...]} if m.use_mlp else {},
                      "user_bias": {"user": m.user_bias[...]}})
    full = m.interact(ur, it, "all")                                  # [5, 7]
    cand = jnp.asarray([[0, 3, 6], [1, 1, 2], [5, 4, 0], [2, 2, 2], [6, 0, 1]])
    rows = m.interact(ur, jax.tree.map(lambda x: x[cand], it), "rows")  # [5, 3]
    uu, ii = jnp.meshgrid(users, items, indexing="ij")
    point = m({"user": uu.ravel(), "item": ii.ravel(), "category": ii.ravel() % 4})
    np.testing.assert_allclose(full["click"].ravel(), point, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["click"], np.take_along_axis(np.asarray(full["click"]),
                                                                 np.asarray(cand), 1), rtol=1e-5)
    assert set(full) == {"click", "rating"}


def test_tables_carry_logical_axes_and_negative_features():
    cfg = {"name": "embed_mlp", "combiner": "both", "dim": 4, "mf_dim": 4, "mlp_dims": [8],
           "bias": True, "heads": ["click"], "init_std": 0.01, "row_multiple": 16}
    m = build(cfg, num_users=10, num_items=20, global_bias=0.0, seed=0,
              side_vocab={"category": 5}, negatives=True)()
    _, tables, dense = split_model(m)
    axes = {k: tuple(v.get_metadata()["axes"]) for k, v in tables.items()}
    assert axes["user_mf"] == ("user", "embed") and axes["item_embed"] == ("item", "embed")
    assert axes["category_embed"] == (None, "embed")
    assert tables["user_mf"][...].shape == (16, 4) and tables["item_mf"][...].shape == (32, 4)
    assert m.table_features["item_mf"] == ("item", "neg_item")
    assert m.table_features["category_embed"] == ("category", "neg_category")
    for path, v in jax.tree_util.tree_flatten_with_path(
            dense, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        assert v.get_metadata().get("axes") is not None, path


def test_bad_combiner_names_the_field():
    with pytest.raises(ValueError, match="model.combiner='nope'"):
        EmbedMLP(2, 2, combiner="nope", rngs=nnx.Rngs(0))
