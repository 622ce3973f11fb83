"""Ranking and pointwise metrics against hand-computed values."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxreco import metrics as M

L2 = lambda p: 1.0 / math.log2(p + 2)  # noqa: E731  discount of 0-based position p


def _rank(scores, rel, rel_mask=None, cand=None, ks=(1, 2, 3, 10)):
    s = jnp.asarray(scores, jnp.float32)
    rel = jnp.asarray(rel, jnp.int32)
    rm = jnp.ones(rel.shape, bool) if rel_mask is None else jnp.asarray(rel_mask)
    c = jnp.ones(s.shape, bool) if cand is None else jnp.asarray(cand)
    return M.ranking_metrics({k: np.asarray(v) for k, v in M.ranking_sums(s, c, rel, rm, ks).items()})


def test_single_relevant_item():
    m = _rank([[0.9, 0.5, 0.7, 0.1]], [[2]])           # one candidate above: position 1
    assert m["hr@1"] == 0 and m["hr@2"] == 1
    assert m["ndcg@2"] == pytest.approx(L2(1))
    assert m["mrr"] == pytest.approx(0.5)
    assert m["recall@2"] == 1 and m["count"] == 1


def test_ties_count_against_the_relevant_item():
    m = _rank([[0.5, 0.5, 0.5]], [[1]])                 # two tied non-relevant: position 2
    assert m["hr@2"] == 0 and m["hr@3"] == 1
    assert m["ndcg@3"] == pytest.approx(0.5)
    assert m["mrr"] == pytest.approx(1 / 3)


def test_query_without_relevant_item_is_skipped():
    m = _rank([[0.9, 0.5, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]], [[2], [0]],
              rel_mask=[[True], [False]])
    assert m["count"] == 1
    assert m["hr@2"] == 1 and m["mrr"] == pytest.approx(0.5)


def test_k_larger_than_candidate_list():
    m = _rank([[0.1, 0.9, 0.3]], [[0]])                 # last of 3 candidates
    assert m["hr@10"] == 1 and m["recall@10"] == 1
    assert m["ndcg@10"] == pytest.approx(L2(2))
    idx, valid = M.top_k_candidates(jnp.asarray([[0.1, 0.9, 0.3]]), jnp.ones((1, 3), bool), 10)
    assert idx.shape == (1, 3) and bool(valid.all())


def test_several_relevant_items():
    # relevant 1 (0.8) at position 1; relevant 3 (0.7) below 0.9 and 0.8: position 2
    m = _rank([[0.9, 0.8, 0.1, 0.7]], [[1, 3]])
    assert m["hr@2"] == 1
    assert m["recall@2"] == pytest.approx(0.5)
    assert m["ndcg@2"] == pytest.approx(L2(1) / (1 + L2(1)))
    assert m["ndcg@3"] == pytest.approx((L2(1) + L2(2)) / (1 + L2(1)))
    assert m["mrr"] == pytest.approx(0.5)


def test_masked_candidates_are_ignored():
    # item 0 scores highest but is a training item (not a candidate)
    m = _rank([[0.9, 0.5, 0.7, 0.1]], [[2]], cand=[[False, True, True, True]])
    assert m["hr@1"] == 1 and m["mrr"] == 1 and m["ndcg@1"] == 1


def test_chunks_merge_to_the_whole():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(6, 20)).round(1)                # rounding makes ties
    rel = rng.integers(0, 20, (6, 2))
    rel[:, 1] = (rel[:, 0] + 1) % 20
    ks = (3, 10)
    whole = M.ranking_sums(jnp.asarray(s), jnp.ones(s.shape, bool), jnp.asarray(rel),
                           jnp.ones(rel.shape, bool), ks)
    parts = None
    for a in (slice(0, 2), slice(2, 6)):
        parts = M.merge(parts, M.ranking_sums(jnp.asarray(s[a]), jnp.ones(s[a].shape, bool),
                                              jnp.asarray(rel[a]), jnp.ones(rel[a].shape, bool), ks))
    for k in whole:
        assert float(whole[k]) == pytest.approx(float(parts[k]), rel=1e-6)


def test_coverage():
    top = np.array([[0, 1], [1, 2], [1, 0]])
    valid = np.ones_like(top, bool)
    c = M.coverage(top, valid, num_items=10, ks=(1, 2))
    assert c == {"coverage@1": 0.2, "coverage@2": 0.3}


def test_auc_hand_computed():
    assert M.auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert M.auc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    assert M.auc(np.array([1.0, 2.0, 2.0]), np.array([0, 1, 0])) == pytest.approx(0.75)
    assert math.isnan(M.auc(np.array([1.0]), np.array([1])))


def test_pointwise_logloss_and_calibration():
    z = np.array([0.0, 0.0, math.log(3.0), -math.log(3.0)])   # p = .5, .5, .75, .25
    y = np.array([1, 0, 1, 0])
    m = M.pointwise_metrics(z, y, bins=2)
    assert m["logloss"] == pytest.approx((2 * math.log(2) + 2 * -math.log(0.75)) / 4)
    assert m["pred_ctr"] == pytest.approx(0.5) and m["obs_ctr"] == pytest.approx(0.5)
    assert m["calibration"] == pytest.approx(1.0)
    # bins [0, .5): {.25 (y 0)} ; [.5, 1]: {.5, .5, .75 (y 1, 0, 1)}
    assert m["ece"] == pytest.approx((abs(0.25 - 0) + abs(1.75 - 2)) / 4)
    assert m["auc"] == pytest.approx(1.0 * 3.5 / 4)   # pairs: (.5,.5) tie, others ordered
