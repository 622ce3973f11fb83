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
