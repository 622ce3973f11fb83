"""``events``: what shoppers did with served recommendations, read from the server's segments.

``jaxreco-serve --events-dir EDIR`` appends JSON lines to segment files in ``EDIR`` (a local
directory or any fsspec URL): ``events-<replica>-<seq:08d>.jsonl`` once closed,
``events-<replica>-<seq:08d>.jsonl.open`` while written (its last line may be cut short, without
a newline: that partial line is not read). Records, one per line:

* ``{"kind": "served", "request_id", "ts", "user", "session", "arm", "model_version",
  "items": [ranked item ids], "replica"}`` for every ``/recommend`` answer (optionally
  ``"split": {arm: weight}``, the traffic split the server ran with);
* ``{"kind": "impression" | "click" | "cart" | "purchase", "event_id", "request_id",
  "ts" (client clock, optional), "received_ts", "user", "session", "items" (impression: the
  shown items, position = index + 1) or "item" (click, cart, purchase), "position"
  (optional, >= 1), "value" (purchase: order value), "quantity" (optional), "replica",
  "arm", "model_version" (may be null: joined from the served record by request_id)}``.

Timestamps are seconds since the epoch (a JSON number) or ISO-8601 text. Ids are JSON strings
(integers are read as their decimal text). Every line is checked; a malformed one stops the
read naming ``file:line``, the field and its value, or is skipped into the quarantine with
``prepare.on_bad_rows=skip``. Events are de-duplicated by ``event_id`` (a client retry
accepted by two replicas counts once) and served records by ``request_id``.

**The join** (:func:`collect`). An impression *slot* is one shown ``(request_id, item)``;
the slot's stage is the deepest event on it, coded as ``synthetic-ecommerce`` codes its rows:
``event`` 0 impression (view), 1 click, 2 cart, 3 purchase. A click, cart or purchase whose
``(request_id, item)`` has no impression event implies one (counted as
``implied_impressions``; its position from the event, else from the served slate). Events
without a ``request_id`` are not attributable to a recommendation: counted
(``unattributed_*``), not joined. A slot's user, session, arm and model version come from
its served record, else from the events.

**Rows** (:func:`source`): one per slot, with ``user`` = the shopper (``dataset.identity``:
``user`` takes the user id and falls back to ``session:<session id>`` when it is null;
``session`` the other way round), ``item``, ``label`` = 1 if the slot was clicked (any stage
>= 1; 0 is a real negative: shown and not clicked), ``event``, ``position`` (1-based rank
shown, 0 unknown), ``timestamp`` (the impression's ``received_ts``, whole seconds), ``arm``
(index into ``metadata.source_report.arms``, -1 unknown) and ``model_version`` (-1 unknown
or not an integer). A shopper shown the same item in several requests has several rows:
``prepare.dedup=aggregate`` makes one per pair (label = any click, event = deepest stage,
``count`` = impressions), ``dedup=none`` keeps each impression.

This module is the dependency-light reader (numpy and ``jaxreco.data.storage``, fsspec for
URLs); :mod:`jaxreco.report` computes the A/B figures from the same join.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import re
from typing import Any, Iterator, Mapping

import numpy as np

from jaxreco.data import storage
from jaxreco.data.dataset import DataError
from jaxreco.data.readers import BadRow, BadRows, IdMapper, Source

SEGMENT_RE = re.compile(r"^events-(?P<replica>.+)-(?P<seq>[0-9]{8})\.jsonl(?P<open>\.open)?$")
EVENT_KINDS = ("impression", "click", "cart", "purchase")
KINDS = ("served",) + EVENT_KINDS
STAGE = {"impression": 0, "click": 1, "cart": 2, "purchase": 3}   # the ``event`` column
IDENTITIES = ("user", "session")


# ----------------------------------------------------------------------------- segments
@dataclasses.dataclass(frozen=True)
class Segment:
    path: str        # full path or URL
    name: str        # file name
    replica: str
    seq: int
    open: bool       # still being written: a last line without newline is not read


def list_segments(path: str) -> list[Segment]:
    """The segment files of ``path`` in (replica, seq) order; where both the open and the
    closed name of a segment are listed (closed while listing), the closed one."""
    found: dict[tuple[str, int], Segment] = {}
    for name in storage.listdir(path):
        m = SEGMENT_RE.match(name)
        if not m:
            continue
        s = Segment(storage.join(path, name), name, m["replica"], int(m["seq"]), bool(m["open"]))
        key = (s.replica, s.seq)
        if key not in found or found[key].open:
            found[key] = s
    return [found[k] for k in sorted(found)]


def _read_bytes(seg: Segment) -> tuple[bytes, Segment]:
    try:
        with storage.open_file(seg.path, "rb") as f:
            return f.read(), seg
    except FileNotFoundError:
        if not seg.open:
            raise
    closed = dataclasses.replace(seg, path=seg.path[:-len(".open")], name=seg.name[:-5],
                                 open=False)       # closed between listing and reading
    with storage.open_file(closed.path, "rb") as f:
        return f.read(), closed


def read_lines(path: str) -> Iterator[tuple[str, int, bytes]]:
    """``(file name, 1-based line number, line)`` of every complete, non-blank line of every
    segment in ``path``, in segment order."""
    segs = list_segments(path)
    if not segs:
        raise DataError(f"{path}: no event segments (files events-<replica>-<seq:08d>.jsonl "
                        "or .jsonl.open); is it the server's --events-dir?")
    for seg in segs:
        data, seg = _read_bytes(seg)
        lines = data.split(b"\n")
        if seg.open or not lines[-1].strip():
            lines = lines[:-1]        # the partial line of an open segment, or the final ""
        for no, line in enumerate(lines, 1):
            if line.strip():
                yield seg.name, no, line


# ----------------------------------------------------------------------------- records
class _Bad(Exception):
    def __init__(self, field: str, value: Any, reason: str):
        self.field, self.value, self.reason = field, value, reason


def _show(v: Any) -> str:
    return json.dumps(v)[:200] if not isinstance(v, str) else v[:200]


def _id(rec: Mapping, key: str, *, required: bool = True) -> str | None:
    v = rec.get(key)
    if v is None:
        if required:
            raise _Bad(key, v, "missing (a non-empty id string is required)")
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)) or v == "":
        raise _Bad(key, v, "not an id (a non-empty string or an integer)")
    return str(v)


def _ts(rec: Mapping, key: str, *, required: bool) -> float | None:
    v = rec.get(key)
    if v is None:
        if required:
            raise _Bad(key, v, "missing (seconds since the epoch, or ISO-8601 text)")
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
        return float(v)
    if isinstance(v, str):
        try:
            t = datetime.datetime.fromisoformat(v)
        except ValueError:
            pass
        else:
            if t.tzinfo is None:
                t = t.replace(tzinfo=datetime.timezone.utc)
            return t.timestamp()
    raise _Bad(key, v, "not a timestamp (seconds since the epoch >= 0, or ISO-8601 text)")


def _number(rec: Mapping, key: str, *, required: bool, lo: float, integer: bool = False):
    v = rec.get(key)
    if v is None:
        if required:
            raise _Bad(key, v, "missing (a number is required)")
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok and integer and not float(v).is_integer():
        ok = False
    if not ok or v < lo:
        what = "an integer" if integer else "a number"
        raise _Bad(key, v, f"not {what} >= {lo:g}")
    return int(v) if integer else float(v)


def _items(rec: Mapping, key: str) -> list[str]:
    v = rec.get(key)
    if not isinstance(v, list):
        raise _Bad(key, v, "not a list of item ids")
    out = []
    for j, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, (str, int)) or x == "":
            raise _Bad(f"{key}[{j}]", x, "not an item id (a non-empty string or an integer)")
        out.append(str(x))
    return out


def _version(v: Any) -> str | None:
    if v is None or isinstance(v, bool):
        return None
    return str(v)


def parse_record(line: bytes) -> dict[str, Any]:
    """One segment line as a checked, normalised record (ids as str, times as float seconds);
    raises ``_Bad(field, value, reason)`` for the first thing wrong with it."""
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _Bad("<line>", line.decode("utf-8", "replace"), f"not valid JSON ({e})") from None
    if not isinstance(rec, dict):
        raise _Bad("<line>", rec, "not a JSON object")
    kind = rec.get("kind")
    if kind not in KINDS:
        raise _Bad("kind", kind, f"not one of {list(KINDS)}")
    out: dict[str, Any] = {"kind": kind, "user": _id(rec, "user", required=False),
                           "session": _id(rec, "session", required=False),
                           "arm": _id(rec, "arm", required=False),
                           "model_version": _version(rec.get("model_version"))}
    if kind == "served":
        out["request_id"] = _id(rec, "request_id")
        out["ts"] = _ts(rec, "ts", required=True)
        out["items"] = _items(rec, "items")
        split = rec.get("split")
        if split is not None:
            if not (isinstance(split, dict) and split and all(
                    isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0
                    for w in split.values())):
                raise _Bad("split", split, "not an object of arm: weight >= 0")
            out["split"] = {str(a): float(w) for a, w in split.items()}
        return out
    out["event_id"] = _id(rec, "event_id")
    out["request_id"] = _id(rec, "request_id", required=kind == "impression")
    out["received_ts"] = _ts(rec, "received_ts", required=True)
    out["ts"] = _ts(rec, "ts", required=False)
    if kind == "impression":
        out["items"] = _items(rec, "items")
        if not out["items"]:
            raise _Bad("items", [], "empty: an impression shows at least one item")
        return out
    out["item"] = _id(rec, "item")
    out["position"] = _number(rec, "position", required=False, lo=1, integer=True)
    out["quantity"] = _number(rec, "quantity", required=False, lo=0)
    out["value"] = _number(rec, "value", required=kind == "purchase", lo=0)
    return out


def read_records(path: str, bad_rows: BadRows) -> Iterator[dict[str, Any]]:
    """Every valid record of the segments in ``path`` (``_file``/``_line`` added); a bad line
    goes to ``bad_rows`` (raises there in error mode), naming file, line, field and value."""
    for name, no, line in read_lines(path):
        try:
            rec = parse_record(line)
        except _Bad as e:
            bad_rows.add(BadRow(name, no, e.field, _show(e.value), e.reason))
            continue
        rec["_file"], rec["_line"] = name, no
        yield rec


# ----------------------------------------------------------------------------- the join
@dataclasses.dataclass
class Log:
    """The segments joined (see the module docstring). Slot columns (one entry per shown
    ``(request_id, item)``, in order of first appearance) and served-request columns are
    numpy arrays; string columns are ``object`` arrays (``None`` unknown)."""

    slot_request: np.ndarray     # str
    slot_item: np.ndarray        # str
    slot_shopper: np.ndarray     # str: by ``identity`` (None: neither user nor session known)
    slot_arm: np.ndarray         # str or None
    slot_version: np.ndarray     # str or None
    slot_position: np.ndarray    # int16, 0 unknown
    slot_ts: np.ndarray          # float64 seconds: the impression's received_ts
    slot_stage: np.ndarray       # int8: 0 impression, 1 click, 2 cart, 3 purchase
    slot_value: np.ndarray       # float64: purchase value attributed to the slot
    served_request: np.ndarray   # str
    served_shopper: np.ndarray   # str or None
    served_arm: np.ndarray       # str or None
    served_version: np.ndarray   # str or None
    served_ts: np.ndarray        # float64
    served_items: list[list[str]]
    splits: list[dict[str, float]]   # distinct ``split`` objects seen on served records
    counts: dict[str, Any]
    files: list[dict[str, Any]]      # name, size, mtime of each segment read


def shopper(user: str | None, session: str | None, identity: str = "user") -> str | None:
    """The shopper key: the user id, else ``session:<session>`` (``identity=session``: the
    session, else ``user:<user>``)."""
    if identity == "session":
        return session if session is not None else (None if user is None else f"user:{user}")
    return user if user is not None else (None if session is None else f"session:{session}")


def collect(path: str, *, bad_rows: BadRows | None = None, identity: str = "user") -> Log:
    """Reads and joins the segments of ``path`` into a :class:`Log`."""
    if identity not in IDENTITIES:
        raise DataError(f"dataset.identity={identity!r}: must be one of {list(IDENTITIES)}")
    bad_rows = bad_rows if bad_rows is not None else BadRows("error")
    files = [dict(name=s.name, **storage.stat(s.path)) for s in list_segments(path)]
    served: dict[str, dict] = {}
    events: list[dict] = []
    seen_events: set[str] = set()
    c = {"lines": 0, "served": 0, "duplicate_served": 0, "duplicate_events": 0,
         **{f"{k}_events": 0 for k in EVENT_KINDS}}
    for rec in read_records(path, bad_rows):
        c["lines"] += 1
        if rec["kind"] == "served":
            if rec["request_id"] in served:
                c["duplicate_served"] += 1
            else:
                served[rec["request_id"]] = rec
            continue
        if rec["event_id"] in seen_events:
            c["duplicate_events"] += 1
            continue
        seen_events.add(rec["event_id"])
        c[f"{rec['kind']}_events"] += 1
        events.append(rec)
    c["served"] = len(served)

    slots: dict[tuple[str, str], int] = {}
    cols: dict[str, list] = {k: [] for k in ("request", "item", "user", "session", "arm",
                                             "version", "position", "ts", "stage", "value")}

    def slot(req: str, item: str, ev: dict, position: int | None) -> int:
        k = slots.get((req, item))
        if k is not None:
            return k
        k = slots[(req, item)] = len(cols["request"])
        s = served.get(req)
        for name, value in (("request", req), ("item", item), ("position", position or 0),
                            ("ts", ev["received_ts"]), ("stage", 0), ("value", 0.0)):
            cols[name].append(value)
        for name, key in (("user", "user"), ("session", "session"), ("arm", "arm"),
                          ("version", "model_version")):
            v = s.get(key) if s is not None else None
            cols[name].append(v if v is not None else ev.get(key))
        return k

    unattr = {k: 0 for k in EVENT_KINDS[1:]}
    unattr_value = 0.0
    implied = repeated = 0
    # impressions first, so a click never creates a slot that its impression would name
    for ev in sorted(events, key=lambda e: e["kind"] != "impression"):
        if ev["kind"] == "impression":
            for j, item in enumerate(ev["items"]):
                if (ev["request_id"], item) in slots:
                    repeated += 1
                    continue
                slot(ev["request_id"], item, ev, j + 1)
            continue
        if ev["request_id"] is None:
            unattr[ev["kind"]] += 1
            unattr_value += ev["value"] or 0.0
            continue
        if (ev["request_id"], ev["item"]) not in slots:
            implied += 1
            pos = ev["position"]
            s = served.get(ev["request_id"])
            if pos is None and s is not None and ev["item"] in s["items"]:
                pos = s["items"].index(ev["item"]) + 1
        else:
            pos = None
        k = slot(ev["request_id"], ev["item"], ev, pos)
        cols["stage"][k] = max(cols["stage"][k], STAGE[ev["kind"]])
        if ev["kind"] == "purchase":
            cols["value"][k] += ev["value"]
    c.update(slots=len(cols["request"]), implied_impressions=implied,
             repeated_impressions=repeated, unattributed_value=unattr_value,
             **{f"unattributed_{k}_events": v for k, v in unattr.items()})

    def obj(xs):
        a = np.empty(len(xs), object)
        a[:] = xs
        return a
    shoppers = [shopper(u, s, identity) for u, s in zip(cols["user"], cols["session"])]
    c["slots_without_shopper"] = sum(x is None for x in shoppers)
    sv = list(served.values())
    splits = []
    for s in sv:
        if "split" in s and s["split"] not in splits:
            splits.append(s["split"])
    return Log(
        slot_request=obj(cols["request"]), slot_item=obj(cols["item"]), slot_shopper=obj(shoppers),
        slot_arm=obj(cols["arm"]), slot_version=obj(cols["version"]),
        slot_position=np.minimum(np.asarray(cols["position"], np.int64), 32767).astype(np.int16),
        slot_ts=np.asarray(cols["ts"], np.float64),
        slot_stage=np.asarray(cols["stage"], np.int8),
        slot_value=np.asarray(cols["value"], np.float64),
        served_request=obj([s["request_id"] for s in sv]),
        served_shopper=obj([shopper(s["user"], s["session"], identity) for s in sv]),
        served_arm=obj([s["arm"] for s in sv]),
        served_version=obj([s["model_version"] for s in sv]),
        served_ts=np.asarray([s["ts"] for s in sv], np.float64),
        served_items=[s["items"] for s in sv], splits=splits, counts=c, files=files)


# ----------------------------------------------------------------------------- source
def _int_or(v: str | None, default: int) -> int:
    try:
        return int(v) if v is not None else default
    except ValueError:
        return default


def source(cfg: Mapping[str, Any], *, on_bad_rows: str = "error") -> Source:
    """The :class:`Source` for ``conf/dataset/events.yaml``: ``path`` (the events directory,
    local or an fsspec URL), ``identity`` (user | session), ``arms`` (keep only slots served
    by these arms; null: all)."""
    path = cfg.get("path")
    if not path or path == "???":
        raise DataError("dataset=events needs dataset.path=<the server's --events-dir>")
    if not storage.exists(path):
        raise DataError(f"dataset.path={path}: no such directory")
    bad = BadRows(on_bad_rows)
    log = collect(str(path), bad_rows=bad, identity=str(cfg.get("identity") or "user"))
    keep = np.array([s is not None for s in log.slot_shopper], bool)
    arms_wanted = cfg.get("arms")
    if arms_wanted is not None:
        wanted = {str(a) for a in arms_wanted}
        keep &= np.array([a in wanted for a in log.slot_arm], bool)
    arm_names = sorted({a for a in log.slot_arm if a is not None})
    users, items = IdMapper(), IdMapper()
    u = users.encode(np.asarray(log.slot_shopper[keep], dtype=str))
    i = items.encode(np.asarray(log.slot_item[keep], dtype=str))
    arm_code = {a: k for k, a in enumerate(arm_names)}
    stage = log.slot_stage[keep]
    arrays = {"user": u, "item": i,
              "timestamp": np.floor(log.slot_ts[keep]).astype(np.int64),
              "label": (stage >= 1).astype(np.float32), "event": stage.astype(np.int8),
              "position": log.slot_position[keep],
              "arm": np.array([arm_code.get(a, -1) for a in log.slot_arm[keep]], np.int8),
              "model_version": np.array([_int_or(v, -1) for v in log.slot_version[keep]],
                                        np.int32)}
    n = len(u)
    report = dict(log.counts, arms=arm_names, rows=n,
                  clicks=int((stage >= 1).sum()), carts=int((stage >= 2).sum()),
                  purchases=int((stage >= 3).sum()))

    def blocks():
        if n:
            yield arrays
    return Source(name=str(cfg.get("name", "events")), user_vocab=users.vocab,
                  item_vocab=items.vocab, blocks=blocks, num_rows_hint=n,
                  extra_columns={"label": "<f4", "event": "|i1", "position": "<i2",
                                 "arm": "|i1", "model_version": "<i4"},
                  fingerprint={"path": str(path), "files": log.files,
                               "identity": str(cfg.get("identity") or "user"),
                               "arms": None if arms_wanted is None else sorted(map(str, arms_wanted))},
                  bad_rows=bad, report=report)
