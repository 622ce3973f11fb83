"""iALS (optimizer=ials): each half-step is the exact least-squares solution, the reported
loss is the iALS objective and never increases, sharded tables give the same model, and the
trainer runs, resumes and refuses models it cannot fit."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxreco import optim
from jaxreco.models.embed_mlp import EmbedMLP
from jaxreco.sharding import make_mesh
from jaxreco.train import ials
from jaxreco.train.state import create_state
from tests.conftest import run_cli
from tests.test_implicit import COMMON, ml_dir  # noqa: F401  (fixture)

USERS, ITEMS, DIM = 13, 11, 4


def _positives(seed=0):
    """Histories of 0..11 items (user 5 has none), so several length buckets are used."""
    rng = np.random.default_rng(seed)
    u, i = [], []
    for user in range(USERS):
        n = 0 if user == 5 else int(rng.integers(1, 12))
        items = rng.choice(ITEMS, n, replace=False)
        u += [user] * n
        i += items.tolist()
    return np.array(u), np.array(i)


def _sides(u, i, pad_users, pad_items, chunk_elements=64, conf=None):
    kw = dict(dim=DIM, chunk_elements=chunk_elements, min_len=2, weights=conf)
    return (ials.group_rows(u, i, USERS, ITEMS, pad_row=pad_users, **kw),
            ials.group_rows(i, u, ITEMS, USERS, pad_row=pad_items, **kw))


def _closed_form(y, hist, alpha0, reg, nu, b=None, col_w=None, row_w=None, conf=None):
    """Row solutions in float64: (Σ_h c_h y_h y_hᵀ + α₀ YᵀY + λ(n + α₀N)^ν I)⁻¹ Σ_h c_h y_h,
    or with a column offset b (ŷ = x·y + b): right-hand side Σ_h c_h (1 − b_h) y_h − α₀ Yᵀb.
    ``conf[r]``: the confidences c_h of row r's history (default 1)."""
    y = y.astype(np.float64)
    b = np.zeros(len(y)) if b is None else b.astype(np.float64)
    cw = np.ones(len(y)) if col_w is None else col_w.astype(np.float64)
    g = alpha0 * (y * cw[:, None]).T @ y
    out = {}
    for r, h in hist.items():
        yh, rw = y[h], 1.0 if row_w is None else float(row_w[r])
        c = np.ones(len(h)) if conf is None else conf[r].astype(np.float64)
        a = ((c[:, None] * yh).T @ yh + rw * g
             + reg * (len(h) + alpha0 * rw * len(y)) ** nu * np.eye(y.shape[1]))
        out[r] = np.linalg.solve(a, ((c * (1 - b[h]))[:, None] * yh).sum(0)
                                 - alpha0 * (y * cw[:, None]).T @ b)
    return out


def test_recency_weights_count_later_positives_in_timestamp_then_row_order():
    user = np.array([0, 0, 1, 0, 1])
    ts = np.array([5, 3, 7, 5, 1])
    # user 0: row 1 (t 3), row 0 (t 5), row 3 (t 5, later row) -> k = 1, 2, -, 0
    # user 1: row 4 (t 1), row 2 (t 7) -> k(row 2) = 0, k(row 4) = 1
    c = ials.recency_weights(user, ts, strength=2.0, half_life=1.0)
    np.testing.assert_allclose(c, [1 + 2 / 2, 1 + 2 / 4, 3.0, 3.0, 2.0])
    np.testing.assert_array_equal(ials.recency_weights(user, ts, strength=0.0, half_life=4.0),
                                  np.ones(5))
    with pytest.raises(ValueError, match="half_life=0"):
        ials.recency_weights(user, ts, strength=1.0, half_life=0.0)
    with pytest.raises(ValueError, match="4 timestamps"):
        ials.recency_weights(user, ts[:4], strength=1.0, half_life=1.0)
    u, i = _positives()
    with pytest.raises(ValueError, match="must be finite and > 0"):
        ials.group_rows(u, i, USERS, ITEMS, pad_row=16, dim=DIM, weights=np.zeros(len(u)))


