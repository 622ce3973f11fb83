"""Complete the cart: baskets, the learned basket model and its baselines
(jaxreco.complement), the numpy scorers the server uses (jaxreco.scenarios.basket), the
export's co-purchase/category files and ``POST /complete`` on a served model."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from jaxreco import complement as cp
from jaxreco.explain import FoldInExplainer
from jaxreco.scenarios import basket

NUM_ITEMS, NUM_CATS = 60, 5


def _planted(num_baskets=900, seed=0):
    """Baskets of a planted truth: item ``a`` goes with ``a+1`` and ``a+2`` (mod 60; other
    categories, as category = index mod 5), plus one uniform noise item. Rows are
    ``(user, item, basket, timestamp)``; 30 users, baskets in time order."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(num_baskets):
        a = int(rng.integers(NUM_ITEMS))
        items = {a, (a + 1) % NUM_ITEMS, (a + 2) % NUM_ITEMS, int(rng.integers(NUM_ITEMS))}
        rows += [(b % 30, i, b, 1000 + b) for i in items]
    u, i, o, t = (np.asarray(c) for c in zip(*rows))
    return cp.baskets_from_rows(u, i, o, t, NUM_ITEMS)


# ------------------------------------------------------------------------------ baskets
def test_baskets_group_order_lines_and_the_last_basket_of_each_user_is_test():
    b = cp.baskets_from_rows(user=[0, 0, 0, 0, 0, 1, 1, 0, 0],
                             item=[1, 2, 2, 3, 4, 5, 6, 7, 7],
                             basket=[10, 10, 10, 11, 11, 20, 21, 12, 12],
                             timestamp=[5, 5, 5, 6, 6, 1, 2, 7, 7], num_items=8)
    assert len(b) == 5 and b.user.tolist() == [0, 0, 0, 1, 1]
    assert [b.basket(k).tolist() for k in range(5)] == [[1, 2], [3, 4], [7], [5], [6]]
    train, val, test = cp.split_last_baskets(b)
    assert [test.basket(k).tolist() for k in range(len(test))] == [[7]]      # user 0 only
    assert [val.basket(k).tolist() for k in range(len(val))] == [[3, 4]]
    assert len(train) == 3                      # user 1 has 2 baskets: all stay in train
    carts, hidden, users = cp.hide_one(train, seed=0)
    assert len(carts) == 1 and users.tolist() == [0]
    assert sorted([*carts[0].tolist(), int(hidden[0])]) == [1, 2]


def test_training_pairs_hide_each_item_of_each_basket_in_turn():
    b = cp.baskets_from_rows([0, 0, 0, 0, 0], [1, 2, 3, 4, 5], [1, 1, 1, 2, 2],
                             [0, 0, 0, 1, 1], 6)
    ctx, tgt = cp.training_pairs(b, max_basket=4)
    got = sorted((int(t), tuple(sorted(c[c >= 0].tolist()))) for c, t in zip(ctx, tgt))
    assert got == [(1, (2, 3)), (2, (1, 3)), (3, (1, 2)), (4, (5,)), (5, (4,))]
    with pytest.raises(cp.ComplementError, match="no training basket holds 2..2 items"):
        cp.training_pairs(cp.baskets_from_rows([0] * 3, [1, 2, 3], [1] * 3, [0] * 3, 6), 2)


def test_bad_inputs_are_named():
    with pytest.raises(cp.ComplementError, match=r"item indices must lie in \[0, 3\)"):
        cp.baskets_from_rows([0], [3], [0], [0], 3)
    with pytest.raises(cp.ComplementError, match="TrainConfig.dim must be an integer >= 1"):
        cp.TrainConfig(dim=0)


# ------------------------------------------------------------------- learned vs baselines
@pytest.fixture(scope="session")
def planted_model():
    b = _planted()
    train, val, test = cp.split_last_baskets(b)
    model = cp.train(train, np.asarray([f"i{k}" for k in range(NUM_ITEMS)]),
                     cp.TrainConfig(dim=8, partners=10, epochs=3, batch_size=256, lr=0.02))
    return b, train, test, model


