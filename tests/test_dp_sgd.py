"""privacy=dp with a gradient optimizer: user-level DP-SGD (jaxreco/privacy/dp_sgd.py) and
its accounting by dp-accounting (Poisson-subsampled Gaussian steps)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreco import config
from jaxreco.privacy import accounting, dp_sgd
from jaxreco.sharding import make_mesh
from jaxreco.train import setup, tasks as tasks_lib

from tests.conftest import write_ratings_dat
from support import compose_train, train


def _over(tmp_path, *extra):
    d = write_ratings_dat(tmp_path / "ml", num_users=40, num_items=60, n=1500)
    return ["experiment=ml1m_mf_dp", f"dataset.path={d}", "model.dim=8",
            "trainer.progress_bar=false", "privacy.users_per_step=12",
            "privacy.max_examples_per_user=20", *extra]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The real model state, DP plan, per-user data and jitted step of a tiny ml1m_mf_dp run
    (SGD at rate 1, so that an update is minus the noisy mean gradient)."""
    tmp = tmp_path_factory.mktemp("dp_sgd")
    cfg = compose_train(_over(tmp, "model.dim=16", "trainer.epochs=2", "privacy.clip_norm=0.05",
                              "privacy.epsilon=null", "privacy.noise_multiplier=1.5",
                              "optimizer=sgd", "optimizer.lr=1", "optimizer.dense_lr=1"))
    config.validate(cfg)
    task = tasks_lib.build(cfg, tasks_lib.PreparedData.prepare(cfg))
    ms = setup.model_state(cfg, task, make_mesh(cfg.mesh.axes))
    pl = dp_sgd.plan(cfg.privacy, num_users=task.num_users, steps=ms.total_steps, seed=0)
    data = jax.device_put(dp_sgd.user_blocks(task.transform(dict(task.train_cols), 0, 0),
                                             task.num_users, pl.max_examples_per_user, pl.seed))
    rows = {t: int(v.shape[0]) for t, v in ms.state.table_values().items()}
    step = jax.jit(dp_sgd.make_dp_step(ms.graphdef, ms.tables, task.loss_fn(ms.abstract_model),
                                       ms.dense_tx, pl, rows))
    users = jnp.arange(task.num_users + 4, dtype=jnp.int32)[None]     # 4 padding users
    nobody = jnp.full_like(users, task.num_users)
    return dict(task=task, ms=ms, pl=pl, data=data, rows=rows, step=step, users=users,
                nobody=nobody, state=_perturbed(ms))


def _perturbed(ms, scale=0.5):
    """The initial state with larger item/user rows, so that gradients are not tiny."""
    st = ms.state
    tables = jax.tree.map(lambda v: v, st.tables)
    for i, (t, v) in enumerate(st.table_values().items()):
        tables[t] = st.tables[t].replace(scale * jax.random.normal(jax.random.key(i), v.shape))
    return st.replace(tables=tables)


def _table(state, t):
    return np.asarray(state.table_values()[t])


