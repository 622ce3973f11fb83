"""export_run on a real ``jaxreco-train`` run: the SavedModel reproduces the trainer's test RMSE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="export tests need the [export] extra (tensorflow-cpu)")

REPO = Path(__file__).resolve().parents[1]


def test_trained_run_exports_and_matches_the_trainers_test_rmse(tmp_path):
    from omegaconf import OmegaConf

    from jaxreco import export as ex
    from jaxreco.data import registry
    from jaxreco.data import split as split_lib

    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxreco.cli.train", "debug=smoke", "trainer.epochs=1",
         "logger.tensorboard=false", f"hydra.run.dir={run}"],
        cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "data" in (proc.stderr + proc.stdout).lower() and \
            not (run / "splits.json").exists():
        pytest.skip(f"the smoke dataset is not available here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())

    path = ex.export_run(run, tmp_path / "models", 3)
    assert path == tmp_path / "models" / "3"
    meta = json.loads((path / "assets.extra" / "jaxreco.json").read_text())
    assert meta["model_info"]["checkpoint_step"] == metrics["train/best_step"]

    cfg = OmegaConf.load(run / "config.yaml")
    data = registry.load(OmegaConf.to_container(cfg.dataset, resolve=True))
    sc = cfg.dataset.split
    test = split_lib.random_split(data, test_fraction=sc.test_fraction,
                                  val_fraction=sc.val_fraction, seed=sc.seed)["test"]
    m = tf.saved_model.load(str(path))
    out = m.signatures["score"](user=tf.constant(data.user_vocab[test.user].astype(str)),
                                item=tf.constant(data.item_vocab[test.item].astype(str)))
    assert out["known"].numpy().all()
    lo, hi = cfg.dataset.rating_range
    pred = np.clip(out["score"].numpy().astype(np.float64), lo, hi)
    rmse = float(np.sqrt(np.mean((pred - test.rating) ** 2)))
    assert abs(rmse - metrics["test/rmse"]) < 1e-4, (rmse, metrics["test/rmse"])
    # the training items are excluded from recommendations
    u = int(test.user[0])
    r = m.signatures["recommend"](user=tf.constant([str(data.user_vocab[u])]), k=tf.constant(20))
    train = split_lib.random_split(data, test_fraction=sc.test_fraction,
                                   val_fraction=sc.val_fraction, seed=sc.seed)["train"]
    seen = set(data.item_vocab[train.item[train.user == u]].astype(str))
    assert seen and not seen & set(r["items"].numpy()[0].astype(str))


def test_implicit_dot_product_run_exports_and_matches_the_trainers_ranking(tmp_path,
                                                                           monkeypatch):
    """An iALS run (implicit feedback, dot product): the SavedModel's scores give the
    trainer's sampled HR/NDCG@10 exactly, and recommendations skip the training positives."""
    from jaxreco import export as ex
    from jaxreco.data.prepare import load_split, load_table
    from tests.conftest import run_cli
    from tests.test_ials import IALS
    from tests.test_implicit import COMMON

    rng = np.random.default_rng(0)
    d = tmp_path / "ml-groups"
    d.mkdir()
    (d / "u.data").write_text("".join(
        f"{u + 1}\t{(u % 4) * 50 + i + 1}\t4\t{880000000 + int(rng.integers(0, 10**7))}\n"
        for u in range(60) for i in rng.choice(50, 30, replace=False)))
    run = tmp_path / "run"
    p = run_cli(["jaxreco.cli.train", f"dataset.path={d}", f"hydra.run.dir={run}", *COMMON,
                 *IALS], cwd=tmp_path, env_extra={"JAXRECO_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    monkeypatch.setenv("JAXRECO_CACHE", str(tmp_path / "cache"))   # the run's prepared data
    path = ex.export_run(run, tmp_path / "models", 1)
    prep = json.loads((run / "splits.json").read_text())["prepared"]
    uv = load_table(prep, "user_vocab")["raw_id"].astype(str)
    iv = load_table(prep, "item_vocab")["raw_id"].astype(str)
    c = load_split(prep, "test_candidates")
    users, negs = np.asarray(c["user"]), np.asarray(c["negatives"])
    items = np.concatenate([np.asarray(c["item"])[:, None], negs], 1)
    m = tf.saved_model.load(str(path))
    out = m.signatures["score"](user=tf.constant(uv[np.repeat(users, items.shape[1])]),
                                item=tf.constant(iv[items.reshape(-1)]))
    assert out["known"].numpy().all()
    s = out["score"].numpy().reshape(items.shape)
    rank = (s[:, 1:] >= s[:, :1]).sum(1)                 # ties count against the test item
    assert np.mean(rank < 10) == pytest.approx(metrics["test/hr@10"], abs=1e-9)
    ndcg = np.mean(np.where(rank < 10, 1 / np.log2(rank + 2), 0.0))
    assert ndcg == pytest.approx(metrics["test/ndcg@10"], abs=1e-6)
    train = load_split(prep, "train", ["user", "item"])
    u = int(users[0])
    seen = set(iv[np.asarray(train["item"])[np.asarray(train["user"]) == u]])
    r = m.signatures["recommend"](user=tf.constant([uv[u]]), k=tf.constant(20))
    assert seen and not seen & set(r["items"].numpy()[0].astype(str))
    with pytest.raises(ex.ExportError, match="combiner"):
        cfg = (run / "config.yaml").read_text().replace("combiner: dot", "combiner: mlp")
        (run / "config.yaml").write_text(cfg)
        ex.export_run(run, tmp_path / "models", 2)
