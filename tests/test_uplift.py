"""Coupon uplift: the synthetic-coupons generator's truth, the Qini/AUUC arithmetic on
hand-worked examples, and a trained uplift model that ranks better than "largest discount
first"."""

from __future__ import annotations

import numpy as np
import pytest

from jaxreco.data import registry, synthetic
from jaxreco.scenarios import coupons
from tests.support import train

SMALL = {"num_users": 300, "exposures_per_user": 40.0}


# ------------------------------------------------------------------ the metrics, by hand
def test_gain_curve_auuc_and_qini_match_a_hand_worked_example():
    # ranked [3, 2, 1] -> gains 1, 0, 2: G = 1, 1, 3; AUUC = (1+1+3)/9
    assert coupons.gain_curve([3, 2, 1], [1, 0, 2]).tolist() == [1, 1, 3]
    q = coupons.qini([3, 2, 1], [1, 0, 2])
    assert q["auuc"] == pytest.approx(5 / 9)
    assert q["auuc_random"] == pytest.approx(6 / 9)     # G = 1, 2, 3
    assert q["auuc_oracle"] == pytest.approx(8 / 9)     # gains sorted 2, 1, 0: G = 2, 3, 3
    assert q["qini"] == pytest.approx((5 - 6) / (8 - 6))
    assert coupons.qini([0, 1, 2], [0, 1, 2])["qini"] == pytest.approx(1.0)


def test_tied_scores_give_the_expected_curve_of_a_random_order():
    # the first two tie: G(1) = (1 + 0) / 2, G(2) = 1, G(3) = 3
    assert coupons.gain_curve([1, 1, 0], [1, 0, 2]).tolist() == [0.5, 1.0, 3.0]
    assert coupons.auuc([1, 1, 0], [1, 0, 2]) == pytest.approx(4.5 / 9)
    rng = np.random.default_rng(0)
    gain = rng.random(6)
    orders = [coupons.auuc(-np.argsort(rng.permutation(6)), gain) for _ in range(4000)]
    assert coupons.auuc(np.zeros(6), gain) == pytest.approx(np.mean(orders), rel=0.01)


def test_empirical_qini_by_hand():
    # ranked: (treated, 1), (control, 0), (treated, 0), (control, 1)
    # Q: n=1 no control row yet, 1; n=2 1-0*1/1=1; n=3 1-0*2/1=1; n=4 1-1*2/2=0 = Q(N)
    v = coupons.empirical_qini([4, 3, 2, 1], [1, 0, 1, 0], [1, 0, 0, 1])
    assert v == pytest.approx(np.mean([1, 1, 1, 0]) / 4)


def test_levels_interpolate_linearly_and_clamp_at_the_top():
    p = np.array([[0.1, 0.2, 0.4]] * 4)
    out = coupons.interpolate_levels(p, [0, 10, 20], [0, 5, 20, 50])
    assert out.tolist() == pytest.approx([0.1, 0.15, 0.4, 0.4])


# ------------------------------------------------------------------ the generator
def test_coupon_log_is_deterministic_and_randomized_over_levels():
    a = list(synthetic.coupon_blocks(SMALL))
    b = list(synthetic.coupon_blocks(SMALL))
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    d = a[0]
    share = np.bincount(d["discount"], minlength=5) / len(d["discount"])
    assert np.abs(share - 0.2).max() < 0.02                  # uniform over the 5 levels
    other = list(synthetic.coupon_blocks({**SMALL, "seed": 1}))[0]
    assert not np.array_equal(other["label"][:1000], d["label"][:1000])


def test_true_uplift_follows_the_sensitivity_and_the_log_agrees_with_it():
    t = synthetic.coupon_truth(SMALL)
    u = np.arange(300)
    k = np.zeros(300, int)
    zero = t.sensitivity == 0
    assert zero.any() and (~zero).any()
    assert np.all(t.uplift(u[zero], k[zero], np.full(zero.sum(), 4)) == 0)
    up = t.uplift(u[~zero], k[~zero], np.full((~zero).sum(), 4))
    assert np.all(up > 0)
    assert np.all(t.uplift(u, k, np.full(300, 4)) >= t.uplift(u, k, np.full(300, 2)))
    # the log's purchase rate per level matches the truth's mean probability
    d = list(synthetic.coupon_blocks(SMALL, t))[0]
    p = t.p_buy(d["user"], d["item"], d["discount"])
    for lv in range(5):
        m = d["discount"] == lv
        assert d["label"][m].mean() == pytest.approx(p[m].mean(), abs=0.02)


def test_synthetic_coupons_is_a_registered_source_and_bad_levels_are_named():
    src = registry.open_source({"name": "synthetic-coupons", **SMALL})
    assert src.num_items == 20 and list(src.item_vocab[:2]) == ["c0", "c1"]
    with pytest.raises(ValueError, match=r"discount_levels=\[5, 10\]"):
        synthetic.coupon_truth({"discount_levels": [5, 10]})
    with pytest.raises(ValueError, match="segment_share"):
        synthetic.coupon_truth({"segment_share": [0.5, 0.6], "segment_sensitivity": [0, 1]})


# ------------------------------------------------------------------ a trained model
def test_trained_uplift_model_beats_largest_discount_first(tmp_path, capsys):
    import importlib.util
    from tests.support import ROOT
    m = train(tmp_path / "run", ["experiment=synthetic_coupons", "debug=smoke",
                                 "dataset.num_users=300", "dataset.exposures_per_user=40",
                                 "logger.tensorboard=false"])
    assert m["test/auc"] > 0.6
    spec = importlib.util.spec_from_file_location("uplift_eval",
                                                  ROOT / "scripts" / "uplift_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--run-dir", str(tmp_path / "run"), "--split", "test"])
    fig = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines()
               if ": " in line)
    for gain in ("uplift", "value"):
        assert float(fig[f"{gain}/oracle/qini"]) == pytest.approx(1.0)
        assert float(fig[f"{gain}/random/qini"]) == pytest.approx(0.0)
        assert float(fig[f"{gain}/model/qini"]) > float(fig[f"{gain}/largest_discount/qini"])
