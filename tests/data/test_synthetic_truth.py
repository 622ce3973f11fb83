"""The synthetic generator's ground truth (the AUC ceiling of ``synthetic_ctr``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxreco.data import synthetic
from jaxreco.metrics import auc


def _log(p):
    cols = ("user", "item", "event")
    parts = [tuple(b[c] for c in cols) for b in synthetic.blocks(p)]
    return {c: np.concatenate([x[i] for x in parts]) for i, c in enumerate(cols)}


def test_truth_matches_the_generated_log():
    p = synthetic.Params(num_interactions=150_000, num_users=1500, num_items=400, seed=3,
                         block_rows=20_000)      # several user blocks
    log = _log(p)
    key = log["user"].astype(np.int64) * p.num_items + log["item"]
    pairs, inv = np.unique(key, return_inverse=True)
    views = np.bincount(inv, weights=log["event"] == 0)
    clicks = np.bincount(inv, weights=log["event"] == 1)
    g = synthetic.ground_truth(dataclasses.asdict(p), pairs // p.num_items, pairs % p.num_items)
    np.testing.assert_array_equal(g["views"], views)
    # Per-view click probability: its view-weighted mean is the observed per-view CTR
    # (binomial standard error ~0.002 at ~120K views), and it ranks clicked pairs first.
    assert abs((g["p_view"] * views).sum() / views.sum() - clicks.sum() / views.sum()) < 0.01
    label = clicks > 0
    assert auc(g["p_any"], label) > auc(g["p_view"], label) > 0.7
    # Calibrated: predicted vs observed "any click" rate in deciles of p_any.
    order = np.argsort(g["p_any"])
    for part in np.array_split(order, 10):
        assert abs(g["p_any"][part].mean() - label[part].mean()) < 0.05


def test_truth_rejects_unknown_ids():
    p = synthetic.Params(num_interactions=1000, num_users=10, num_items=5)
    with pytest.raises(ValueError, match="outside"):
        synthetic.click_probability(p, np.array([10]), np.array([0]))