def test_grouping_covers_every_positive_once_in_bounded_chunks():
    u, i = _positives()
    side = ials.group_rows(u, i, USERS, ITEMS, pad_row=16, dim=DIM, chunk_elements=64, min_len=2)
    seen = []
    for rows, cols, counts in zip(side.rows, side.cols, side.counts):
        assert rows.shape[1] * cols.shape[2] * DIM <= 64 or rows.shape[1] == 1
        for r, c, n in zip(rows.reshape(-1), cols.reshape(-1, cols.shape[2]), counts.reshape(-1)):
            if r == 16:                                   # padding row: no columns
                assert n == 0 and (c == ITEMS).all()
                continue
            valid = c[c < ITEMS]
            assert len(valid) == n and (c[len(valid):] == ITEMS).all()
            seen += [(int(r), int(x)) for x in valid]
    assert sorted(seen) == sorted(zip(u.tolist(), i.tolist()))
    assert 5 not in {r for r, _ in seen} and side.freq[5] == 0
    with pytest.raises(ValueError, match="out of range"):
        ials.group_rows(u, i + ITEMS, USERS, ITEMS, pad_row=16, dim=DIM)


def test_bucket_lengths_cover_each_row_with_fewer_padded_slots_than_powers_of_two():
    rng = np.random.default_rng(3)
    n = np.concatenate([rng.zipf(1.6, 3000), [1, 2, 3, 5000]])
    L = ials.bucket_lengths(n, min_len=8)
    pow2 = np.maximum(8, 2 ** np.ceil(np.log2(n))).astype(np.int64)
    assert (L >= np.maximum(n, 8)).all()
    assert len(np.unique(L)) <= len(np.unique(pow2))
    assert L.sum() < 0.9 * pow2.sum()
    # every row sits in the shortest bucket that holds it
    edges = np.unique(L)
    np.testing.assert_array_equal(L, edges[np.searchsorted(edges, np.maximum(n, 8))])
    # the optimum for a tiny case, checked by hand: {1, 2, 9, 10} in 2 buckets -> 2, 2, 10, 10
    np.testing.assert_array_equal(ials.bucket_lengths(np.array([1, 2, 9, 10]), min_len=1,
                                                      num_buckets=2), [2, 2, 10, 10])
    np.testing.assert_array_equal(ials.bucket_lengths(np.array([3, 3]), min_len=8), [8, 8])


def _confidences(n, seed=2):
    return np.random.default_rng(seed).uniform(0.5, 4.0, n)


@pytest.mark.parametrize("alpha0, reg, nu, biased, weighted, confident", [
    (0.3, 0.05, 1.0, False, False, False), (1.0, 0.5, 0.0, False, False, False),
    (0.3, 0.05, 1.0, True, False, False), (0.3, 0.05, 1.0, True, True, False),
    (0.3, 0.05, 1.0, False, False, True), (0.3, 0.05, 1.0, True, True, True)])
def test_half_step_is_the_exact_least_squares_solution(alpha0, reg, nu, biased, weighted,
                                                       confident):
    _check_half_step(alpha0, reg, nu, biased, weighted, confident, {})


@pytest.mark.parametrize("biased, weighted, confident", [
    (False, False, False), (True, True, False), (False, False, True), (True, True, True)])
def test_cg_half_step_with_enough_steps_equals_the_cholesky_solution(biased, weighted,
                                                                     confident):
    """CG reaches the exact solution in d steps in exact arithmetic; 3d in float32."""
    _check_half_step(0.3, 0.05, 1.0, biased, weighted, confident,
                     dict(solver="cg", cg_steps=3 * DIM))


