"""prepare: splits, fixed negatives, leakage check, bad rows, no-op reruns, atomicity."""

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
    assert [p for p in os.listdir(tmp_path) if p != "out"] == []
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


def test_prepare_yaml_matches_defaults():
    from omegaconf import OmegaConf
    from jaxreco.data.prepare import DEFAULTS
    here = os.path.dirname(__file__)
    c = OmegaConf.to_container(OmegaConf.load(os.path.join(here, "..", "..", "conf", "prepare",
                                                           "default.yaml")))
    assert c == DEFAULTS
