"""prepare: splits, fixed negatives, leakage check, bad rows, no-op reruns, atomicity."""

import hashlib
import json
import os

import numpy as np
import pytest

from conftest import SYN, write_csv
from jaxreco.data import features, storage
from jaxreco.data.dataset import DataError
from jaxreco.data.prepare import load_split, load_table, prepare


def _all(out):
    return {s: load_split(out, s) for s in ("train", "val", "test")}


def test_leave_last_out_invariants(run_prepare):
    meta, out = run_prepare(SYN, split={"kind": "leave_last_out"}, negatives={"num": 20})
    sp = _all(out)
    # disjoint pairs (dedup=last) and one val + one test row per eligible user
    keys = {s: set(zip(v["user"].tolist(), v["item"].tolist())) for s, v in sp.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["val"]
    assert len(np.unique(sp["test"]["user"])) == len(sp["test"]["user"]) == meta["splits"]["test"]["rows"]
    last_train = np.full(meta["num_users"], -1)
    np.maximum.at(last_train, sp["train"]["user"], sp["train"]["timestamp"])
    assert (sp["test"]["timestamp"] >= last_train[sp["test"]["user"]]).all()
    assert (sp["test"]["timestamp"] >= 0).all()
    val_t = dict(zip(sp["val"]["user"].tolist(), sp["val"]["timestamp"].tolist()))
    assert all(t >= val_t[u] for u, t in zip(sp["test"]["user"].tolist(),
                                              sp["test"]["timestamp"].tolist()))
    assert sum(v["rows"] for v in meta["splits"].values()) == (
        meta["counts"]["raw_rows"] - meta["counts"]["duplicates_removed"]
        - sum(0 for _ in ()) - _kcore_rows(meta, sp))


def _kcore_rows(meta, sp):
    return meta["counts"]["raw_rows"] - meta["counts"]["duplicates_removed"] - sum(
        len(v["user"]) for v in sp.values())


def test_temporal_invariants(run_prepare):
    meta, out = run_prepare(SYN, split={"kind": "temporal", "test_fraction": 0.2,
                                        "val_fraction": 0.1})
    sp = _all(out)
    vc, tc = meta["split"]["cutoffs"]
    assert sp["train"]["timestamp"].max() <= vc < sp["val"]["timestamp"].min()
    assert sp["val"]["timestamp"].max() <= tc < sp["test"]["timestamp"].min()
    n = sum(len(v["user"]) for v in sp.values())
    assert abs(len(sp["test"]["user"]) / n - 0.2) < 0.01


def test_random_split_and_kcore(run_prepare):
    meta, out = run_prepare(SYN, split={"kind": "random", "test_fraction": 0.25,
                                        "val_fraction": 0.0}, min_user_interactions=20,
                            min_item_interactions=10, negatives={"num": 0})
    sp = _all(out)
    n = sum(len(v["user"]) for v in sp.values())
    assert abs(len(sp["test"]["user"]) - 0.25 * n) <= 1 and len(sp["val"]["user"]) == 0
    allu = np.concatenate([v["user"] for v in sp.values()])
    alli = np.concatenate([v["item"] for v in sp.values()])
    assert np.bincount(allu).min() >= 20 and np.bincount(alli).min() >= 10   # k-core holds
    assert allu.max() + 1 == meta["num_users"] and alli.max() + 1 == meta["num_items"]
    vocab = load_table(out, "user_vocab")["raw_id"]
    assert len(vocab) == meta["num_users"] and len(set(vocab.tolist())) == len(vocab)


def test_negatives_fixed_across_runs_and_never_positive(run_prepare):
    opts = dict(split={"kind": "leave_last_out"}, negatives={"num": 30, "sampler": "popularity"})
    m1, o1 = run_prepare(SYN, name="a", **opts)
    m2, o2 = run_prepare(SYN, name="b", **opts)
    assert m1["candidates"]["test"]["sha256"] == m2["candidates"]["test"]["sha256"]
    assert {s: v["sha256"] for s, v in m1["splits"].items()} == \
        {s: v["sha256"] for s, v in m2["splits"].items()}
    c1, c2 = load_split(o1, "test_candidates"), load_split(o2, "test_candidates")
    np.testing.assert_array_equal(c1["negatives"], c2["negatives"])
    sp = _all(o1)
    pos = set()   # positives: label > 0 in any split (an unclicked view may be a negative)
    for v in sp.values():
        m = v["label"] > 0
        pos |= set(zip(v["user"][m].tolist(), v["item"][m].tolist()))
    assert len(pos) > 1000
    negs = c1["negatives"]
    assert negs.shape == (m1["candidates"]["test"]["rows"], 30)
    assert not any((u, i) in pos for u, row in zip(c1["user"].tolist(), negs.tolist())
                   for i in row)
    assert all(len(set(r)) == 30 for r in negs.tolist())
    # candidates are the positive test rows
    t = sp["test"]
    assert set(zip(c1["user"].tolist(), c1["item"].tolist())) == {
        (u, i) for u, i, lab in zip(t["user"].tolist(), t["item"].tolist(), t["label"]) if lab > 0}


def test_rerun_is_noop_and_config_change_is_not(run_prepare):
    m1, out = run_prepare(SYN)
    mtime = os.stat(os.path.join(out, "metadata.json")).st_mtime_ns
    m2, _ = run_prepare(SYN)
    assert m2.get("noop") and os.stat(os.path.join(out, "metadata.json")).st_mtime_ns == mtime
    m3, _ = run_prepare(SYN, negatives={"num": 5})
    assert not m3.get("noop") and m3["config_sha256"] != m1["config_sha256"]


def test_concurrent_prepares_of_one_dataset_prepare_it_once(run_prepare):
    """Two processes of a multi-process run prepare the same dataset at once: one writes it,
    the other waits on the lock and finds it up to date (it never replaces the directory
    under the first one's readers)."""
    import threading
    start, results, errors = threading.Barrier(2), [], []

    def one():
        start.wait()
        try:
            results.append(run_prepare(SYN)[0])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(bool(m.get("noop")) for m in results) == [False, True]
    assert results[0]["config_sha256"] == results[1]["config_sha256"]


def test_leakage_check_catches_planted_leak(run_prepare):
    meta, out = run_prepare(SYN, split={"kind": "leave_last_out"})
    sp = _all(out)
    uf, itf = load_table(out, "user_features"), load_table(out, "item_features")
    groups = [(sp["train"], [("val", sp["val"]), ("test", sp["test"])])]
    ok = features.check_leakage(groups, user_features=uf, item_features=itf,
                                split_kind="leave_last_out", pairs_unique=True)
    assert ok["train_rows_checked"] == len(sp["train"]["user"])
    # plant: popularity computed over train + test
    leaky = dict(itf)
    leaky["popularity"] = itf["popularity"] + np.bincount(sp["test"]["item"],
                                                          minlength=len(itf["popularity"]))
    with pytest.raises(DataError, match="leakage: feature popularity"):
        features.check_leakage(groups, user_features=uf, item_features=leaky,
                               split_kind="leave_last_out")
    # plant: a test row copied into train
    t0 = {k: v[:1] for k, v in sp["test"].items()}
    train2 = {k: np.concatenate([sp["train"][k], t0[k]]) for k in ("user", "item", "timestamp")}
    with pytest.raises(DataError, match="leakage"):
        features.check_leakage([(train2, [("test", sp["test"])])], user_features=uf,
                               item_features=itf, split_kind="leave_last_out", pairs_unique=True)


def _files(tmp_path, bad_line=None):
    train = [f"u{k % 7},i{k % 11},{k % 5 + 1},{1000 + k}" for k in range(60)]
    if bad_line:
        train[9] = bad_line                        # physical line 11 of train.csv
    test = [f"u{k},i{(k + 3) % 11},4,{5000 + k}" for k in range(7)] + ["newuser,i1,3,6000",
                                                                      "u1,newitem,3,6001"]
    negs = [f"u{k},i{j}" for k in range(7) for j in range(11) if (f"u{k}", f"i{j}") not in
            {(f"u{x % 7}", f"i{x % 11}") for x in range(60)} | {(f"u{k}", f"i{(k + 3) % 11}")}]
    return {"name": "from-files",
            "train": write_csv(tmp_path / "train.csv", "user,item,rating,ts", train),
            "test": write_csv(tmp_path / "test.csv", "user,item,rating,ts", test),
            "columns": {"user": "user", "item": "item", "rating": "rating", "timestamp": "ts"},
            "rating_range": [1, 5]}, negs


def test_from_files_ids_consistent_and_test_only_reported(tmp_path, run_prepare):
    ds, _ = _files(tmp_path)
    meta, out = run_prepare(ds, negatives={"num": 1})
    assert meta["split"]["kind"] == "given"
    assert meta["source_report"]["test_only_users"] == 1
    assert meta["source_report"]["test_only_item_examples"] == ["newitem"]
    uv = load_table(out, "user_vocab")["raw_id"]
    iv = load_table(out, "item_vocab")["raw_id"]
    te = load_split(out, "test")
    got = {(uv[u], iv[i]) for u, i in zip(te["user"], te["item"])}
    assert ("u3", "i6") in got and ("newuser", "i1") in got
    assert meta["splits"]["train"]["rows"] == 60 - 60 + len(
        {(k % 7, k % 11) for k in range(60)})       # dedup=last on (user, item)


def test_from_files_fixed_negatives_file(tmp_path, run_prepare):
    ds, negs = _files(tmp_path)
    ds["test"] = write_csv(tmp_path / "test.csv", "user,item,rating,ts",
                           [f"u{k},i{(k + 3) % 11},4,{5000 + k}" for k in range(7)])
    per_user = {}
    for line in negs:
        u, i = line.split(",")
        per_user.setdefault(u, []).append(i)
    width = min(len(v) for v in per_user.values())
    rows = [f"{u},{i}" for u, v in per_user.items() for i in v[:width]]
    ds["negatives"] = write_csv(tmp_path / "negs.csv", "user,item", rows)
    meta, out = run_prepare(ds)
    c = load_split(out, "test_candidates")
    uv = load_table(out, "user_vocab")["raw_id"]
    iv = load_table(out, "item_vocab")["raw_id"]
    assert meta["candidates"]["test"]["sampler"] == "fixed"
    for u, row in zip(c["user"], c["negatives"]):
        assert [iv[i] for i in row] == per_user[uv[u]][:width]


def test_bad_rows_error_and_skip_with_quarantine(tmp_path, run_prepare):
    ds, _ = _files(tmp_path, bad_line="u1,i2,excellent,1010")
    with pytest.raises(DataError, match=r"train.csv:11: field 'rating' = 'excellent'"):
        run_prepare(ds, negatives={"num": 0})
    assert not os.path.exists(tmp_path / "out")          # nothing half-written
    meta, out = run_prepare(ds, on_bad_rows="skip", negatives={"num": 0})
    assert meta["bad_rows"]["skipped"] == 1 and meta["counts"]["bad_rows_skipped"] == 1
    q = open(os.path.join(out, "quarantine.csv")).read().splitlines()
    assert len(q) == 2 and "train.csv,11,rating,excellent" in q[1]


def test_interrupted_prepare_leaves_no_dataset(tmp_path, run_prepare, monkeypatch):
    meta, out = run_prepare(SYN)
    from jaxreco.data import prepare as P

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(P, "check_leakage", boom)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(SYN, negatives={"num": 7})              # a different config, interrupted
    # the old complete dataset is still there, untouched; no staging dirs are left behind
    assert storage.read_metadata(out)["config_sha256"] == meta["config_sha256"]
    assert [p for p in os.listdir(tmp_path) if p not in ("out", "out.lock")] == []
    os.remove(os.path.join(out, "metadata.json"))
    with pytest.raises(DataError, match="no metadata.json"):
        load_split(out, "train")


def test_prepare_to_fsspec_url(run_prepare):
    """Any fsspec path works (memory:// here; gs:// or hdfs:// the same way)."""
    url = "memory://jaxreco-test/prepared"
    meta = prepare({"dataset": SYN, "prepare": {"output_dir": url, "progress": False,
                                                "negatives": {"num": 5}}})
    assert storage.read_metadata(url)["config_sha256"] == meta["config_sha256"]
    tr = load_split(url, "train")
    assert len(tr["user"]) == meta["splits"]["train"]["rows"]
    again = prepare({"dataset": SYN, "prepare": {"output_dir": url, "progress": False,
                                                 "negatives": {"num": 5}}})
    assert again.get("noop")


# The defaults as they were written out before jaxreco.config.PrepareConfig became their one
# source: prepared datasets are keyed by a hash of the full options, so any change here
# re-prepares every cached dataset (bump PREPARE_VERSION if that is the intent).
GOLDEN_DEFAULTS = {
    "output_dir": None, "on_bad_rows": "error", "dedup": "last",
    "min_user_interactions": 0, "min_item_interactions": 0,
    "timestamp_min": None, "timestamp_max": None, "rating_min": None, "rating_max": None,
    "split": {"kind": "random", "test_fraction": 0.1, "val_fraction": 0.1, "seed": 0,
              "num_val": 1, "num_test": 1, "min_train": 1, "tie_break": "first"},
    "negatives": {"num": 99, "sampler": "uniform", "seed": 0},
    "features": {"price_buckets": 10},
    "num_buckets": None, "compression": "lz4", "leakage_check": True, "progress": True,
    "temp_dir": None,
}


def test_defaults_come_from_the_schema_as_plain_data_and_are_unchanged():
    from jaxreco.data.prepare import DEFAULTS, options
    assert DEFAULTS == GOLDEN_DEFAULTS
    assert json.dumps(DEFAULTS, sort_keys=True) == json.dumps(GOLDEN_DEFAULTS, sort_keys=True)
    assert type(DEFAULTS["split"]["kind"]) is str
    assert options(None) == DEFAULTS
    # a partial dict, as the trainer and the tests pass it, fills in from the schema
    o = options({"split": {"kind": "leave_last_out"}, "negatives": {"num": 5}})
    assert o["split"] == {**DEFAULTS["split"], "kind": "leave_last_out"}
    assert o["negatives"] == {**DEFAULTS["negatives"], "num": 5}


@pytest.mark.parametrize("prep, message", [
    ({"split": {"kind": "randm"}}, r"prepare.split.kind: Invalid value 'randm'"),
    ({"negatives": {"nmu": 5}}, r"prepare.negatives.nmu: Key 'nmu' not in"),
    ({"split": {"test_fraction": 0.6, "val_fraction": 0.4}},
     r"prepare.split.test_fraction \+ prepare.split.val_fraction = 0.6 \+ 0.4 = 1.0: must be < 1"),
    ({"negatives": {"num": -1}}, r"^prepare.negatives.num=-1: must be an integer >= 0$"),
    ({"num_buckets": 0}, r"^prepare.num_buckets=0: must be an integer >= 1, or null$"),
])
def test_bad_options_are_refused_naming_the_key_before_reading(prep, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        prepare({"dataset": {"name": "from-files", "train": str(tmp_path / "absent.csv")},
                 "prepare": {"output_dir": str(tmp_path / "out"), **prep}})


def test_prepared_dir_is_keyed_by_content_options(monkeypatch, tmp_path):
    from jaxreco.data.prepare import DEFAULTS, PREPARE_VERSION, prepared_dir

    monkeypatch.setenv("JAXRECO_CACHE", str(tmp_path / "c"))
    ds = {"name": "movielens-100k", "path": None}
    llo = {"split": {"kind": "leave_last_out", "num_val": 0}}
    d = prepared_dir(ds, llo)
    assert d.startswith(str(tmp_path / "c" / "prepared-datasets" / "movielens-100k-"))
    assert len(os.path.basename(d)) == len("movielens-100k-") + 12
    full = json.loads(json.dumps(DEFAULTS))
    full["split"].update(kind="leave_last_out", num_val=0)
    assert prepared_dir(ds, full) == d                       # defaults filled in either way
    assert prepared_dir(ds, {**llo, "progress": False, "temp_dir": "/x"}) == d
    assert prepared_dir(ds, {**llo, "negatives": {"num": 5}}) != d
    assert prepared_dir({**ds, "path": "/data"}, llo) != d
    assert prepared_dir(ds, {**llo, "output_dir": "/data/out"}) == "/data/out"
    # the hash: [dataset, options without output_dir/progress/temp_dir, PREPARE_VERSION]
    keep = {k: v for k, v in full.items() if k not in ("output_dir", "progress", "temp_dir")}
    key = hashlib.sha256(json.dumps([ds, keep, PREPARE_VERSION], sort_keys=True,
                                    default=str).encode()).hexdigest()
    assert d.endswith(key[:12])


def test_random_global_split_is_the_in_memory_random_split_row_for_row(ml_dir, cache_env,
                                                                        run_prepare):
    """What the rating experiments (ml100k_mf, ml1m_mf) prepare: the split they had in memory."""
    from jaxreco.data import registry, split as split_lib

    ds = {"name": "movielens-100k", "path": str(ml_dir)}
    sp = {"kind": "random_global", "test_fraction": 0.1, "val_fraction": 0.05, "seed": 0}
    meta, out = run_prepare(ds, dedup="none", negatives={"num": 0}, split=sp, num_buckets=3)
    x = registry.load(ds)
    want = split_lib.random_split(x, test_fraction=0.1, val_fraction=0.05, seed=0)
    for s in ("train", "val", "test"):
        got = load_split(out, s)
        order = np.lexsort((got["item"], got["user"]))   # shards are per user range
        w = want[s]
        worder = np.lexsort((w.item, w.user))
        np.testing.assert_array_equal(got["user"][order], w.user[worder])
        np.testing.assert_array_equal(got["item"][order], w.item[worder])
        np.testing.assert_array_equal(got["rating"][order], w.rating[worder])
    assert meta["num_users"] == x.num_users and meta["num_items"] == x.num_items