def test_learned_model_finds_the_planted_complements_better_than_popularity(planted_model):
    b, train, test, model = planted_model
    carts, hidden, users = cp.hide_one(train.select(np.arange(300)), seed=3)
    learned = cp.evaluate(model.scores, carts, hidden, users)
    co = cp.CoPurchase.from_baskets(train)
    pop = cp.evaluate(lambda c, u: np.broadcast_to(co.popularity(), (len(c), NUM_ITEMS)),
                      carts, hidden, users)
    # 3 of 4 items in a basket are planted: hiding one leaves its partners in the cart
    assert learned["hr"].mean() > 0.7 > 0.3 > pop["hr"].mean()
    # a cart {a, a+1} (noise aside) ranks a+2 first
    top = np.argsort(-model.scores([np.array([10, 11])])[0])
    assert 12 in top[:3].tolist()


def test_basket_model_contributions_sum_to_the_score_and_survive_a_file(planted_model, tmp_path):
    *_, model = planted_model
    cart = np.array([4, 9, 30])
    s = model.scores([cart])[0]
    for i in (5, 6, 40):
        c = model.contributions(cart, i)
        assert c.shape == (3,)
        assert abs(float(model.bias[i]) + c.sum() - s[i]) < 1e-5
    back = basket.BasketModel.load(model.save(tmp_path / "m.npz"))
    np.testing.assert_allclose(back.scores([cart]), model.scores([cart]), rtol=0, atol=1e-6)
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(basket.ComplementError, match="cannot read complement model"):
        basket.BasketModel.load(tmp_path / "bad.npz")


def test_reindexed_model_matches_items_by_raw_id(planted_model):
    *_, model = planted_model
    ids = np.asarray(["new"] + [f"i{k}" for k in range(NUM_ITEMS - 1, -1, -1)])  # reversed
    r = model.reindexed(ids)
    cart_old, cart_new = np.array([3, 7]), np.array([NUM_ITEMS - 3, NUM_ITEMS - 7])
    s_old, s_new = model.scores([cart_old])[0], r.scores([cart_new])[0]
    np.testing.assert_allclose(s_new[1:], s_old[::-1], atol=1e-5)
    assert s_new[0] < s_old.min()                       # an item it never saw comes last
    with pytest.raises(basket.ComplementError, match="shares no item id"):
        model.reindexed(["x", "y"])


def test_lift_scores_and_contributions_agree_between_scipy_and_the_served_numpy(planted_model):
    from jaxreco.export import co_purchase_counts

    b, train, *_ = planted_model
    order = np.repeat(np.arange(len(train)), train.sizes())
    stats = basket.CoPurchaseStats.from_lines(
        order, train.items, NUM_ITEMS, co_purchase_counts(order, train.items, NUM_ITEMS))
    stats.min_count = 1
    ref = cp.CoPurchase.from_baskets(train).lift_scorer(1)
    cart = np.array([0, 1, 17])
    s = stats.scores([cart])[0]
    order_ref = np.argsort(-ref([cart])[0], kind="stable")[:10]
    assert np.argsort(-s, kind="stable")[:10].tolist() == order_ref.tolist()
    tie = 1e-6 * stats.freq / stats.freq.max()
    for i in (2, 3, 18):
        assert abs(stats.contributions(cart, i).sum() + tie[i] - s[i]) < 1e-9


def test_prefer_other_categories_puts_the_carts_categories_last_and_one_per_category():
    cats = np.array([0, 0, 1, 1, 2, -1])
    scores = np.array([[5.0, 4.0, 3.0, 2.0, 1.0, 0.5]])
    out = basket.prefer_other_categories(scores, [np.array([0])], cats)[0]
    assert np.argsort(-out, kind="stable").tolist() == [2, 3, 4, 5, 0, 1]
    assert basket.one_per_category(np.array([2, 3, 4, 5, 0, 1]), cats, 10).tolist() == [2, 4, 5, 0]


