"""Reasons for a sequential model's picks: the encoder's attention of the last position
(``Sequential.attention``, rollout over the blocks). The ``session_attention`` signature of
the SavedModel gives the JAX model's weights (within 1e-5) over the sequence that
``session_scores`` encodes, each row a distribution over the non-padding positions; and
``explain=true`` on ``/recommend`` serves them from a server without JAX."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

tf = pytest.importorskip("tensorflow", reason="export tests need the [export] extra (tensorflow-cpu)")

from jaxreco.models.sequential import Sequential  # noqa: E402
from jaxreco.serve import layout  # noqa: E402
from tests import test_export_support as S  # noqa: E402
from tests.test_export_sequential import EVENTS, ITEMS, L, export_sequential  # noqa: E402


def _model(num_blocks=2, seed=0):
    return Sequential(ITEMS, 64, max_len=L, dim=16, num_blocks=num_blocks, num_heads=2,
                      dropout=0.2, num_events=5, use_gaps=True, init_std=0.3,
                      rngs=nnx.Rngs(seed))


def test_attention_is_a_distribution_over_the_items_and_rollout_of_one_block_is_half_its_attention():
    rng = np.random.default_rng(0)
    items = rng.integers(0, ITEMS, (6, L)).astype(np.int32)
    for r, n in enumerate([1, 3, L, 0, 5, 2]):           # left padding; row 3 has no item
        items[r, :L - n] = -1
    ev = rng.integers(0, 5, (6, L)).astype(np.int32)
    gp = rng.uniform(0, 1e5, (6, L)).astype(np.float32)
    def attention(m, method="rollout"):
        return np.asarray(jax.jit(lambda *a: m.attention(*a, method=method))(items, ev, gp))

    m = _model()
    w = attention(m)
    valid = items >= 0
    assert (w[~valid] == 0).all()
    np.testing.assert_allclose(w[valid.any(1)].sum(1), 1.0, atol=1e-5)
    assert (w[3] == 0).all() and w[0, -1] == pytest.approx(1.0)   # one item: all its weight
    assert (w[valid] > 0).all()
    assert np.abs(w[2] - 1.0 / L).max() > 1e-3                      # not uniform
    # one block: the rollout is ½ (its head-averaged attention) + ½ (the latest position)
    m1 = _model(num_blocks=1)
    last, roll = attention(m1, "last"), attention(m1)
    onehot = np.zeros(L, np.float32)
    onehot[-1] = 1.0
    np.testing.assert_allclose(roll[valid.any(1)], 0.5 * last[valid.any(1)] + 0.5 * onehot,
                               atol=1e-6)
    with pytest.raises(ValueError, match="method='mean'"):
        m.attention(items, ev, gp, method="mean")


def _export(tmp_path):
    path, fns, hist, _, user_seq = export_sequential(tmp_path, _model(), attention=True)
    return path, fns, hist, user_seq


# (user, [(item, event, ts)]): a known user with a session, an anonymous session, a known
# user whose session has only unknown items (answered from the user's own sequence), a
# session longer than L, an unknown user without a known item (no sequence)
CASES = [("u1", [("i3", "click", 1500.0), ("i7", "view", 1550.0), ("i3", "cart", 1600.0)]),
         ("", [("i5", "view", 0.0), ("new1", "view", 1701.0), ("i9", "purchase", 1800.0)]),
         ("u2", [("new2", "view", 1900.0)]),
         ("u3", [(f"i{j}", EVENTS[j % 4], 2000.0 + j) for j in range(12)]),
         ("stranger", [("nope", "view", 1.0)])]


def _reference(fns, hist, user_seq, user, sess):
    """``(weights [L], item ids [L])`` by JAX on the sequence built in plain Python."""
    indptr, h_items, h_events, h_ts, h_gaps = hist
    uid = int(user[1:]) if user.startswith("u") else None
    known = [(int(x[1:]), e, t) for x, e, t in sess if x.startswith("i")]
    if not known:
        if uid is None:
            return np.zeros(L, np.float32), [""] * L
        it, ev, gp = (a[uid:uid + 1] for a in user_seq)
    else:
        lo, hi = (indptr[uid], indptr[uid + 1]) if uid is not None else (0, 0)
        seq = [(int(h_items[j]), int(h_events[j]), float(h_gaps[j])) for j in range(lo, hi)]
        prev = float(h_ts[hi - 1]) if hi > lo else 0.0
        for i, e, t in known:
            seq.append((i, EVENTS.index(e) + 1, max(t - prev, 0.0) if t > 0 and prev > 0 else 0.0))
            prev = t
        seq = [(-1, 0, 0.0)] * (L - len(seq[-L:])) + seq[-L:]
        it = np.asarray([[x[0] for x in seq]], np.int32)
        ev = np.asarray([[x[1] for x in seq]], np.int32)
        gp = np.asarray([[x[2] for x in seq]], np.float32)
    w = np.asarray(jax.jit(fns.attention_fn)(fns.functions.params, it, ev, gp))[0]
    return w, [f"i{j}" if j >= 0 else "" for j in it[0]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("seq_attention"))


def test_saved_model_attention_equals_jax_and_sums_to_one(exported):
    path, fns, hist, user_seq = exported
    loaded = tf.saved_model.load(str(path))
    sig = loaded.signatures[layout.SIG_SESSION_ATTENTION]
    w = max(len(s) for _, s in CASES)
    pad = lambda s, v: s + [v] * (w - len(s))  # noqa: E731
    out = sig(user=tf.constant([u for u, _ in CASES]),
              items=tf.constant([pad([x[0] for x in s], "") for _, s in CASES]),
              events=tf.constant([pad([x[1] for x in s], "") for _, s in CASES]),
              ts=tf.constant([pad([x[2] for x in s], 0.0) for _, s in CASES], tf.float64))
    got_w, got_ids = out["weights"].numpy(), out["items"].numpy().astype(str)
    assert got_w.shape == (len(CASES), L)
    for r, (user, sess) in enumerate(CASES):
        want_w, want_ids = _reference(fns, hist, user_seq, user, sess)
        np.testing.assert_allclose(got_w[r], want_w, atol=1e-5, rtol=0, err_msg=user)
        assert got_ids[r].tolist() == want_ids, user
        visible = got_ids[r] != ""
        assert (got_w[r][~visible] == 0).all()
        if visible.any():
            assert got_w[r][visible].sum() == pytest.approx(1.0, abs=1e-5)
    assert out["session_known"].numpy().tolist() == [3, 2, 0, 12, 0]
    assert not out["known"].numpy()[4] and (got_w[4] == 0).all()
    assert got_ids[0][-3:].tolist() == ["i3", "i7", "i3"]       # the session ends the sequence
    assert got_ids[2].tolist() == [f"i{j}" if j >= 0 else "" for j in user_seq[0][2]]


@pytest.mark.slow          # a server start: ~30 s on 2 busy cores
def test_served_explain_lists_the_items_the_encoder_attends_to(exported, tmp_path):
    path, fns, hist, user_seq = exported
    server = S.Server(path.parent, tmp_path / "server.log", "--max-batch", "2")
    try:
        server.wait()
        st, body = server.client.post("/recommend", {
            "user": "u1", "k": 4, "explain": True,
            "session": [{"item": i, "event": e, "ts": t} for i, e, t in CASES[0][1]]})
        assert st == 200, body
        want_w, want_ids = _reference(fns, hist, user_seq, *CASES[0])
        total: dict[str, float] = {}
        for i, w in zip(want_ids, want_w):
            if i:
                total[i] = total.get(i, 0.0) + float(w)
        want = sorted(total.items(), key=lambda kv: -kv[1])[:3]
        items = body["results"][0]["items"]
        assert len(items) == 4
        for x in items:
            e = x["explain"]
            assert e["method"] == "attention" and e.get("score") is None
            got = [(h["item"], h["contribution"]) for h in e["history_items"]]
            assert [g[0] for g in got] == [w[0] for w in want]
            np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], atol=1e-5)
        # without a session: the user's own sequence (what user_scores encodes)
        st, body = server.client.post("/recommend", {"user": "u2", "k": 2, "explain": True})
        assert st == 200, body
        want_w, want_ids = _reference(fns, hist, user_seq, "u2", [])
        top = max(set(i for i in want_ids if i),
                  key=lambda i: sum(w for j, w in zip(want_ids, want_w) if j == i))
        assert body["results"][0]["items"][0]["explain"]["history_items"][0]["item"] == top
    finally:
        server.stop()