def _check_half_step(alpha0, reg, nu, biased, weighted, confident, solve):
    u, i = _positives()
    pad_u, pad_i = 16, 16                        # tables padded past the real rows
    rng = np.random.default_rng(1)
    p = rng.normal(0, 0.3, (pad_u, DIM)).astype(np.float32)
    q = rng.normal(0, 0.3, (pad_i, DIM)).astype(np.float32)
    conf = _confidences(len(u)) if confident else None
    users, _ = _sides(u, i, pad_u, pad_i, conf=conf)
    data = ials.epoch_data(users, users)["users"]
    bias = rng.normal(0, 0.3, pad_i).astype(np.float32) if biased else None
    cw = rng.uniform(0.2, 2.0, pad_i).astype(np.float32) if weighted else None
    rw = rng.uniform(0.2, 2.0, pad_u).astype(np.float32) if weighted else None
    new, _ = jax.jit(lambda p, q, d, b, cw, rw: ials._solve_side(
        p, q, d, USERS, ITEMS, alpha0=alpha0, reg=reg, nu=nu, with_loss=False, y_bias=b,
        col_weight=cw, row_weight=rw, **solve))(p, q, data, bias, cw, rw)
    new = np.asarray(new)
    hist = {r: i[u == r] for r in range(USERS) if (u == r).any()}
    confs = None if conf is None else {r: conf[u == r] for r in hist}
    want = _closed_form(q[:ITEMS], hist, alpha0, reg, nu,
                        None if bias is None else bias[:ITEMS],
                        None if cw is None else cw[:ITEMS], rw, confs)
    for r, w in want.items():
        np.testing.assert_allclose(new[r], w, rtol=2e-4, atol=2e-5)
    # a user with no positives and the padding rows are left as they were
    np.testing.assert_array_equal(new[5], p[5])
    np.testing.assert_array_equal(new[USERS:], p[USERS:])


ONE = {"batch": None, "user": None, "item": None, "embed": None}


def _state(mesh, rules, bias=False):
    def model_fn():
        return EmbedMLP(16, 16, combiner="dot", mf_dim=DIM, bias=bias, init_std=0.3,
                        rngs=nnx.Rngs(0))
    return create_state(model_fn, optim.row_optimizer("ials"), optim.dense_optimizer("adam", 0.1),
                        mesh, rules)


def _objective(p, q, u, i, alpha0, reg, nu, b=None, beta=0.0, conf=None):
    p, q = p[:USERS].astype(np.float64), q[:ITEMS].astype(np.float64)
    c = np.ones(len(u)) if conf is None else conf
    b = np.zeros(ITEMS) if b is None else b[:ITEMS, 0].astype(np.float64)
    s = p @ q.T + b[None, :]
    fu, fi = np.bincount(u, minlength=USERS), np.bincount(i, minlength=ITEMS)
    w = fi.astype(np.float64) ** beta
    w = w * ITEMS / w.sum()
    return ((np.sum(c * (1 - s[u, i]) ** 2) + alpha0 * np.sum(w[None, :] * s ** 2)
             + reg * np.sum((fu + alpha0 * ITEMS) ** nu * np.sum(p * p, 1))
             + reg * np.sum((fi + alpha0 * w * USERS) ** nu * (np.sum(q * q, 1) + b * b)))
            / len(u))


def _run_epochs(mesh, rules, n=5, alpha0=0.3, reg=0.05, nu=1.0, bias=False, beta=0.0,
                confident=False, **solve):
    u, i = _positives()
    _, state, shardings = _state(mesh, rules, bias)
    conf = _confidences(len(u)) if confident else None
    users, items = _sides(u, i, 16, 16, conf=conf)
    epoch = jax.jit(ials.make_epoch(users, items, user_table="user_mf", item_table="item_mf",
                                    alpha0=alpha0, reg=reg, nu=nu,
                                    item_bias_table="item_bias" if bias else None,
                                    pop_exponent=beta, **solve),
                    out_shardings=(shardings, None))
    data = jax.device_put(ials.epoch_data(users, items), NamedSharding(mesh, P()))
    losses, tables = [], []
    for _ in range(n):
        state, m = epoch(state, data)
        v = {k: np.asarray(x) for k, x in state.table_values().items()}
        losses.append(float(m["loss"]))
        tables.append(v)
        want = _objective(v["user_mf"], v["item_mf"], u, i, alpha0, reg, nu,
                          v["item_bias"] if bias else None, beta, conf)
        assert losses[-1] == pytest.approx(want, rel=1e-4)
    return losses, tables, state


@pytest.mark.parametrize("bias, beta, confident", [
    (False, 0.0, False), (True, 0.0, False), (True, 0.5, False), (False, 0.0, True),
    (True, 0.5, True)])
