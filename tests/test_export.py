"""Export: SavedModel layout, parity with JAX in a fresh process without JAX, bad input."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="export tests need the [export] extra (tensorflow-cpu)")

_spec = importlib.util.spec_from_file_location(
    "jaxreco_test_export_support", Path(__file__).with_name("test_export_support.py"))
S = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = S
_spec.loader.exec_module(S)

from jaxreco import export as ex  # noqa: E402
from jaxreco.serve import layout  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    data = S.make_mf(seed=0)
    model_dir = tmp_path_factory.mktemp("models")
    path = S.export(data, model_dir, 1, model_info={"model": "mf", "run": "test"})
    return data, model_dir, path


def test_versioned_layout_assets_and_metadata(exported):
    data, model_dir, path = exported
    assert path == model_dir / "1"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]  # no temp dirs left behind
    for f in ("saved_model.pb", "variables/variables.index", "assets.extra/jaxreco.json"):
        assert (path / f).is_file(), f
    assets = path / "assets"
    users = (assets / layout.USER_VOCAB_FILE).read_text(encoding="utf-8").split("\n")[:-1]
    items = (assets / layout.ITEM_VOCAB_FILE).read_text(encoding="utf-8").split("\n")[:-1]
    cats = (assets / layout.ITEM_CATEGORY_FILE).read_text(encoding="utf-8").split("\n")[:-1]
    assert users == list(data.user_vocab) and items == list(data.item_vocab)
    assert cats == data.categories
    meta = json.loads((path / "assets.extra" / layout.METADATA_FILE).read_text())
    assert meta["num_users"] == data.num_users and meta["num_items"] == data.num_items
    assert meta["embedding_dim"] == 8 and meta["has_co_counts"] and meta["has_item_category"]
    assert meta["model_info"] == {"model": "mf", "run": "test"}
    assert set(meta["signatures"]) == set(layout.SIGNATURES)


_PARITY_PROGRAM = S.BLOCK_JAX + r"""
import json, sys
import numpy as np
import tensorflow as tf
path, qfile, out = sys.argv[1:4]
q = np.load(qfile, allow_pickle=False)
m = tf.saved_model.load(path)
sig = m.signatures
res = {"signatures": np.asarray(sorted(sig))}
s = sig["score"](user=tf.constant(q["score_users"]), item=tf.constant(q["score_items"]))
res["score"], res["score_known"] = s["score"].numpy(), s["known"].numpy()
items, scores, known = [], [], []
start = 0
for b in q["batch_sizes"]:  # several batch sizes: the batch dimension is polymorphic
    r = sig["recommend"](user=tf.constant(q["rec_users"][start:start + b]), k=tf.constant(10))
    items.append(r["items"].numpy().astype(str)); scores.append(r["scores"].numpy())
    known.append(r["known"].numpy()); start += b
res["rec_items"], res["rec_scores"] = np.concatenate(items), np.concatenate(scores)
res["rec_known"] = np.concatenate(known)
r = sig["serving_default"](user=tf.constant(q["rec_users"][:5]), k=tf.constant(10))
res["default_items"] = r["items"].numpy().astype(str)
r = sig["similar_items"](item=tf.constant(q["sim_items"]), k=tf.constant(5))
res["sim_items"] = r["items"].numpy().astype(str)
res["sim_scores"], res["sim_co"] = r["scores"].numpy(), r["co_counts"].numpy()
res["sim_known"] = r["known"].numpy()
r = sig["user_scores"](user=tf.constant(q["rec_users"][:3]))
res["user_scores"] = r["scores"].numpy()
try:
    sig["recommend"](user=tf.constant(["u1"]), k=tf.constant(0))
    res["k0_error"] = np.asarray("")
except tf.errors.InvalidArgumentError as e:
    res["k0_error"] = np.asarray(e.message)
