"""privacy=dp: user-level DP iALS (jaxreco/privacy/dp_ials.py) and its accounting by
dp-accounting (jaxreco/privacy/accounting.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreco import config
from jaxreco.privacy import accounting, dp_ials
from jaxreco.train import ials

from tests.conftest import write_ratings_dat
from support import compose_train, train


def _data(num_users=30, num_items=25, n=400, seed=0):
    rng = np.random.default_rng(seed)
    pairs = np.unique(np.stack([rng.integers(0, num_users, n), rng.integers(0, num_items, n)], 1),
                      axis=0)
    return pairs[:, 0], pairs[:, 1]


def _item_stats(p_clipped, user, item, num_items):
    """Exact per-item (G_i, b_i, n_i) and the all-users G, by numpy."""
    d = p_clipped.shape[1]
    g = np.zeros((num_items, d, d)), np.zeros((num_items, d)), np.zeros(num_items)
    for u, i in zip(user, item):
        g[0][i] += np.outer(p_clipped[u], p_clipped[u])
        g[1][i] += p_clipped[u]
        g[2][i] += 1
    return g, p_clipped.T @ p_clipped


def _released(stats, gram, clip):
    """The released vector V of the module docstring (√2 on off-diagonal Gram entries)."""
    (gi, bi, ni), d = stats, gram.shape[0]
    iu = np.triu_indices(d)
    scale = np.where(iu[0] == iu[1], 1.0, math.sqrt(2))
    per_item = [np.concatenate([gi[i][iu] * scale, bi[i], [clip * ni[i]]]) for i in range(len(ni))]
    return np.concatenate([*per_item, gram[iu] * scale])


def test_one_users_contribution_is_bounded_by_the_sensitivity():
    """Removing one user changes the released statistics by at most Δ(k, C) in L2, whatever
    the norm of the user rows before clipping, and the bound is reached by a full-norm row."""
    user, item = _data(num_users=8, num_items=20, n=150)
    k, clip, d = 5, 0.7, 4
    keep = dp_ials.sample_per_user(user, k, seed=3)
    user, item = user[keep], item[keep]
    assert np.bincount(user).max() <= k
    p = np.asarray(dp_ials.clip_rows(3.0 * jax.random.normal(jax.random.key(0), (8, d)), clip))
    assert np.linalg.norm(p, axis=1).max() <= clip * (1 + 1e-6)
    full = _released(*_item_stats(p, user, item, 20), clip)
    bound = dp_ials.sensitivity(k, clip)
    norms = []
    for u in range(8):
        others = user != u
        p0 = p.copy()
        p0[u] = 0.0
        without = _released(*_item_stats(p0, user[others], item[others], 20), clip)
        norms.append(np.linalg.norm(full - without))
        mine = dp_ials.user_statistics(jnp.asarray(p[u]), jnp.asarray(item[user == u]), 20, clip)
        np.testing.assert_allclose(np.linalg.norm(mine), norms[-1], rtol=1e-4)
    assert max(norms) <= bound * (1 + 1e-6)
    assert max(norms) >= 0.999 * bound          # users with k items at the clip norm: tight


def test_noise_std_is_what_the_accountant_was_given():
    """Plan: σ = z·Δ, z calibrated so the accountant's ε is the target; the mechanism's drawn
    noise has std σ on each released coordinate (σ/√2 on off-diagonal Gram entries)."""
    cfg = compose_train(["experiment=ml1m_ncf_mf_uniform", "privacy=dp", "privacy.epsilon=2",
                         "trainer.epochs=3", "privacy.max_items_per_user=10",
                         "privacy.clip_norm=0.5"]).privacy
    pl = dp_ials.plan(cfg, num_users=1000, epochs=3, seed=0)
    assert pl.delta == 1e-3
    assert pl.sensitivity == pytest.approx(math.sqrt(10 * (0.5**4 + 2 * 0.5**2) + 0.5**4))
    assert pl.noise_std == pytest.approx(pl.noise_multiplier * pl.sensitivity)
    assert accounting.epsilon(pl.noise_multiplier, 3, 1e-3) == pytest.approx(2.0, rel=1e-3)
    assert pl.metrics()["privacy/epsilon"] == pytest.approx(2.0, rel=1e-3)

    d, n_items = 4, 4000
    y_pad = jnp.zeros((2, d))                          # no signal: the statistics are noise
    cols = jnp.full((n_items, 1), 1)
    g, b, n = jax.jit(lambda r: dp_ials.noisy_item_statistics(
        y_pad, cols, r, 1, key=jax.random.key(1), noise_std=pl.noise_std,
        clip_norm=pl.clip_norm))(jnp.arange(n_items))
    g, b, n = map(np.asarray, (g, b, n))
    np.testing.assert_allclose(g, np.swapaxes(g, 1, 2), rtol=1e-5, atol=1e-5)
    diag = g[:, np.arange(d), np.arange(d)]
    off = g[:, 0, 1:]
    for x, want in ((diag, pl.noise_std), (off * math.sqrt(2), pl.noise_std),
                    (b, pl.noise_std), (n * pl.clip_norm, pl.noise_std)):
        assert np.std(x) == pytest.approx(want, rel=0.03)


def test_epsilon_decreases_with_the_noise_and_calibration_inverts_it():
    for acc in accounting.ACCOUNTANTS:
        eps = [accounting.epsilon(z, 5, 1e-5, acc) for z in (0.6, 0.8, 1.0, 2.0, 4.0, 8.0)]
        assert all(a > b for a, b in zip(eps, eps[1:])), (acc, eps)
        zs = [accounting.noise_multiplier(e, 5, 1e-5, acc) for e in (1.0, 2.0, 4.0, 8.0)]
        assert all(a > b for a, b in zip(zs, zs[1:])), (acc, zs)
        assert accounting.epsilon(zs[1], 5, 1e-5, acc) == pytest.approx(2.0, rel=1e-3)
    assert accounting.epsilon(0.0, 5, 1e-5) == math.inf
    # more releases cost more; PLD is at least as tight as RDP
    assert accounting.epsilon(1.0, 10, 1e-5) > accounting.epsilon(1.0, 5, 1e-5)
    assert accounting.epsilon(1.0, 5, 1e-5, "pld") <= accounting.epsilon(1.0, 5, 1e-5, "rdp")


def _sides(user, item, nu, ni, d, chunk_elements=1 << 24):
    users = ials.group_rows(user, item, nu, ni, pad_row=nu, dim=d, chunk_elements=chunk_elements)
    items = dp_ials.with_empty_rows(
        ials.group_rows(item, user, ni, nu, pad_row=ni, dim=d, chunk_elements=chunk_elements),
        pad_row=ni, dim=d, chunk_elements=chunk_elements)
    return users, {"rows": items.rows, "cols": items.cols}, items


def test_without_noise_or_clipping_the_item_solve_is_the_ials_one():
    """σ = 0, C above every norm, k above every history: the DP item solve (PSD projection +
    eigen-solve) equals iALS's Cholesky item solve; items without positives get q = 0."""
    nu, ni, d = 30, 25, 5
    user, item = _data(nu, ni)
    item = np.where(item == 7, 8, item)               # item 7: no positives
    users, dp_side, items = _sides(user, item, nu, ni, d)
    p = jax.random.normal(jax.random.key(0), (nu + 1, d)) * 0.3
    q0 = jax.random.normal(jax.random.key(1), (ni + 1, d))
    kw = dict(alpha0=0.3, reg=0.05, nu=1.0)
    want, _ = jax.jit(lambda side: ials._solve_side(q0, p, side, ni, nu, with_loss=False, **kw))(
        ials.epoch_data(items, items)["items"])
    got = jax.jit(lambda side: dp_ials.dp_item_solve(
        q0, p[:nu], side, ni, nu, clip_norm=100.0, noise_std=0.0, key=jax.random.key(2),
        **kw))(dp_side)
    want = np.asarray(want[:ni]).copy()
    want[7] = 0.0
    np.testing.assert_allclose(np.asarray(got[:ni]), want, atol=1e-4)
    assert np.abs(want).max() > 0.1


