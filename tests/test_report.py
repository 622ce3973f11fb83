"""``jaxreco-report``: the A/B statistics against a hand computation and against simulations
with a known truth (interval coverage, type-I error), and the CLI on written segments."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from jaxreco import report as R
from jaxreco.cli.report import main

T0 = 1_700_000_000.0


# ----------------------------------------------------------------------------- by hand
def test_ctr_interval_matches_a_hand_computation():
    # shoppers (impressions, clicks): (2, 1), (3, 0), (5, 2)
    # R = 3/10 = 0.3; residuals d = y - R x = 0.4, -0.9, 0.5; Σd² = 1.22
    # Var R = Σd² / (n (n-1) x̄²) = 1.22 / (3 · 2 · (10/3)²) = 0.0183
    e = R.ratio_estimate([1, 0, 2], [2, 3, 5])
    assert e.value == pytest.approx(0.3)
    assert e.se == pytest.approx(math.sqrt(0.0183), rel=1e-12)
    assert (e.lo, e.hi) == pytest.approx((0.3 - 1.959964 * 0.135277, 0.3 + 1.959964 * 0.135277),
                                         abs=1e-6)
    assert e.clusters == 3
    # the same variance in the covariance form (s_y² - 2R s_xy + R² s_x²) / (n x̄²)
    x, y = np.array([2, 3, 5.0]), np.array([1, 0, 2.0])
    c = np.cov(x, y)
    assert e.se ** 2 == pytest.approx((c[1, 1] - 2 * 0.3 * c[0, 1] + 0.09 * c[0, 0]) / (3 * (10 / 3) ** 2))
    # design effect: against the binomial 0.3·0.7/10 = 0.021
    assert e.design_effect == pytest.approx(0.0183 / 0.021)


def test_lift_matches_a_hand_computation():
    control = R.ratio_estimate([1, 0, 2], [2, 3, 5])            # 0.3 ± 0.135277
    treat = R.ratio_estimate([2, 2], [4, 4])                    # 0.5, se 0 (no spread)
    d = R.relative_lift(treat, control)
    # θ = ln(0.5/0.3) = 0.510826; se θ = 0.135277 / 0.3 = 0.450924
    assert d["lift"] == pytest.approx(2 / 3)
    assert d["lo"] == pytest.approx(math.exp(0.510826 - 1.959964 * 0.450924) - 1, abs=1e-5)
    assert d["hi"] == pytest.approx(math.exp(0.510826 + 1.959964 * 0.450924) - 1, abs=1e-5)
    assert d["p"] == pytest.approx(math.erfc(0.510826 / 0.450924 / math.sqrt(2)), abs=1e-5)
    assert d["p"] == pytest.approx(0.2573, abs=1e-3)
    assert d["diff"] == pytest.approx(0.2)
    zero = R.relative_lift(R.ratio_estimate([0, 0], [3, 4]), control)   # a rate of 0: no log
    assert zero["lift"] is None and zero["test"] == "difference" and 0 < zero["p"] < 0.1


def test_sample_ratio_check_flags_a_mismatch():
    ok = R.srm_check({"control": 500, "treatment": 500}, {"control": 50, "treatment": 50})
    assert ok["chi2"] == 0 and ok["p"] == pytest.approx(1.0) and not ok["mismatch"]
    bad = R.srm_check({"control": 560, "treatment": 440}, {"control": 1, "treatment": 1})
    assert bad["chi2"] == pytest.approx(14.4)                   # 2 · 60² / 500
    assert bad["p"] == pytest.approx(math.erfc(math.sqrt(14.4 / 2)))   # χ²₁ tail = 2(1-Φ(√χ²))
    assert bad["mismatch"]
    skew = R.srm_check({"a": 300, "b": 700}, {"a": 30, "b": 70})      # the split is 30/70
    assert skew["chi2"] == pytest.approx(0) and not skew["mismatch"]
    three = R.srm_check({"a": 100, "b": 100, "c": 130}, {"a": 1, "b": 1, "c": 1})
    assert three["df"] == 2 and three["p"] == pytest.approx(math.exp(-three["chi2"] / 2))


# ----------------------------------------------------------------------------- simulations
def _clustered(rng, n_sims, n_users, mean_impr, a, b, scale=1.0):
    """Per simulation and shopper: impressions 1 + Poisson, click probability Beta(a, b)·scale
    (so the true CTR is scale · a / (a + b), the probability independent of the count)."""
    x = 1 + rng.poisson(mean_impr - 1, (n_sims, n_users))
    p = np.clip(rng.beta(a, b, (n_sims, n_users)) * scale, 0, 1)
    return rng.binomial(x, p).astype(float), x.astype(float)


def test_ctr_interval_covers_the_truth_95_percent_where_the_binomial_one_does_not():
    rng = np.random.default_rng(0)
    sims, truth = 400, 0.1
    y, x = _clustered(rng, sims, 300, 20, 1.0, 9.0)             # strong per-shopper spread
    ests = [R.ratio_estimate(y[s], x[s]) for s in range(sims)]
    cover = np.mean([e.lo <= truth <= e.hi for e in ests])
    assert 0.92 <= cover <= 0.98, cover                         # ± 2.7 s.e. of a 95% rate
    r = np.array([e.value for e in ests])
    se_binom = np.sqrt(r * (1 - r) / x.sum(1))
    naive = np.mean(np.abs(r - truth) <= 1.96 * se_binom)
    assert naive < 0.85, naive                                  # clustering matters here
    assert np.mean([e.design_effect for e in ests]) > 2


def test_lift_interval_covers_the_true_lift_and_null_p_values_are_uniform():
    rng = np.random.default_rng(1)
    sims = 400
    yc, xc = _clustered(rng, sims, 300, 10, 2.0, 18.0)
    yt, xt = _clustered(rng, sims, 300, 10, 2.0, 18.0, scale=1.2)   # true lift +20%
    lifts = [R.relative_lift(R.ratio_estimate(yt[s], xt[s]), R.ratio_estimate(yc[s], xc[s]))
             for s in range(sims)]
    cover = np.mean([d["lo"] <= 0.2 <= d["hi"] for d in lifts])
    assert 0.92 <= cover <= 0.98, cover
    assert np.mean([d["p"] < 0.05 for d in lifts]) > 0.4        # power at this size: ~0.5
    assert all((d["lo"] > 0) == (d["p"] < 0.05) for d in lifts if d["lo"] != 0)
    y2, x2 = _clustered(rng, sims, 300, 10, 2.0, 18.0)          # A/A: no lift
    null = np.array([R.relative_lift(R.ratio_estimate(y2[s], x2[s]),
                                     R.ratio_estimate(yc[s], xc[s]))["p"] for s in range(sims)])
    assert 0.02 <= np.mean(null < 0.05) <= 0.08
    assert 0.15 <= np.mean(null < 0.25) <= 0.35


# ----------------------------------------------------------------------------- end to end
def write_ab(d, per_user, split=None):
    """Segments for ``per_user``: {arm: [(shopper, impressions, clicks, purchase value)]};
    each shopper gets one request showing ``impressions`` items, clicks the first ones and
    buys the first for ``value`` if > 0."""
    d.mkdir(parents=True, exist_ok=True)
    recs, t = [], T0
    for arm, users in per_user.items():
        for u, n, c, value in users:
            rid = f"{arm}-{u}"
            items = [f"i{j}" for j in range(n)]
            s = {"kind": "served", "request_id": rid, "ts": t, "user": u, "session": None,
                 "arm": arm, "model_version": 1 if arm == "control" else 2, "items": items,
                 "replica": "r0"}
            if split:
                s["split"] = split
            recs.append(s)
            base = {"request_id": rid, "user": u, "session": None, "received_ts": t + 1,
                    "replica": "r0", "arm": None, "model_version": None}
            recs.append({"kind": "impression", "event_id": f"{rid}-i", "items": items, **base})
            for j in range(c):
                recs.append({"kind": "click", "event_id": f"{rid}-c{j}", "item": items[j],
                             "position": j + 1, **base})
            if value > 0:
                recs.append({"kind": "cart", "event_id": f"{rid}-k", "item": items[0], **base})
                recs.append({"kind": "purchase", "event_id": f"{rid}-p", "item": items[0],
                             "value": value, **base})
            t += 60
    (d / "events-r0-00000000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


HAND = {"control": [("u1", 2, 1, 0.0), ("u2", 3, 0, 0.0), ("u3", 5, 2, 20.0)],
        "treatment": [("u4", 4, 2, 10.0), ("u5", 4, 2, 0.0)]}


def test_cli_writes_the_report_with_the_hand_figures(tmp_path, capsys):
    d = write_ab(tmp_path / "ev", HAND, split={"control": 50, "treatment": 50})
    assert main(["--events", str(d), "--out", str(tmp_path / "out")]) == 0
    shown = capsys.readouterr().out
    assert "30.00% [3.49, 56.51]" in shown                       # 0.3 ± 1.96 · 0.135277
    assert "+66.7% [" in shown and "sample-ratio check" in shown
    res = json.loads((tmp_path / "out" / "report.json").read_text())
    c = res["per_arm"]["control"]
    assert (c["impressions"], c["users"], c["clicks"], c["purchases"]) == (10, 3, 3, 1)
    assert c["ctr"]["value"] == pytest.approx(0.3)
    assert c["ctr"]["se"] == pytest.approx(math.sqrt(0.0183))
    assert c["revenue_per_impression"]["value"] == pytest.approx(2.0)
    assert c["conversion_rate"]["value"] == pytest.approx(0.1)
    assert c["model_versions"] == ["1"] and res["per_arm"]["treatment"]["model_versions"] == ["2"]
    assert res["lift"]["treatment"]["ctr"]["lift"] == pytest.approx(2 / 3)
    assert res["srm"]["split_from"] == "served records" and res["srm"]["observed"] == [3, 2]
    assert (tmp_path / "out" / "report.md").read_text().startswith("# A/B report")
    if pytest.importorskip("matplotlib"):
        png = (tmp_path / "out" / "ctr_over_time.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_control_flag_picks_the_reference_and_bad_input_is_one_line(tmp_path, capsys):
    d = write_ab(tmp_path / "ev", HAND)
    out = R.report(str(d), control="treatment")["result"]
    assert out["arms"] == ["treatment", "control"]
    assert out["lift"]["control"]["ctr"]["lift"] == pytest.approx(0.3 / 0.5 - 1)
    assert out["srm"]["split_from"].startswith("equal")
    assert main(["--events", str(d), "--control", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --control 'nope' is not an arm of these events; arms: "
                   "['control', 'treatment']")
    assert main(["--events", str(tmp_path / "missing")]) == 2
    assert "no event segments" in capsys.readouterr().err


def test_winner_is_the_arm_with_a_significant_lift(tmp_path):
    rng = np.random.default_rng(3)
    arms = {}
    for arm, p in (("control", 0.05), ("treatment", 0.15)):
        arms[arm] = [(f"{arm}{u}", 10, int(rng.binomial(10, p)), 0.0) for u in range(200)]
    res = R.report(str(write_ab(tmp_path / "ev", arms)), split={"control": 1, "treatment": 1})
    out = res["result"]
    assert R.winner(out) == "treatment"
    assert out["lift"]["treatment"]["ctr"]["lo"] > 0
    assert not out["srm"]["mismatch"] and out["srm"]["split_from"] == "--split"
    assert "winner on CTR: treatment" in res["text"]
    same = R.report(str(write_ab(tmp_path / "aa", {"control": arms["control"][:100],
                                                   "treatment": arms["control"][100:]})))
    assert R.winner(same["result"]) is None


def test_parse_split():
    assert R.parse_split("control=50,treatment=50") == {"control": 50.0, "treatment": 50.0}
    assert R.parse_split("30,70", ["a", "b"]) == {"a": 30.0, "b": 70.0}
    with pytest.raises(R.ReportError, match="name the arms"):
        R.parse_split("30,70")