def test_reported_loss_is_the_objective_and_never_increases(bias, beta, confident):
    mesh = make_mesh({"data": 1, "model": 1}, devices=jax.devices()[:1])
    losses, tables, state = _run_epochs(mesh, ONE, bias=bias, beta=beta, confident=confident)
    if bias:                                       # the item bias is fitted, the user's not
        assert np.abs(tables[-1]["item_bias"][:ITEMS]).max() > 1e-3
        assert not tables[-1]["user_bias"].any()
    assert all(b <= a * (1 + 1e-5) for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0]
    assert int(state.step) == 5


@pytest.mark.parametrize("bias, beta, confident", [
    (False, 0.0, False), (True, 0.5, True)])
def test_cg_loss_is_the_objective_never_increases_and_nears_the_exact_one(bias, beta,
                                                                         confident):
    """One CG step per row per half-epoch already lowers the objective every epoch (each step
    lowers each row's quadratic); after 8 epochs of 2 steps the loss is within 2% of 8 exact
    epochs'."""
    mesh = make_mesh({"data": 1, "model": 1}, devices=jax.devices()[:1])
    kw = dict(n=8, bias=bias, beta=beta, confident=confident)
    exact, _, _ = _run_epochs(mesh, ONE, **kw)
    for steps in (1, 2):
        losses, tables, _ = _run_epochs(mesh, ONE, solver="cg", cg_steps=steps, **kw)
        assert all(b <= a * (1 + 1e-5) for a, b in zip(losses, losses[1:])), (steps, losses)
        assert losses[-1] < losses[0]
        assert all(e <= c * (1 + 1e-5) for e, c in zip(exact, losses)), (exact, losses)
    assert losses[-1] == pytest.approx(exact[-1], rel=0.02), (losses, exact)
    if bias:
        assert np.abs(tables[-1]["item_bias"][:ITEMS]).max() > 1e-3


def test_unknown_solver_is_refused_naming_the_choices():
    u, i = _positives()
    users, items = _sides(u, i, 16, 16)
    with pytest.raises(ValueError, match=r"solver='lu': must be one of \('cholesky', 'cg'\)"):
        ials.make_epoch(users, items, user_table="user_mf", item_table="item_mf", alpha0=0.3,
                        reg=0.05, nu=1.0, solver="lu")


def test_row_sharded_tables_give_the_same_model():
    one = make_mesh({"data": 1, "model": 1}, devices=jax.devices()[:1])
    assert jax.device_count() >= 4
    mp = make_mesh({"data": 1, "model": 4}, devices=jax.devices()[:4])
    rules = {"batch": "data", "user": "model", "item": "model", "embed": None}
    _, t1, _ = _run_epochs(one, ONE)
    _, t4, state = _run_epochs(mp, rules)
    assert len(state.tables["user_mf"][...].sharding.device_set) == 4
    for a, b in zip(t1, t4):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5)


IALS = ["optimizer=ials", "model.bias=false", "model.reg=0.01",
        "model.init_std=0.1"]


def _train(tmp_path, ml_dir, *extra, run="run", ok=True):
    out = tmp_path / run
    p = run_cli(["jaxreco.cli.train", f"dataset.path={ml_dir}", f"hydra.run.dir={out}",
                 *COMMON, *IALS, *extra], cwd=tmp_path,
                env_extra={"JAXRECO_CACHE": str(tmp_path / "cache")})
    if not ok:
        assert p.returncode != 0
        return p.stderr
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def test_trainer_fits_resumes_and_refuses_other_models(tmp_path, ml_dir):  # noqa: F811
    a = _train(tmp_path, ml_dir, run="a")
    assert a["train/steps"] == 4 and a["train/epochs"] == 4     # one step per epoch
    assert a["test/hr@5"] > 0.6, a                              # chance: 5/21 = 0.24
    det = lambda m: {k: v for k, v in m.items() if not k.startswith("perf/")}  # noqa: E731
    _train(tmp_path, ml_dir, "trainer.max_steps=2", run="c")
    assert det(_train(tmp_path, ml_dir, run="c")) == det(a)
    err = _train(tmp_path, ml_dir, "optimizer.cg_steps=0", run="z", ok=False)
    assert "optimizer.cg_steps" in err, err[-2000:]
    err = _train(tmp_path, ml_dir, "model.combiner=mlp", run="m", ok=False)
    assert "model.combiner='mlp'" in err and "optimizer=ials" in err