def test_same_seed_same_noise_whatever_the_chunking_and_another_seed_differs():
    nu, ni, d = 30, 25, 4
    user, item = _data(nu, ni)
    p = jax.random.normal(jax.random.key(0), (nu, d))
    q0 = jnp.zeros((ni, d))                           # padding rows (id ni) are dropped
    solve = jax.jit(lambda side, key: dp_ials.dp_item_solve(
        q0, dp_ials.clip_rows(p, 1.0), side, ni, nu, alpha0=0.3, reg=0.05, nu=1.0,
        clip_norm=1.0, noise_std=2.0, key=key))
    outs = []
    for chunk_elements, seed in ((1 << 24, 5), (64, 5), (1 << 24, 6)):
        _, side, _ = _sides(user, item, nu, ni, d, chunk_elements)
        outs.append(np.asarray(solve(side, jax.random.key(seed))))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    assert np.abs(outs[0] - outs[2]).max() > 1e-2
    keep = dp_ials.sample_per_user(user, 3, seed=1)
    np.testing.assert_array_equal(keep, dp_ials.sample_per_user(user, 3, seed=1))
    assert not np.array_equal(keep, dp_ials.sample_per_user(user, 3, seed=2))


def _dp_run(tmp_path, monkeypatch, name):
    monkeypatch.setenv("JAXRECO_CACHE", str(tmp_path / "cache"))
    d = write_ratings_dat(tmp_path / "ml", num_users=40, num_items=120, n=1200)
    over = ["experiment=ml1m_ncf_mf_uniform", f"dataset.path={d}", "task.prepare.negatives.num=9",
            "model.mf_dim=8", "trainer.epochs=2", "trainer.progress_bar=false", "privacy=dp",
            "privacy.epsilon=4", "privacy.max_items_per_user=8"]
    return train(tmp_path / name, over)


