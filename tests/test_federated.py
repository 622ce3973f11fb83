"""Federated iALS (jaxreco/federated): only item statistics leave a client, and without
noise the result is the trainer's own iALS (within 1e-5), in the engine-free loop and on a
real Flower server (flwr is in the test extra: the Flower test runs in .ci/run, never skips)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxreco.federated import ials as fed
from jaxreco.federated.simulate import simulate

from tests.conftest import write_ratings_dat
from support import compose_train


def _cfg(tmp_path, monkeypatch, *extra):
    monkeypatch.setenv("JAXRECO_CACHE", str(tmp_path / "cache"))
    d = write_ratings_dat(tmp_path / "ml", num_users=40, num_items=120, n=1200)
    return compose_train(["experiment=federated_ials", f"dataset.path={d}",
                          "task.prepare.negatives.num=9", "model.mf_dim=8", *extra])


def _same_as_central(out, atol=1e-5):
    for side in ("user", "item"):
        got, want = out["tables"][side], out["central_tables"][side]
        assert np.abs(want).max() > 0.1
        np.testing.assert_allclose(got, want, atol=atol, err_msg=side)
    for k in ("test/hr@10", "test/ndcg@10", "test/full/hr@10"):
        assert out["federated"][k] == pytest.approx(out["central"][k], abs=1e-6), k


def test_clients_send_only_item_statistics_and_equal_central_ials(tmp_path, monkeypatch):
    out = simulate(_cfg(tmp_path, monkeypatch), num_clients=2, rounds=2, engine="local")
    _same_as_central(out)
    d = out["tables"]["item"].shape[1]
    for r in out["rounds"]:                            # per touched item: G (upper), b, n, id
        assert r["clients"] == 2
        assert r["bytes_per_client_max"] <= 4 * (120 * (d * (d + 1) // 2 + d + 2)
                                                 + d * (d + 1) // 2)


def test_shards_partition_the_users():
    shards = fed.shard_users(10, 3, seed=0)
    assert sorted(np.concatenate(shards).tolist()) == list(range(10))
    assert [len(s) for s in shards] == [4, 3, 3]
    with pytest.raises(ValueError, match="num_clients=11"):
        fed.shard_users(10, 11, seed=0)


def test_flower_run_equals_central_ials(tmp_path, monkeypatch):
    """A real Flower gRPC server and three clients on 127.0.0.1."""
    import flwr  # noqa: F401  (in the test extra: a missing flwr fails, it does not skip)
    out = simulate(_cfg(tmp_path, monkeypatch), num_clients=3, rounds=3)
    _same_as_central(out)
    assert len(out["rounds"]) == 3


@pytest.mark.slow
def test_server_noise_reports_epsilon_and_is_seeded(tmp_path, monkeypatch):
    """Clients clip and sample, the server adds the DP noise: ε as planned, the same seed
    the same model. (Engine-free: Flower's in-process server runs once per process; the
    Flower transport is checked above.)"""
    cfg = _cfg(tmp_path, monkeypatch, "privacy=dp", "privacy.epsilon=4",
               "privacy.max_items_per_user=8")
    runs = [simulate(cfg, num_clients=3, rounds=2, dp=True, central=False, engine="local")
            for _ in range(2)]
    assert runs[0]["federated"]["privacy/epsilon"] == pytest.approx(4.0, rel=1e-3)
    assert np.isfinite(runs[0]["tables"]["item"]).all()
    np.testing.assert_array_equal(runs[0]["tables"]["item"], runs[1]["tables"]["item"])


def test_server_solves_touched_items_and_leaves_untouched_ones_as_sent():
    """An item no client touched keeps the row the server sent (the trainer's item step
    leaves items without positives alone); the others are the iALS item solve."""
    rng = np.random.default_rng(0)
    d, num_users, alpha0, reg, nu = 4, 30, 0.2, 0.05, 1.0
    p = rng.normal(size=(num_users, d))
    touched = [rng.choice(num_users, k, replace=False) for k in (3, 7, 1, 12)] + [[]]
    g = np.stack([p[u].T @ p[u] for u in touched])
    b = np.stack([p[u].sum(0) if len(u) else np.zeros(d) for u in touched])
    n = np.asarray([len(u) for u in touched], np.float64)
    previous = rng.normal(size=(len(touched), d)).astype(np.float32)
    q = fed.item_solve(g, b, n, p.T @ p, num_users=num_users, alpha0=alpha0, reg=reg, nu=nu,
                       previous=previous)
    np.testing.assert_array_equal(q[4], previous[4])
    for i in range(4):
        a = g[i] + alpha0 * p.T @ p + reg * (n[i] + alpha0 * num_users) ** nu * np.eye(d)
        np.testing.assert_allclose(q[i], np.linalg.solve(a, b[i]), atol=1e-5)
