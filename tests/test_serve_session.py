"""``/recommend`` with a session of events, against a ``jaxreco-serve`` subprocess (JAX
blocked) with two A/B arms and an event log:
the answer is the JAX fold-in's top-k, a known user's session joins the history (login),
unknown items are skipped and counted, long sessions are cut to the latest items, bad events
get a 422 naming the field, served records carry the session and its platform, and TF
Serving REST calls ``recommend_session``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="serving tests need tensorflow-cpu")
pytest.importorskip("fastapi", reason="serving tests need the [serve] extra")

from jaxreco import foldin  # noqa: E402
from jaxreco.export import SessionModel  # noqa: E402
from jaxreco.serve import layout  # noqa: E402
from jaxreco.serve.events import read_segments  # noqa: E402
from jaxreco.serve.model import SESSION_CAP  # noqa: E402
from tests import test_export_support as S  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("session")
    data = S.make_mf(seed=3)
    p = data.params
    f = foldin.FoldIn(p["item_embed"], p["item_bias"][:, 0], None, alpha0=0.3, reg=0.05, nu=1.0)
    S.export(data, tmp / "models", 1, session=SessionModel("foldin", foldin=f))
    shutil.copytree(tmp / "models" / "1", tmp / "models" / "2")   # the other arm: same model
    server = S.Server(tmp / "models", tmp / "server.log", "--arm", "fold=1", "--arm",
                      "plain=2", "--split", "50,50", "--salt", "s", "--events-dir",
                      str(tmp / "events"))
    try:
        server.wait()
        yield server, data, f, tmp / "events"
    finally:
        server.stop()


def _expected(data, f, user, items, arm, k):
    """Top-k item ids by JAX: fold-in over (history ∪ session), seen and session items
    excluded (``arm="plain"``: the user's own scores, popularity when anonymous)."""
    iidx = {str(x): j for j, x in enumerate(data.item_vocab)}
    uidx = {str(u): j for j, u in enumerate(data.user_vocab)}
    sess = {iidx[x] for x in items if x in iidx}
    seen = data.seen(uidx[user]) if user in uidx else set()
    if arm == "fold":
        s = foldin.scores(f, foldin.fold_in(f, [sorted(sess | seen)]))[0]
    else:
        s = data.all_scores()[uidx[user]] if user in uidx else data.popularity()
    s = s.copy()
    s[sorted(sess | seen)] = layout.EXCLUDED_SCORE
    order = np.argsort(-s, kind="stable")[:k]
    return [str(data.item_vocab[j]) for j in order], s


def _post(server, body):
    st, out = server.client.post("/recommend", body)
    assert st == 200, out
    return out


def test_session_answers_are_the_fold_in_top_k_for_both_arms(served):
    server, data, f, _ = served
    iv = [str(x) for x in data.item_vocab]
    arms = set()
    for s in range(12):                                      # both arms get some sessions
        items = [iv[(7 * s + 3 * j) % len(iv)] for j in range(4)]
        sess = [{"item": x, "event": "click", "ts": 1000.0 + j, "platform": "app"}
                for j, x in enumerate(items)]
        res = _post(server, {"session": sess, "session_id": f"sid-{s}", "k": 5})["results"][0]
        want, scores = _expected(data, f, None, items, "fold", 5)
        got = [x["item"] for x in res["items"]]
        assert S.same_ranking([iv.index(x) for x in got], [iv.index(x) for x in want], scores)
        assert not set(got) & set(items)
        assert res["session"] == {"mode": "foldin", "events": 4, "used": 4, "unknown_items": 0, "truncated": 0,
                                  "limit": SESSION_CAP}
        assert res["user"] is None and res["cold_start"] is False   # the session was used
        arms.add(res["arm"])
    assert arms == {"fold", "plain"}                       # both arms fold in


def test_login_continues_the_session_under_the_account(served):
    """The anonymous session's items join the user's training history for the request."""
    server, data, f, _ = served
    iv = [str(x) for x in data.item_vocab]
    u = 3
    user = str(data.user_vocab[u])
    items = [x for x in iv[10:16] if iv.index(x) not in data.seen(u)][:4]
    sess = [{"item": x, "event": "view", "platform": "web"} for x in items]
    res = _post(server, {"user": user, "session": sess, "k": 6})["results"][0]
    want, scores = _expected(data, f, user, items, "fold", 6)
    got = [iv.index(x["item"]) for x in res["items"]]
    assert S.same_ranking(got, [iv.index(x) for x in want], scores)
    assert not {iv[j] for j in got} & (set(items) | {iv[j] for j in data.seen(u)})
    assert res["cold_start"] is False
    plain = _post(server, {"user": user, "k": 6})["results"][0]  # no session: frozen vector
    assert [x["item"] for x in plain["items"]] != [x["item"] for x in res["items"]]
    # an id the model does not know, with a session: folded in from the session alone, and
    # the id is still reported unknown
    out = _post(server, {"user": "nobody", "session": sess, "k": 6})
    want, scores = _expected(data, f, None, items, "fold", 6)
    got = [iv.index(x["item"]) for x in out["results"][0]["items"]]
    assert S.same_ranking(got, [iv.index(x) for x in want], scores)
    assert out["unknown_users"] == ["nobody"] and out["results"][0]["cold_start"] is False
    out = _post(server, {"user": "nobody", "session": [{"item": "zzz"}], "k": 6})
    assert out["results"][0]["cold_start"] is True and out["unknown_users"] == ["nobody"]


def test_unknown_items_are_skipped_and_long_sessions_cut_to_the_latest(served):
    server, data, f, _ = served
    iv = [str(x) for x in data.item_vocab]
    # 30 items, then 100 events over 50 other items: the first 30 are cut
    long = iv[:30] + [iv[30 + j % 50] for j in range(SESSION_CAP)]
    sess = [{"item": "no-such-item"}, *({"item": x} for x in long), {"item": 10 ** 12}]
    out = _post(server, {"session": sess, "session_id": "long", "k": 3})
    res = out["results"][0]
    assert res["session"] == {"mode": "foldin", "events": len(sess), "used": SESSION_CAP,
                              "unknown_items": 2, "truncated": 30, "limit": SESSION_CAP}
    assert out["unknown_session_items"] == ["no-such-item", str(10 ** 12)]
    want, scores = _expected(data, f, None, long[-SESSION_CAP:], "fold", 3)
    assert S.same_ranking([iv.index(x["item"]) for x in res["items"]],
                          [iv.index(x) for x in want], scores)
    assert {x["item"] for x in res["items"]} <= set(iv[:30]) | set(iv[80:])


@pytest.mark.parametrize("event, where, fix", [
    ({"item": "1001", "ts": -1}, "session[1].ts=-1", "must be a finite number >= 0"),
    ({"ts": 5}, "session[1].item", "field required"),
    ({"item": True}, "session[1].item=true", "must be an id"),
    ({"item": "1001", "event": 3}, "session[1].event=3", "non-empty string"),
    ({"item": "1001", "platform": ""}, 'session[1].platform=""', "non-empty string"),
    ({"item": "1001", "colour": "red"}, "session[1].colour", "unknown field"),
    ({"item": "1001", "ts": 10}, "session[1].ts=10", "earlier than the event before it"),
    ("1001", 'session[1]="1001"', "must be an object"),
])
def test_malformed_session_events_get_422_naming_the_field(served, event, where, fix):
    server, *_ = served
    st, out = server.client.post("/recommend", {"session": [{"item": "1000", "ts": 20},
                                                            event], "k": 3})
    assert st == 422 and out["error"].startswith(where) and fix in out["error"], out


def test_session_rules_of_the_request(served):
    server, data, *_ = served
    u = [str(x) for x in data.user_vocab[:2]]
    st, out = server.client.post("/recommend", {"users": u, "session": [{"item": "1000"}]})
    assert st == 400 and "belongs to one shopper" in out["error"]
    st, out = server.client.post("/recommend", {"session": "s1", "session_id": "s2"})
    assert st == 400 and out["error"].startswith("session_id")
    # the session id alone still names an anonymous shopper's session, as before
    assert _post(server, {"session": "s-only", "k": 2})["results"][0]["cold_start"]


def test_served_records_carry_the_session_and_its_platform(served):
    server, data, _, events_dir = served
    sess = [{"item": "1002", "event": "view", "ts": 1.0, "platform": "web"},
            {"item": "1004", "event": "cart", "ts": 2.0, "platform": "app"}]
    res = _post(server, {"session": sess, "session_id": "plat-1", "k": 2})["results"][0]
    st, ack = server.client.post("/events", {"events": [
        {"event_id": "pe-1", "kind": "click", "request_id": res["request_id"],
         "item": res["items"][0]["item"], "platform": "app", "session": "plat-1"}]})
    assert st == 200 and ack["accepted"] == 1
    recs = {r.get("request_id"): r for r in read_segments(events_dir)
            if r.get("request_id") == res["request_id"]}
    assert recs  # the served record (the click is keyed by the same request id)
    served_rec = next(r for r in read_segments(events_dir)
                      if r["kind"] == "served" and r["request_id"] == res["request_id"])
    assert served_rec["platform"] == "app" and served_rec["session"] == "plat-1"
    assert [e["item"] for e in served_rec["session_events"]] == ["1002", "1004"]
    click = next(r for r in read_segments(events_dir) if r.get("event_id") == "pe-1")
    assert click["platform"] == "app"


def test_tf_serving_rest_recommend_session(served):
    server, data, f, _ = served
    st, out = server.client.post("/v1/models/jaxreco/versions/1:predict", {
        "signature_name": "recommend_session",
        "inputs": {"user": [""], "items": [["1004", "1005", "nope"]],
                   "events": [["click", "", ""]], "ts": [[0.0, 0.0, 0.0]], "k": 4}})
    assert st == 200, out
    want, scores = _expected(data, f, None, ["1004", "1005"], "fold", 4)
    iv = [str(x) for x in data.item_vocab]
    got = out["outputs"]["items"][0]
    assert S.same_ranking([iv.index(x) for x in got], [iv.index(x) for x in want], scores)
    assert out["outputs"]["session_known"] == [2]
    st, meta = server.client.get("/v1/models/jaxreco/metadata")
    assert st == 200
    assert "recommend_session" in meta["metadata"]["signature_def"]["signature_def"]
    assert json.dumps(meta["metadata"]["jaxreco"]["session"]).startswith('{"mode"')
