"""Each task built from a config and prepared data, in this process: what it trains on,
what its batches hold, and that a run restores from what it recorded (no re-split)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from flax import nnx

from jaxreco import models, optim, run as run_lib
from jaxreco.sharding import batch_sharding, make_mesh
from jaxreco.train import setup, tasks
from jaxreco.train.state import create_state
from jaxreco.train.tasks import PreparedData
from tests.conftest import low_rank_ratings, write_u_data
from tests.support import ROOT, compose_train, train, write_rows

ONE_DEVICE = ["mesh.axes.data=1", "mesh.axes.model=1"]
QUIET = ["trainer.progress_bar=false", "trainer.async_checkpoint=false",
         "logger.tensorboard=false", *ONE_DEVICE]


@pytest.fixture
def rating_files(tmp_path):
    """train / val / test CSV files of a low-rank rating model; the test file's (user,
    item) pairs are all distinct and none is in train (so a reshuffle would show)."""
    u, i, r, ts = low_rank_ratings(num_users=50, num_items=30, n=3000, seed=1)
    rows = sorted({(a, b): (a, b, c, d) for a, b, c, d in zip(u, i, r, ts)}.values())
    rng = np.random.default_rng(0)
    code = rng.choice(3, len(rows), p=[0.8, 0.1, 0.1])
    paths = {}
    for k, name in enumerate(("train", "val", "test")):
        paths[name] = write_rows(tmp_path / f"{name}.csv", "user,item,rating,ts",
                                 [rows[j] for j in np.flatnonzero(code == k)])
    return paths, {name: [rows[j] for j in np.flatnonzero(code == k)]
                   for k, name in enumerate(("train", "val", "test"))}


def _from_files(paths) -> list[str]:
    return ["dataset=from-files", f"dataset.train={paths['train']}",
            f"dataset.val={paths['val']}", f"dataset.test={paths['test']}",
            "dataset.columns.rating=rating", "dataset.columns.timestamp=ts"]


def test_rating_run_on_from_files_evaluates_exactly_the_test_files_rows(tmp_path,
                                                                         rating_files,
                                                                         cache_env):
    paths, rows = rating_files
    m = train(tmp_path / "run", ["experiment=ml100k_mf", *_from_files(paths), "model.dim=4",
                                 "trainer.epochs=3", "trainer.batch_size=64", *QUIET])
    r = run_lib.restore_run(tmp_path / "run")
    d = r.task.data
    uv = d.table("user_vocab")["raw_id"].astype(str)
    iv = d.table("item_vocab")["raw_id"].astype(str)
    for split in ("train", "val", "test"):
        s = r.task.split[split]
        got = sorted(zip(uv[s["user"]].astype(int), iv[s["item"]].astype(int),
                         s["rating"].astype(int)))
        assert got == sorted((a, b, c) for a, b, c, _ in rows[split]), split
    # the test RMSE is the model's on exactly those rows
    test = r.task.split["test"]
    model = nnx.merge(r.graphdef, r.state.tables, r.state.dense)
    from jaxreco.models.layers import gather_rows
    batch = {"user": test["user"], "item": test["item"]}
    feats = {t: tuple(f for f in fs if f in batch) for t, fs in model.table_features.items()}
    pred = np.clip(np.asarray(model.score(gather_rows(r.state.table_values(), batch, feats),
                                          batch)), 1, 5)
    assert np.sqrt(np.mean((pred - test["rating"]) ** 2)) == pytest.approx(m["test/rmse"],
                                                                        abs=1e-5)
    assert run_lib.evaluate_run(tmp_path / "run")["test/rmse"] == pytest.approx(
        m["test/rmse"], abs=1e-6)


def test_test_users_never_seen_in_training_are_counted_and_all_unseen_fails(tmp_path,
                                                                            cache_env):
    rows = [(u, i, 1 + (u + i) % 5, 880000000 + 10 * u + i) for u in range(1, 31)
            for i in range(1, 21)]
    train_rows = [r for r in rows if r[0] <= 20]
    files = {"train": write_rows(tmp_path / "train.csv", "user,item,rating,ts", train_rows),
             "val": write_rows(tmp_path / "val.csv", "user,item,rating,ts", rows[:5]),
             # 2 rows of a known user, 3 of users 21 and 22 that training never saw
             "test": write_rows(tmp_path / "test.csv", "user,item,rating,ts",
                                [rows[7], rows[8], (21, 1, 3, 1), (21, 2, 4, 2), (22, 3, 5, 3)])}
    m = train(tmp_path / "run", ["experiment=ml100k_mf", *_from_files(files), "model.dim=4",
                                 "trainer.epochs=1", "trainer.batch_size=64", *QUIET])
    assert (m["test/cold_users"], m["test/cold_user_rows"], m["val/cold_users"]) == (2, 3, 0)
    files["test"] = write_rows(tmp_path / "test.csv", "user,item,rating,ts",
                               [(25, 1, 3, 1), (26, 2, 4, 2)])
    with pytest.raises(ValueError, match="none of the 2 users of the test split has a train row"):
        train(tmp_path / "run2", ["experiment=ml100k_mf", *_from_files(files), "model.dim=4",
                                  "trainer.epochs=1", "trainer.batch_size=64", *QUIET])
    assert not (tmp_path / "run2" / "metrics.json").exists()


def test_a_scheduled_run_restores_and_rescores_to_its_metrics(tmp_path, ml_dir, cache_env):
    m = train(tmp_path / "run", ["experiment=ml100k_mf", f"dataset.path={ml_dir}",
                                 "optimizer.schedule=cosine", "model.dim=4",
                                 "trainer.epochs=3", "trainer.batch_size=128", *QUIET])
    cfg = run_lib.load_config(tmp_path / "run")
    assert cfg.optimizer.schedule == "cosine"
    again = run_lib.evaluate_run(tmp_path / "run")
    assert again["step"] == m["train/best_step"]
    for k in ("val/rmse", "test/rmse", "test/mae"):
        assert again[k] == pytest.approx(m[k], abs=1e-6), k


def test_restore_refuses_a_run_whose_prepared_data_changed(tmp_path, ml_dir, cache_env):
    train(tmp_path / "run", ["experiment=ml100k_mf", f"dataset.path={ml_dir}", "model.dim=4",
                             "trainer.epochs=1", "trainer.batch_size=128", *QUIET])
    rec = json.loads((tmp_path / "run" / "splits.json").read_text())
    rec["train/sha256"] = "0" * 64
    (tmp_path / "run" / "splits.json").write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="changed since training"):
        run_lib.restore_run(tmp_path / "run")
    rec["prepared"] = str(tmp_path / "gone")
    (tmp_path / "run" / "splits.json").write_text(json.dumps(rec))
    with pytest.raises(FileNotFoundError, match="gone"):
        run_lib.restore_run(tmp_path / "run")


def _built(cfg):
    data = PreparedData.prepare(cfg)
    task = tasks.build(cfg, data)
    mesh = make_mesh(cfg.mesh.axes)
    ms = setup.model_state(cfg, task, mesh)
    task.setup(ms.graphdef, ms.tables, ms.abstract_model,
               batch_sharding(mesh, dict(cfg.mesh.rules)), mesh)
    return task, ms


def test_rating_task_batches_ratings_and_scores_rmse(ml_dir, cache_env):
    cfg = compose_train(["experiment=ml100k_mf", f"dataset.path={ml_dir}", "model.dim=4",
                         *ONE_DEVICE])
    task, ms = _built(cfg)
    assert isinstance(task, tasks.RatingTask)
    n = sum(len(task.split[s]["user"]) for s in ("train", "val", "test"))
    assert len(task.split["test"]["user"]) == round(0.1 * n)
    assert set(task.train_cols) == {"user", "item", "rating"}
    res = task.final(ms.state)
    assert {k for k in res if "cold" not in k} == {"val/rmse", "val/mae", "test/rmse",
                                                   "test/mae"}
    assert all(np.isfinite(v) for v in res.values())


def test_implicit_task_draws_negatives_that_are_not_train_positives(tmp_path, cache_env):
    ml_dir = write_u_data(tmp_path / "ml-sparse", num_users=60, num_items=200, n=2400)
    cfg = compose_train(["experiment=ml1m_ncf_mf_lazy_adam", f"dataset.path={ml_dir}",
                         "dataset.name=movielens-100k", "model.mf_dim=4",
                         "task.prepare.negatives.num=10", *ONE_DEVICE])
    task, ms = _built(cfg)
    assert isinstance(task, tasks.ImplicitTask)
    k = int(cfg.task.num_negatives)
    b = task.transform({c: v[:64] for c, v in task.train_cols.items()}, step=3, shard_index=0)
    assert b["neg_item"].shape == (64 * k,) and b["neg_item"].dtype == np.int32
    pos = set(zip(task.train_cols["user"].tolist(), task.train_cols["item"].tolist()))
    pairs = zip(np.repeat(b["user"], k).tolist(), b["neg_item"].tolist())
    assert not pos & set(pairs)
    again = task.transform({c: v[:64] for c, v in task.train_cols.items()}, 3, 0)
    np.testing.assert_array_equal(b["neg_item"], again["neg_item"])   # a function of the step
    loss, _ = task.loss_fn(ms.abstract_model)(
        nnx.merge(ms.graphdef, ms.state.tables, ms.state.dense),
        ms.tables.lookup(ms.state.table_values(), b), b)
    assert np.isfinite(float(loss))
    res = task.evaluate(ms.state, "test", full=True)
    assert {"hr@10", "ndcg@10", "full/hr@10"} <= set(res)


def test_ctr_task_labels_each_head_and_scores_auc(cache_env):
    cfg = compose_train(["experiment=synthetic_ctr", "dataset.num_interactions=20000",
                         "dataset.num_users=200", "dataset.num_items=100", "trainer.batch_size=256",
                         *ONE_DEVICE])
    task, ms = _built(cfg)
    assert isinstance(task, tasks.CtrTask)
    b = task.transform({c: v[:32] for c, v in task.train_cols.items()}, 0, 0)
    assert "label" not in b and b["_y_click"].dtype == np.float32
    np.testing.assert_array_equal(b["_y_click"], task.train_cols["label"][:32] > 0)
    res = task.final(ms.state)
    assert 0.0 <= res["test/auc"] <= 1.0 and "test/truth_auc" in res


def test_an_unknown_task_kind_is_refused_naming_the_kinds():
    cfg = SimpleNamespace(task=SimpleNamespace(kind="nope"))
    with pytest.raises(ValueError, match=r"task.kind='nope': must be one of \['rating', "):
        tasks.build(cfg, None)


EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_builds_its_model_and_state(name):
    """Each experiment's model is built from its config alone (tiny vocabularies, no data):
    shapes first, then a sharded state with the run's optimizers."""
    cfg = compose_train([f"experiment={name}", *ONE_DEVICE], name=name)
    kind = getattr(cfg.task.kind, "value", cfg.task.kind)
    model_fn = models.build(cfg.model, num_users=11, num_items=13, global_bias=3.5, seed=0,
                            side_vocab={f: 4 for f in cfg.task.side_features},
                            context_vocab={f: 5 for f in cfg.task.context_features},
                            negatives=kind == "implicit")
    abstract = nnx.eval_shape(model_fn)
    tables = dict(abstract.table_features)
    assert tables
    row_opt = optim.row_optimizer(cfg.optimizer.name, lr=cfg.optimizer.lr)
    dense_tx = optim.dense_optimizer(cfg.optimizer.dense_name, cfg.optimizer.dense_lr)
    _, state, _ = create_state(model_fn, row_opt, dense_tx, make_mesh(cfg.mesh.axes),
                               dict(cfg.mesh.rules))
    assert set(state.tables) == set(tables)
    assert all(v.shape[0] >= 4 and np.isfinite(np.asarray(v)).all()
               for v in state.table_values().values())