res["jax_modules"] = np.asarray(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib")) or [""])
np.savez(out, **res)
"""


@pytest.fixture(scope="module")
def parity(exported, tmp_path_factory):
    """Runs 1,000 score and 1,000 recommend queries in a fresh process with JAX blocked."""
    data, _, path = exported
    rng = np.random.default_rng(123)
    n = 1000
    su = rng.integers(0, data.num_users, n)
    si = rng.integers(0, data.num_items, n)
    score_users = data.user_vocab[su].astype(str)
    score_users[:5] = "no-such-user"
    ru = rng.integers(0, data.num_users, n)
    ru[:3] = [0, 1, 2]
    rec_users = data.user_vocab[ru].astype(str)
    rec_users[[10, 500]] = ["unknown-a", "unknown-b"]
    sim = rng.integers(0, data.num_items, 100)
    sim_items = data.item_vocab[sim].astype(str)
    sim_items[7] = "no-such-item"
    tmp = tmp_path_factory.mktemp("parity")
    np.savez(tmp / "q.npz", score_users=score_users, score_items=data.item_vocab[si].astype(str),
             rec_users=rec_users, sim_items=sim_items,
             batch_sizes=np.asarray([1, 7, 64, 128, 300, 500]))
    proc = subprocess.run([sys.executable, "-c", _PARITY_PROGRAM, str(path), str(tmp / "q.npz"),
                           str(tmp / "out.npz")], env=S.subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(np.load(tmp / "out.npz"))
    return data, out, (su, si, ru, sim)


def test_fresh_process_never_imported_jax(parity):
    _, out, _ = parity
    assert out["jax_modules"].tolist() == [""]
    assert sorted(out["signatures"].tolist()) == sorted(layout.SIGNATURES)


def test_score_parity_1000_queries(parity):
    data, out, (su, si, _, _) = parity
    want = S.mf_functions()[0]
    import jax
    want = np.asarray(jax.jit(want)(data.params, su.astype(np.int32), si.astype(np.int32)))
    known = out["score_known"]
    assert known.tolist() == [False] * 5 + [True] * 995
    np.testing.assert_allclose(out["score"][5:], want[5:], atol=1e-5, rtol=0)
    assert np.all(out["score"][:5] == 0.0)


def test_recommend_parity_1000_users(parity):
    data, out, (_, _, ru, _) = parity
    all_scores = data.all_scores()
    item_pos = {s: i for i, s in enumerate(data.item_vocab)}
    mismatches = 0
    for q in range(len(ru)):
        got_ids = out["rec_items"][q]
        got_scores = out["rec_scores"][q]
        keep = got_scores > layout.EXCLUDED_SCORE
        got = [item_pos[s] for s in got_ids[keep]]
        cold = q in (10, 500)
        assert bool(out["rec_known"][q]) is (not cold)
        if cold:
            want = S.ref_recommend(data, None, None, 10)
            assert got == want
            np.testing.assert_array_equal(got_scores, data.popularity()[want])
            continue
        u = int(ru[q])
        want = S.ref_recommend(data, all_scores[u], u, 10)
        if not S.same_ranking(got, want, all_scores[u]):
            mismatches += 1
        np.testing.assert_allclose(got_scores[keep], all_scores[u][got], atol=1e-5, rtol=0)
        assert not set(got) & data.seen(u)
    assert mismatches == 0
    # user 0 saw all but 3 items: 3 real entries, the rest marked excluded
    assert int(np.sum(out["rec_scores"][0] > layout.EXCLUDED_SCORE)) == 3
    np.testing.assert_array_equal(out["default_items"], out["rec_items"][:5])
    np.testing.assert_allclose(out["user_scores"][1][list(data.seen(1))], layout.EXCLUDED_SCORE)


def test_similar_items_ranks_co_purchases_then_cosine(parity):
    data, out, (_, _, _, sim) = parity
    item_pos = {s: i for i, s in enumerate(data.item_vocab)}
    v = data.params["item_embed"] / np.linalg.norm(data.params["item_embed"], axis=1, keepdims=True)
    for q, i in enumerate(sim):
        got = [item_pos[s] for s in out["sim_items"][q]]
        if q == 7:  # unknown item: the popular items, none left out
            assert not out["sim_known"][q]
            pop = data.popularity()
            assert got == sorted(range(data.num_items), key=lambda j: (-pop[j], j))[:5]
            continue
        assert out["sim_known"][q]
        want = S.ref_similar(data, int(i), 5)
        assert got == want, (q, got, want)
        np.testing.assert_allclose(out["sim_scores"][q], v[got] @ v[i], atol=1e-5)
        ip, ix, d = data.co
        co = dict(zip(ix[ip[i]:ip[i + 1]].tolist(), d[ip[i]:ip[i + 1]].tolist()))
        assert out["sim_co"][q].tolist() == [co.get(j, 0) for j in got]


def test_k_out_of_range_is_a_clear_graph_error(parity):
    _, out, _ = parity
    assert "k must be in [1, 90]" in str(out["k0_error"])


def test_similar_items_without_baskets(tmp_path):
    tf = pytest.importorskip("tensorflow")
    data = S.make_mf(num_users=20, num_items=15, seed=3, baskets=False, categories=False)
    path = S.export(data, tmp_path, 7, popularity=np.arange(15, 0, -1))  # item 0 most popular
    m = tf.saved_model.load(str(path))
    r = m.signatures["similar_items"](item=tf.constant([data.item_id(2), "unknown"]),
                                      k=tf.constant(14))
    pos = {s: i for i, s in enumerate(data.item_vocab)}
    got = [[pos[s] for s in row] for row in r["items"].numpy().astype(str)]
    assert got[0] == S.ref_similar(data, 2, 14)
    assert got[1] == list(range(14))  # popularity order; item 0 is not "the query item"
    assert r["known"].numpy().tolist() == [True, False]
    assert r["co_counts"].numpy().tolist() == [[0] * 14] * 2
    r = m.signatures["recommend"](user=tf.constant(["unknown"]), k=tf.constant(3))
    assert [pos[s] for s in r["items"].numpy()[0].astype(str)] == [0, 1, 2]
    np.testing.assert_array_equal(r["scores"].numpy()[0], [15, 14, 13])
    assert not (path / "assets" / layout.ITEM_CATEGORY_FILE).exists()


# --------------------------------------------------------------------------- bad input
def _kw(data, **over):
    score, all_fn, vec = S.mf_functions()
    kw = dict(params=data.params, score_fn=score, user_item_scores_fn=all_fn, item_vectors_fn=vec,
              user_vocab=data.user_vocab, item_vocab=data.item_vocab,
              seen=(data.indptr, data.indices), verify=False)
    kw.update(over)
    return kw


@pytest.mark.parametrize("over, message", [
    (dict(user_vocab=["a", "b", "a"]), "user_vocab has duplicate ids"),
    (dict(item_vocab=["x\ny"] + [str(i) for i in range(89)]), "item_vocab[0]='x\\ny'"),
    (dict(seen=(np.zeros(5, np.int64), np.zeros(0, np.int32))), "seen.indptr must have shape [121]"),
    (dict(seen=lambda d: (d.indptr, d.indices + 1000)), "seen.indices must lie in [0, 90)"),
    (dict(popularity=np.ones(3)), "popularity must be finite with shape [90]"),
    (dict(item_category=["a"]), "item_category must have one entry per item (90)"),
    (dict(score_fn=lambda p, u, i: p["user_embed"][u]), "score_fn(params, user[3], item[3]) must return shape (3,)"),
    (dict(user_item_scores_fn=lambda p, u: p["user_embed"][u]), "must return shape (3, 90)"),
    (dict(co_counts=lambda d: (d.co[0], d.co[1])), "co_counts must be a CSR tuple (indptr, indices, data)"),
])
def test_bad_arguments_are_named(tmp_path, over, message):
    data = S.make_mf(seed=0)
    over = {k: (v(data) if callable(v) and k in ("seen", "co_counts") else v) for k, v in over.items()}
    with pytest.raises(ex.ExportError) as e:
        ex.export_saved_model(tmp_path, 1, **_kw(data, **over))
    assert message in str(e.value)
    assert not any(tmp_path.iterdir()) or sorted(p.name for p in tmp_path.iterdir()) == []


def test_version_rules(tmp_path, exported):
    data, model_dir, _ = exported
    for v in (0, -1, "2", True):
        with pytest.raises(ex.ExportError, match="version must be a positive integer"):
            ex.export_saved_model(tmp_path, v, **_kw(data))
    with pytest.raises(ex.ExportError, match=r"1 already exists; pick a new version"):
        ex.export_saved_model(model_dir, 1, **_kw(data))


def test_tf_that_cannot_read_the_artifact_fails_with_versions(tmp_path, monkeypatch):
    import tensorflow as tf

    def broken_load(*a, **k):
        raise RuntimeError("failed to deserialize portable artifact using StableHLO_v1.13.7")

    monkeypatch.setattr(tf.saved_model, "load", broken_load)
    data = S.make_mf(num_users=10, num_items=6, seed=1)
    with pytest.raises(ex.ExportError) as e:
        ex.export_saved_model(tmp_path, 1, **_kw(data, verify=True))
    msg = str(e.value)
    assert "failed to deserialize portable artifact" in msg
    assert f"tested with jax {ex.TESTED_JAX} and tensorflow {ex.TESTED_TF}" in msg
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing half-written is left


def test_restore_params_from_orbax_manager_and_step(tmp_path):
    import orbax.checkpoint as ocp

    data = S.make_mf(num_users=10, num_items=6, seed=2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        for step in (1, 5):
            p = {k: v + step for k, v in data.params.items()}
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(p)))
        mngr.wait_until_finished()
    latest = ex.restore_params(tmp_path / "ckpt", item="state")
    first = ex.restore_params(tmp_path / "ckpt" / "1")  # one step dir, its only item
    for k, v in data.params.items():
        np.testing.assert_array_equal(latest[k], v + 5)
        np.testing.assert_array_equal(first[k], v + 1)
    with pytest.raises(ex.ExportError, match=r"has no step 3; steps: \[1, 5\]"):
        ex.restore_params(tmp_path / "ckpt", step=3)
    with pytest.raises(ex.ExportError, match="has no item 'model'; items: \\['state'\\]"):
        ex.restore_params(tmp_path / "ckpt", item="model")


def test_export_run_names_what_is_missing(tmp_path):
    with pytest.raises(ex.ExportError, match="is not a jaxreco-train run directory: no config.yaml"):
        ex.export_run(tmp_path, tmp_path / "out", 1)


def test_seen_csr_dedupes_and_sorts():
    indptr, indices = ex.seen_csr(np.array([2, 0, 2, 2]), np.array([5, 1, 3, 5]), 4)
    assert indptr.tolist() == [0, 1, 1, 3, 3] and indices.tolist() == [1, 3, 5]


def test_cli_export_reports_errors_and_picks_next_version(tmp_path, capsys, exported):
    from jaxreco.cli.export import main, next_version

    _, model_dir, _ = exported
    assert next_version(str(model_dir)) == 2
    assert next_version(str(tmp_path / "missing")) == 1
    assert main(["--run-dir", str(tmp_path), "--out-dir", str(tmp_path / "m")]) == 2
    assert "not a jaxreco-train run directory" in capsys.readouterr().err


def test_co_purchase_counts_equal_brute_force():
    rng = np.random.default_rng(5)
    n_items = 30
    basket = rng.integers(0, 200, 1500)
    item = rng.integers(0, n_items, 1500)
    basket[:40], item[:40] = 999, np.arange(40) % n_items  # a bulk order, skipped
    indptr, indices, data = ex.co_purchase_counts(basket, item, n_items, max_basket_size=25,
                                                  max_partners=4, chunk_pairs=500)
    want = np.zeros((n_items, n_items), np.int64)
    for b in set(basket.tolist()):
        its = sorted(set(item[basket == b].tolist()))
        if 2 <= len(its) <= 25:
            for i in its:
                for j in its:
                    if i != j:
                        want[i, j] += 1
    assert indptr.shape == (n_items + 1,)
    for i in range(n_items):
        cols, vals = indices[indptr[i]:indptr[i + 1]], data[indptr[i]:indptr[i + 1]]
        assert list(cols) == sorted(cols)
        top = sorted((j for j in range(n_items) if want[i, j] > 0), key=lambda j: (-want[i, j], j))[:4]
        assert sorted(top) == cols.tolist() and vals.tolist() == want[i, cols].tolist()
    with pytest.raises(ex.ExportError, match=r"must lie in \[0, 30\)"):
        ex.co_purchase_counts([1], [30], n_items)
