"""The sequential model (``model=sequential``) and its task (``task.kind=next_item``): the
pinned encoder interface, causality and padding, the losses, sequences built from train
rows only, and a short training run that learns and resumes exactly."""

from __future__ import annotations

import numpy as np
import pytest
import jax.numpy as jnp
from flax import nnx

from jaxreco.models.sequential import Sequential
from jaxreco.train import tasks
from jaxreco.train.tasks import PreparedData
from jaxreco.train.tasks.next_item import NextItemTask, Sequences
from tests.support import compose_train, train

QUIET = ["trainer.progress_bar=false", "trainer.async_checkpoint=false",
         "logger.tensorboard=false", "mesh.axes.data=1", "mesh.axes.model=1"]
SMALL_DATA = ["dataset=synthetic-ecommerce", "dataset.num_interactions=6000",
              "dataset.num_users=80", "dataset.num_items=150", "task.prepare.negatives.num=20"]


def _model(**kw):
    args = dict(max_len=6, dim=8, num_blocks=2, num_heads=2, dropout=0.3, num_events=4,
                use_gaps=True, rngs=nnx.Rngs(0))
    args.update(kw)
    return Sequential(23, 32, **args)


def test_encode_is_the_last_position_and_all_scores_are_one_matmul():
    m = _model()
    items = jnp.array([[-1, -1, 3, 7, 7, 1], [4, 5, 6, 7, 8, 9]], jnp.int32)
    events = jnp.array([[0, 0, 1, 2, 3, 1], [1] * 6], jnp.int32)
    gaps = jnp.array([[0, 0, 0, 30.0, 5.0, 9000.0], [0.0] + [60.0] * 5], jnp.float32)
    h = m.encode(items, events, gaps)
    assert (m.max_len, m.num_items, m.num_events, m.use_gaps) == (6, 23, 4, True)
    assert h.shape == (2, 8) and m.item_vectors().shape == (32, 8)
    rows = m.item_vectors()[jnp.maximum(items, 0)]
    full = m.encode_rows(rows, items, events, gaps)
    np.testing.assert_allclose(h, full[:, -1], atol=1e-6)
    scores = h @ m.item_vectors()[:m.num_items].T
    u = m.user_repr({"item_embed": {"seq_item": rows.reshape(-1, 8)}},
                    {"seq_item": items.reshape(-1), "seq_event": events.reshape(-1),
                     "seq_gap": gaps.reshape(-1)})
    got = m.interact(u, {"q": m.item_vectors()[:m.num_items]}, "all")["next"]
    np.testing.assert_allclose(got, scores, atol=1e-5)
    # events and gaps change the answer when the model uses them
    assert not np.allclose(m.encode(items, events, None), h, atol=1e-4)
    assert not np.allclose(m.encode(items, None, gaps), h, atol=1e-4)


def test_outputs_are_causal_and_ignore_padding():
    m = _model(num_events=1, use_gaps=False)
    a = jnp.array([[-1, -1, 3, 7, 2, 1]], jnp.int32)
    b = a.at[0, 5].set(11)                       # a different latest item
    ha = m.encode_rows(m.item_vectors()[jnp.maximum(a, 0)], a)
    hb = m.encode_rows(m.item_vectors()[jnp.maximum(b, 0)], b)
    np.testing.assert_allclose(ha[:, 2:5], hb[:, 2:5], atol=1e-6)   # earlier positions
    assert not np.allclose(ha[:, 5], hb[:, 5], atol=1e-4)
    # the row padding reads (row 0, the clip of -1) does not matter
    before = m.encode(a)
    m.item_embed[...] = m.item_embed[...].at[0].set(100.0)
    np.testing.assert_allclose(m.encode(a), before, atol=1e-6)
    # dropout: deterministic by default, keyed per example when training
    d1 = m.encode(a, deterministic=False, dropout_seeds=jnp.array([5]))
    d2 = m.encode(a, deterministic=False, dropout_seeds=jnp.array([5]))
    d3 = m.encode(a, deterministic=False, dropout_seeds=jnp.array([6]))
    np.testing.assert_array_equal(d1, d2)
    assert not np.allclose(d1, d3)


def test_sequences_are_in_timestamp_then_row_order_and_windows_are_left_padded():
    s = Sequences(user=np.array([1, 0, 1, 1, 0]), item=np.array([10, 20, 11, 12, 21]),
                  num_users=3, timestamp=np.array([5, 9, 5, 1, 3]),
                  event=np.array([0, 1, 2, 3, 0]))
    assert s.length.tolist() == [2, 3, 0]
    it, ev, gp = s.latest(4)
    assert it.tolist() == [[-1, -1, 21, 20], [-1, 12, 10, 11], [-1, -1, -1, -1]]
    assert ev.tolist() == [[0, 0, 1, 2], [0, 4, 1, 3], [0, 0, 0, 0]]
    assert gp.tolist() == [[0, 0, 0, 6], [0, 0, 4, 0], [0, 0, 0, 0]]
    it, _, _ = s.window(np.array([1]), np.array([2]), 2)
    assert it.tolist() == [[12, 10]]


