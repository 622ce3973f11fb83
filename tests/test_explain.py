"""Reasons for each pick (jaxreco.explain): the iALS score of every item decomposes exactly
over the shopper's items, checked against the trainer's own fold-in solve
(jaxreco.foldin -> jaxreco.train.ials._solve_side), and ``explain=true`` on ``/recommend``."""

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


# ----------------------------------------------------------------- served: explain=true
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("tensorflow", reason="serving tests need tensorflow-cpu")
    pytest.importorskip("fastapi", reason="serving tests need the [serve] extra")
    from jaxreco.export import SessionModel
    from tests import test_export_support as S

    tmp = tmp_path_factory.mktemp("explain")
    data = S.make_mf(seed=5)
    p = data.params
    f = foldin.FoldIn(p["item_embed"], p["item_bias"][:, 0], None, alpha0=0.3, reg=0.05, nu=1.0)
    S.export(data, tmp / "models", 1, session=SessionModel("foldin", foldin=f))
    server = S.Server(tmp / "models", tmp / "server.log")
    try:
        server.wait()
        yield server.client, data, f
    finally:
        server.stop()


def test_recommend_explain_sums_to_the_served_ials_score(served):
    client, data, f = served
    sess = [str(data.item_vocab[j]) for j in (3, 17, 40)]
    st, out = client.post("/recommend", {"session": [{"item": x} for x in sess], "k": 6,
                                         "explain": True})
    assert st == 200, out
    items = out["results"][0]["items"]
    assert len(items) == 6
    for x in items:
        e = x["explain"]
        assert e["method"] == "foldin"
        assert {h["item"] for h in e["history_items"]} == set(sess)      # all 3 listed
        total = e["base"] + sum(h["contribution"] for h in e["history_items"])
        assert abs(total - x["score"]) < 1e-5                            # the served score
        assert abs(e["score"] - x["score"]) < 1e-5
        c = [h["contribution"] for h in e["history_items"]]
        assert c == sorted(c, reverse=True)
    st, plain = client.post("/recommend", {"session": [{"item": x} for x in sess], "k": 6})
    assert [x["item"] for x in plain["results"][0]["items"]] == [x["item"] for x in items]
    assert "explain" not in plain["results"][0]["items"][0]


def test_recommend_explain_for_a_known_user_names_their_own_items(served):
    client, data, f = served
    u = 7
    st, out = client.post("/recommend", {"user": str(data.user_vocab[u]), "k": 4,
                                         "explain": True})
    assert st == 200, out
    seen = {str(data.item_vocab[j]) for j in data.seen(u)}
    ex = explain.FoldInExplainer.from_foldin(f)
    hist = sorted(data.seen(u))
    for x in out["results"][0]["items"]:
        e = x["explain"]
        assert e["method"] == "foldin" and len(e["history_items"]) == min(3, len(seen))
        assert {h["item"] for h in e["history_items"]} <= seen
        i = int(np.flatnonzero(data.item_vocab == x["item"])[0])
        score, base, contrib = ex.explain(hist, [i])
        assert abs(e["score"] - score[0]) < 1e-4 and abs(e["base"] - base[0]) < 1e-4
    st, out = client.post("/recommend", {"user": "nobody", "k": 2, "explain": True})
    assert st == 200 and out["results"][0]["items"][0]["explain"]["method"] == "none"