# ----------------------------------------------------------------- served: POST /complete
@pytest.fixture(scope="session")
def served_basket_model(planted_model, tmp_path_factory):
    """One server for this file and tests/test_explain.py: an MF model exported with
    fold-in (iALS-style sessions), categories, co-purchase counts and the planted basket
    model; rules exclude item 13 and promote item 12. Yields ``(client, data, basket model,
    FoldIn)``."""
    pytest.importorskip("tensorflow", reason="serving tests need tensorflow-cpu")
    pytest.importorskip("fastapi", reason="serving tests need the [serve] extra")
    from jaxreco import foldin
    from jaxreco.export import SessionModel, co_purchase_counts
    from tests import test_export_support as S

    b, train, _, model = planted_model
    data = S.make_mf(num_items=NUM_ITEMS, seed=1, baskets=False, categories=False)
    data.categories = [f"cat{i % NUM_CATS}" for i in range(NUM_ITEMS)]
    model = basket.BasketModel(model.ctx, model.out, model.bias, model.nbr, model.w,
                               data.item_vocab.astype(str))      # the served items' ids
    order = np.repeat(np.arange(len(train)), train.sizes())
    co = co_purchase_counts(order, train.items, NUM_ITEMS)
    stats = basket.CoPurchaseStats.from_lines(order, train.items, NUM_ITEMS, co)
    tmp = tmp_path_factory.mktemp("complete")
    data.co = co
    p = data.params
    f = foldin.FoldIn(p["item_embed"], p["item_bias"][:, 0], None, alpha0=0.3, reg=0.05, nu=1.0)
    S.export(data, tmp / "models", 1, session=SessionModel("foldin", foldin=f), assets_extra={
        basket.COMPLEMENT_FILE: model.to_bytes(), basket.CO_PURCHASE_FILE: stats.to_bytes()})
    (tmp / "rules.json").write_text(json.dumps({"exclude_items": [data.item_id(13)],
                                                "promoted_items": {data.item_id(12): 1.0}}))
    server = S.Server(tmp / "models", tmp / "server.log", "--rules", str(tmp / "rules.json"))
    try:
        server.wait()
        yield server.client, data, model, f
    finally:
        server.stop()


@pytest.fixture
def served(served_basket_model):
    return served_basket_model


def test_complete_answers_exclude_the_cart_prefer_other_categories_and_explain(served):
    client, data, model, _ = served
    cart = [data.item_id(10), data.item_id(11)]
    st, body = client.post("/complete", {"items": cart + [cart[0]], "k": 8, "explain": True})
    assert st == 200, body
    got = [x["item"] for x in body["items"]]
    assert body["source"] == "learned" and len(got) == 8
    assert not set(got) & set(cart)                          # the cart is never answered
    assert data.item_id(13) not in got                       # excluded by the rules
    assert got[0] == data.item_id(12)                        # the planted complement
    assert {x["category"] for x in body["items"]}.isdisjoint({"cat0", "cat1"})
    s = model.scores([np.array([10, 11])])[0]
    for x in body["items"]:
        i = int(np.flatnonzero(data.item_vocab == x["item"])[0])
        assert abs(x["score"] - s[i]) < 1e-4
        e = x["explain"]
        total = e["base"] + sum(c["contribution"] for c in e["cart_items"])
        assert abs(total - x["score"]) < 1e-5                # a 2-item cart: both listed
    reasons = {r["kind"] for r in body["items"][0]["explain"]["reasons"]}
    assert reasons == {"promoted", "bought_together"}


def test_complete_one_per_category_user_and_unknown_items(served):
    client, data, *_ = served
    st, body = client.post("/complete", {"items": [data.item_id(20), "no-such-item"], "k": 10,
                                         "one_per_category": True, "user": data.user_vocab[5]})
    assert st == 200, body
    cats = [x["category"] for x in body["items"]]
    assert len(cats) == len(set(cats)) == NUM_CATS           # one of each category
    assert body["unknown_items"] == ["no-such-item"] and body["personalised"]
    assert data.item_id(20) not in [x["item"] for x in body["items"]]
    st, body = client.post("/complete", {"items": [data.item_id(1)], "k": 0})
    assert st == 400 and "k" in body["error"]


