"""Events and A/B: a durable event log that survives SIGKILL, duplicates, validation, sticky
arms, Prometheus counts and the A/B description -- against ``jaxreco-serve`` subprocesses
(JAX blocked), as in tests/test_serve.py."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("tensorflow", reason="serving tests need tensorflow-cpu")
pytest.importorskip("fastapi", reason="serving tests need the [serve] extra")
pytest.importorskip("prometheus_client", reason="serving tests need the [serve] extra")

from tests import test_export_support as S  # noqa: E402

from jaxreco.serve.ab import ABConfig, Arm, build  # noqa: E402
from jaxreco.serve.events import list_segments, read_segments  # noqa: E402

SALT = "exp-1"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Versions 1 and 2 of the tiny MF model (different parameters, same vocabularies)."""
    tmp = tmp_path_factory.mktemp("models")
    data = S.make_mf(seed=0)
    S.export(data, tmp, 1)
    S.export(S.make_mf(seed=1), tmp, 2)
    return tmp, data


@pytest.fixture(scope="module")
def ab_server(models, tmp_path_factory):
    model_dir, data = models
    tmp = tmp_path_factory.mktemp("ab")
    server = S.Server(model_dir, tmp / "server.log", "--arm", "control=1", "--arm", "treatment=2",
                      "--split", "50,50", "--salt", SALT, "--events-dir", str(tmp / "events"),
                      "--replica-id", "ab0", "--log-level", "info")
    try:
        server.wait()
        yield server, data, tmp / "events"
    finally:
        server.stop()


def _recommend(client, body) -> dict:
    st, out = client.post("/recommend", body)
    assert st == 200, out
    return out


