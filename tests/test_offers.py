"""``/offers``: only coupons usable now (window, budget, eligibility, minimum spend) are
offered, ranked by uplift × margin; ``/redeem`` consumes the budget; ``/recommend`` boosts
and explains covered items. Pure logic first (no TensorFlow), then a served uplift model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from jaxreco.promotions import Catalogue
from jaxreco.serve.offers import BudgetLedger, OfferError, rank_offers, usable

T0 = 1_700_000_000.0
DAY = 86400.0


def _coupon(cid, **kw):
    d = {"id": cid, "discount": {"percent": 10}, "valid_from": T0, "valid_until": T0 + 10 * DAY,
         "budget": 100.0, "margin": 0.3}
    d.update(kw)
    return d


def _catalogue(*coupons) -> Catalogue:
    return Catalogue.from_dict({"coupons": list(coupons)}, "test.json")


CAT = _catalogue(
    _coupon("ok10", categories=["c1"]),
    _coupon("ok20", discount={"percent": 20}, categories=["c2"], margin=0.5),
    _coupon("expired", valid_until=T0 - 1, valid_from=T0 - DAY),
    _coupon("future", valid_from=T0 + DAY, valid_until=T0 + 2 * DAY),
    _coupon("spent", budget=5.0),
    _coupon("other_user", users=["u2"]),
    _coupon("big_spend", min_spend=50.0, categories=["c1"]),
    _coupon("amount", discount={"amount": 3.0}, min_spend=20.0, categories=["c2"]))


def test_only_coupons_usable_now_are_candidates_and_the_rest_are_counted():
    spent = {"spent": 5.0}
    got, left = usable(CAT, spent, "u1", T0 + DAY / 2, cart_total=30.0)
    assert [c.id for c in got] == ["ok10", "ok20", "amount"]
    assert left == {"outside_window": 2, "budget_spent": 1, "not_eligible": 1, "min_spend": 1}
    # without a cart the minimum spend is not checked; the window edges are [from, until)
    got, _ = usable(CAT, spent, "u1", T0, None)
    assert {c.id for c in got} == {"ok10", "ok20", "big_spend", "amount"}
    assert "ok10" not in {c.id for c in usable(CAT, spent, "u1", T0 + 10 * DAY, None)[0]}
    assert "other_user" in {c.id for c in usable(CAT, spent, "u2", T0, None)[0]}


def test_candidates_never_break_the_catalogue_rule_on_random_catalogues():
    rng = np.random.default_rng(0)
    for trial in range(50):
        cs = [_coupon(f"k{n}", valid_from=T0 + rng.integers(-5, 5) * DAY,
                      valid_until=T0 + rng.integers(6, 12) * DAY, budget=float(rng.integers(1, 4)),
                      min_spend=float(rng.integers(0, 3)) * 10,
                      **({"users": ["a"]} if rng.random() < 0.3 else {})) for n in range(8)]
        cat = _catalogue(*cs)
        spent = {f"k{n}": float(rng.integers(0, 4)) for n in range(8)}
        now = T0 + float(rng.integers(-6, 13)) * DAY
        user = "a" if rng.random() < 0.5 else "b"
        cart = float(rng.integers(0, 4)) * 10
        got, left = usable(cat, spent, user, now, cart)
        allowed = {c.id for c in cat.offerable(user, now, spent)}
        for c in got:
            assert c.id in allowed and c.valid_from <= now < c.valid_until
            assert spent[c.id] < c.budget and cart >= c.min_spend
        assert len(got) + sum(left.values()) == 8


def _p_fn(table):
    def p(cats):
        return np.array([table[c] for c in cats]), True
    return p


def test_offers_are_ranked_by_uplift_times_margin_with_interpolated_levels():
    levels = np.array([0.0, 10.0, 20.0])
    table = {"c1": [0.10, 0.30, 0.40], "c2": [0.20, 0.25, 0.30]}
    got, _ = usable(CAT, {"spent": 5.0}, "u1", T0 + DAY / 2, cart_total=30.0)
    out = rank_offers(got, _p_fn(table), levels, ["c1", "c2"], {}, 30.0)
    by = {o["coupon"]: o for o in out}
    assert by["ok10"]["uplift"] == pytest.approx(0.20)
    assert by["ok10"]["value"] == pytest.approx(0.20 * 0.3)
    assert by["ok20"]["uplift"] == pytest.approx(0.10)
    assert by["ok20"]["value"] == pytest.approx(0.10 * 0.5)
    # 3.0 off a 30.0 cart is 10%: the 10% level on c2
    assert by["amount"]["uplift"] == pytest.approx(0.05)
    assert [o["coupon"] for o in out] == ["ok10", "ok20", "amount"]
    assert "valid until" in by["ok10"]["why"] and "uplift +0.2000 on c1" in by["ok10"]["why"]
    # 15% interpolates between the 10% and 20% levels
    cat = _catalogue(_coupon("p15", discount={"percent": 15}, categories=["c1"]))
    o = rank_offers(list(cat.coupons), _p_fn(table), levels, ["c1", "c2"], {}, None)[0]
    assert o["p_buy"] == pytest.approx(0.35) and o["uplift"] == pytest.approx(0.25)
    # a coupon on every category takes the category where it moves the user most
    cat = _catalogue(_coupon("all"))
    o = rank_offers(list(cat.coupons), _p_fn(table), levels, ["c1", "c2"], {}, None)[0]
    assert o["category"] == "c1"


def test_unknown_uplift_comes_last_with_null_value():
    cat = _catalogue(_coupon("x", categories=["c9"]), _coupon("y", categories=["c1"]),
                     _coupon("amt", discount={"amount": 2.0}, categories=["c1"]))
    out = rank_offers(list(cat.coupons), _p_fn({"c1": [0.1, 0.2]}), np.array([0.0, 10.0]),
                      ["c1"], {}, None)
    assert [o["coupon"] for o in out] == ["y", "amt", "x"]
    assert out[1]["value"] is None and "percent is unknown" in out[1]["why"]
    assert out[2]["value"] is None and "no category" in out[2]["why"]


def test_redemptions_consume_the_budget_once_per_order_and_replay_from_the_ledger(tmp_path):
    cat = _catalogue(_coupon("c", budget=10.0), _coupon("mine", users=["u1"]))
    c, mine = cat.coupons
    led = BudgetLedger(tmp_path / "ledger.jsonl")
    assert led.redeem(c, "u1", "o1", 6.0, T0)["budget_left"] == pytest.approx(4.0)
    assert led.redeem(c, "u1", "o1", 6.0, T0)["duplicate"]           # counted once
    with pytest.raises(OfferError, match="exceeds the budget left 4.00"):
        led.redeem(c, "u2", "o2", 5.0, T0)
    with pytest.raises(OfferError, match="outside its validity window"):
        led.redeem(c, "u2", "o3", 1.0, T0 + 11 * DAY)
    with pytest.raises(OfferError, match="not eligible"):
        led.redeem(mine, "u2", "o4", 1.0, T0)
    led.redeem(c, "u2", "o5", 4.0, T0)
    assert "c" not in {x.id for x in usable(cat, led.snapshot(), "u1", T0, None)[0]}
    again = BudgetLedger(tmp_path / "ledger.jsonl")
    assert again.snapshot() == {"c": 10.0}
    (tmp_path / "bad.jsonl").write_text('{"coupon": "c"}\n')
    with pytest.raises(OfferError, match=r"bad.jsonl:1: not a redemption record"):
        BudgetLedger(tmp_path / "bad.jsonl")


# ----------------------------------------------------------------- served: a trained model
@pytest.fixture(scope="module")
def served_uplift(tmp_path_factory):
    """A smoke-sized synthetic_coupons run exported as the recommender (items = coupon
    categories c0..c19) and as the uplift model (``<model_dir>/uplift``), served with a
    promotions catalogue. Yields ``(client, server, catalogue path, tmp)``."""
    pytest.importorskip("tensorflow", reason="serving tests need tensorflow-cpu")
    pytest.importorskip("fastapi", reason="serving tests need the [serve] extra")
    from jaxreco.export import export_run
    from tests import test_export_support as S
    from tests.support import train

    tmp = tmp_path_factory.mktemp("offers")
    train(tmp / "run", ["experiment=synthetic_coupons", "debug=smoke", "dataset.num_users=200",
                        "dataset.exposures_per_user=30", "logger.tensorboard=false",
                        "model.dim=4", "model.mlp_dims=[8,4]"])
    export_run(tmp / "run", tmp / "models", 1)
    shutil.copytree(tmp / "models" / "1", tmp / "models" / "uplift" / "1")
    now = 1_800_000_000
    cat = {"coupons": [
        _coupon("c1_30", discount={"percent": 30}, categories=["c1"], valid_from=now - DAY,
                valid_until=now + DAY, margin=0.4),
        _coupon("c2_5", discount={"percent": 5}, categories=["c2"], valid_from=now - DAY,
                valid_until=now + DAY, margin=0.4),
        _coupon("expired", categories=["c3"], valid_from=now - 2 * DAY, valid_until=now - DAY),
        _coupon("small_budget", categories=["c4"], valid_from=now - DAY,
                valid_until=now + DAY, budget=2.0)]}
    path = tmp / "promotions.json"
    path.write_text(json.dumps(cat))
    server = S.Server(tmp / "models", tmp / "server.log", "--promotions", str(path),
                      "--poll-interval", "0.2")
    try:
        server.wait()
        yield server.client, path, now, cat
    finally:
        server.stop()


def _offers(client, body, want_model=True):
    import time
    for _ in range(200):
        st, out = client.post("/offers", body)
        if st != 200 or not want_model or out["uplift_model_version"] is not None:
            return st, out
        time.sleep(0.1)
    raise AssertionError(f"the uplift model never loaded: {out}")


@pytest.mark.slow  # trains, exports and starts a server: ~35 s of CPU
def test_served_offers_rank_by_value_and_never_offer_outside_window_or_budget(served_uplift):
    client, path, now, cat = served_uplift
    st, out = _offers(client, {"user": "3", "k": 10, "now": now})
    assert st == 200, out
    ids = [o["coupon"] for o in out["offers"]]
    assert set(ids) == {"c1_30", "c2_5", "small_budget"}
    assert out["not_offered"]["outside_window"] == 1
    vals = [o["value"] for o in out["offers"]]
    assert vals == sorted(vals, reverse=True)
    for o in out["offers"]:
        assert o["value"] == pytest.approx(o["uplift"] * o["margin"], rel=1e-6)
        assert o["uplift"] == pytest.approx(o["p_buy"] - o["p_buy_without"], abs=1e-6)
    # the served probabilities are the model's predict_ctr at the coupon's level
    st, pr = client.post("/predict_ctr", {"user": ["3", "3"], "item": ["c1", "c1"],
                                          "discount": [0, 4]})
    assert st == 200, pr
    o = next(o for o in out["offers"] if o["coupon"] == "c1_30")
    assert o["p_buy"] == pytest.approx(pr["predictions"]["click"][1], abs=1e-6)
    assert o["p_buy_without"] == pytest.approx(pr["predictions"]["click"][0], abs=1e-6)
    # a redemption spends the small budget: the coupon is no longer offered
    st, r = client.post("/redeem", {"coupon": "small_budget", "user": "3", "order_id": "o1",
                                    "discount": 2.0, "now": now})
    assert st == 200 and r["budget_left"] == pytest.approx(0.0), r
    st, r = client.post("/redeem", {"coupon": "small_budget", "user": "4", "order_id": "o2",
                                    "discount": 0.5, "now": now})
    assert st == 409, r
    st, out = _offers(client, {"user": "3", "k": 10, "now": now})
    assert "small_budget" not in [o["coupon"] for o in out["offers"]]
    assert out["not_offered"]["budget_spent"] == 1
    # outside the windows nothing is offered; a cart below min spend leaves a coupon out
    st, out = _offers(client, {"user": "3", "now": now + 3 * DAY})
    assert out["offers"] == [] and out["not_offered"]["outside_window"] == 4


@pytest.mark.slow  # trains, exports and starts a server: ~35 s of CPU
def test_recommend_boosts_and_explains_items_covered_by_usable_coupons(served_uplift):
    client, path, now, cat = served_uplift
    st, plain = client.post("/recommend", {"user": "3", "k": 20})
    assert st == 200, plain
    # the coupons are usable at the server's clock only after a reload with a window
    # around now: rewrite the catalogue (hot reload) with wide windows
    import time
    wide = {"coupons": [dict(c, valid_from=0, valid_until=4e9) for c in cat["coupons"]
                        if c["id"] != "expired"]}
    wide["coupons"].append(_coupon("late", categories=["c5"], valid_from=0, valid_until=1))
    path.write_text(json.dumps(wide))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        st, out = _offers(client, {"user": "3"})
        if {o["coupon"] for o in out["offers"]} >= {"c1_30", "c2_5"}:
            break
        time.sleep(0.2)
    assert {o["coupon"] for o in out["offers"]} == {"c1_30", "c2_5"}    # small_budget is spent
    st, body = client.post("/recommend", {"user": "3", "k": 20, "coupon_boost": 100.0,
                                          "explain": True})
    assert st == 200, body
    items = body["results"][0]["items"]
    assert {x["item"] for x in items[:2]} == {"c1", "c2"}
    for x in items:
        coupons = [r["coupon"] for r in x["explain"]["reasons"] if r["kind"] == "coupon"]
        assert coupons == ({"c1": ["c1_30"], "c2": ["c2_5"]}.get(x["item"], []))
    before = {x["item"]: x["score"] for x in plain["results"][0]["items"]}
    assert items[0]["score"] == pytest.approx(before[items[0]["item"]] + 100.0, rel=1e-5)
    # an invalid new catalogue keeps the old one and says why
    path.write_text('{"coupons": [{"id": "bad"}]}')
    for _ in range(100):
        st, out = _offers(client, {"user": "3"})
        if out["catalogue_error"]:
            break
        time.sleep(0.1)
    assert "coupons[0] (id 'bad')" in out["catalogue_error"]
    assert {o["coupon"] for o in out["offers"]} == {"c1_30", "c2_5"}