@pytest.mark.slow  # ~15 s: three CLI trainings; bias, recency and CG are checked in-process above
def test_trainer_with_bias_recency_and_cg_fits(tmp_path, ml_dir):  # noqa: F811
    a = _train(tmp_path, ml_dir, run="a")
    b = _train(tmp_path, ml_dir, "model.bias=true", run="b")       # + item bias
    assert b["test/hr@5"] > 0.6 and b["train/loss"] != a["train/loss"], b
    r = _train(tmp_path, ml_dir, "optimizer.recency_weight=3", run="r")   # recency weights
    assert r["test/hr@5"] > 0.6 and r["train/loss"] != a["train/loss"], r
    g = _train(tmp_path, ml_dir, "optimizer.solver=cg", "optimizer.cg_steps=3", run="g")
    assert g["train/steps"] == 4 and g["test/hr@5"] > 0.6, g       # conjugate gradients
    assert g["train/loss"] == pytest.approx(a["train/loss"], rel=0.05), (g, a)
    assert g["train/loss"] != a["train/loss"]


def test_data_without_timestamps_trains_but_refuses_recency_weights(tmp_path):
    """300 positives (fewer than trainer.batch_size: iALS takes whole tables, no batches)
    from CSV files without a timestamp column."""
    rng = np.random.default_rng(0)
    (tmp_path / "train.csv").write_text("user,item\n" + "".join(
        f"u{u},i{i}\n" for u in range(30) for i in rng.choice(40, 10, replace=False)))
    (tmp_path / "test.csv").write_text("user,item\n" + "".join(
        f"u{u},i{(u * 7) % 40}\n" for u in range(30)))
    args = ["jaxreco.cli.train", "dataset=from-files", f"dataset.train={tmp_path / 'train.csv'}",
            f"dataset.test={tmp_path / 'test.csv'}", "model=embed_mlp", "model.combiner=dot",
            "model.mf_dim=8", "model.bias=false", "task.kind=implicit", "optimizer=ials",
            "+task.prepare.negatives={num: 20, sampler: uniform, seed: 0}", "trainer.epochs=3",
            "trainer.progress_bar=false", "logger.tensorboard=false"]
    env = {"JAXRECO_CACHE": str(tmp_path / "cache")}
    p = run_cli(args + [f"hydra.run.dir={tmp_path / 'ok'}"], cwd=tmp_path, env_extra=env)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert m["train/steps"] == 3 and "test/full/hr@10" in m
    p = run_cli(args + [f"hydra.run.dir={tmp_path / 'bad'}", "optimizer.recency_weight=3"],
                cwd=tmp_path, env_extra=env)
    assert p.returncode != 0
    assert "optimizer.recency_weight=3.0 needs timestamps" in p.stderr
    assert "'from-files' has no timestamp column" in p.stderr


@pytest.mark.slow  # ~12 s; row-sharded iALS = single device in test_row_sharded_tables_give_the_same_model
def test_two_processes_with_row_sharded_tables_match_one(tmp_path, ml_dir):  # noqa: F811
    import os
    import subprocess
    import sys

    from tests.test_multiprocess import _free_port
    common = [f"dataset.path={ml_dir}", *COMMON, *IALS, "logger.tensorboard=false"]
    env = {"JAXRECO_CACHE": str(tmp_path / "cache")}
    p = run_cli(["jaxreco.cli.train", f"hydra.run.dir={tmp_path / 'one'}", "mesh=single",
                 *common], cwd=tmp_path, env_extra=env)
    assert p.returncode == 0, p.stderr[-3000:]
    port, procs = _free_port(), []
    for i in range(2):
        e = dict(os.environ, **env, JAXRECO_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAXRECO_NUM_PROCESSES="2", JAXRECO_PROCESS_ID=str(i),
                 XLA_FLAGS="--xla_force_host_platform_device_count=1")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jaxreco.cli.train", f"hydra.run.dir={tmp_path / 'two'}",
             "mesh=mp", *common], cwd=tmp_path, env=e, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    for pr in procs:
        _, err = pr.communicate(timeout=300)
        assert pr.returncode == 0, err[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert json.loads((tmp_path / "two" / "run.json").read_text())["process_count"] == 2
    for k, v in one.items():
        if not k.startswith("perf/"):
            assert two[k] == pytest.approx(v, abs=1e-5), k
