"""Every EmbedMLP combiner exports through ``jaxreco.export_models``: the reloaded SavedModel
scores what the JAX model scores (side features looked up per item, a default context), and a
ctr model's ``predict_ctr`` (context as input) is served by ``POST /predict_ctr``."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

tf = pytest.importorskip("tensorflow", reason="export tests need the [export] extra (tensorflow-cpu)")

from tests import test_export_support as S  # noqa: E402

from jaxreco import export as ex  # noqa: E402
from jaxreco.export_models import model_functions  # noqa: E402
from jaxreco.models.embed_mlp import EmbedMLP  # noqa: E402
from jaxreco.serve import layout  # noqa: E402

NU, NI, ROWS = 13, 11, 16            # vocabulary sizes; tables padded to 16 rows
SIDE, CTX = {"category": 4}, {"position": 4}
DEFAULT_POSITION = 2
USERS = np.asarray([f"u{i}" for i in range(NU)], dtype=object)
ITEMS = np.asarray([f"i{i}" for i in range(NI)], dtype=object)


def _model(combiner: str, heads=("click",), seed=0) -> EmbedMLP:
    """A tiny EmbedMLP with a side and a context feature, every parameter perturbed (so
    biases, head weights and padded rows are all non-trivial)."""
    m = EmbedMLP(ROWS, ROWS, combiner=combiner, dim=4, mf_dim=4, mlp_dims=(8, 4),
                 side_features=SIDE, context_features=CTX, heads=heads, init_std=0.3,
                 rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(m)
    state = jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32), state)
    return nnx.merge(graphdef, state)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    category = rng.integers(0, SIDE["category"], NI).astype(np.int32)   # 0 = unknown
    lens = rng.integers(0, 5, NU)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    indices = np.concatenate([np.sort(rng.choice(NI, n, replace=False)) for n in lens]).astype(np.int32)
    return category, (indptr, indices)


def _reference(model, category, users, items, position, head=None):
    """The model's own prediction (``EmbedMLP.score_heads`` on gathered rows) per pair."""
    from jaxreco.models.layers import gather_rows, present_features

    batch = {"user": np.asarray(users, np.int32), "item": np.asarray(items, np.int32),
             "category": category[items], "position": np.asarray(position, np.int32)}
    tables = {t: getattr(model, t)[...] for t in model.table_features}
    rows = gather_rows(tables, batch, present_features(model.table_features, batch))
    out = {h: np.asarray(v) for h, v in model.score_heads(rows, batch).items()}
    return out if head == "all" else out[model.heads[0]]


def _export(model, category, seen, out_dir, *, ctr=False, **kw):
    width = 8 if model.use_mlp else 1
    fns = model_functions(model, num_users=NU, num_items=NI, item_side={"category": category},
                          context_defaults={"position": DEFAULT_POSITION},
                          tower_elements=2 * NI * width)      # tower blocks of 2 users
    extra = {}
    if ctr:
        extra = dict(predict_fn=fns.predict_fn, heads=fns.heads,
                     context_features=fns.context_features,
                     context_defaults=fns.context_defaults)
    path = ex.export_saved_model(
        out_dir, 1, params=fns.params, score_fn=fns.score_fn,
        user_item_scores_fn=fns.user_item_scores_fn, item_vectors_fn=fns.item_vectors_fn,
        user_vocab=USERS, item_vocab=ITEMS, seen=seen, **extra, **kw)
    return fns, path


@pytest.mark.parametrize("combiner, vector_dim", [("dot", 4), ("gmf", 4), ("mlp", 8),
                                                  ("both", 12), ("linear", 6)])
def test_every_combiner_exports_and_its_scores_match_the_jax_model(tmp_path, combiner,
                                                                   vector_dim):
    model = _model(combiner)
    category, seen = _data()
    fns, path = _export(model, category, seen, tmp_path)
    m = tf.saved_model.load(str(path))
    uu, ii = (a.reshape(-1) for a in np.meshgrid(np.arange(NU), np.arange(NI), indexing="ij"))
    want = _reference(model, category, uu, ii, np.full(len(uu), DEFAULT_POSITION))
    # score: every (user, item) pair, the item's category looked up inside the export
    out = m.signatures["score"](user=tf.constant(USERS[uu].astype(str)),
                                item=tf.constant(ITEMS[ii].astype(str)))
    assert out["known"].numpy().all()
    np.testing.assert_allclose(out["score"].numpy(), want, atol=1e-4, rtol=0)
    # user_scores: all users in one batch (13 = 6 tower blocks of 2 + a padded one)
    got = m.signatures["user_scores"](user=tf.constant(USERS.astype(str)))["scores"].numpy()
    want = want.reshape(NU, NI)
    mask = np.zeros((NU, NI), bool)
    for u in range(NU):
        mask[u, seen[1][seen[0][u]:seen[0][u + 1]]] = True
    np.testing.assert_allclose(got[~mask], want[~mask], atol=1e-4, rtol=0)
    assert (got[mask] == np.float32(layout.EXCLUDED_SCORE)).all() and mask.any()
    # recommend ranks those scores; similar_items the cosine of the documented item vectors
    rec = m.signatures["recommend"](user=tf.constant(["u5"]), k=tf.constant(3))
    np.testing.assert_allclose(rec["scores"].numpy()[0],
                               np.sort(np.where(mask[5], -np.inf, want[5]))[::-1][:3], atol=1e-4)
    vec = np.asarray(jax.jit(fns.item_vectors_fn)(fns.params), np.float64)
    assert vec.shape == (NI, vector_dim)
    unit = vec / np.linalg.norm(vec, axis=1, keepdims=True)
    cos = unit @ unit[4]
    cos[4] = -np.inf
    sim = m.signatures["similar_items"](item=tf.constant(["i4"]), k=tf.constant(3))
    np.testing.assert_allclose(sim["scores"].numpy()[0], np.sort(cos)[::-1][:3], atol=1e-5)
    meta = json.loads((path / "assets.extra" / layout.METADATA_FILE).read_text())
    assert meta["signatures"] == list(layout.SIGNATURES) and meta["context_features"] == {}


