"""RankingEvaluator: full and sampled protocols agree when the negatives are exactly the
unseen items, match a brute-force numpy computation, and do not depend on the chunk size."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreco.evaluate import RankingEvaluator
from jaxreco.models.embed_mlp import EmbedMLP
from jaxreco.train.state import TrainState, split_model

U, I, SEEN = 7, 11, 3


def _setup(combiner, seed=0):
    rng = np.random.default_rng(seed)
    m = EmbedMLP(U, I, combiner=combiner, dim=4, mf_dim=4, mlp_dims=(8, 4), init_std=0.5,
                 rngs=nnx.Rngs(seed))
    m.item_bias[...] = jnp.asarray(rng.normal(size=(I, 1)), jnp.float32)
    graphdef, tables, dense = split_model(m)
    state = TrainState(step=jnp.zeros((), jnp.int32), tables=tables, dense=dense, table_opt={},
                       dense_opt=())
    seen, held, negs = [], [], []
    for u in range(U):
        items = rng.permutation(I)
        seen += [(u, i) for i in items[:SEEN]]
        held.append((u, items[SEEN]))
        negs.append(np.sort(items[SEEN + 1:]))        # every unseen item but the held-out one
    seen, held = np.array(seen), np.array(held)
    cands = {"user": held[:, 0], "item": held[:, 1], "negatives": np.stack(negs)}
    return m, graphdef, state, seen, held, cands


def _evaluator(m, graphdef, seen, held, cands, **kw):
    return RankingEvaluator(graphdef, m, num_users=U, num_items=I, seen=(seen[:, 0], seen[:, 1]),
                            held_out=(held[:, 0], held[:, 1]), candidates=cands, ks=(1, 3, 5, 20),
                            **kw)


@pytest.mark.parametrize("combiner", ["dot", "mlp", "both"])
def test_sampled_equals_full_when_negatives_are_all_unseen_items(combiner):
    m, graphdef, state, seen, held, cands = _setup(combiner)
    ev = _evaluator(m, graphdef, seen, held, cands)
    full, sampled = ev.full(state), ev.sampled(state)
    for k in full:
        assert full[k] == pytest.approx(sampled[k], abs=1e-6), k
    # brute force: score every (user, item), rank the held-out item among unseen items
    uu, ii = np.meshgrid(np.arange(U), np.arange(I), indexing="ij")
    s = np.asarray(m({"user": jnp.asarray(uu.ravel()), "item": jnp.asarray(ii.ravel())})).reshape(U, I)
    pos = []
    for u, i in held:
        unseen = np.setdiff1d(np.arange(I), np.r_[seen[seen[:, 0] == u, 1], i])
        pos.append(int(np.sum(s[u, unseen] >= s[u, i])))
    pos = np.array(pos)
    assert full["hr@3"] == pytest.approx(np.mean(pos < 3))
    assert full["ndcg@5"] == pytest.approx(np.mean(np.where(pos < 5, 1 / np.log2(pos + 2), 0)), rel=1e-5)
    assert full["mrr"] == pytest.approx(np.mean(1 / (pos + 1)), rel=1e-5)
    assert full["hr@20"] == 1.0                       # K larger than the 8 candidates


def test_chunking_does_not_change_the_metrics():
    m, graphdef, state, seen, held, cands = _setup("mlp", seed=3)
    one = _evaluator(m, graphdef, seen, held, cands).full(state)
    many = _evaluator(m, graphdef, seen, held, cands, chunk_elements=1).full(state)  # 8-user chunks
    tiny = _evaluator(m, graphdef, seen, held, cands, chunk_elements=1)
    tiny._chunk = lambda n, width=None: 2                              # 2-user chunks
    assert one == pytest.approx(many) and one == pytest.approx(tiny.full(state))
    assert one == pytest.approx(tiny.sampled(state))


@pytest.mark.parametrize("combiner", ["mlp", "both"])
def test_blocked_tower_matches_whole_chunk(combiner):
    """The MLP tower run on 2-user blocks in a loop gives the scores and metrics of running
    it on the whole chunk at once."""
    import jax
    from jaxreco.evaluate import _model
    m, graphdef, state, seen, held, cands = _setup(combiner, seed=5)
    whole = _evaluator(m, graphdef, seen, held, cands, tower_elements=None)
    blocked = _evaluator(m, graphdef, seen, held, cands, tower_elements=2 * I * 8)
    assert whole.tower_users is None and blocked.tower_users == 2
    assert blocked._full_chunk_users() % 2 == 0
    users = jnp.arange(U + 1) % U                   # 8 users: 4 blocks of 2

    def scores(ev):
        def f(state):
            model = _model(graphdef, state)
            return ev._score_all(model, ev._user_reprs(model, state, users),
                                 ev._item_reprs(state, {"item": jnp.arange(I)}))
        return np.asarray(jax.jit(f)(state))
    s_whole, s_blocked = scores(whole), scores(blocked)
    assert s_whole.shape == (U + 1, I)
    np.testing.assert_allclose(s_blocked, s_whole, atol=1e-5, rtol=0)
    a, b = whole.full(state), blocked.full(state)
    for k in a:
        assert b[k] == pytest.approx(a[k], abs=1e-5), k
