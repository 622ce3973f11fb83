"""Bayesian MF by Gibbs sampling (optimizer=bpmf): the hyperparameter and row draws follow
their conditional distributions, the tables hold the running average of the draws after
burn-in, the chain fits a low-rank rating matrix, and the trainer runs, resumes exactly and
refuses what it cannot sample."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

from jaxreco import config as config_lib, optim
from jaxreco.models.mf import MF
from jaxreco.sharding import make_mesh
from jaxreco.train import bpmf, ials
from jaxreco.train.state import create_state
from tests.conftest import run_cli
from tests.test_configs import _compose


def test_normal_wishart_draws_have_the_posterior_moments():
    rng = np.random.default_rng(0)
    k, n = 3, 40
    x = rng.normal(size=(n + 5, k)) @ np.diag([1.0, 0.5, 2.0]) + np.array([0.3, -1.0, 0.5])
    mask = np.r_[np.ones(n), np.zeros(5)]            # the last 5 rows do not count
    x[n:] = 100.0
    draw = jax.jit(jax.vmap(lambda key: bpmf.sample_normal_wishart(key, jnp.asarray(x, jnp.float32),
                                                                   jnp.asarray(mask, jnp.float32))))
    m, lam = draw(jax.random.split(jax.random.PRNGKey(0), 20000))
    xs = x[:n]
    xbar = xs.mean(0)
    beta_n, nu_n = bpmf.BETA0 + n, k + n
    w_inv = np.eye(k) + (xs - xbar).T @ (xs - xbar) + bpmf.BETA0 * n / beta_n * np.outer(xbar, xbar)
    w_n = np.linalg.inv(w_inv)
    e_lam = nu_n * w_n                                                    # Wishart mean
    np.testing.assert_allclose(np.mean(lam, 0), e_lam, atol=0.03 * np.abs(e_lam).max())
    np.testing.assert_allclose(np.mean(m, 0), n * xbar / beta_n, atol=0.01)
    # m | Λ ~ N(m_n, (β_n Λ)⁻¹): whitened by Λ, the deviations have covariance I / β_n
    dev = np.asarray(m) - n * xbar / beta_n
    white = np.einsum("sij,sj->si", np.linalg.cholesky(np.asarray(lam)).transpose(0, 2, 1), dev)
    np.testing.assert_allclose(np.cov(white.T) * beta_n, np.eye(k), atol=0.05)


def test_row_draws_follow_the_gaussian_conditional():
    """One user with 4 ratings, the item rows fixed: the draws' mean and covariance are the
    closed-form conditional's, N(A⁻¹(Λm + α Σ t_i y_i), A⁻¹), A = Λ + α Σ y_i y_iᵀ."""
    rng = np.random.default_rng(1)
    d, k = 2, 3
    items = rng.normal(size=(5, d + 1)).astype(np.float32)              # [q_i, b_i]
    user_items = np.array([0, 2, 3, 4])
    ratings = np.array([4.0, 2.0, 5.0, 3.0])
    mu, alpha = 3.5, 1.7
    m = np.array([0.1, -0.2, 0.3], np.float32)
    lam = np.array([[2.0, 0.3, 0.0], [0.3, 1.5, 0.2], [0.0, 0.2, 1.0]], np.float32)
    users, _ = bpmf.build_sides(np.zeros(4, np.int64), user_items, ratings, 1, 5,
                                user_rows=1, item_rows=5, dim=d)
    side = ials.epoch_data(users, users)["users"]
    y = np.concatenate([items[:, :d], np.ones((5, 1), np.float32)], 1)

    def one(key):
        x, _ = bpmf._sample_rows(key, jnp.zeros((1, k)), jnp.asarray(y), jnp.asarray(items[:, d]),
                                 side, jnp.asarray(m), jnp.asarray(lam), alpha, mu,
                                 with_sse=False)
        return x[0]
    draws = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(3), 40000)))
    yy = y[user_items]
    t = ratings - mu - items[user_items, d]
    a = lam + alpha * yy.T @ yy
    cov = np.linalg.inv(a)
    mean = cov @ (lam @ m + alpha * yy.T @ t)
    np.testing.assert_allclose(draws.mean(0), mean, atol=4 * np.sqrt(np.diag(cov).max() / 40000))
    np.testing.assert_allclose(np.cov(draws.T), cov, atol=0.03 * np.abs(cov).max())