@pytest.fixture(scope="module")
def ctr_export(tmp_path_factory):
    model = _model("both", heads=("click", "purchase"), seed=1)
    category, seen = _data(seed=1)
    out_dir = tmp_path_factory.mktemp("ctr")
    _, path = _export(model, category, seen, out_dir, ctr=True)
    return model, category, out_dir, path


def test_predict_ctr_takes_the_context_and_matches_the_jax_heads(ctr_export):
    model, category, _, path = ctr_export
    rng = np.random.default_rng(3)
    u, i = rng.integers(0, NU, 40), rng.integers(0, NI, 40)
    pos = np.arange(40) % CTX["position"]
    m = tf.saved_model.load(str(path))
    out = m.signatures["predict_ctr"](user=tf.constant(USERS[u].astype(str)),
                                      item=tf.constant(ITEMS[i].astype(str)),
                                      position=tf.constant(pos, tf.int32))
    want = _reference(model, category, u, i, pos, head="all")
    assert set(out) == {"click", "purchase", "known"} and out["known"].numpy().all()
    for h in ("click", "purchase"):
        np.testing.assert_allclose(out[h].numpy(), 1 / (1 + np.exp(-want[h])), atol=1e-4)
    # the context matters, and `score` is the click logit in the default context
    assert np.ptp(_reference(model, category, [0] * 4, [1] * 4, [0, 1, 2, 3])) > 1e-3
    s = m.signatures["score"](user=tf.constant(["u0"]), item=tf.constant(["i1"]))["score"]
    np.testing.assert_allclose(s.numpy(), _reference(model, category, [0], [1], [DEFAULT_POSITION]),
                               atol=1e-4)
    # unknown ids: known false, probability 0; a context value outside its vocabulary: refused
    out = m.signatures["predict_ctr"](user=tf.constant(["nobody", "u1"]),
                                      item=tf.constant(["i1", "i1"]),
                                      position=tf.constant([0, 0], tf.int32))
    assert out["known"].numpy().tolist() == [False, True] and out["click"].numpy()[0] == 0.0
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"position must be in \[0, 4\)"):
        m.signatures["predict_ctr"](user=tf.constant(["u1"]), item=tf.constant(["i1"]),
                                    position=tf.constant([4], tf.int32))
    meta = json.loads((path / "assets.extra" / layout.METADATA_FILE).read_text())
    assert meta["heads"] == ["click", "purchase"]
    assert meta["context_features"] == {"position": {"vocab_size": 4, "default": DEFAULT_POSITION}}
    assert meta["signatures"][-1] == "predict_ctr"


def test_predict_ctr_arguments_are_checked():
    model = _model("gmf")
    category, seen = _data()
    fns = model_functions(model, num_users=NU, num_items=NI, item_side={"category": category})
    kw = dict(params=fns.params, score_fn=fns.score_fn, user_item_scores_fn=fns.user_item_scores_fn,
              item_vectors_fn=fns.item_vectors_fn, user_vocab=USERS, item_vocab=ITEMS, seen=seen)
    with pytest.raises(ex.ExportError, match="predict_fn needs heads"):
        ex.export_saved_model("/nonexistent", 1, predict_fn=fns.predict_fn, **kw)
    with pytest.raises(ex.ExportError, match=r"context_defaults\['position'\]=4: must lie in \[0, 4\)"):
        ex.export_saved_model("/nonexistent", 1, predict_fn=fns.predict_fn, heads=["click"],
                              context_features={"position": 4}, context_defaults={"position": 4},
                              **kw)
    with pytest.raises(ValueError, match=r"item side feature\(s\) \['category'\]"):
        model_functions(model, num_users=NU, num_items=NI)


