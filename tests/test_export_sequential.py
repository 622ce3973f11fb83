"""The sequential model in the SavedModel: ``session_scores`` runs the encoder on (the user's
latest training items, the session's known items) cut to the last ``max_len``, with event
types and time gaps, and matches JAX on 1,000 sessions in a process without JAX (scores
within 1e-5, identical top-k)."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

tf = pytest.importorskip("tensorflow", reason="export tests need the [export] extra (tensorflow-cpu)")

from jaxreco import export as ex  # noqa: E402
from jaxreco import export_models  # noqa: E402
from jaxreco.models.layers import Table  # noqa: E402
from jaxreco.models.sequential import Sequential  # noqa: E402
from jaxreco.serve import layout  # noqa: E402
from jaxreco.train.tasks.next_item import Sequences  # noqa: E402
from tests import test_export_support as S  # noqa: E402
from tests.test_foldin import _PROGRAM  # noqa: E402

USERS, ITEMS, L, K = 30, 40, 8, 10
EVENTS = ["view", "click", "cart", "purchase"]


def _data(seed=0):
    """Train interactions with event codes 0..3 and timestamps (ties included)."""
    rng = np.random.default_rng(seed)
    user, item, ts, ev = [], [], [], []
    for u in range(USERS):
        n = 0 if u == 4 else int(rng.integers(1, 16))
        user += [u] * n
        item += rng.integers(0, ITEMS, n).tolist()
        ts += np.sort(rng.integers(1_000, 2_000, n)).tolist()
        ev += rng.integers(0, 4, n).tolist()
    return (np.asarray(user), np.asarray(item), np.asarray(ts, np.int64),
            np.asarray(ev, np.int32))


def _sessions(rng, n):
    users, items, events, ts = [], [], [], []
    for s in range(n):
        users.append("" if s % 3 == 0 else (f"u{rng.integers(USERS)}" if s % 3 == 1
                                            else f"stranger{s}"))
        m = int(rng.integers(0 if s % 7 else 1, 13))
        row = [f"i{j}" if rng.random() > 0.1 else f"new{j}" for j in rng.integers(0, ITEMS, m)]
        items.append(row)
        events.append([EVENTS[j] if j < 4 else ("" if j == 4 else "wishlist")
                       for j in rng.integers(0, 6, m)])
        t = np.sort(rng.integers(1_500, 3_000, m)).astype(float)
        t[rng.random(m) < 0.2] = 0.0                      # unknown times
        ts.append(t.tolist())
    w = max(len(r) for r in items)
    pad = lambda rows, v: [r + [v] * (w - len(r)) for r in rows]  # noqa: E731
    return (np.asarray(users), np.asarray(pad(items, "")), np.asarray(pad(events, "")),
            np.asarray(pad(ts, 0.0)))


def _reference(fns, hist, seen, users, items, events, ts):
    """Scores by JAX, the sequence built in plain Python from the same rules."""
    params = fns.functions.params
    base = np.asarray(jax.jit(fns.functions.user_item_scores_fn)(
        params, np.arange(USERS, dtype=np.int32)))
    pop = np.bincount(seen[1], minlength=ITEMS).astype(np.float32)
    indptr, h_items, h_events, h_ts, h_gaps = hist
    rows, drops, has = [], [], []
    for u, its, evs, tss in zip(users, items, events, ts):
        uid = int(u[1:]) if u.startswith("u") else None
        lo, hi = (indptr[uid], indptr[uid + 1]) if uid is not None else (0, 0)
        seq = [(int(h_items[j]), int(h_events[j]), float(h_gaps[j])) for j in range(lo, hi)]
        prev = float(h_ts[hi - 1]) if hi > lo else 0.0
        known = [(int(x[1:]), e, t) for x, e, t in zip(its, evs, tss)
                 if x.startswith("i") and x != ""]
        for i, e, t in known:
            gap = max(t - prev, 0.0) if (t > 0 and prev > 0) else 0.0
            seq.append((i, EVENTS.index(e) + 1 if e in EVENTS else 0, gap))
            prev = t
        seq = seq[-L:]
        pad = [(-1, 0, 0.0)] * (L - len(seq))
        rows.append(pad + seq)
        s_items = {i for i, _, _ in known}
        mine = set(seen[1][seen[0][uid]:seen[0][uid + 1]].tolist()) if uid is not None else set()
        drops.append(sorted(s_items | mine))
        has.append(bool(known))
    it = np.asarray([[x[0] for x in r] for r in rows], np.int32)
    ev = np.asarray([[x[1] for x in r] for r in rows], np.int32)
    gp = np.asarray([[x[2] for x in r] for r in rows], np.float32)
    h = np.asarray(jax.jit(fns.encode_fn)(params, it, ev, gp))
    s = h @ fns.item_vectors.T
    out = np.empty((len(users), ITEMS), np.float32)
    for r, u in enumerate(users):
        uid = int(u[1:]) if u.startswith("u") else None
        out[r] = s[r] if has[r] else (base[uid] if uid is not None else pop)
        out[r, drops[r]] = layout.EXCLUDED_SCORE
    return out, np.asarray(has)


def export_sequential(tmp_path, model, attention: bool = False):
    """Exports ``model`` on :func:`_data` (version 1 under ``tmp_path/models``); returns
    ``(path, fns, hist, seen, (seq_item, seq_event, seq_gap))``. ``attention``: with the
    ``session_attention`` signature."""
    graphdef, tables, dense = nnx.split(model, Table, ...)
    user, item, ts, ev = _data()
    seq = Sequences(user, item, USERS, ts, ev)
    hist = ex.history_csr(seq, user, ts, L)
    it, e, g = seq.latest(L)
    fns = export_models.sequential_functions(
        graphdef, tables, dense, num_users=USERS, num_items=ITEMS,
        user_seq={"seq_item": it, "seq_event": e, "seq_gap": g}, use_events=True, use_gaps=True)
    seen = ex.seen_csr(user, item, USERS)
    f = fns.functions
    extra = ({"attention_fn": fns.attention_fn, "user_attention_fn": fns.user_attention_fn}
             if attention else {})
    path = ex.export_saved_model(
        tmp_path / "models", 1, params=f.params, score_fn=f.score_fn,
        user_item_scores_fn=f.user_item_scores_fn, item_vectors_fn=f.item_vectors_fn,
        user_vocab=[f"u{u}" for u in range(USERS)], item_vocab=[f"i{i}" for i in range(ITEMS)],
        seen=seen, verify=False, session=ex.SessionModel(
            "sequential", encode_fn=fns.encode_fn, item_vectors=fns.item_vectors, max_len=L,
            event_vocab=EVENTS, history=hist, use_gaps=True, **extra))
    return path, fns, hist, seen, (it, e, g)


def test_sequential_session_scores_match_jax_on_1000_sessions_without_jax(tmp_path):
    model = Sequential(ITEMS, 128, max_len=L, dim=16, num_blocks=2, num_heads=2, dropout=0.2,
                       num_events=5, use_gaps=True, init_std=0.3, rngs=nnx.Rngs(0))
    path, fns, hist, seen, _ = export_sequential(tmp_path, model)
    meta = json.loads((path / "assets.extra" / layout.METADATA_FILE).read_text())
    assert meta["session"] == {"mode": "sequential", "event_vocab": EVENTS, "max_len": L,
                               "use_gaps": True}
    users, items, events, tss = _sessions(np.random.default_rng(1), 1000)
    want, has = _reference(fns, hist, seen, users, items, events, tss)
    assert 500 < has.sum() < 1000
    qfile, out = tmp_path / "q.npz", tmp_path / "out.npz"
    np.savez(qfile, user=users, items=items, events=events, ts=tss, k=np.asarray(K))
    p = subprocess.run([sys.executable, "-c", _PROGRAM, str(path), str(qfile), str(out)],
                       capture_output=True, text=True, env=S.subprocess_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = np.load(out)
    assert not got["jax_loaded"]
    np.testing.assert_allclose(got["scores"], want, atol=1e-5, rtol=0)
    for r in range(len(users)):
        order = np.argsort(-want[r], kind="stable")[:K]
        idx = [int(x[1:]) for x in got["top"][r]]
        assert S.same_ranking(idx, order.tolist(), want[r]), r
    # the session changes the answer: the encoder saw it (not just the exclusions)
    r = int(np.flatnonzero(has & np.char.startswith(users, "u"))[0])
    uid = int(users[r][1:])
    f = fns.functions
    base = np.asarray(jax.jit(f.user_item_scores_fn)(f.params, np.asarray([uid], np.int32)))[0]
    ok = want[r] > -1e30
    assert np.abs(want[r][ok] - base[ok]).max() > 1e-3
