"""``dataset=events``: the server's event segments read, checked, joined and prepared."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from jaxreco.data import events
from jaxreco.data.dataset import DataError
from jaxreco.data.prepare import load_split, load_table
from jaxreco.data.readers import BadRows

T0 = 1_700_000_000.0


def served(rid, user, items, arm="control", version=1, session=None, ts=T0, **kw):
    return {"kind": "served", "request_id": rid, "ts": ts, "user": user, "session": session,
            "arm": arm, "model_version": version, "items": items, "replica": "r0", **kw}


def event(kind, eid, rid, *, user=None, ts=T0 + 1, **kw):
    rec = {"kind": kind, "event_id": eid, "request_id": rid, "received_ts": ts, "user": user,
           "session": None, "replica": "r0", "arm": None, "model_version": None}
    rec.update(kw)
    return rec


def write_segment(d, name, records, *, tail: str = ""):
    d.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (d / name).write_text(text)
    return d / name


def basic_log(d):
    """Two requests: u1 (control) sees a, b, c and clicks b, carts b, buys b for 30; u2
    (treatment) sees c, a and clicks c."""
    write_segment(d, "events-r0-00000000.jsonl", [
        served("q1", "u1", ["a", "b", "c"]),
        served("q2", "u2", ["c", "a"], arm="treatment", version=2),
        event("impression", "e1", "q1", items=["a", "b", "c"]),
        event("click", "e2", "q1", item="b", position=2, ts=T0 + 5),
    ])
    write_segment(d, "events-r1-00000000.jsonl", [
        event("impression", "e3", "q2", items=["c", "a"], user="u2", ts=T0 + 100),
        event("click", "e4", "q2", item="c"),
        event("cart", "e5", "q1", item="b"),
        event("purchase", "e6", "q1", item="b", value=30.0, quantity=1),
    ])
    return d


def rows_by_key(src):
    b = next(src.blocks())
    uv, iv = src.vocab("user"), src.vocab("item")
    return {(uv[u], iv[i]): {k: v[r] for k, v in b.items()}
            for r, (u, i) in enumerate(zip(b["user"], b["item"]))}


def test_one_row_per_shown_item_with_click_label_deepest_stage_and_position(tmp_path):
    src = events.source({"name": "events", "path": str(basic_log(tmp_path / "ev"))})
    rows = rows_by_key(src)
    assert sorted(rows) == [("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "a"), ("u2", "c")]
    got = {k: (float(r["label"]), int(r["event"]), int(r["position"])) for k, r in rows.items()}
    assert got == {("u1", "a"): (0, 0, 1), ("u1", "b"): (1, 3, 2), ("u1", "c"): (0, 0, 3),
                   ("u2", "c"): (1, 1, 1), ("u2", "a"): (0, 0, 2)}
    assert rows[("u1", "a")]["timestamp"] == int(T0 + 1)       # the impression's received_ts
    assert rows[("u2", "a")]["timestamp"] == int(T0 + 100)
    assert src.report["arms"] == ["control", "treatment"]      # arm joined from served records
    assert int(rows[("u2", "c")]["arm"]) == 1 and int(rows[("u2", "c")]["model_version"]) == 2
    assert int(rows[("u1", "b")]["arm"]) == 0 and int(rows[("u1", "b")]["model_version"]) == 1
    assert src.report["purchases"] == 1 and src.report["clicks"] == 2


def test_log_carries_purchase_value_and_counts(tmp_path):
    log = events.collect(str(basic_log(tmp_path / "ev")))
    k = [j for j in range(len(log.slot_item))
         if (log.slot_request[j], log.slot_item[j]) == ("q1", "b")][0]
    assert log.slot_value[k] == 30.0 and log.slot_stage[k] == 3
    assert log.counts["served"] == 2 and log.counts["impression_events"] == 2
    assert log.counts["purchase_events"] == 1 and log.counts["implied_impressions"] == 0
    assert sorted(log.served_arm.tolist()) == ["control", "treatment"]


def test_open_segment_partial_last_line_is_ignored(tmp_path):
    d = tmp_path / "ev"
    write_segment(d, "events-r0-00000001.jsonl.open",
                  [served("q1", "u1", ["a", "b"]), event("impression", "e1", "q1", items=["a", "b"])],
                  tail='{"kind": "click", "event_id": "e2", "request_id": "q1", "ite')
    log = events.collect(str(d))
    assert log.counts["lines"] == 2 and log.counts["click_events"] == 0
    assert sorted(log.slot_item.tolist()) == ["a", "b"]


def test_closed_segment_wins_over_its_open_name_and_order_is_replica_then_seq(tmp_path):
    d = tmp_path / "ev"
    write_segment(d, "events-r0-00000002.jsonl", [served("q2", "u1", ["x"])])
    write_segment(d, "events-r0-00000001.jsonl", [served("q1", "u1", ["a"])])
    write_segment(d, "events-r0-00000001.jsonl.open", [served("stale", "u1", ["a"])])
    (d / "notes.txt").write_text("not a segment\n")
    assert [s.name for s in events.list_segments(str(d))] == [
        "events-r0-00000001.jsonl", "events-r0-00000002.jsonl"]
    assert events.collect(str(d)).served_request.tolist() == ["q1", "q2"]


def test_segments_read_from_an_fsspec_url(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    local = basic_log(tmp_path / "ev")
    for p in local.iterdir():
        fs.pipe(f"/edir-test/{p.name}", p.read_bytes())
    try:
        src = events.source({"name": "events", "path": "memory://edir-test"})
        assert sorted(rows_by_key(src)) == sorted(rows_by_key(
            events.source({"name": "events", "path": str(local)})))
    finally:
        fs.rm("/edir-test", recursive=True)


@pytest.mark.parametrize("line, field, value", [
    ('{"kind": "served", "request_id": "q", "ts": 1, "user": "u", "items": "abc"}',
     "items", "abc"),
    ('{"kind": "click", "event_id": "e", "request_id": "q", "received_ts": 5, "item": "a", '
     '"position": 0}', "position", "0"),
    ('{"kind": "purchase", "event_id": "e", "request_id": "q", "received_ts": 5, "item": "a"}',
     "value", "null"),
    ('{"kind": "purchase", "event_id": "e", "request_id": "q", "received_ts": 5, "item": "a", '
     '"value": -3}', "value", "-3"),
    ('{"kind": "view", "event_id": "e"}', "kind", "view"),
    ('{"kind": "impression", "event_id": "e", "request_id": "q", "received_ts": "yesterday", '
     '"items": ["a"]}', "received_ts", "yesterday"),
    ('{"kind": "impression", "event_id": "e", "request_id": null, "received_ts": 5, '
     '"items": ["a"]}', "request_id", "null"),
    ('{"kind": "served", "request_id": "q", "ts": 1, "items": ["a", {"id": 1}]}',
     "items[1]", '{"id": 1}'),
    ('{"kind": "click", "event_id": "e", ', "<line>", '{"kind": "click", "event_id": "e", '),
])
def test_malformed_line_error_names_file_line_field_and_value(tmp_path, line, field, value):
    d = tmp_path / "ev"
    write_segment(d, "events-r0-00000000.jsonl", [served("q0", "u", ["a"])],
                  tail="\n" + line + "\n")            # line 3: a blank line 2 counts too
    with pytest.raises(DataError) as e:
        events.collect(str(d))
    msg = str(e.value)
    assert msg.startswith(f"events-r0-00000000.jsonl:3: field {field!r} = {value!r}: "), msg
    assert "on_bad_rows=skip" in msg


def test_bad_lines_quarantined_with_skip_and_counted(run_prepare, tmp_path):
    d = basic_log(tmp_path / "ev")
    write_segment(d, "events-r2-00000000.jsonl", [served("q9", "u9", ["z"])],
                  tail="not json\n" + json.dumps(event("click", "e9", "q9", item="z",
                                                       position=-1)) + "\n")
    with pytest.raises(DataError, match=r"events-r2-00000000.jsonl:2: field '<line>'"):
        run_prepare({"name": "events", "path": str(d)}, name="strict")
    meta, out = run_prepare({"name": "events", "path": str(d)}, on_bad_rows="skip",
                            split={"kind": "random", "test_fraction": 0.0, "val_fraction": 0.0},
                            negatives={"num": 0})
    with open(f"{out}/quarantine.csv") as f:
        q = list(csv.DictReader(f))
    assert [(r["file"], r["line"], r["field"]) for r in q] == [
        ("events-r2-00000000.jsonl", "2", "<line>"), ("events-r2-00000000.jsonl", "3", "position")]
    assert meta["source_report"]["rows"] == 5           # q9 was served, never shown


def test_duplicate_events_count_once_and_click_without_impression_implies_one(tmp_path):
    d = tmp_path / "ev"
    write_segment(d, "events-r0-00000000.jsonl", [
        served("q1", "u1", ["a", "b", "c"]),
        event("click", "e1", "q1", item="c"),                    # no impression event
        event("click", "e1", "q1", item="c"),                    # a retry: same event_id
        event("click", "e2", None, item="a", user="u1"),         # not from a recommendation
        event("purchase", "e3", None, item="a", user="u1", value=7.5),
    ])
    write_segment(d, "events-r1-00000000.jsonl", [served("q1", "u1", ["a", "b", "c"])])
    log = events.collect(str(d))
    assert log.counts["duplicate_events"] == 1 and log.counts["duplicate_served"] == 1
    assert log.counts["implied_impressions"] == 1
    assert log.counts["unattributed_click_events"] == 1
    assert log.counts["unattributed_value"] == 7.5
    assert log.slot_item.tolist() == ["c"] and log.slot_position.tolist() == [3]
    assert log.slot_stage.tolist() == [1] and log.slot_arm.tolist() == ["control"]


def test_anonymous_shoppers_are_their_session_and_identity_session_flips_it(tmp_path):
    d = tmp_path / "ev"
    write_segment(d, "events-r0-00000000.jsonl", [
        served("q1", None, ["a"], session="s1"),
        served("q2", "u2", ["a"], session="s2"),
        event("impression", "e1", "q1", items=["a"]),
        event("impression", "e2", "q2", items=["a"]),
    ])
    by_user = events.source({"name": "events", "path": str(d)})
    assert sorted(by_user.vocab("user").tolist()) == ["session:s1", "u2"]
    by_session = events.source({"name": "events", "path": str(d), "identity": "session"})
    assert sorted(by_session.vocab("user").tolist()) == ["s1", "s2"]
    only = events.source({"name": "events", "path": str(d), "arms": ["treatment"]})
    assert only.num_rows_hint == 0


def test_no_segments_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no event segments"):
        events.collect(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="dataset.path=.*no such directory"):
        events.source({"name": "events", "path": str(tmp_path / "nope")})


def test_prepare_aggregates_each_pair_to_any_click_and_deepest_stage(run_prepare, tmp_path):
    d = basic_log(tmp_path / "ev")
    write_segment(d, "events-r0-00000001.jsonl", [       # u1 is shown b again, no click
        served("q3", "u1", ["b", "d"]),
        event("impression", "e7", "q3", items=["b", "d"], ts=T0 + 500),
    ])
    meta, out = run_prepare({"name": "events", "path": str(d)}, dedup="aggregate",
                            split={"kind": "random", "test_fraction": 0.0, "val_fraction": 0.0},
                            negatives={"num": 0})
    tr = load_split(out, "train")
    uv = load_table(out, "user_vocab")["raw_id"].astype(str)
    iv = load_table(out, "item_vocab")["raw_id"].astype(str)
    got = {(uv[u], iv[i]): (float(lab), int(ev), int(c)) for u, i, lab, ev, c in zip(
        tr["user"], tr["item"], tr["label"], tr["event"], tr["count"])}
    assert got[("u1", "b")] == (1.0, 3, 2)              # shown twice, clicked once, bought
    assert got[("u1", "d")] == (0.0, 0, 1)
    assert len(got) == 6 and meta["source_report"]["slots"] == 7
    assert {"position", "timestamp", "arm", "model_version"} <= set(tr)


def learnable_log(d, n_users=120, n_items=40, requests=8, k=6, seed=0):
    """Shoppers in two tastes click items of their taste with 0.6, others with 0.05."""
    rng = np.random.default_rng(seed)
    recs = []
    for u in range(n_users):
        for r in range(requests):
            rid = f"q{u}-{r}"
            items = rng.choice(n_items, k, replace=False)
            shown = [f"i{i}" for i in items]
            recs.append(served(rid, f"u{u}", shown, ts=T0 + r * 60))
            recs.append(event("impression", f"{rid}-imp", rid, items=shown, ts=T0 + r * 60 + 1))
            for i in items:
                p = 0.6 if (i % 2) == (u % 2) else 0.05
                if rng.random() < p:
                    recs.append(event("click", f"{rid}-{i}", rid, item=f"i{i}",
                                      ts=T0 + r * 60 + 2))
    write_segment(d, "events-r0-00000000.jsonl", recs)
    return d


def test_jaxreco_train_on_collected_events_learns_the_clicks(tmp_path, monkeypatch):
    from tests.support import train

    monkeypatch.setenv("JAXRECO_CACHE", str(tmp_path / "cache"))
    d = learnable_log(tmp_path / "ev")
    m = train(tmp_path / "run", [
        "dataset=events", f"dataset.path={d}", "model=embed_mlp", "model.combiner=gmf",
        "model.dim=8", "model.mf_dim=8", "task.kind=ctr", "task.select=auc",
        "task.prepare.dedup=aggregate", "task.prepare.negatives.num=0",
        "task.prepare.split.kind=random", "task.prepare.split.test_fraction=0.2",
        "task.prepare.split.val_fraction=0.1", "optimizer.lr=0.02", "trainer.epochs=8",
        "trainer.batch_size=256", "trainer.progress_bar=false", "trainer.patience=8",
        "trainer.async_checkpoint=false", "logger.tensorboard=false"])
    assert m["test/auc"] > 0.75, m     # the Bayes score reaches ~0.82 here