def test_server_predict_ctr_endpoint_and_tf_serving_predict(ctr_export):
    model, category, out_dir, _ = ctr_export
    server = S.Server(out_dir, out_dir.parent / "ctr-server.log", "--model-name", "ctr",
                      "--max-batch", "8")
    try:
        server.wait()
        c = server.client
        u, i, pos = [0, 5, 12], [1, 10, 3], [3, 0, 1]          # 3 rows: padded to a bucket of 4
        st, body = c.post("/predict_ctr", {"user": list(USERS[u]), "item": list(ITEMS[i]),
                                           "position": pos})
        assert st == 200, body
        want = _reference(model, category, u, i, pos, head="all")
        assert body["model_version"] == 1 and body["known"] == [True] * 3
        for h in ("click", "purchase"):
            np.testing.assert_allclose(body["predictions"][h], 1 / (1 + np.exp(-want[h])), atol=1e-4)
        # TF Serving's predict API runs the same signature, rows or columns
        inst = [{"user": USERS[a], "item": ITEMS[b], "position": p} for a, b, p in zip(u, i, pos)]
        st, rows = c.post("/v1/models/ctr:predict", {"signature_name": "predict_ctr",
                                                     "instances": inst})
        assert st == 200, rows
        np.testing.assert_allclose([r["click"] for r in rows["predictions"]],
                                   body["predictions"]["click"], atol=1e-6)
        st, cols = c.post("/v1/models/ctr:predict", {"signature_name": "predict_ctr", "inputs": {
            "user": list(USERS[u]), "item": list(ITEMS[i]), "position": pos}})
        assert st == 200 and cols["outputs"]["purchase"] == pytest.approx(body["predictions"]["purchase"])
        # bad fields get 422 naming the field
        base = {"user": ["u1", "u2"], "item": ["i1", "i2"], "position": [1, 2]}
        bad = [({k: v for k, v in base.items() if k != "position"}, "missing field(s) ['position']"),
               ({**base, "colour": [1, 2]}, "unknown field(s) ['colour']"),
               ({**base, "position": [1, 4]}, "position[1]=4: must be an integer in [0, 4)"),
               ({**base, "position": [1, "2"]}, "position[1]=\"2\": must be an integer"),
               ({**base, "position": 1}, "position: must be a list"),
               ({**base, "item": ["i1"]}, "item: has 1 values but user has 2"),
               ({**base, "user": ["u1", 2.5]}, "user[1]: must be an id"),
               ({k: v * 5 for k, v in base.items()}, "user: has 10 values; must have 1 to 8")]
        for b, msg in bad:
            st, resp = c.post("/predict_ctr", b)
            assert st == 422 and msg in resp["error"], (b, resp)
        st, resp = c.post("/predict_ctr", [base])
        assert st == 400 and "must be a JSON object" in resp["error"]
        st, resp = c.post("/v1/models/ctr:predict", {"signature_name": "predict_ctr", "inputs": {
            **base, "position": [1, 7]}})
        assert st == 400 and "position must be in [0, 4)" in resp["error"]
        _fuzz_predict_ctr(server, c)
    finally:
        server.stop()


def _fuzz_predict_ctr(server, client, examples=400):
    """Random bodies (valid and not) never get a 5xx, always JSON; valid ones still answer."""
    hypothesis = pytest.importorskip("hypothesis")
    requests = pytest.importorskip("requests")
    from hypothesis import strategies as st

    scalar = (st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats(allow_nan=False)
              | st.text(max_size=5) | st.sampled_from(list(USERS[:3]) + list(ITEMS[:3])))
    value = st.lists(scalar, min_size=0, max_size=10) | scalar
    body = st.dictionaries(st.sampled_from(["user", "item", "position", "k"]) | st.text(max_size=4),
                           value, max_size=4)
    valid = st.integers(1, 8).flatmap(lambda n: st.fixed_dictionaries({
        "user": st.lists(st.sampled_from(list(USERS) + ["nobody"]), min_size=n, max_size=n),
        "item": st.lists(st.sampled_from(list(ITEMS)), min_size=n, max_size=n),
        "position": st.lists(st.integers(0, 3), min_size=n, max_size=n)}))
    raw = st.one_of(body.map(json.dumps), valid.map(json.dumps), st.binary(max_size=100))
    session = requests.Session()
    url = f"http://127.0.0.1:{server.port}/predict_ctr"
    statuses: dict[int, int] = {}

    @hypothesis.settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                         phases=[hypothesis.Phase.generate],
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(data=raw)
    def fuzz(data):
        r = session.post(url, data=data, timeout=30)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (data, r.text[:300])
        out = r.json()
        if r.status_code == 200:
            n = len(json.loads(data)["user"])
            assert len(out["known"]) == n and len(out["predictions"]["click"]) == n
        else:
            assert isinstance(out["error"], str) and out["error"]

    fuzz()
    # both kinds of answer were exercised: valid bodies, and bodies refused with a 4xx
    assert statuses.get(200, 0) >= 20, statuses
    assert statuses.get(400, 0) + statuses.get(422, 0) >= 50, statuses
    assert client.post("/predict_ctr", {"user": ["u1"], "item": ["i1"], "position": [0]})[0] == 200