# ------------------------------------------------------------------- durability
@pytest.fixture(scope="module")
def killed_and_restarted(models, tmp_path_factory):
    """Four clients post events; the server is SIGKILLed right after the 400th acknowledged
    event, a torn write is appended to its open segment, and it is restarted."""
    model_dir, data = models
    tmp = tmp_path_factory.mktemp("kill")
    events = tmp / "events"
    args = ("--events-dir", str(events), "--replica-id", "k0")
    server = S.Server(model_dir, tmp / "server-1.log", *args)
    server.wait()
    served = _recommend(server.client, {"users": [data.user_vocab[u] for u in range(3, 13)], "k": 5})
    rids = [r["request_id"] for r in served["results"]]
    acked: list[str] = []
    lock, stop, wrong = threading.Lock(), threading.Event(), []

    def post(t: int):
        client = S.Client(server.port, timeout=10)
        for b in range(10_000):
            if stop.is_set():
                break
            batch = [{"event_id": f"t{t}-b{b}-{j}", "kind": ("impression", "click")[j % 2],
                      "request_id": rids[(b + j) % len(rids)], "user": f"u{t}",
                      **({"items": ["1001", "1002"]} if j % 2 == 0 else {"item": "1001", "position": 1})}
                     for j in range(10)]
            try:
                st, body = client.post("/events", {"events": batch})
            except Exception:  # noqa: BLE001 - the server is gone
                break
            if st != 200 or body != {"accepted": 10, "duplicates": 0}:
                wrong.append((st, body))
                break
            with lock:
                acked.extend(e["event_id"] for e in batch)
        client.close()

    threads = [threading.Thread(target=post, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 400 and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(server.proc.pid, signal.SIGKILL)
    n_at_kill = len(acked)
    server.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(30)
    server.stop()
    assert n_at_kill >= 400, f"only {n_at_kill} events acknowledged in 60 s"
    assert not wrong, wrong[:3]
    (open_seg,) = [s for s in list_segments(events) if s.open]
    with open(open_seg.path, "ab") as f:  # what a write cut short by the crash looks like
        f.write(b'{"kind":"click","event_id":"torn-write","request_id":"x","it')
    before_restart = list(read_segments(events))
    server = S.Server(model_dir, tmp / "server-2.log", *args)
    try:
        server.wait()
        yield dict(server=server, events=events, acked=list(acked), rids=rids,
                   before_restart=before_restart, open_seg=open_seg)
    finally:
        server.stop()


def _event_ids(records) -> collections.Counter:
    return collections.Counter(r["event_id"] for r in records if r["kind"] != "served")


def test_sigkill_right_after_acks_loses_no_acknowledged_event(killed_and_restarted):
    k = killed_and_restarted
    # the reader skips the torn last line of the open segment, before any recovery
    before = _event_ids(k["before_restart"])
    assert "torn-write" not in before
    assert all(before[e] == 1 for e in k["acked"]), [e for e in k["acked"] if before[e] != 1][:5]
    # the restarted replica truncated the torn line and closed its old segment
    closed = k["open_seg"].path.with_name(k["open_seg"].path.name[:-len(".open")])
    assert not k["open_seg"].path.exists() and closed.read_bytes().endswith(b"\n")
    assert b"torn-write" not in closed.read_bytes()
    for seg in list_segments(k["events"]):
        if not seg.open:
            assert seg.path.read_bytes().endswith(b"\n"), seg.path
    after = _event_ids(read_segments(k["events"]))
    assert all(after[e] == 1 for e in k["acked"])
    assert max(after.values()) == 1  # unacknowledged ones too: none written twice
    served = [r for r in read_segments(k["events"]) if r["kind"] == "served"]
    assert {r["request_id"] for r in served} == set(k["rids"])


def test_duplicates_are_ignored_across_a_restart(killed_and_restarted):
    k = killed_and_restarted
    client = k["server"].client
    again = k["acked"][:150]
    fresh = [f"fresh-{j}" for j in range(7)]
    body = {"events": [{"event_id": e, "kind": "click", "request_id": k["rids"][0],
                        "item": "1001"} for e in again + fresh + fresh[:2]]}
    assert client.post("/events", body) == (200, {"accepted": 7, "duplicates": 152})
    assert client.post("/events", body) == (200, {"accepted": 0, "duplicates": 159})
    recs = [r for r in read_segments(k["events"]) if r["kind"] != "served"]
    counts = _event_ids(recs)
    assert all(counts[e] == 1 for e in again + fresh)
    # the restarted replica still knows which arm served a request from before the crash
    new = [r for r in recs if r["event_id"] in fresh]
    assert {(r["arm"], r["model_version"], r["replica"]) for r in new} == {("default", 2, "k0")}


# ------------------------------------------------------------------- validation
def _ok_event(**kw):
    return {"event_id": "v1", "kind": "purchase", "request_id": "r1", "item": "1001",
            "value": 12.5, **kw}


def _impression(**kw):
    return {"event_id": "v2", "kind": "impression", "request_id": "r1", "items": ["1001"], **kw}


BAD_EVENTS = [
    (_ok_event(value=-2), "events[0].value=-2: must be >= 0"),
    (_ok_event(value="12"), 'events[0].value="12": must be a finite number'),
    ({k: v for k, v in _ok_event().items() if k != "value"}, "events[0].value: field required"),
    (_ok_event(kind="view"), 'events[0].kind="view": must be one of'),
    (_ok_event(event_id=7), "events[0].event_id=7: must be a non-empty string"),
    (_ok_event(event_id=""), 'events[0].event_id="": must be a non-empty string'),
    ({k: v for k, v in _ok_event().items() if k != "request_id"}, "events[0].request_id: field required"),
    (_ok_event(position=0), "events[0].position=0: must be >= 1"),
    (_ok_event(position=1.5), "events[0].position=1.5: must be an integer"),
    (_ok_event(quantity=0), "events[0].quantity=0: must be >= 1"),
    (_ok_event(position=2**40), f"events[0].position={2**40}: must be <= 2147483647"),
    (_ok_event(ts="yesterday"), 'events[0].ts="yesterday": must be a finite number'),
    (_ok_event(user=["u1"]), 'events[0].user=["u1"]: must be an id'),
    (_ok_event(colour="red"), "events[0].colour: unknown field"),
    (_ok_event(arm="control"), "events[0].arm: unknown field"),  # the server sets it
    ({k: v for k, v in _ok_event().items() if k != "item"}, "events[0].item: field required"),
    (_ok_event(items=["1001"]), 'events[0].items=["1001"]: only impression events list'),
    (_impression(items=[]), "events[0].items=[]: must be a list of 1 to"),
    (_impression(items=["1", ""]), 'events[0].items[1]="": must be an id'),
    (_impression(item="1"), 'events[0].item="1": an impression lists the items shown in'),
]


@pytest.mark.parametrize("event, message", BAD_EVENTS, ids=[m.split(":")[0] + f"-{i}"
                                                             for i, (_, m) in enumerate(BAD_EVENTS)])
def test_bad_event_gets_422_naming_index_field_and_value(ab_server, event, message):
    client = ab_server[0].client
    good = {"event_id": "never-written", "kind": "click", "request_id": "r0", "item": "1"}
    st, body = client.post("/events", {"events": [good, event]})
    assert st == 422 and set(body) == {"error"}, body
    assert body["error"].startswith(message.replace("events[0]", "events[1]")), body["error"]
    # nothing of a refused request is written
    assert "never-written" not in _event_ids(read_segments(ab_server[2]))


def test_bad_events_body(ab_server):
    client = ab_server[0].client
    assert client.post("/events", {"evts": []})[0] == 422
    assert client.post("/events", {"events": {}}) == (422, {"error": "events={}: must be a list of events"})
    assert client.post("/events", [1])[0] == 400
    st, body = client.post("/events", {"events": [_ok_event(value=10**400)]})  # no float holds it
    assert st == 422 and body["error"].startswith("events[0].value=1000")
    assert body["error"].endswith(": must be a finite number")
    many = {"events": [_ok_event(event_id=f"m{i}") for i in range(1001)]}
    st, body = client.post("/events", many)
    assert st == 422 and "1001 events in one request; at most 1000" in body["error"]


# ------------------------------------------------------------------- A/B assignment
def test_same_user_always_gets_the_same_arm_and_split_is_50_50(ab_server):
    server, data, _ = ab_server
    client = server.client
    ab = build(["control=1", "treatment=2"], "50,50", SALT)
    users = [f"shopper-{i}" for i in range(2000)]
    arm_of = {}
    for i in range(0, len(users), 64):
        out = _recommend(client, {"users": users[i:i + 64], "k": 3})
        for r in out["results"]:
            assert r["model_version"] == {"control": 1, "treatment": 2}[r["arm"]]
            assert r["cold_start"] is True
            arm_of[r["user"]] = r["arm"]
    assert all(arm_of[u] == ab.names[ab.assign(u)] for u in users)  # the documented hash
    n = sum(a == "control" for a in arm_of.values())
    assert abs(n - 1000) <= 3 * (2000 * 0.25) ** 0.5, n
    for u in users[:40:3] + [data.user_vocab[3]]:  # sticky: asked again, one at a time
        r = _recommend(client, {"user": u, "session": "s-any", "k": 2})["results"][0]
        assert r["arm"] == ab.names[ab.assign(u)]  # the user id is the key, not the session
    # an anonymous shopper: keyed by the session, cold-start answer, user null
    for s in ("sess-1", "sess-2", "sess-3"):
        r1 = _recommend(client, {"session": s, "k": 4})
        r2 = _recommend(client, {"session": s, "users": [], "k": 4})
        assert r1["results"][0]["arm"] == r2["results"][0]["arm"] == ab.names[ab.assign(s)]
        assert r1["results"][0]["user"] is None and r1["results"][0]["cold_start"] is True
    # a mixed request answers per arm, without a shared top-level version
    mixed = _recommend(client, {"users": users[:8], "k": 2})
    assert len({r["arm"] for r in mixed["results"]}) == 2 and "model_version" not in mixed


def test_a_new_salt_reshuffles_the_arms():
    users = [f"shopper-{i}" for i in range(2000)]
    a = build(["control=1", "treatment=2"], "50,50", SALT)
    b = build(["control=1", "treatment=2"], "50,50", SALT + "-next")
    moved = sum(a.assign(u) != b.assign(u) for u in users)
    assert abs(moved - 1000) <= 3 * (2000 * 0.25) ** 0.5, moved  # independent draws
    assert [a.assign(u) for u in users] == [a.assign(u) for u in users]
    c = ABConfig((Arm("a", 1), Arm("b", 2), Arm("c", 3)), (80, 10, 10), "x")
    share = collections.Counter(c.assign(u) for u in users)
    assert abs(share[0] - 1600) <= 3 * (2000 * 0.16) ** 0.5, share


def test_missing_pinned_version_stops_the_server_at_start(models):
    model_dir, _ = models
    proc = subprocess.run(
        [sys.executable, "-m", "jaxreco.serve", "--model-dir", str(model_dir), "--arm", "control=1",
         "--arm", "treatment=9"], env=S.subprocess_env(), cwd=str(S.REPO), capture_output=True,
        text=True, timeout=60)
    assert proc.returncode == 2
    assert "arm(s) ['treatment=9'] pin version(s) [9], which are not under" in proc.stderr
    assert "(versions there: [1, 2])" in proc.stderr


# ------------------------------------------------------------------- metrics
def _metrics(client) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    st, text = client.get("/metrics")
    assert st == 200
    out = {}
    for fam in text_string_to_metric_families(text.decode() if isinstance(text, bytes) else text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _delta(after, before, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_count_what_was_posted(ab_server):
    server, _, _ = ab_server
    client = server.client
    ab = build(["control=1", "treatment=2"], "50,50", SALT)
    users = [u for u in (f"m-{i}" for i in range(40))]
    by_arm = {"control": [u for u in users if ab.assign(u) == 0][:3],
              "treatment": [u for u in users if ab.assign(u) == 1][:2]}
    before = _metrics(client)
    rid = {}
    for arm, us in by_arm.items():
        for r in _recommend(client, {"users": us, "k": 3})["results"]:
            rid[r["user"]] = r["request_id"]
    plan = {"impression": 5, "click": 3, "cart": 2, "purchase": 1}
    evs = []
    for u, r in rid.items():
        for kind, n in plan.items():
            for j in range(n):
                e = {"event_id": f"met-{u}-{kind}-{j}", "kind": kind, "request_id": r, "user": u}
                e.update({"items": ["1001", "1002"]} if kind == "impression" else {"item": "1001"})
                if kind == "purchase":
                    e["value"] = 9.5
                evs.append(e)
    evs.append({"event_id": "met-unknown", "kind": "click", "request_id": "not-served-here",
                "item": "1001"})
    assert client.post("/events", {"events": evs}) == (200, {"accepted": len(evs), "duplicates": 0})
    assert client.post("/events", {"events": evs[:4]}) == (200, {"accepted": 0, "duplicates": 4})
    assert client.post("/events", {"events": [{"kind": "click"}]})[0] == 422
    after = _metrics(client)
    for arm, version in (("control", "1"), ("treatment", "2")):
        n_users = len(by_arm[arm])
        assert _delta(after, before, "jaxreco_served_total", arm=arm, model_version=version) == n_users
        for kind, n in plan.items():
            assert _delta(after, before, "jaxreco_events_total", kind=kind, arm=arm,
                          model_version=version) == n * n_users
    assert _delta(after, before, "jaxreco_events_total", kind="click", arm="unknown",
                  model_version="unknown") == 1
    assert _delta(after, before, "jaxreco_event_duplicates_total") == 4
    assert _delta(after, before, "jaxreco_events_rejected_total") == 1
    assert _delta(after, before, "jaxreco_http_requests_total", endpoint="/events", status="200") == 2
    assert _delta(after, before, "jaxreco_http_requests_total", endpoint="/events", status="422") == 1
    assert _delta(after, before, "jaxreco_http_requests_total", endpoint="/recommend", status="200") == 2
    assert _delta(after, before, "jaxreco_http_request_duration_seconds_count",
                  endpoint="/recommend", status="200") == 2
    # the records carry what the server knew: arm and version joined by request_id
    recs = {r["event_id"]: r for r in read_segments(ab_server[2]) if r.get("event_id", "").startswith("met-")}
    assert len(recs) == len(evs)
    u0 = by_arm["treatment"][0]
    assert recs[f"met-{u0}-click-0"]["arm"] == "treatment" and recs[f"met-{u0}-click-0"]["model_version"] == 2
    assert recs["met-unknown"]["arm"] is None and recs["met-unknown"]["model_version"] is None
    p = recs[f"met-{u0}-purchase-0"]
    assert p["value"] == 9.5 and p["replica"] == "ab0" and p["received_ts"] > 1.7e9


# ------------------------------------------------------------------- A/B description
def test_ab_endpoint_served_records_and_log_show_arms_split_and_salt(ab_server):
    server, data, events = ab_server
    client = server.client
    assert client.get("/v1/ab") == (200, {"arms": ["control", "treatment"],
                                          "versions": {"control": 1, "treatment": 2},
                                          "split": {"control": 50, "treatment": 50}, "salt": SALT})
    st, ready = client.get("/readyz")
    assert st == 200 and ready["arms"] == {"control": 1, "treatment": 2}
    out = _recommend(client, {"user": data.user_vocab[5], "session": "s5", "k": 4})["results"][0]
    deadline = time.monotonic() + 10  # served records are written after the answer
    while True:
        served = {r["request_id"]: r for r in read_segments(events) if r["kind"] == "served"}
        if out["request_id"] in served or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    rec = served[out["request_id"]]
    assert rec == {"kind": "served", "request_id": out["request_id"], "ts": rec["ts"],
                   "user": data.user_vocab[5], "session": "s5", "arm": out["arm"],
                   "model_version": out["model_version"], "items": [x["item"] for x in out["items"]],
                   "replica": "ab0", "split": {"control": 50, "treatment": 50}, "salt": SALT}
    assert abs(rec["ts"] - time.time()) < 60
    assert "A/B arms: control=v1 (50), treatment=v2 (50); salt 'exp-1'" in server.log()
    # a pinned arm's version answers the TF Serving predict API by version
    st, body = client.post("/v1/models/jaxreco/versions/2:predict",
                           {"inputs": {"user": [data.user_vocab[3]], "k": 2}})
    assert st == 200 and len(body["outputs"]["items"][0]) == 2


def test_cli_reads_arms_split_salt_events_dir_and_replica_from_env(tmp_path):
    from jaxreco.serve.cli import ab_config, build_parser

    args = build_parser().parse_args(["--model-dir", "m"])
    assert args.events_dir is None and ab_config(args).is_default
    env = {"JAXRECO_SERVE_ARMS": "control=3, treatment=4", "JAXRECO_SERVE_SPLIT": "90,10",
           "JAXRECO_SERVE_SALT": "s", "JAXRECO_EVENTS_DIR": str(tmp_path), "JAXRECO_REPLICA_ID": "p-1"}
    old = dict(os.environ)
    try:
        os.environ.update(env)
        args = build_parser().parse_args(["--model-dir", "m"])
        ab = ab_config(args)
        assert (args.events_dir, args.replica_id) == (str(tmp_path), "p-1")
        assert [(a.name, a.version) for a in ab.arms] == [("control", 3), ("treatment", 4)]
        assert ab.split_map() == {"control": 90, "treatment": 10} and ab.salt == "s"
        args = build_parser().parse_args(["--model-dir", "m", "--arm", "x=1", "--split", "1"])
        assert ab_config(args).names == ["x"]  # a flag wins over the variable
        with pytest.raises(ValueError, match="--split has 2 weights for 1 arms"):
            ab_config(build_parser().parse_args(["--model-dir", "m", "--arm", "x=1"]))
    finally:
        os.environ.clear()
        os.environ.update(old)
