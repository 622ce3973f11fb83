"""``jaxreco-report`` per platform: where served records (or events) carry ``platform``, the
figures of each platform's slots, per arm, equal a hand count; without the field there is
no per-platform part."""

from __future__ import annotations

import json

import pytest

from jaxreco import report as R
from tests.test_report import HAND, write_ab


def test_per_platform_figures_are_the_slots_of_each_platform(tmp_path):
    d = write_ab(tmp_path / "ev", HAND)
    seg = d / "events-r0-00000000.jsonl"
    # u1, u3 (control) and u4 (treatment) were served on the app, u2 on the web (the served
    # record says so); u5's request has no platform on its served record, only on a click
    plat = {"control-u1": "app", "control-u3": "app", "treatment-u4": "app",
            "control-u2": "web"}
    lines = []
    for line in seg.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "served" and rec["request_id"] in plat:
            rec["platform"] = plat[rec["request_id"]]
        if rec.get("event_id") == "treatment-u5-c0":
            rec["platform"] = "web"
        lines.append(json.dumps(rec))
    seg.write_text("\n".join(lines) + "\n")
    res = R.report(str(d), plots=False)
    pp = res["result"]["per_platform"]
    assert sorted(pp) == ["app", "web"]
    app, web = pp["app"], pp["web"]
    # control on the app: u1 (2 shown, 1 click) + u3 (5 shown, 2 clicks, 20.0 bought)
    assert (app["control"]["impressions"], app["control"]["users"],
            app["control"]["clicks"]) == (7, 2, 3)
    assert app["control"]["ctr"].value == pytest.approx(3 / 7)
    assert app["control"]["revenue_per_impression"].value == pytest.approx(20 / 7)
    assert (app["treatment"]["impressions"], app["treatment"]["clicks"]) == (4, 2)
    assert (web["control"]["impressions"], web["control"]["clicks"]) == (3, 0)
    assert (web["treatment"]["impressions"], web["treatment"]["clicks"]) == (4, 2)
    assert "per platform:" in res["text"] and "| app | control | 7 | 2 |" in R.markdown(
        res["result"])


def test_no_platform_field_no_per_platform_part(tmp_path):
    res = R.report(str(write_ab(tmp_path / "ev", HAND)), plots=False)
    assert res["result"]["per_platform"] == {} and "per platform" not in res["text"]
