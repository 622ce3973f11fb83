"""Sharded training on 8 CPU devices: same numbers on every mesh, tables really sharded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hydra import compose, initialize_config_dir

from jaxreco import config, losses, optim
from jaxreco.cli import CONF_DIR
from jaxreco.embedding import ShardedTables
from jaxreco.models.mf import MF
from jaxreco.sharding import batch_sharding, make_mesh
from jaxreco.train.state import create_state, table_axes
from jaxreco.train.step import make_group_step, make_train_step

GOLDEN = Path(__file__).parent / "golden" / "state_shardings.json"
USERS, ITEMS, DIM, BATCH = 256, 128, 8, 64
config.register()


def _preset(name):
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=[f"mesh={name}"])
    return dict(cfg.mesh.axes), dict(cfg.mesh.rules)


def _setup(axes, rules, optimizer="lazy_adam", **table_kw):
    mesh = make_mesh(axes)
    row_opt = optim.row_optimizer(optimizer, lr=0.05)
    tx = optim.dense_optimizer("adam", 0.01)
    graphdef, state, shardings = create_state(
        lambda: MF(USERS, ITEMS, dim=DIM, init_std=0.1, global_bias=3.0, rngs=nnx.Rngs(0)),
        row_opt, tx, mesh, rules)
    tables = ShardedTables(mesh, rules, table_axes(state.tables), MF.table_features, row_opt,
                           **table_kw)

    def loss_fn(model, rows, batch):
        pred = model.score(rows, batch)
        return losses.mse_frobenius(pred, batch["rating"], rows,
                                    embedding_tables=MF.embedding_tables, reg=0.01), {}

    raw = make_train_step(graphdef, tables, loss_fn, tx)
    step = jax.jit(raw, in_shardings=(shardings, batch_sharding(mesh, rules)),
                   out_shardings=(shardings, None), donate_argnums=0)
    step.tables, step.raw, step.shardings = tables, raw, shardings
    return mesh, state, step


def _batches(n=12):
    rng = np.random.default_rng(0)
    # Skewed ids (repeats within and across shards) exercise the dedup paths.
    return [{"user": (rng.zipf(1.3, BATCH) % USERS).astype(np.int32),
             "item": (rng.zipf(1.3, BATCH) % ITEMS).astype(np.int32),
             "rating": rng.integers(1, 6, BATCH).astype(np.float32)} for _ in range(n)]


def _train(preset, optimizer="lazy_adam"):
    axes, rules = _preset(preset) if isinstance(preset, str) else preset
    mesh, state, step = _setup(axes, rules, optimizer)
    for b in _batches():
        state, m = step(state, b)
        jax.block_until_ready(state)      # bounded in-flight collectives on CPU
    return mesh, state


@pytest.mark.parametrize("preset", ["single", pytest.param("dp_mp", marks=pytest.mark.slow)])
def test_group_step_gives_the_parameters_of_one_call_per_step(preset):
    """trainer.steps_per_call's program (make_group_step) on sharded tables: full groups of
    K = 5 and a shorter last group (count < K, the rest of the stack ignored) give the
    parameters of one call per step."""
    K = 5
    axes, rules = _preset(preset)
    _, want = _train((axes, rules))
    mesh, state, step = _setup(axes, rules)
    stacked_sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, *batch_sharding(mesh, rules).spec))
    group = jax.jit(make_group_step(step.raw, K),
                    in_shardings=(step.shardings, stacked_sharding, None),
                    out_shardings=(step.shardings, None), donate_argnums=0)
    batches = _batches()
    assert len(batches) % K != 0                  # the last group is a short one
    for i in range(0, len(batches), K):
        part = batches[i:i + K]
        part = part + [part[-1]] * (K - len(part))   # padding the program must ignore
        stack = {k: np.stack([b[k] for b in part]) for k in batches[0]}
        state, m = group(state, stack, np.int32(min(K, len(batches) - i)))
        jax.block_until_ready(state)
    assert m["loss"].shape == (K,) and int(state.step) == len(batches)
    got, ref = _params(state), _params(want)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _params(state):
    out = {t: np.asarray(v) for t, v in state.table_values().items()}
    out["global_bias"] = np.asarray(state.dense["global_bias"][...])
    return out


@pytest.mark.parametrize("optimizer, presets", [
    ("lazy_adam", ("dp", "mp", "dp_mp")), ("adagrad", ("dp_mp",)), ("sgd", ("dp_mp",))])
def test_meshes_give_the_same_parameters(optimizer, presets):
    assert jax.device_count() == 8
    ref = _params(_train("single", optimizer)[1])
    for preset in presets:
        got = _params(_train(preset, optimizer)[1])
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=0, err_msg=f"{preset} {k}")
    moved = np.abs(ref["user_embed"] - _params(_setup(*_preset("single"))[1])["user_embed"]).max()
    assert moved > 1e-3          # training really changed the tables


def test_dp_mp_2x4_explicit_shape():
    axes, rules = _preset("dp_mp")
    mesh, state = _train(({"data": 2, "model": 4}, rules))
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    ref = _params(_train("single")[1])
    np.testing.assert_allclose(_params(state)["item_embed"], ref["item_embed"], atol=1e-5)


def _spec_tree(state):
    def spec(x):
        return str(x.sharding.spec)
    return {"tables": {t: spec(v) for t, v in state.table_values().items()},
            "table_opt": {t: {s: spec(v) for s, v in sl.items()} for t, sl in state.table_opt.items()},
            "dense": {"global_bias": spec(state.dense["global_bias"][...])},
            "step": spec(state.step)}


def test_state_shardings_match_golden():
    got = {p: _spec_tree(_setup(*_preset(p))[1]) for p in ("single", "dp", "mp", "dp_mp")}
    want = json.loads(GOLDEN.read_text())
    assert got == want


def test_row_sharded_tables_use_a_fraction_of_device_memory():
    """Per-device table bytes scale as 1/model; the compiled step never holds a whole table."""
    big_users = 64 * 1024
    axes, rules = _preset("mp")
    mesh = make_mesh(axes)
    row_opt = optim.row_optimizer("adagrad", lr=0.05)
    tx = optim.dense_optimizer("adam", 0.01)
    graphdef, state, shardings = create_state(
        lambda: MF(big_users, big_users, dim=32, init_std=0.1, rngs=nnx.Rngs(0)),
        row_opt, tx, mesh, rules)
    table = state.table_values()["user_embed"]
    shard_bytes = {s.data.nbytes for s in table.addressable_shards}
    assert shard_bytes == {table.nbytes // 8}
    tables = ShardedTables(mesh, rules, table_axes(state.tables), MF.table_features, row_opt)

    def loss_fn(model, rows, batch):
        return jnp.mean(jnp.square(model.score(rows, batch) - batch["rating"])), {}

    step = jax.jit(make_train_step(graphdef, tables, loss_fn, tx),
                   in_shardings=(shardings, batch_sharding(mesh, rules)),
                   out_shardings=(shardings, None), donate_argnums=0)
    b = {k: jax.ShapeDtypeStruct((256,), v) for k, v in
         (("user", jnp.int32), ("item", jnp.int32), ("rating", jnp.float32))}
    compiled = step.lower(state, b).compile()
    mem = compiled.memory_analysis()
    whole = table.nbytes
    # Temporaries are batch-sized: far below one whole table (a gathered table would be 8 MiB).
    assert mem.temp_size_in_bytes < whole / 8, mem
    hlo = compiled.as_text()
    assert f"f32[{big_users},32]" not in hlo.replace(" ", "")


# ---------------------------------------------------------------- routed (owner) layout
def _run(preset, batches, optimizer="adagrad", **table_kw):
    """Trains on ``batches``; returns the parameters and each batch's routing rounds."""
    axes, rules = _preset(preset) if isinstance(preset, str) else preset
    _, state, step = _setup(axes, rules, optimizer, **table_kw)
    rounds = []
    for b in batches:
        if any(step.tables.routed.values()):
            rounds.append(step.tables.rounds(state.table_values(), b))
        state, _ = step(state, b)
        jax.block_until_ready(state)
    return _params(state), rounds


