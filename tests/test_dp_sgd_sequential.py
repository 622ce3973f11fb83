"""privacy=dp with the sequential model (model=sequential, task.kind=next_item): user-level
DP-SGD over one window of each Poisson-sampled user (jaxreco/privacy/dp_sgd.py), and the
resume of a DP-SGD run (sequential and MF)."""

from __future__ import annotations

import json
import logging
import math

import jax
import numpy as np
import pytest
from flax import nnx

from jaxreco import config
from jaxreco.privacy import dp_sgd
from jaxreco.run import restore_run
from jaxreco.sharding import make_mesh
from jaxreco.train import setup, tasks as tasks_lib

from tests.conftest import write_ratings_dat
from support import compose_train, train

L = 6


def _over(tmp_path, *extra):
    d = write_ratings_dat(tmp_path / "ml", num_users=50, num_items=80, n=1200)
    return ["experiment=ml1m_sasrec_dp", f"dataset.path={d}", "task.prepare.negatives.num=9",
            "model.dim=8", f"model.max_len={L}", "model.num_blocks=1",
            "task.next_item.num_sampled=16", "trainer.progress_bar=false",
            "logger.tensorboard=false", "privacy.users_per_step=16",
            "privacy.max_examples_per_user=4", *extra]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny ml1m_sasrec_dp run's model state, plan and jitted DP step (SGD at rate 1, so
    that an update is minus the noisy mean gradient), the windows of every user plus 3
    padding slots at step 0, and a state with larger item rows (gradients not tiny)."""
    tmp = tmp_path_factory.mktemp("dp_seq")
    cfg = compose_train(_over(tmp, "privacy.clip_norm=0.05", "privacy.epsilon=null",
                              "privacy.noise_multiplier=1.5", "optimizer=sgd", "optimizer.lr=1",
                              "optimizer.dense_lr=1"))
    config.validate(cfg)
    task = tasks_lib.build(cfg, tasks_lib.PreparedData.prepare(cfg))
    ms = setup.model_state(cfg, task, make_mesh(cfg.mesh.axes))
    pl = dp_sgd.plan(cfg.privacy, num_users=task.num_users, steps=ms.total_steps, seed=0)
    rows = {t: int(v.shape[0]) for t, v in ms.state.table_values().items()}
    loss_fn = task.loss_fn(ms.abstract_model)
    ug = dp_sgd.make_window_gradients(ms.graphdef, ms.tables, loss_fn, rows)
    step = jax.jit(dp_sgd.make_dp_step(ms.graphdef, ms.tables, loss_fn, ms.dense_tx, pl, rows, ug))
    users = np.arange(task.num_users + 3, dtype=np.int32)[None]
    batch = dp_sgd.window_batch(task, users, 0, pl.max_examples_per_user)
    nobody = dp_sgd.window_batch(task, np.full_like(users, task.num_users), 0,
                                 pl.max_examples_per_user)
    st = ms.state
    tables = jax.tree.map(lambda v: v, st.tables)
    v = st.table_values()["item_embed"]
    tables["item_embed"] = st.tables["item_embed"].replace(
        0.5 * jax.random.normal(jax.random.key(1), v.shape))
    return dict(tmp=tmp, task=task, ms=ms, pl=pl, rows=rows, loss_fn=loss_fn, ug=ug, step=step,
                batch=batch, nobody=nobody, state=st.replace(tables=tables))


def _items(state):
    return np.asarray(state.table_values()["item_embed"])


def _dense(state):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state.dense))])


def test_windows_hold_one_window_per_user_and_at_most_k_targets(built):
    task, pl, (shared, xs) = built["task"], built["pl"], built["batch"]
    n = task.num_users
    assert xs["seq_item"].shape == (1, n + 3, L) and xs["item"].shape == (1, n + 3, L)
    targets = (xs["item"][0] >= 0).sum(1)
    assert targets.max() == pl.max_examples_per_user == 4 < L          # the bound binds
    assert np.all(xs["item"][0][:, :L - 4] == -1)                      # latest k kept
    assert np.all(targets[n:] == 0) and np.all(xs["seq_item"][0][n:] == -1)   # padding
    assert shared["cand_item"].shape == (16,)
    for u in range(n):                               # a window of the user's own sequence
        seq = task.seq.item[task.seq.start[u]:task.seq.start[u + 1]]
        w = xs["seq_item"][0][u]
        w = w[w >= 0]
        assert any(np.array_equal(seq[i:i + len(w)], w) for i in range(len(seq) - len(w) + 1))


def test_the_plan_reports_the_bound_a_window_actually_has(built):
    """k in the plan (and in metrics.json's privacy/max_examples_per_user) is min(k, L): a
    window holds at most L targets whatever privacy.max_examples_per_user says."""
    task, ms = built["task"], built["ms"]
    for k, want in ((4, 4), (L, L), (1000, L)):
        cfg = compose_train(_over(built["tmp"], f"privacy.max_examples_per_user={k}"))
        pl = dp_sgd.task_plan(cfg, task, ms)
        assert pl.max_examples_per_user == want
        assert pl.metrics(1)["privacy/max_examples_per_user"] == want


def test_each_users_clipped_contribution_is_at_most_C_and_is_what_the_step_adds(built):
    """Per user, the gradient over the whole item table (input, target and candidate rows,
    by jax.grad through the full table, independently of the per-row code) and every dense
    parameter has the norm the code clips; each clipped contribution has norm ≤ C; the step
    moves the item table and the dense parameters by minus the sum of the clipped
    contributions over the expected number of users plus the noise (SGD: linear, so the
    same step with nobody sampled gives the noise alone)."""
    task, ms, pl, state, rows = (built[k] for k in ("task", "ms", "pl", "state", "rows"))
    shared, xs = built["batch"]
    chunk = jax.tree.map(lambda v: v[0], xs)
    g_rows, g_dense, ex, _, count = jax.jit(built["ug"])(state, shared, chunk)
    _, clip = dp_sgd.make_functions(ms.graphdef, ms.tables, built["loss_fn"], pl, rows)
    scale, norm = clip(g_rows, g_dense, ex)
    scale, norm = np.asarray(scale), np.asarray(norm)
    assert int(count) == int((xs["item"] >= 0).sum())

    table0 = state.table_values()["item_embed"]

    @jax.jit
    def full_grad(table, dense, b):            # one user's loss through the whole table
        def loss(table, dense):
            model = nnx.merge(ms.graphdef, state.tables, dense)
            look = {f: table[jax.numpy.maximum(b[f], 0)] for f in ("seq_item", "item", "cand_item")}
            return built["loss_fn"](model, {"item_embed": look}, b)[0]
        return jax.grad(loss, argnums=(0, 1))(table, dense)

    n_rows = rows["item_embed"]
    full = []
    for u in range(chunk["user"].shape[0]):
        b = {c: v[u] for c, v in chunk.items() if c != "user"}
        gt, gd = full_grad(table0, state.dense, {**b, **shared})
        full.append(np.concatenate([np.ravel(gt), *[np.ravel(x) for x in jax.tree.leaves(gd)]]))
    full = np.stack(full)
    np.testing.assert_allclose(norm, np.linalg.norm(full, axis=1), rtol=1e-4, atol=1e-7)
    clipped = full * scale[:, None]
    assert np.linalg.norm(full, axis=1).max() > 5 * pl.clip_norm      # clipping is active
    assert np.linalg.norm(clipped, axis=1).max() <= pl.clip_norm * (1 + 1e-5)
    assert np.all(full[-3:] == 0)                                      # padding adds nothing
    touched = np.abs(full[:, :n_rows * 8].reshape(len(full), n_rows, 8)).sum((0, 2)) > 0
    assert set(np.flatnonzero(touched)) >= set(shared["cand_item"].tolist())  # candidates too

    new, m = built["step"](state, shared, xs)
    noise_only, _ = built["step"](state, *built["nobody"])
    expect = -clipped.sum(0) / pl.expected_users
    moved_t = _items(new) - _items(noise_only)
    np.testing.assert_allclose(moved_t, expect[:n_rows * 8].reshape(n_rows, 8), rtol=1e-3,
                               atol=1e-6)
    np.testing.assert_allclose(_dense(new) - _dense(noise_only), expect[n_rows * 8:],
                               rtol=1e-3, atol=1e-6)
    assert np.isfinite(float(m["loss"]))


def test_noise_on_every_row_and_parameter_has_std_sigma_C_and_is_seeded(built):
    """A step with no sampled user moves every item row and every dense parameter by noise
    alone (from zero parameters, so that no small update is lost to rounding): its std,
    times the denominator, is σC, its mean 0; the same seed and step give the same noise,
    another step other noise."""
    pl, state, step, nobody = (built[k] for k in ("pl", "state", "step", "nobody"))
    assert pl.noise_std == pytest.approx(1.5 * 0.05)
    tables = jax.tree.map(lambda v: v, state.tables)
    tables["item_embed"] = state.tables["item_embed"].replace(
        0 * state.table_values()["item_embed"])
    state = state.replace(tables=tables, dense=jax.tree.map(lambda x: 0 * x, state.dense))
    new, _ = step(state, *nobody)
    for before, after in ((_items(state), _items(new)), (_dense(state), _dense(new))):
        noise = (before - after) * pl.expected_users
        n = noise.size
        assert noise.std() == pytest.approx(pl.noise_std, rel=4 / math.sqrt(2 * n))
        assert abs(noise.mean()) < 4 * pl.noise_std / math.sqrt(n)
        assert np.all(noise != 0)                                      # every coordinate
    again, _ = step(state, *nobody)
    np.testing.assert_array_equal(_items(again), _items(new))
    other, _ = step(state.replace(step=state.step + 1), *nobody)
    assert not np.array_equal(_items(other), _items(new))


def test_popularity_candidates_are_refused_under_dp():
    cfg = compose_train(["experiment=ml1m_sasrec_dp", "task.sampler=popularity"])

    class Task:
        kind = "next_item"

    class Mesh:
        class devices:
            size = 1
    with pytest.raises(ValueError, match="task.sampler='popularity'.*task.sampler=uniform"):
        dp_sgd.check(cfg, Task, Mesh)


def _state(run):
    r = restore_run(run, full=False)
    leaves = jax.tree.leaves(jax.device_get((r.state.table_values(), r.state.dense)))
    return [np.asarray(x) for x in leaves]


def _metrics(run):
    m = json.loads((run / "metrics.json").read_text())
    return {k: v for k, v in m.items() if not k.startswith("perf/")}


def _same_seed_and_resume(tmp_path, caplog, over):
    """Two uninterrupted runs and one stopped after an epoch then restarted from its
    checkpoint give the same metrics and parameters."""
    full = [tmp_path / "a", tmp_path / "b"]
    for d in full:
        train(d, over)
    cut = tmp_path / "cut"
    half = _metrics(full[0])["train/steps"] // 2
    first = train(cut, [*over, f"trainer.max_steps={half}"])
    assert first["train/steps"] == half
    with caplog.at_level(logging.INFO, logger="jaxreco"):
        train(cut, over)                               # the same command: resumes
    assert f"step {half}" in "".join(r.getMessage() for r in caplog.records
                                     if r.getMessage().startswith("resumed from"))
    ref = _state(full[0])
    for d in (full[1], cut):
        assert _metrics(d) == _metrics(full[0])
        for x, y in zip(_state(d), ref):
            np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sequential_dp_sgd_same_seed_same_run_and_resume_equals_uninterrupted(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("JAXRECO_CACHE", str(tmp_path / "cache"))
    _same_seed_and_resume(tmp_path, caplog, _over(tmp_path, "trainer.epochs=2",
                                          "privacy.epsilon=null", "privacy.noise_multiplier=1"))


@pytest.mark.slow
def test_mf_dp_sgd_resume_equals_uninterrupted(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("JAXRECO_CACHE", str(tmp_path / "cache"))
    d = write_ratings_dat(tmp_path / "ml", num_users=40, num_items=60, n=1500)
    _same_seed_and_resume(tmp_path, caplog, [
        "experiment=ml1m_mf_dp", f"dataset.path={d}", "model.dim=8", "trainer.epochs=2",
        "trainer.progress_bar=false", "logger.tensorboard=false", "privacy.users_per_step=12",
        "privacy.max_examples_per_user=20", "privacy.epsilon=null", "privacy.noise_multiplier=1"])
