"""Fold-in: the request-time user vector is the iALS trainer's own user row solve, and the
SavedModel's ``session_scores`` / ``recommend_session`` reproduce the JAX fold-in on 1,000
sessions in a process without JAX (scores within 1e-5, identical top-k)."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxreco import foldin
from jaxreco.sharding import make_mesh
from jaxreco.train import ials
from tests.test_ials import ITEMS, ONE, USERS, _positives, _sides, _state

tf = pytest.importorskip("tensorflow", reason="export tests need the [export] extra (tensorflow-cpu)")

from jaxreco.serve import layout  # noqa: E402
from tests import test_export_support as S  # noqa: E402


@pytest.mark.parametrize("bias, beta", [(True, 0.5)])
def test_fold_in_equals_the_trainers_user_half_step(bias, beta):
    """One trainer epoch solves every user row against the item table it started from:
    folding each user's training items into that table gives the same rows (1e-5)."""
    alpha0, reg, nu = 0.3, 0.05, 1.0
    mesh = make_mesh({"data": 1, "model": 1})
    u, i = _positives()
    _, state, shardings = _state(mesh, ONE, bias)
    before = {k: np.asarray(x) for k, x in state.table_values().items()}
    users, items = _sides(u, i, 16, 16)
    epoch = jax.jit(ials.make_epoch(users, items, user_table="user_mf", item_table="item_mf",
                                    alpha0=alpha0, reg=reg, nu=nu,
                                    item_bias_table="item_bias" if bias else None,
                                    pop_exponent=beta), out_shardings=(shardings, None))
    state, _ = epoch(state, jax.device_put(ials.epoch_data(users, items),
                                           NamedSharding(mesh, P())))
    after = np.asarray(state.table_values()["user_mf"])[:USERS]
    w = None
    if beta:
        f = np.bincount(i, minlength=ITEMS).astype(np.float32) ** beta
        w = f * (ITEMS / f.sum())
    f = foldin.FoldIn(before["item_mf"][:ITEMS], before["item_bias"][:ITEMS, 0] if bias else None,
                      w, alpha0=alpha0, reg=reg, nu=nu)
    hist = [i[u == r] for r in range(USERS)]
    got = foldin.fold_in(f, hist)
    has = np.array([len(h) > 0 for h in hist])
    np.testing.assert_allclose(got[has], after[has], atol=1e-5, rtol=0)
    assert not has.all() and (got[~has] == 0).all()          # user 5: no items, no vector
    # the order of a history and repeated items do not change the vector
    again = foldin.fold_in(f, [np.concatenate([h[::-1], h]) for h in hist])
    np.testing.assert_allclose(again, got, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        foldin.fold_in(f, [[ITEMS]])


# ------------------------------------------------------------------- SavedModel parity
N_SESSIONS, MAX_SESSION, K = 1000, 12, 10

_PROGRAM = S.BLOCK_JAX + r"""
import sys
import numpy as np
import tensorflow as tf
path, qfile, out = sys.argv[1:4]
q = np.load(qfile, allow_pickle=False)
m = tf.saved_model.load(path)
args = dict(user=tf.constant(q["user"]), items=tf.constant(q["items"]),
            events=tf.constant(q["events"]), ts=tf.constant(q["ts"]))
s = m.signatures["session_scores"](**args)       # all sessions in one batch: one compile
r = m.signatures["recommend_session"](**args, k=tf.constant(int(q["k"])))
res = {}
for name, t in [("scores", s["scores"]), ("known", s["known"]),
                ("session_known", s["session_known"]), ("top", r["items"]),
                ("top_scores", r["scores"])]:
    a = t.numpy()
    res[name] = np.char.decode(a.astype(bytes), "utf-8") if a.dtype == object else a
np.savez(out, **res, jax_loaded=np.asarray("jax" in sys.modules))
"""


def _sessions(data, rng):
    """Anonymous shoppers, known users and unknown users, sessions of 0..MAX_SESSION items
    with unknown ids and repeats mixed in (padded with "")."""
    users, items = [], []
    for s in range(N_SESSIONS):
        kind = s % 4
        users.append("" if kind == 0 else ("nobody-%d" % s if kind == 3 else
                                           str(data.user_vocab[rng.integers(data.num_users)])))
        n = int(rng.integers(0 if s % 10 else 1, MAX_SESSION + 1))
        row = [str(data.item_vocab[j]) for j in rng.integers(0, data.num_items, n)]
        for j in range(n):
            if rng.random() < 0.15:
                row[j] = f"new-item-{s}-{j}"
        items.append(row)
    width = max(len(r) for r in items)
    pad = np.asarray([r + [""] * (width - len(r)) for r in items])
    return np.asarray(users), pad


def _reference(data, f, users, items):
    """Scores by JAX: fold-in of (training items ∪ session items) for a row with a known
    session item, else the user's own scores (popularity for an unknown user); seen and
    session items excluded."""
    uidx = {str(u): j for j, u in enumerate(data.user_vocab)}
    iidx = {str(x): j for j, x in enumerate(data.item_vocab)}
    base = data.all_scores()
    hist, drops = [], []
    for u, row in zip(users, items):
        sess = {iidx[x] for x in row if x in iidx}
        seen = data.seen(uidx[u]) if u in uidx else set()
        hist.append(sorted(sess | seen) if sess else [])
        drops.append(sess | seen)
    p = foldin.fold_in(f, hist)
    s = foldin.scores(f, p)
    out = np.empty((len(users), data.num_items), np.float32)
    for r, (u, row) in enumerate(zip(users, items)):
        if hist[r]:
            out[r] = s[r]
        elif u in uidx:
            out[r] = base[uidx[u]]
        else:
            out[r] = data.popularity()
        out[r, sorted(drops[r])] = layout.EXCLUDED_SCORE
    n_known = np.asarray([sum(x in iidx for x in row) for row in items])
    return out, n_known


def test_session_scores_match_jax_fold_in_on_1000_sessions_without_jax(tmp_path):
    data = S.make_mf(seed=3)
    p = data.params
    f = foldin.FoldIn(p["item_embed"], p["item_bias"][:, 0], None, alpha0=0.3, reg=0.05, nu=1.0)
    from jaxreco.export import SessionModel

    # verify=False: the export's own reload check is a subset of this test
    path = S.export(data, tmp_path / "models", 1, session=SessionModel("foldin", foldin=f),
                    verify=False)
    meta = json.loads((path / "assets.extra" / layout.METADATA_FILE).read_text())
    assert meta["session"]["mode"] == "foldin" and meta["session"]["alpha0"] == 0.3
    assert meta["signatures"] == list(layout.SIGNATURES)
    users, items = _sessions(data, np.random.default_rng(0))
    want, n_known = _reference(data, f, users, items)
    qfile = tmp_path / "q.npz"
    np.savez(qfile, user=users, items=items, events=np.full(items.shape, "click"),
             ts=np.zeros(items.shape), k=np.asarray(K))
    out = tmp_path / "out.npz"
    p = subprocess.run([sys.executable, "-c", _PROGRAM, str(path), str(qfile), str(out)],
                       capture_output=True, text=True, env=S.subprocess_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = np.load(out)
    assert not got["jax_loaded"]
    assert (got["session_known"] == n_known).all() and (n_known > 0).sum() > 500
    np.testing.assert_array_equal(got["known"], [u in set(data.user_vocab) for u in users])
    np.testing.assert_allclose(got["scores"], want, atol=1e-5, rtol=0)
    top = got["top"]
    for r in range(len(users)):
        order = np.argsort(-want[r], kind="stable")[:K]
        got_idx = [int(np.flatnonzero(data.item_vocab == x)[0]) for x in top[r]]
        assert S.same_ranking(got_idx, order.tolist(), want[r]), r
    # the folded-in answer differs from the frozen user vector where a session is known
    u0 = next(r for r in range(len(users)) if users[r] in set(data.user_vocab) and n_known[r])
    base = data.all_scores()[int(np.flatnonzero(data.user_vocab == users[u0])[0])]
    assert np.abs(np.where(want[u0] > -1e30, want[u0] - base, 0)).max() > 1e-3
