"""export_run on real ``jaxreco-train`` runs of every kind: the SavedModel reproduces the
trainer's own test figures -- RMSE (biased MF on ratings), sampled HR/NDCG@10 through the
``score`` signature (implicit dot, GMF, MLP, NeuMF), AUC through ``predict_ctr`` (a ctr model
with an item-side and a context feature) -- and never re-splits the data."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli, write_u_data

tf = pytest.importorskip("tensorflow", reason="export tests need the [export] extra (tensorflow-cpu)")

from jaxreco.serve import layout  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _train(tmp_path, *args, multirun=False):
    p = run_cli(["jaxreco.cli.train", *(["-m"] if multirun else []), *args,
                 "logger.tensorboard=false"], cwd=tmp_path,
                env_extra={"JAXRECO_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-3000:]


def _sampled_hr_ndcg(model, prepared: str) -> tuple[float, float]:
    """HR@10 / NDCG@10 of the SavedModel's ``score`` on the test split's fixed candidates
    (1 held-out item + negatives; ties count against the held-out item, as the trainer's)."""
    from jaxreco.data.prepare import load_split, load_table

    uv = load_table(prepared, "user_vocab")["raw_id"].astype(str)
    iv = load_table(prepared, "item_vocab")["raw_id"].astype(str)
    c = load_split(prepared, "test_candidates")
    users = np.asarray(c["user"])
    items = np.concatenate([np.asarray(c["item"])[:, None], np.asarray(c["negatives"])], 1)
    out = model.signatures["score"](user=tf.constant(uv[np.repeat(users, items.shape[1])]),
                                    item=tf.constant(iv[items.reshape(-1)]))
    assert out["known"].numpy().all()
    s = out["score"].numpy().reshape(items.shape)
    assert np.ptp(s) > 1e-3                       # the models are not constant
    rank = (s[:, 1:] >= s[:, :1]).sum(1)
    return float(np.mean(rank < 10)), float(np.mean(np.where(rank < 10, 1 / np.log2(rank + 2), 0.0)))


def _train_items(prepared: str, user: int) -> set[str]:
    """Raw ids of the user's training positives (``label > 0`` when the data has labels)."""
    from jaxreco.data.prepare import load_split, load_table

    schema = json.loads((Path(prepared) / "metadata.json").read_text())["schema"]["interactions"]
    train = load_split(prepared, "train", ["user", "item"] + (["label"] if "label" in schema else []))
    keep = np.asarray(train["user"]) == user
    if "label" in train:
        keep &= np.asarray(train["label"]) > 0
    iv = load_table(prepared, "item_vocab")["raw_id"].astype(str)
    return set(iv[np.asarray(train["item"])[keep]])


# ------------------------------------------------------------------ ratings: biased MF
def test_trained_run_exports_and_matches_the_trainers_test_rmse(tmp_path):
    from jaxreco import export as ex
    from jaxreco.run import restore_run

    data_dir = write_u_data(tmp_path / "ml-tiny")
    run = tmp_path / "run"
    _train(tmp_path, "debug=smoke", "trainer.epochs=1", f"dataset.path={data_dir}",
           f"hydra.run.dir={run}")
    metrics = json.loads((run / "metrics.json").read_text())

    path = ex.export_run(run, tmp_path / "models", 3)
    assert path == tmp_path / "models" / "3"
    meta = json.loads((path / "assets.extra" / "jaxreco.json").read_text())
    assert meta["model_info"]["checkpoint_step"] == metrics["train/best_step"]
    assert meta["model_info"]["model"] == "mf" and meta["model_info"]["task"] == "rating"

    # the split the run's own task holds (restored from the prepared directory, not re-made)
    from jaxreco.data.prepare import load_table
    r = restore_run(str(run))
    uv = load_table(r.task.path, "user_vocab")["raw_id"].astype(str)
    iv = load_table(r.task.path, "item_vocab")["raw_id"].astype(str)
    test, train = r.task.split["test"], r.task.split["train"]
    m = tf.saved_model.load(str(path))
    out = m.signatures["score"](user=tf.constant(uv[test["user"]]), item=tf.constant(iv[test["item"]]))
    assert out["known"].numpy().all()
    lo, hi = r.cfg.dataset.rating_range
    pred = np.clip(out["score"].numpy().astype(np.float64), lo, hi)
    rmse = float(np.sqrt(np.mean((pred - np.asarray(test["rating"])) ** 2)))
    assert abs(rmse - metrics["test/rmse"]) < 1e-4, (rmse, metrics["test/rmse"])
    # the training items are excluded from recommendations (they sort last, at the
    # excluded score: a user of this tiny set has seen most of its 40 items)
    u = int(test["user"][0])
    rec = m.signatures["recommend"](user=tf.constant([uv[u]]), k=tf.constant(len(iv)))
    seen = set(iv[np.asarray(train["item"])[np.asarray(train["user"]) == u]])
    real = rec["scores"].numpy()[0] > np.float32(layout.EXCLUDED_SCORE)
    assert seen and set(rec["items"].numpy()[0][real].astype(str)) == set(iv) - seen
    # a step the run did not keep is refused, naming the kept ones
    with pytest.raises(ex.ExportError, match=r"has no step 12345; steps: \["):
        ex.export_run(run, tmp_path / "models", 4, step=12345)


# ------------------------------------------------------------------ implicit feedback
@pytest.fixture
def ml_groups(tmp_path):
    """60 users in 4 taste groups, each rating 30 of its group's 50 items."""
    rng = np.random.default_rng(0)
    d = tmp_path / "ml-groups"
    d.mkdir()
    (d / "u.data").write_text("".join(
        f"{u + 1}\t{(u % 4) * 50 + i + 1}\t4\t{880000000 + int(rng.integers(0, 10**7))}\n"
        for u in range(60) for i in rng.choice(50, 30, replace=False)))
    return d


def test_implicit_dot_product_run_exports_and_matches_the_trainers_ranking(tmp_path, ml_groups,
                                                                           monkeypatch):
    """An iALS run (implicit feedback, dot product): the SavedModel's scores give the
    trainer's sampled HR/NDCG@10 exactly, and recommendations skip the training positives."""
    from jaxreco import export as ex
    from tests.test_ials import IALS
    from tests.test_implicit import COMMON

    run = tmp_path / "run"
    _train(tmp_path, f"dataset.path={ml_groups}", f"hydra.run.dir={run}", *COMMON, *IALS)
    metrics = json.loads((run / "metrics.json").read_text())
    monkeypatch.setenv("JAXRECO_CACHE", str(tmp_path / "cache"))   # the run's prepared data
    path = ex.export_run(run, tmp_path / "models", 1)
    prep = json.loads((run / "splits.json").read_text())["prepared"]
    m = tf.saved_model.load(str(path))
    hr, ndcg = _sampled_hr_ndcg(m, prep)
    assert hr == pytest.approx(metrics["test/hr@10"], abs=1e-9)
    assert ndcg == pytest.approx(metrics["test/ndcg@10"], abs=1e-6)
    from jaxreco.data.prepare import load_split
    u = int(load_split(prep, "test_candidates")["user"][0])
    seen = _train_items(prep, u)
    r = m.signatures["recommend"](user=tf.constant([str(u + 1)]), k=tf.constant(20))
    assert seen and not seen & set(r["items"].numpy()[0].astype(str))


@pytest.mark.slow  # ~25 s: three trainings; ml1m_ncf_neumf exports in the default run
def test_gmf_mlp_and_neumf_runs_export_and_reproduce_the_trainers_hr_at_10(tmp_path, ml_groups,
                                                                          monkeypatch):
    """Three combiners trained in one sweep process; each export's ``score`` gives the
    trainer's sampled HR@10 (exactly) and NDCG@10 (1e-6)."""
    from jaxreco import export as ex
    from tests.test_implicit import COMMON

    sweep = tmp_path / "sweep"
    _train(tmp_path, f"dataset.path={ml_groups}", f"hydra.sweep.dir={sweep}",
           "hydra.sweep.subdir=${model.combiner}", *COMMON, "model.combiner=gmf,mlp,both",
           "model.dim=8", "model.mlp_dims=[16,8]", "trainer.epochs=3", multirun=True)
    monkeypatch.setenv("JAXRECO_CACHE", str(tmp_path / "cache"))
    for combiner, dim in (("gmf", 8), ("mlp", 16), ("both", 24)):
        run = sweep / combiner
        metrics = json.loads((run / "metrics.json").read_text())
        path = ex.export_run(run, tmp_path / "models" / combiner, 1)
        meta = json.loads((path / "assets.extra" / "jaxreco.json").read_text())
        assert meta["model_info"]["combiner"] == combiner and meta["embedding_dim"] == dim
        assert "predict_ctr" not in meta["signatures"]
        prep = json.loads((run / "splits.json").read_text())["prepared"]
        hr, ndcg = _sampled_hr_ndcg(tf.saved_model.load(str(path)), prep)
        assert hr == pytest.approx(metrics["test/hr@10"], abs=1e-9), combiner
        assert ndcg == pytest.approx(metrics["test/ndcg@10"], abs=1e-6), combiner


# ------------------------------------------------------------------ ctr: side + context
def _obd_wheel(cache: Path, n=4000, n_users=150, n_items=30, seed=0) -> None:
    """A stand-in for the ``obp==0.4.1`` wheel (the zozotown-obd source reads its CSVs):
    clicks depend on the user's group x the item's category and on the position."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, 4, n_items)
    items = "".join(f"{i},{i},{rng.normal():.3f},cat{cat[i]},x,y\n" for i in range(n_items))
    u, i, pos = rng.integers(0, n_users, n), rng.integers(0, n_items, n), rng.integers(1, 4, n)
    logit = -1.5 + 2.5 * (cat[i] == u % 4) - 0.7 * (pos - 1)
    click = rng.random(n) < 1 / (1 + np.exp(-logit))
    rows = "".join(
        f"{r},2019-11-24 {r // 3600 % 24:02d}:{r // 60 % 60:02d}:{r % 60:02d}.000000+00:00,"
        f"{i[r]},{pos[r]},{int(click[r])},0.0333,f{u[r]},g{u[r] % 7},h,k,0.0\n" for r in range(n))
    head = (",timestamp,item_id,position,click,propensity_score,user_feature_0,user_feature_1,"
            "user_feature_2,user_feature_3,user-item_affinity_0\n")
    cache.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("obp/dataset/obd/random/all/all.csv", head + rows)
        z.writestr("obp/dataset/obd/random/all/item_context.csv",
                   ",item_id,item_feature_0,item_feature_1,item_feature_2,item_feature_3\n" + items)
    (cache / "obp-0.4.1-py3-none-any.whl").write_bytes(buf.getvalue())


def test_ctr_run_with_side_and_context_features_exports_predict_ctr_with_the_trainers_auc(
        tmp_path, monkeypatch):
    """``experiment=zozotown_ctr`` (MLP tower, item category, impression position) on a
    stand-in OBD wheel: ``predict_ctr`` on the test split gives the trainer's test AUC."""
    from jaxreco import export as ex
    from jaxreco import metrics as metrics_lib
    from jaxreco.data.prepare import load_split, load_table

    wheels = tmp_path / "wheels"
    _obd_wheel(wheels)
    run = tmp_path / "ctr"
    _train(tmp_path, "experiment=zozotown_ctr", f"dataset.cache_dir={wheels}",
           "dataset.policies=[random]", "trainer.epochs=3", "trainer.progress_bar=false",
           "trainer.async_checkpoint=false", f"hydra.run.dir={run}")
    metrics = json.loads((run / "metrics.json").read_text())
    monkeypatch.setenv("JAXRECO_CACHE", str(tmp_path / "cache"))
    path = ex.export_run(run, tmp_path / "models", 1)
    prep = json.loads((run / "splits.json").read_text())["prepared"]
    meta = json.loads((path / "assets.extra" / "jaxreco.json").read_text())
    train = load_split(prep, "train", ["position"])
    mode = int(np.bincount(train["position"]).argmax())
    assert meta["context_features"] == {"position": {"vocab_size": 4, "default": mode}}
    assert meta["heads"] == ["click"] and meta["signatures"][-1] == "predict_ctr"
    assert meta["has_item_category"] and meta["model_info"]["side_features"] == ["category"]

    uv = load_table(prep, "user_vocab")["raw_id"].astype(str)
    iv = load_table(prep, "item_vocab")["raw_id"].astype(str)
    test = load_split(prep, "test", ["user", "item", "label", "position"])
    m = tf.saved_model.load(str(path))
    out = m.signatures["predict_ctr"](user=tf.constant(uv[test["user"]]),
                                      item=tf.constant(iv[test["item"]]),
                                      position=tf.constant(np.asarray(test["position"], np.int32)))
    assert out["known"].numpy().all()
    auc = metrics_lib.auc(out["click"].numpy(), test["label"])
    assert auc == pytest.approx(metrics["test/auc"], abs=1e-6), (auc, metrics["test/auc"])
    assert auc > 0.6
    # score / recommend: the click logit in the default context
    s = m.signatures["score"](user=tf.constant(uv[test["user"][:5]]),
                              item=tf.constant(iv[test["item"][:5]]))["score"].numpy()
    p = m.signatures["predict_ctr"](user=tf.constant(uv[test["user"][:5]]),
                                    item=tf.constant(iv[test["item"][:5]]),
                                    position=tf.constant([mode] * 5, tf.int32))["click"].numpy()
    np.testing.assert_allclose(1 / (1 + np.exp(-s)), p, atol=1e-5)
    u = int(test["user"][0])
    seen = _train_items(prep, u)
    rec = m.signatures["recommend"](user=tf.constant([uv[u]]), k=tf.constant(5))
    assert not seen & set(rec["items"].numpy()[0].astype(str))
