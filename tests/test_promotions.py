"""The promotions catalogue (jaxreco.promotions): validation naming the entry and field,
coupons outside their window or budget (or for other users) never offered, hot reload
that keeps the old catalogue when the new file is invalid."""

from __future__ import annotations

import json
import os

import pytest

from jaxreco.promotions import Catalogue, CatalogueError, CatalogueWatcher

T0 = 1_767_225_600.0   # 2026-01-01T00:00:00Z


def _coupon(**kw):
    c = {"id": "C", "discount": {"percent": 10}, "valid_from": "2026-01-01T00:00:00Z",
         "valid_until": "2026-02-01T00:00:00Z", "budget": 100.0, "margin": 0.3}
    c.update(kw)
    return {k: v for k, v in c.items() if v is not None}


def test_coupons_outside_their_window_budget_or_users_are_never_offered():
    cat = Catalogue.from_dict({"coupons": [
        _coupon(id="open"),
        _coupon(id="later", valid_from=T0 + 86400 * 10),
        _coupon(id="ended", valid_until="2026-01-01T12:00:00+00:00"),
        _coupon(id="spent", budget=50.0),
        _coupon(id="vip", users=["7", 8], discount={"amount": 5}),
    ]}, "cat.json")
    spent = {"spent": 50.0, "open": 99.99}
    day = T0 + 86400
    assert [c.id for c in cat.offerable("7", day, spent)] == ["open", "vip"]
    assert [c.id for c in cat.offerable("1", day, spent)] == ["open"]
    assert [c.id for c in cat.offerable(None, day, spent)] == ["open"]
    assert [c.id for c in cat.offerable("8", T0 + 86400 * 11, spent)] == ["open", "later", "vip"]
    assert cat.offerable("7", T0 - 1, spent) == []                        # before every window
    assert cat.offerable("7", T0 + 86400 * 31, spent) == []               # valid_until is open
    assert [c.id for c in cat.offerable("1", day, {"open": 100.0})] == ["spent"]
    # a brute-force check over times and spends: nothing offered outside window or budget
    for t in range(int(T0) - 3600, int(T0) + 86400 * 40, 86400 // 3):
        for used in (0.0, 49.9, 50.0, 100.0, 1e9):
            for c in cat.offerable("7", t, {k: used for k in ("open", "later", "ended", "spent", "vip")}):
                assert c.valid_from <= t < c.valid_until and used < c.budget


def test_coupon_discounts_and_coverage():
    cat = Catalogue.from_dict({"coupons": [
        _coupon(id="pct", items=["a"], categories=["dairy"]),
        _coupon(id="amt", discount={"amount": 5}), ]}, "c")
    pct, amt = cat.coupons
    assert pct.discount_on(30.0) == pytest.approx(3.0) and amt.discount_on(3.0) == 3.0
    assert pct.covers("a", None) and pct.covers("z", "dairy") and not pct.covers("z", "meat")
    assert amt.covers("anything", None)


@pytest.mark.parametrize("entry,msg", [
    (_coupon(discount={"percent": 0}), r"coupons\[0\] \(id 'C'\)\.discount\.percent=0: must lie in \(0, 100\]"),
    (_coupon(discount={"percent": 5, "amount": 1}), r"\(id 'C'\)\.discount: must be"),
    (_coupon(valid_until="2026-13-01T00:00:00Z"), r"\(id 'C'\)\.valid_until='2026-13-01T00:00:00Z': not an ISO 8601"),
    (_coupon(valid_until="2026-02-01T00:00:00"), r"valid_until=.*not an ISO 8601 time with a zone"),
    (_coupon(valid_until=T0 - 5), r"\(id 'C'\)\.valid_until: must be after valid_from"),
    (_coupon(valid_from=None), r"\(id 'C'\)\.valid_from: required"),
    (_coupon(budget=None), r"\(id 'C'\)\.budget: required"),
    (_coupon(budget=-1), r"\(id 'C'\)\.budget=-1: must lie in \[0"),
    (_coupon(margin=1.5), r"\(id 'C'\)\.margin=1.5: must lie in \[0, 1\]"),
    (_coupon(users="7"), r"\(id 'C'\)\.users: must be a list of ids"),
    (_coupon(colour="red"), r"\(id 'C'\): unknown field\(s\) \['colour'\]"),
    (_coupon(id=""), r"coupons\[0\]\.id: must be a non-empty string"),
])
def test_bad_entries_are_named_by_entry_and_field(entry, msg):
    with pytest.raises(CatalogueError, match=msg) as e:
        Catalogue.from_dict({"coupons": [entry]}, "cat.json")
    assert str(e.value).startswith("cat.json: coupons[0]")


def test_repeated_ids_and_a_bad_file_are_named(tmp_path):
    with pytest.raises(CatalogueError, match=r"coupons\[1\]\.id='C' repeats coupons\[0\]"):
        Catalogue.from_dict({"coupons": [_coupon(), _coupon()]}, "x")
    p = tmp_path / "p.json"
    p.write_text("{not json")
    with pytest.raises(CatalogueError, match="p.json: not valid JSON"):
        Catalogue.load(p)
    with pytest.raises(CatalogueError, match="cannot read promotions catalogue"):
        Catalogue.load(tmp_path / "missing.json")


def test_hot_reload_installs_a_valid_file_and_keeps_the_old_one_on_an_invalid_file(tmp_path):
    p = tmp_path / "promo.json"
    p.write_text(json.dumps({"coupons": [_coupon(id="A")]}))
    w = CatalogueWatcher(p)
    held = w.current                        # what an in-flight request holds
    assert [c.id for c in held.coupons] == ["A"] and not w.poll()

    def write(obj, bump):
        p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        st = os.stat(p)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + bump))   # a new mtime, always

    write({"coupons": [_coupon(id="A"), _coupon(id="B")]}, 10**9)
    assert w.poll() and [c.id for c in w.current.coupons] == ["A", "B"] and w.last_error is None
    assert [c.id for c in held.coupons] == ["A"]                # the old object is untouched
    write({"coupons": [_coupon(id="B", margin=2)]}, 2 * 10**9)
    assert not w.poll()
    assert [c.id for c in w.current.coupons] == ["A", "B"]
    assert "kept the previous catalogue (2 coupons)" in w.last_error
    assert "coupons[0] (id 'B').margin=2" in w.last_error
    write("", 3 * 10**9)                                        # a half-written file
    assert not w.poll() and len(w.current.coupons) == 2 and "not valid JSON" in w.last_error
    write({"coupons": []}, 4 * 10**9)
    assert w.poll() and w.current.coupons == () and w.last_error is None