def test_each_users_clipped_contribution_is_at_most_C_and_is_what_the_step_adds(built):
    """On the real per-user gradients: the shared part (item rows, item biases, μ; repeated
    items of a user summed) has the norm the code clips, each clipped contribution has norm
    ≤ C, and the step moves the item table by minus their sum over the expected number of
    users plus the noise (SGD is linear: the same step with nobody sampled gives the noise
    alone); user rows move by their own user's gradient only."""
    task, ms, pl, state, users = (built[k] for k in ("task", "ms", "pl", "state", "users"))
    ug, clip = dp_sgd.make_functions(ms.graphdef, ms.tables, task.loss_fn(ms.abstract_model),
                                     pl, built["rows"])
    g_rows, g_dense, ex, _, _ = jax.jit(ug)(state, built["data"], users[0])
    scale, norm = clip(g_rows, g_dense, ex)
    g_rows, ex = jax.device_get(g_rows), jax.device_get(ex)
    n_items, d = built["rows"]["item_embed"], 16
    full = []                                 # each user's shared gradient, dense, by numpy
    for u in range(users.shape[1]):
        gi, gb = np.zeros((n_items, d)), np.zeros((n_items, 1))
        np.add.at(gi, ex["item"][u], g_rows["item_embed"]["item"][u])
        np.add.at(gb, ex["item"][u], g_rows["item_bias"]["item"][u])
        dense = [np.ravel(x[u]) for x in jax.tree.leaves(jax.device_get(g_dense))]
        full.append(np.concatenate([gi.ravel(), gb.ravel(), *dense]))
    full = np.stack(full)
    np.testing.assert_allclose(np.asarray(norm), np.linalg.norm(full, axis=1), rtol=1e-4,
                               atol=1e-7)
    clipped = full * np.asarray(scale)[:, None]
    assert np.linalg.norm(full, axis=1).max() > 5 * pl.clip_norm      # clipping is active
    assert np.linalg.norm(clipped, axis=1).max() <= pl.clip_norm * (1 + 1e-5)
    assert np.all(full[-4:] == 0)                                      # padding adds nothing

    new, m = built["step"](state, built["data"], users)
    noise_only, _ = built["step"](state, built["data"], built["nobody"])
    moved = _table(new, "item_embed") - _table(noise_only, "item_embed")
    expect = -clipped[:, :n_items * d].sum(0).reshape(n_items, d) / pl.expected_users
    np.testing.assert_allclose(moved, expect, rtol=1e-3, atol=1e-6)
    own = g_rows["user_embed"]["user"].sum(1)[:task.num_users]
    np.testing.assert_allclose(_table(new, "user_embed")[:task.num_users]
                               - _table(state, "user_embed")[:task.num_users],
                               -own, rtol=1e-4, atol=1e-6)
    assert np.isfinite(float(m["loss"]))


def test_noise_on_every_row_has_std_sigma_C_and_is_seeded(built):
    """A step with no sampled user moves every item row by noise alone: its std, times the
    denominator, is σC (σ the multiplier the accountant was given), its mean 0; the same
    seed and step give the same noise, another step other noise."""
    pl, state, step, data, nobody = (built[k] for k in ("pl", "state", "step", "data", "nobody"))
    assert pl.noise_std == pytest.approx(1.5 * 0.05)
    new, _ = step(state, data, nobody)
    noise = (_table(state, "item_embed") - _table(new, "item_embed")) * pl.expected_users
    n = noise.size
    assert noise.std() == pytest.approx(pl.noise_std, rel=4 / math.sqrt(2 * n))
    assert abs(noise.mean()) < 4 * pl.noise_std / math.sqrt(n)
    assert np.all(noise != 0)                                          # every row moves
    again, _ = step(state, data, nobody)
    np.testing.assert_array_equal(_table(again, "item_embed"), _table(new, "item_embed"))
    other, _ = step(state.replace(step=state.step + 1), data, nobody)
    assert not np.array_equal(_table(other, "item_embed"), _table(new, "item_embed"))


def test_poisson_sampling_is_seeded_and_never_truncated():
    pl = dp_sgd.Plan(noise_multiplier=1.0, clip_norm=1.0, noise_std=1.0, sampling_rate=0.3,
                     num_users=1000, max_examples_per_user=4, delta=1e-3, steps=10, epsilon=1.0,
                     accountant="rdp", seed=7)
    a, b = dp_sgd.sample_users(pl, 3, 64), dp_sgd.sample_users(pl, 3, 64)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, dp_sgd.sample_users(pl, 4, 64))
    got = a[a < 1000]
    assert len(got) > 64 and a.shape[1] == 64                       # several chunks, none cut
    assert len(np.unique(got)) == len(got)
    sizes = [int((dp_sgd.sample_users(pl, s, 400) < 1000).sum()) for s in range(200)]
    assert np.mean(sizes) == pytest.approx(300, rel=0.02)            # Binomial(1000, 0.3)