def _low_rank(num_users=60, num_items=50, rank=2, per_user=20, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.normal(size=(num_users, rank))
    q = rng.normal(size=(num_items, rank))
    rows = [(u, i) for u in range(num_users) for i in rng.choice(num_items, per_user, replace=False)]
    u, i = np.array(rows).T
    r = 3.0 + 0.8 * np.sum(p[u] * q[i], 1) + 0.3 * rng.normal(size=len(u))
    return u, i, np.clip(r, 1, 5)


def test_sweeps_average_the_draws_after_burn_in_and_fit_a_low_rank_matrix():
    u, i, r = _low_rank()
    test = np.arange(len(u)) % 10 == 0
    nu, ni, d, burn = 60, 50, 4, 3
    mesh = make_mesh({"data": 1})
    model_fn = lambda: MF(nu, ni, dim=d, init_std=0.1, global_bias=float(r[~test].mean()),  # noqa: E731
                          rngs=__import__("flax").nnx.Rngs(0))
    _, state, _ = create_state(model_fn, optim.bpmf(), bpmf.noise_state(2.0), mesh,
                               {"user": None, "item": None, "embed": None})
    users, items = bpmf.build_sides(u[~test], i[~test], r[~test], nu, ni, user_rows=nu,
                                    item_rows=ni, dim=d)
    sweep = jax.jit(bpmf.make_sweep(users, items, burn_in=burn, seed=0))
    data = ials.epoch_data(users, items)
    draws, losses = [], []
    for _ in range(40):
        state, m = sweep(state, data)
        losses.append(float(m["loss"]))
        draws.append({k: np.asarray(v["sample"]) for k, v in state.table_opt.items()})
        assert float(state.dense_opt["noise_precision"]) > 0
    tables = {k: np.asarray(v[...]) for k, v in state.tables.items()}
    for name in tables:                       # the tables: the mean of the draws of sweeps burn+1 .. 40
        np.testing.assert_allclose(tables[name], np.mean([x[name] for x in draws[burn:]], 0),
                                   rtol=1e-4, atol=1e-5)
    assert int(state.step) == 40

    def rmse(t, rows):
        pred = (float(state.dense["global_bias"][...]) + t["user_bias"][u[rows], 0]
                + t["item_bias"][i[rows], 0]
                + np.sum(t["user_embed"][u[rows]] * t["item_embed"][i[rows]], 1))
        return float(np.sqrt(np.mean((np.clip(pred, 1, 5) - r[rows]) ** 2)))
    mean_only = float(np.sqrt(np.mean((r[~test].mean() - r[test]) ** 2)))
    assert rmse(tables, test) < 0.6 * mean_only, (rmse(tables, test), mean_only)
    # the posterior-predictive mean (the average of the draws' predictions) is what the
    # averaged factors stand in for; on this set they are close
    pred = np.mean([float(state.dense["global_bias"][...]) + x["user_bias"][u[test], 0]
                    + x["item_bias"][i[test], 0]
                    + np.sum(x["user_embed"][u[test]] * x["item_embed"][i[test]], 1)
                    for x in draws[burn:]], 0)
    predictive = float(np.sqrt(np.mean((np.clip(pred, 1, 5) - r[test]) ** 2)))
    assert rmse(tables, test) < predictive + 0.05, (rmse(tables, test), predictive)
    assert np.mean(losses[-10:]) < 0.5 * losses[0]           # train MSE of the draws falls


def _cfg(*over):
    config_lib.register()
    return _compose(["optimizer=bpmf", "model=mf", *over])


@pytest.mark.parametrize("over, words", [
    (["trainer.steps_per_call=4"], ["trainer.steps_per_call=4", "optimizer=bpmf"]),
    (["privacy=dp", "privacy.epsilon=1"], ["privacy=dp", "optimizer=bpmf"]),
    (["optimizer.burn_in=-1"], ["optimizer.burn_in", "-1"]),
    (["optimizer.noise_precision=0"], ["optimizer.noise_precision", "0"]),
])
def test_config_refusals_name_the_option(over, words):
    with pytest.raises(ValueError) as e:
        config_lib.validate(_cfg(*over))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_only_the_biased_mf_is_sampled():
    abstract = type("M", (), {"table_features": {"user_mf": 0, "item_mf": 0}})()
    with pytest.raises(ValueError, match="model=mf.*model.name='embed_mlp'"):
        bpmf.check_model(OmegaConf.create({"name": "embed_mlp"}), abstract)


def test_several_cpu_devices_are_refused_one_is_not():
    assert jax.device_count() >= 4
    ials.check_mesh(make_mesh({"model": 1}, devices=jax.devices()[:1]), "bpmf")
    with pytest.raises(ValueError, match=r"optimizer=bpmf on 4 CPU devices.*mesh=single"):
        ials.check_mesh(make_mesh({"data": 2, "model": 2}, devices=jax.devices()[:4]), "bpmf")


@pytest.fixture
def rating_files(tmp_path):
    u, i, r = _low_rank(num_users=80, num_items=60, per_user=25, seed=4)
    d = tmp_path / "ml-lowrank"
    d.mkdir()
    d.joinpath("u.data").write_text("".join(
        f"{a + 1}\t{b + 1}\t{int(round(c))}\t{880000000 + k}\n" for k, (a, b, c) in
        enumerate(zip(u, i, r))))
    return d


BPMF = ["experiment=ml1m_mf_bpmf", "dataset=movielens-100k", "model.dim=4",
        "optimizer.burn_in=3", "trainer.epochs=12", "trainer.progress_bar=false",
        "trainer.async_checkpoint=false", "logger.tensorboard=false"]


def _train(tmp_path, files, *extra, run="run"):
    out = tmp_path / run
    p = run_cli(["jaxreco.cli.train", f"dataset.path={files}", f"hydra.run.dir={out}", *BPMF,
                 *extra], cwd=tmp_path, env_extra={"JAXRECO_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def test_trainer_samples_a_rating_model_that_beats_the_mean(tmp_path, rating_files):
    m = _train(tmp_path, rating_files)
    assert m["train/steps"] == 12 and "learning/lr" not in m
    assert m["test/rmse"] < 0.85, m          # rounded ratings of a rank-2 matrix; mean ≈ 1.3


@pytest.mark.slow  # ~15 s: two more CLI trainings
def test_a_run_stopped_and_resumed_draws_what_an_uninterrupted_one_draws(tmp_path, rating_files):
    a = _train(tmp_path, rating_files, run="a")
    _train(tmp_path, rating_files, "trainer.max_steps=5", run="b")
    b = _train(tmp_path, rating_files, run="b")
    det = lambda m: {k: v for k, v in m.items() if not k.startswith("perf/")}  # noqa: E731
    assert det(a) == det(b)