def _task(tmp_path, extra=()):
    cfg = compose_train(["experiment=ml1m_sasrec", *SMALL_DATA, "model.max_len=8",
                         "task.prepare.split.num_val=1", *extra, *QUIET])
    return cfg, tasks.build(cfg, PreparedData.prepare(cfg))


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_held_out_items_are_never_inside_an_input_sequence(tmp_path, cache_env, loss):
    cfg, task = _task(tmp_path, [f"task.next_item.loss={loss}", "task.next_item.crop=random",
                                 "model.events=true", "model.gaps=true"])
    assert isinstance(task, NextItemTask)
    tr_u, tr_i = task.positives("train")
    train_pairs = set(zip(tr_u.tolist(), tr_i.tolist()))
    held = set()
    for s in ("val", "test"):
        u, i = task.positives(s)
        held |= {p for p in zip(u.tolist(), i.tolist()) if p not in train_pairs}
    assert len(held) > 20                   # enough held-out items to be caught if leaked
    feats = task.user_features()
    seen = set()
    for u, row in enumerate(feats["seq_item"]):
        seen |= {(u, int(i)) for i in row if i >= 0}
    users = task.train_cols["user"]
    for step in range(5):
        b = task.transform({"user": users[:32]}, step, 0)
        L = task.max_len
        seq, tgt = b["seq_item"].reshape(-1, L), b["item"].reshape(-1, L)
        for u, rs, rt in zip(users[:32], seq, tgt):
            seen |= {(int(u), int(i)) for i in np.concatenate([rs, rt]) if i >= 0}
        assert b["seq_event"].shape == b["seq_gap"].shape == (32 * L,)
        assert ((tgt >= 0) <= (seq >= 0)).all()              # a target follows an input
        both = (seq[:, 1:] >= 0) & (seq[:, :-1] >= 0)      # the next input is the target
        np.testing.assert_array_equal(seq[:, 1:][both], tgt[:, :-1][both])
    assert seen <= train_pairs and not seen & held
    # every user's evaluation input is their latest train items, in time order
    ts = task.data.load("train", ["timestamp"])["timestamp"]
    u0 = int(users[0])
    rows = np.flatnonzero(tr_u == u0)
    order = rows[np.lexsort((rows, ts[rows]))]
    want = tr_i[order][-task.max_len:]
    got = feats["seq_item"][u0]
    assert got[got >= 0].tolist() == want.tolist()


def test_losses_match_reference_softmax(tmp_path, cache_env):
    for loss in ("full", "sampled"):
        cfg, task = _task(tmp_path, [f"task.next_item.loss={loss}",
                                     "task.next_item.num_sampled=16", "model.dropout=0.0"])
        model = task.model_fn()()
        b = task.transform({"user": task.train_cols["user"][:4]}, 0, 0)
        E = np.asarray(model.item_vectors())
        rows = {"item_embed": {f: jnp.asarray(E[np.maximum(b[f], 0)])
                               for f in ("seq_item", "item", "cand_item")}}
        got, _ = task.loss_fn(model)(model, rows, b)
        h = np.asarray(model.encode_rows(rows["item_embed"]["seq_item"].reshape(4, 8, -1),
                                         jnp.asarray(b["seq_item"].reshape(4, 8)))).reshape(-1, E.shape[1])
        tgt, cand = b["item"], b["cand_item"]
        logq = np.log(task.proposal)
        per = []
        for t in np.flatnonzero(tgt >= 0):
            if loss == "full":
                lg = h[t] @ E[:task.num_items].T
                per.append(np.log(np.exp(lg).sum()) - lg[tgt[t]])
            else:
                o = [h[t] @ E[tgt[t]] - logq[tgt[t]]] + [
                    h[t] @ E[c] - logq[c] for c in cand if c != tgt[t]]
                per.append(np.log(np.exp(o).sum()) - o[0])
        assert float(got) == pytest.approx(float(np.mean(per)), rel=1e-4), loss


def test_model_and_task_refuse_mismatches(tmp_path, cache_env):
    cfg = compose_train(["experiment=ml1m_sasrec", *SMALL_DATA, *QUIET])
    data = PreparedData.prepare(cfg)
    cfg.model.name = "embed_mlp"
    with pytest.raises(ValueError, match="needs model=sequential"):
        NextItemTask(cfg, data)
    with pytest.raises(ValueError, match="not divisible"):
        _model(dim=8, num_heads=3)
    with pytest.raises(Exception, match="softmax"):
        compose_train(["experiment=ml1m_sasrec", "task.next_item.loss=softmax", *QUIET])


@pytest.mark.slow
def test_short_training_learns_and_resumes_exactly(tmp_path, cache_env):
    over = ["experiment=ml1m_sasrec", *SMALL_DATA, "model.max_len=10", "model.dim=16",
            "trainer.batch_size=16", "trainer.epochs=12", "task.prepare.split.num_val=1",
            "task.next_item.crop=random", "task.next_item.loss=full", "optimizer.lr=0.01",
            "optimizer.dense_lr=0.01", *QUIET]
    m = train(tmp_path / "a", over)
    # the full softmax starts at log(148 items) = 5.0; random ranking of 1 held-out item
    # among 21 candidates gives HR@10 = 10/21 = 0.48
    assert m["train/loss"] < 4.5
    assert m["val/hr@10"] > 0.55, m["val/hr@10"]
    train(tmp_path / "b", [*over, "trainer.max_steps=23"])
    r = train(tmp_path / "b", over)
    for k in ("test/hr@10", "test/ndcg@10", "test/full/ndcg@10", "train/loss"):
        assert r[k] == pytest.approx(m[k], abs=1e-6), k