def test_user_blocks_keep_at_most_k_examples_of_each_user():
    rng = np.random.default_rng(0)
    user = rng.integers(0, 20, 500)
    cols = {"user": user, "item": np.arange(500), "rating": rng.random(500)}
    b = dp_sgd.user_blocks(cols, 22, 7, seed=1)
    assert b["item"].shape == (22, 7)
    counts = np.bincount(user, minlength=22)
    np.testing.assert_array_equal(b["_mask"].sum(1), np.minimum(counts, 7))
    for u in range(22):
        kept = b["item"][u][b["_mask"][u]]
        assert np.all(user[kept] == u) and len(set(kept)) == len(kept)
        np.testing.assert_array_equal(b["rating"][u][b["_mask"][u]], cols["rating"][kept])


def test_epsilon_decreases_with_the_noise_and_calibration_round_trips():
    q, steps, delta = 0.05, 100, 1e-4
    eps = [accounting.epsilon(z, steps, delta, "rdp", q) for z in (0.8, 1.0, 1.5, 3.0)]
    assert all(a > b for a, b in zip(eps, eps[1:]))
    assert accounting.epsilon(1.0, steps, delta, "rdp", q) < accounting.epsilon(1.0, steps, delta)
    for target in (1.0, 3.0):
        z = accounting.noise_multiplier(target, steps, delta, "rdp", q)
        assert accounting.epsilon(z, steps, delta, "rdp", q) == pytest.approx(target, rel=1e-3)


def test_dp_sgd_run_writes_epsilon_to_metrics_and_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXRECO_CACHE", str(tmp_path / "cache"))
    m = train(tmp_path / "run", _over(tmp_path, "trainer.epochs=2", "privacy.epsilon=4"))
    steps = 2 * math.ceil(40 / 12)
    assert m["train/steps"] == steps
    assert m["privacy/epsilon"] == pytest.approx(4.0, rel=1e-3)
    assert m["privacy/delta"] == pytest.approx(1 / 40)
    assert m["privacy/sampling_rate"] == pytest.approx(12 / 40)
    assert m["privacy/releases"] == steps
    assert 0 < m["test/rmse"] < 3
    events = list((tmp_path / "run" / "tb").rglob("events.out.tfevents.*"))
    assert any(b"privacy/epsilon" in e.read_bytes() for e in events)


@pytest.mark.slow
def test_same_seed_gives_the_same_dp_sgd_run(tmp_path, monkeypatch):
    from jaxreco.run import restore_run

    monkeypatch.setenv("JAXRECO_CACHE", str(tmp_path / "cache"))
    runs = [train(tmp_path / f"run{i}", _over(tmp_path, "trainer.epochs=2")) for i in range(2)]
    same = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in runs]
    assert same[0] == same[1]
    tables = [np.asarray(restore_run(tmp_path / f"run{i}").state.table_values()["item_embed"])
              for i in range(2)]
    np.testing.assert_array_equal(*tables)


@pytest.mark.parametrize("over, match", [
    (["experiment=ml1m_ncf_mf_lazy_adam", "privacy=dp"], "task.kind='implicit' is not supported"),
    (["experiment=ml1m_mf_dp", "mesh.axes.data=2"], "runs on one device"),
])
def test_dp_sgd_refuses_what_it_does_not_cover(over, match):
    cfg = compose_train(over)

    class Task:
        kind = cfg.task.kind

    class Mesh:
        class devices:
            size = int(np.prod(list(cfg.mesh.axes.values())))
    with pytest.raises(ValueError, match=match):
        dp_sgd.check(cfg, Task, Mesh)


@pytest.mark.parametrize("field", ["users_per_step", "max_examples_per_user"])
def test_bad_dp_sgd_sizes_are_refused_naming_the_field(field):
    with pytest.raises(ValueError, match=f"privacy.{field}=0"):
        config.validate(compose_train(["experiment=ml1m_mf_dp", f"privacy.{field}=0"]))