def test_a_version_without_basket_data_cannot_complete(tmp_path):
    from jaxreco.serve.complete import Complementer

    v = tmp_path / "3"
    (v / "assets.extra").mkdir(parents=True)
    (v / "assets").mkdir()
    m = types.SimpleNamespace(path=v, version=3, item_ids=np.asarray(["a", "b"], object),
                              num_items=2)
    assert Complementer(m).source is None
    basket.CoPurchaseStats(np.array([0, 0, 0, 0]), np.zeros(0), np.zeros(0), np.ones(3), 5).save(
        v / "assets.extra" / basket.CO_PURCHASE_FILE)
    with pytest.raises(basket.ComplementError, match="has 3 items, the model 2"):
        Complementer(m)


# ------------------------------------------------- served: explain=true on /recommend
def test_recommend_explain_sums_to_the_served_ials_score(served):
    client, data, _, f = served
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
        boost = sum(r.get("boost") or 0.0 for r in e["reasons"])         # item 12: +1.0
        total = e["base"] + sum(h["contribution"] for h in e["history_items"])
        assert abs(total + boost - x["score"]) < 1e-5                    # the served score
        assert abs(e["score"] - total) < 1e-9
        c = [h["contribution"] for h in e["history_items"]]
        assert c == sorted(c, reverse=True)
    st, plain = client.post("/recommend", {"session": [{"item": x} for x in sess], "k": 6})
    assert [x["item"] for x in plain["results"][0]["items"]] == [x["item"] for x in items]
    assert "explain" not in plain["results"][0]["items"][0]


def test_recommend_explain_for_a_known_user_names_their_own_items(served):
    client, data, _, f = served
    u = 7
    st, out = client.post("/recommend", {"user": str(data.user_vocab[u]), "k": 4,
                                         "explain": True})
    assert st == 200, out
    seen = {str(data.item_vocab[j]) for j in data.seen(u)}
    ex = FoldInExplainer.from_foldin(f)
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


# ------------------------------------------------------ the category cap on CLI exports
@pytest.mark.slow
def test_category_cap_works_on_a_cli_exported_model_and_is_refused_without_categories(tmp_path):
    """A CLI-exported model of a dataset with categories carries them (the cap holds); one
    without categories exports none, and a cap is refused with a message naming why."""
    pytest.importorskip("tensorflow", reason="export tests need tensorflow-cpu")
    from jaxreco.serve.model import ServedModel
    from jaxreco.serve.rules import BusinessRules, RulesError, top_k
    from tests.conftest import cli_train_export, write_u_data

    env = {"JAXRECO_CACHE": str(tmp_path / "cache")}
    runs = {"synthetic": ["experiment=synthetic_ctr", "dataset.num_interactions=20000",
                          "dataset.num_users=200", "dataset.num_items=100"],
            "ml": [f"dataset.path={write_u_data(tmp_path / 'ml-tiny')}"]}
    cli_train_export(tmp_path, runs, env)
    m = ServedModel(tmp_path / "models-synthetic" / "1", rules=BusinessRules(max_per_category=1))
    assert len(set(m.item_category.tolist())) > 5
    users = [str(u) for u in range(8)]
    scores, _ = m.user_scores(users)
    idx, _ = top_k(scores, 5, m.rules)
    for row in idx:
        assert len(row) == 5 and len(set(m.item_category[row].tolist())) == 5
    ml = tmp_path / "models-ml" / "1"
    assert not (ml / "assets" / "item_category.txt").exists()
    with pytest.raises(RulesError, match="max_per_category needs item categories"):
        ServedModel(ml, rules=BusinessRules(max_per_category=2))
