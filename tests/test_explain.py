"""Reasons for each pick (jaxreco.explain): the iALS score of every item decomposes exactly
over the shopper's items, checked against the trainer's own fold-in solve
(jaxreco.foldin -> jaxreco.train.ials._solve_side). ``explain=true`` on a served model:
tests/test_complete.py (one server for both files)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxreco import explain, foldin


def _foldin(bias: bool, weights: bool, seed=0, num_items=70, d=6):
    rng = np.random.default_rng(seed)
    return foldin.FoldIn(
        item_vectors=rng.normal(0, 0.4, (num_items, d)).astype(np.float32),
        item_bias=rng.normal(0, 0.1, num_items).astype(np.float32) if bias else None,
        col_weight=rng.uniform(0.5, 1.5, num_items).astype(np.float32) if weights else None,
        alpha0=0.3, reg=0.05, nu=0.5)


@pytest.mark.parametrize("bias,weights", [(False, False), (True, False), (True, True)])
def test_contributions_sum_to_the_ials_foldin_score(bias, weights):
    f = _foldin(bias, weights)
    ex = explain.FoldInExplainer.from_foldin(f)
    rng = np.random.default_rng(1)
    histories = [rng.choice(f.num_items, n, replace=False) for n in (1, 3, 12, 40)]
    want = foldin.scores(f, foldin.fold_in(f, histories))      # the trainer's solve
    for h, w in zip(histories, want):
        items = np.arange(f.num_items)
        score, base, contrib = ex.explain(h, items)
        assert contrib.shape == (f.num_items, len(h))
        np.testing.assert_allclose(base + contrib.sum(1), score, rtol=0, atol=1e-9)
        np.testing.assert_allclose(score, w, rtol=0, atol=1e-5)


def test_an_item_is_explained_most_by_the_history_item_it_resembles():
    f = _foldin(False, False, seed=3)
    q = np.array(f.item_vectors)
    q[1] = q[0] * 1.01                                  # item 1 is a near copy of item 0
    f = dataclasses_replace(f, item_vectors=q)
    ex = explain.FoldInExplainer.from_foldin(f)
    _, _, contrib = ex.explain([0, 10, 20], [1])
    assert int(np.argmax(contrib[0])) == 0
    top = explain.top_contributions(["a", "b", "c"], contrib[0], top=2)
    assert top[0]["item"] == "a" and len(top) == 2
    with pytest.raises(ValueError, match="each item once"):
        ex.explain([0, 0], [1])


def dataclasses_replace(f, **kw):
    import dataclasses
    return dataclasses.replace(f, **kw)