def test_dp_run_writes_epsilon_to_metrics_and_tensorboard(tmp_path, monkeypatch):
    """A privacy=dp iALS run: privacy/epsilon ≈ the target and privacy/delta = 1/users in
    metrics.json and TensorBoard."""
    m = _dp_run(tmp_path, monkeypatch, "run")
    assert m["privacy/epsilon"] == pytest.approx(4.0, rel=1e-3)
    assert m["privacy/delta"] == pytest.approx(1 / 40)
    assert m["privacy/releases"] == 2
    assert 0 <= m["test/hr@10"] <= 1
    events = list((tmp_path / "run" / "tb").rglob("events.out.tfevents.*"))
    assert any(b"privacy/epsilon" in e.read_bytes() for e in events)


@pytest.mark.slow
def test_same_seed_gives_the_same_dp_run(tmp_path, monkeypatch):
    from jaxreco.run import restore_run

    runs = [_dp_run(tmp_path, monkeypatch, f"run{i}") for i in range(2)]
    same = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in runs]
    assert same[0] == same[1]
    tables = [np.asarray(restore_run(tmp_path / f"run{i}").state.table_values()["item_mf"])
              for i in range(2)]
    np.testing.assert_array_equal(*tables)


@pytest.mark.parametrize("over, match", [
    (["privacy=dp", "privacy.epsilon=-1"], "privacy.epsilon=-1"),
    (["experiment=ml1m_ncf_mf_uniform", "privacy=dp", "privacy.noise_multiplier=1"],
     "exactly one of privacy.epsilon"),
    (["experiment=ml1m_ncf_mf_uniform", "privacy=dp", "privacy.delta=1.5"], "privacy.delta=1.5"),
    (["experiment=ml1m_ncf_mf_uniform", "privacy=dp", "privacy.clip_norm=0"], "privacy.clip_norm=0"),
])
def test_bad_privacy_config_is_refused_naming_the_field(over, match):
    with pytest.raises(ValueError, match=match):
        config.validate(compose_train(over))


def test_dp_refuses_options_it_does_not_cover():
    cfg = compose_train(["experiment=ml1m_ncf_mf_uniform", "privacy=dp", "model.bias=true",
                         "optimizer.recency_weight=1"])
    with pytest.raises(ValueError, match="model.bias=true.*optimizer.recency_weight=1"):
        dp_ials.check_options(cfg)
