"""Business rules (numpy only): the vectorised ranking equals a plain loop, and bad files are named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxreco.serve.layout import EXCLUDED_SCORE
from jaxreco.serve.rules import BusinessRules, CompiledRules, RulesError, top_k

EXC = np.float32(EXCLUDED_SCORE)


def _loop(scores, k, exclude, boost, cap, cats):
    """Reference: one row at a time, in pure Python."""
    cand = []
    for i, s in enumerate(scores.tolist()):
        if s <= EXC or i in exclude:
            continue
        cand.append((-(np.float32(s) + np.float32(boost.get(i, 0.0))), i))
    cand.sort()
    out, per = [], {}
    for neg, i in cand:
        if cap is not None:
            if per.get(cats[i], 0) >= cap:
                continue
            per[cats[i]] = per.get(cats[i], 0) + 1
        out.append(i)
        if len(out) == k:
            break
    return out


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_top_k_equals_loop(seed):
    rng = np.random.default_rng(seed)
    n, b = int(rng.integers(20, 400)), int(rng.integers(1, 9))
    scores = rng.normal(size=(b, n)).astype(np.float32)
    scores[0, : n // 2] = np.round(scores[0, : n // 2], 1)  # many ties
    scores[:, rng.choice(n, n // 4, replace=False)] = EXC  # seen
    ncat = int(rng.integers(1, 6))
    cats = rng.integers(0, ncat, n)
    ids = [f"i{j}" for j in range(n)]
    excl = {int(j) for j in rng.choice(n, 5, replace=False)}
    boost = {int(j): float(rng.uniform(0, 2)) for j in rng.choice(n, 4, replace=False)}
    cap = [None, 1, 2, 3][seed % 4]
    rules = CompiledRules.compile(
        BusinessRules((*[ids[j] for j in excl], "missing"), {ids[j]: v for j, v in boost.items()}, cap),
        {s: j for j, s in enumerate(ids)}, n, cats)
    for k in (1, 5, 40, n):
        idx, vals = top_k(scores.copy(), k, rules)
        for r in range(b):
            want = _loop(scores[r], k, excl, boost, cap, cats)
            assert idx[r].tolist() == want, (seed, k, r)
            np.testing.assert_allclose(
                vals[r], [scores[r, j] + np.float32(boost.get(j, 0.0)) for j in want], rtol=1e-6)


def test_cap_that_needs_more_than_the_first_candidates():
    # 300 items of category 0 score highest; the 10th allowed item is far down the list
    n = 1000
    scores = np.linspace(1, 0, n, dtype=np.float32)[None, :]
    cats = np.zeros(n, np.int64)
    cats[900:] = np.arange(100) + 1
    rules = CompiledRules.compile(BusinessRules(max_per_category=1), {}, n, cats)
    idx, _ = top_k(scores.copy(), 10, rules)
    assert idx[0].tolist() == [0] + list(range(900, 909))


def test_boost_never_resurrects_an_excluded_item():
    scores = np.asarray([[EXC, 0.5, 0.1]], np.float32)
    rules = CompiledRules.compile(BusinessRules(promoted_items={"a": 1e30}), {"a": 0, "b": 1, "c": 2},
                                  3, None)
    idx, vals = top_k(scores, 3, rules)
    assert idx[0].tolist() == [1, 2]
    assert rules.is_promoted.tolist() == [True, False, False]


def test_rules_file_errors_name_the_field(tmp_path):
    cases = [
        ({"exclude": []}, "unknown field(s) ['exclude']"),
        ({"exclude_items": "x"}, "exclude_items must be a list of item ids"),
        ({"promoted_items": ["x"]}, "promoted_items must map item id -> boost"),
        ({"promoted_items": {"x": "big"}}, "promoted_items['x'] must be a finite number"),
        ({"max_per_category": 0}, "max_per_category must be a positive integer or null"),
        ([], "expected a JSON object"),
    ]
    for body, msg in cases:
        p = tmp_path / "rules.json"
        p.write_text(json.dumps(body))
        with pytest.raises(RulesError) as e:
            BusinessRules.load(p)
        assert msg in str(e.value) and str(p) in str(e.value)
    p.write_text("{nope")
    with pytest.raises(RulesError, match="not valid JSON"):
        BusinessRules.load(p)
    with pytest.raises(RulesError, match="cannot read rules file"):
        BusinessRules.load(tmp_path / "missing.json")
    with pytest.raises(RulesError, match="needs item categories"):
        CompiledRules.compile(BusinessRules(max_per_category=2), {}, 3, None)
    ok = BusinessRules.from_dict({"exclude_items": [1, "2"], "promoted_items": {"3": 1},
                                  "max_per_category": 2})
    assert ok == BusinessRules(("1", "2"), {"3": 1.0}, 2)