def _check_same(batches, presets=("dp_mp", "mp"), optimizer="adagrad", **table_kw):
    ref, _ = _run("single", batches, optimizer)
    all_rounds = {}
    for preset in presets:
        got, rounds = _run(preset, batches, optimizer, **table_kw)
        all_rounds[preset] = rounds
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=0, err_msg=f"{preset} {k}")
    return all_rounds


def _batch(user, item, seed=0):
    user, item = np.asarray(user, np.int32), np.asarray(item, np.int32)
    return {"user": user, "item": item,
            "rating": np.random.default_rng(seed).integers(1, 6, len(user)).astype(np.float32)}


def test_dp_mp_rows_have_one_owner_and_use_routing():
    axes, rules = _preset("dp_mp")
    _, state, step = _setup(axes, rules)
    assert all(step.tables.routed.values())
    t = state.table_values()["user_embed"]
    assert {s.data.shape for s in t.addressable_shards} == {(USERS // 8, DIM)}
    assert len({s.index[0].start for s in t.addressable_shards}) == 8     # no replica


@pytest.mark.parametrize("optimizer", ["adagrad", pytest.param("lazy_adam", marks=pytest.mark.slow)])
def test_capacity_overflow_takes_extra_rounds_and_stays_exact(optimizer):
    # Zipf ids with capacity 1 per (device, owner): most batches overflow.
    rounds = _check_same(_batches(6), optimizer=optimizer, capacity_factor=0.01)
    for preset, rs in rounds.items():
        assert max(max(r.values()) for r in rs) > 2, (preset, rs)


def test_default_capacity_is_one_round_for_spread_ids():
    rng = np.random.default_rng(1)
    batches = [_batch(rng.permutation(USERS)[:BATCH], rng.permutation(ITEMS)[:BATCH], s)
               for s in range(4)]
    rounds = _check_same(batches, capacity_factor=8.0)
    assert all(r == {"user_embed": 1, "item_embed": 1} for rs in rounds.values() for r in rs)


def test_all_ids_on_one_owner():
    # Every id in the first owner's row range (32 rows on 8 devices): 64 ids, 1/8 capacity.
    rng = np.random.default_rng(2)
    batches = [_batch(rng.integers(0, USERS // 8, BATCH), rng.integers(0, ITEMS // 8, BATCH), s)
               for s in range(4)]
    rounds = _check_same(batches)
    assert all(max(r.values()) > 1 for rs in rounds.values() for r in rs)


def test_repeated_id_is_sent_once():
    # One id repeated over the whole batch: each device sends it once, whatever the capacity.
    batches = [_batch([7] * BATCH, [100] * BATCH, s) for s in range(3)]
    rounds = _check_same(batches, capacity_factor=0.01)
    assert all(r == {"user_embed": 1, "item_embed": 1} for rs in rounds.values() for r in rs)


def test_batch_not_divisible_by_device_count():
    rng = np.random.default_rng(3)
    batches = [_batch(rng.integers(0, USERS, 60), rng.integers(0, ITEMS, 60), s)
               for s in range(3)]
    _check_same(batches, presets=("mp",), capacity_factor=0.5)


def test_unique_inverse_matches_jnp_unique():
    rng = np.random.default_rng(4)
    for n, rows in ((1, 5), (64, 10), (300, 1000), (513, 1 << 24)):
        ids = jnp.asarray(rng.integers(-2, rows + 2, n), jnp.int32)
        clean = jnp.where((ids >= 0) & (ids < rows), ids, rows)
        # a batch touches at most rows + 1 distinct ids (the rows and the padding id)
        size = min(n, rows + 1)
        want_u, want_inv = jnp.unique(clean, size=size, fill_value=rows, return_inverse=True)
        got_u, got_inv = optim.unique_inverse(ids, rows)
        assert got_u.shape == (size,)
        np.testing.assert_array_equal(got_u, want_u)
        np.testing.assert_array_equal(got_inv, want_inv.reshape(-1))



def test_dp_update_is_split_by_row_range_and_exact():
    # Replicated tables: each device runs the row optimizer on its row range only, the new
    # rows are all-gathered; the parameters match one device (adagrad; lazy_adam above).
    axes, rules = _preset("dp")
    _, _, step = _setup(axes, rules, "adagrad")
    assert not any(step.tables.routed.values())
    assert all(step.tables._replicated_routed(ra) for ra in step.tables.row_axes.values())
    _check_same(_batches(4), presets=("dp",), optimizer="adagrad")


def test_update_without_the_lookups_plan_routes_again_and_agrees():
    # The step reuses the lookup's routing; update() called alone routes again (first round,
    # then the rounds of a skewed batch) and gives the same tables.
    axes, rules = _preset("dp_mp")
    mesh, state, step = _setup(axes, rules, "adagrad", capacity_factor=0.01)
    tables, b = step.tables, _batches(1)[0]
    values, slots = state.table_values(), state.table_opt
    grads = jax.jit(lambda v, b: jax.tree.map(lambda r: 0.1 * r + 0.01,
                                              tables.lookup(v, b)))(values, b)

    def run(with_plan):
        def f(v, s, b, g):
            plans = tables.lookup_and_plan(v, b)[1] if with_plan else None
            return tables.update(v, s, b, g, jnp.int32(0), plans)
        return jax.block_until_ready(jax.jit(f)(values, slots, b, grads))

    (t1, s1), (t2, s2) = run(True), run(False)
    for k in t1:
        np.testing.assert_allclose(np.asarray(t1[k]), np.asarray(t2[k]), atol=1e-6, err_msg=k)
        np.testing.assert_allclose(np.asarray(s1[k]["acc"]), np.asarray(s2[k]["acc"]),
                                   atol=1e-6, err_msg=k)
        assert float(np.abs(np.asarray(t1[k]) - np.asarray(values[k])).max()) > 0, k


@pytest.mark.parametrize("preset", ["dp_mp", pytest.param("mp", marks=pytest.mark.slow),
                                    pytest.param("dp", marks=pytest.mark.slow)])
def test_group_features_of_different_lengths_look_up_and_update_exactly(preset):
    # One table read through features of different lengths (items [B] with negatives [B·k],
    # a sequence's [B·L] inputs with [S] candidates): each feature gets its own rows, and the
    # update equals the single-device one.
    feats = dict(MF.table_features, item_embed=("item", "neg_item"))
    rng = np.random.default_rng(5)
    b = {"user": rng.integers(0, USERS, BATCH).astype(np.int32),
         "item": rng.integers(0, ITEMS, BATCH).astype(np.int32),
         "neg_item": rng.integers(0, ITEMS, 3 * BATCH).astype(np.int32)}
    out = {}
    for name in ("single", preset):
        axes, rules = _preset(name)
        mesh = make_mesh(axes)
        row_opt = optim.row_optimizer("adagrad", lr=0.05)
        _, state, _ = create_state(
            lambda: MF(USERS, ITEMS, dim=DIM, init_std=0.1, global_bias=3.0, rngs=nnx.Rngs(0)),
            row_opt, optim.dense_optimizer("adam", 0.01), mesh, rules)
        tables = ShardedTables(mesh, rules, table_axes(state.tables), feats, row_opt)
        values, slots = state.table_values(), state.table_opt

        def f(v, s, b):
            rows, plans = tables.lookup_and_plan(v, b)
            grads = jax.tree.map(lambda r: 0.1 * r + 0.01, rows)
            return rows, tables.update(v, s, b, grads, jnp.int32(0), plans)
        rows, (new_v, _) = jax.block_until_ready(jax.jit(f)(values, slots, b))
        want = np.asarray(values["item_embed"])
        np.testing.assert_allclose(np.asarray(rows["item_embed"]["neg_item"]),
                                   want[b["neg_item"]], rtol=0, atol=0)
        np.testing.assert_allclose(np.asarray(rows["item_embed"]["item"]), want[b["item"]],
                                   rtol=0, atol=0)
        out[name] = {t: np.asarray(v) for t, v in new_v.items()}
    for t in out["single"]:
        np.testing.assert_allclose(out[preset][t], out["single"][t], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("preset", ["dp_mp", "mp"])
def test_a_step_routes_every_table_group_through_one_exchange(preset):
    # MF's user and item groups share one routing: ids and rows travel once in the lookup
    # and gradients once in the update (3 all_to_all, not 3 per group). (Capacity 8: one
    # round always fits, so the step has no rounds loop.)
    want = {"all-to-all": 3, "all-gather": 0}
    axes, rules = _preset(preset)
    mesh, state, step = _setup(axes, rules, "adagrad", capacity_factor=8.0)
    b = {k: jax.ShapeDtypeStruct((BATCH,), v) for k, v in
         (("user", jnp.int32), ("item", jnp.int32), ("rating", jnp.float32))}
    hlo = step.lower(state, b).compile().as_text()
    got = {op: len(re.findall(rf"\) {op}\(|\]\S* {op}\(", hlo)) for op in want}
    assert got == want, got
