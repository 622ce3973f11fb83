"""Row-sparse optimizers equal the dense optimizer restricted to the touched rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxreco import optim

ROWS, DIM = 50, 4


def _case(seed=0):
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.normal(size=(ROWS, DIM)), jnp.float32)
    ids = jnp.asarray([3, 7, 3, 11, 7, 3, 0, 49], jnp.int32)       # repeats on purpose
    grads = jnp.asarray(rng.normal(size=(len(ids), DIM)), jnp.float32)
    dense_grad = jnp.zeros_like(table).at[ids].add(grads)
    return table, ids, grads, dense_grad


def test_dedup_sums_repeated_ids():
    _, ids, grads, dense_grad = _case()
    uids, ug = optim.dedup(ids, grads, ROWS)
    valid = uids < ROWS
    np.testing.assert_array_equal(np.sort(np.asarray(uids[valid])), [0, 3, 7, 11, 49])
    np.testing.assert_allclose(ug[valid], dense_grad[uids[valid]], rtol=1e-6)
    assert np.all(np.asarray(uids[~valid]) == ROWS) and np.all(np.asarray(ug[~valid]) == 0)


@pytest.mark.parametrize("name, dense_tx", [
    ("sgd", optax.sgd(0.1)),
    ("lazy_adam", optax.adam(0.1, eps=1e-8)),
])
def test_sparse_equals_dense_on_touched_rows(name, dense_tx):
    table, ids, grads, dense_grad = _case()
    opt = optim.row_optimizer(name, lr=0.1)
    slots = opt.init(table)
    dense_state = dense_tx.init(table)
    t_sparse, t_dense = table, table
    for step in range(3):   # several steps: moments and bias correction must agree
        t_sparse, slots = opt.update(t_sparse, slots, ids, grads, jnp.int32(step))
        upd, dense_state = dense_tx.update(dense_grad, dense_state, t_dense)
        t_dense = optax.apply_updates(t_dense, upd)
    touched = np.unique(np.asarray(ids))
    untouched = np.setdiff1d(np.arange(ROWS), touched)
    np.testing.assert_allclose(t_sparse[touched], t_dense[touched], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(t_sparse[untouched], table[untouched])


def test_rowwise_adagrad_matches_formula():
    table, ids, grads, dense_grad = _case()
    opt = optim.row_optimizer("adagrad", lr=0.5)
    slots = opt.init(table)
    new, slots = opt.update(table, slots, ids, grads, jnp.int32(0))
    touched = np.unique(np.asarray(ids))
    acc = np.mean(np.asarray(dense_grad) ** 2, axis=1)
    want = np.asarray(table) - 0.5 * np.asarray(dense_grad) / (np.sqrt(acc)[:, None] + 1e-8)
    np.testing.assert_allclose(new[touched], want[touched], rtol=1e-5)
    np.testing.assert_allclose(slots["acc"][touched], acc[touched], rtol=1e-6)
    assert float(jnp.abs(slots["acc"]).sum()) == pytest.approx(acc[touched].sum(), rel=1e-6)


def test_unknown_optimizer_names_choices():
    with pytest.raises(ValueError, match=r"optimizer.table.name='adamx' is unknown; choose one of \["):
        optim.row_optimizer("adamx", lr=0.1)


def test_sparse_update_cost_does_not_touch_whole_table():
    """The compiled update reads/writes O(batch) rows: no full-table-sized temporaries."""
    opt = optim.row_optimizer("lazy_adam", lr=0.1)
    rows, batch = 200_000, 64
    table = jax.ShapeDtypeStruct((rows, DIM), jnp.float32)
    slots = jax.eval_shape(opt.init, table)
    ids = jax.ShapeDtypeStruct((batch,), jnp.int32)
    grads = jax.ShapeDtypeStruct((batch, DIM), jnp.float32)
    f = jax.jit(opt.update, donate_argnums=(0, 1))
    compiled = f.lower(table, slots, ids, grads, jax.ShapeDtypeStruct((), jnp.int32)).compile()
    mem = compiled.memory_analysis()
    table_bytes = rows * DIM * 4
    assert mem.temp_size_in_bytes < table_bytes / 10, mem


def test_dense_adam_equals_optax_adam_on_every_row():
    table, ids, grads, dense_grad = _case()
    opt = optim.row_optimizer("adam", lr=0.1)
    slots, tx = opt.init(table), optax.adam(0.1, eps=1e-8)
    dense_state = tx.init(table)
    t_rows, t_dense = table, table
    # step 2 touches other rows: rows touched only earlier keep moving with their momentum
    for step, (i, g) in enumerate([(ids, grads), (ids, grads), (ids[:2] + 1, grads[:2])]):
        t_rows, slots = opt.update(t_rows, slots, i, g, jnp.int32(step))
        upd, dense_state = tx.update(jnp.zeros_like(table).at[i].add(g), dense_state, t_dense)
        t_dense = optax.apply_updates(t_dense, upd)
    np.testing.assert_allclose(t_rows, t_dense, rtol=1e-5, atol=1e-6)
    assert not np.allclose(t_rows[11], table[11])   # touched at steps 0-1 only, still moved


@pytest.mark.parametrize("name", ["sgd", "adagrad", "lazy_adam", "adam"])
def test_decaying_schedule_scales_the_step(name):
    table, ids, grads, _ = _case()
    const = optim.row_optimizer(name, lr=0.1)
    lin = optim.row_optimizer(name, lr=optim.schedule(0.1, "linear", 10))
    at = lambda opt, step: opt.update(table, opt.init(table), ids, grads, jnp.int32(step))[0]  # noqa: E731
    np.testing.assert_allclose(at(lin, 0), at(const, 0), rtol=1e-6)    # full rate at step 0
    np.testing.assert_allclose(at(lin, 10), table, rtol=1e-6)          # zero at the end
    with pytest.raises(ValueError, match="optimizer.schedule='step'"):
        optim.schedule(0.1, "step", 10)
