"""Complete-the-cart protocol: held-out last basket of each user, one item hidden, ranked
given the rest, over the whole catalogue (cart excluded). Learned basket model
(jaxreco.complement) against popularity, co-occurrence, lift/PMI and embedding cosine.

    python scripts/complement_eval.py                       # instacart-sample, full grid
    python scripts/complement_eval.py --grid dim=64,lr=0.003 --epochs 10

Each user's baskets in time order: the last is test, the one before it validation, the rest
train. Hyper-parameters (the learned model's and the baselines') are chosen on the
validation queries with scorers fitted on the train baskets; the chosen settings are then
refitted on train + validation baskets and scored once on the test queries. Prints every
figure as ``name: value``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import numpy as np

from jaxreco import complement as cp
from jaxreco.data import registry


def _grid(spec: list[str]) -> list[dict]:
    """``["dim=32,64", "lr=0.003"]`` -> every combination as dicts."""
    keys, values = [], []
    for s in spec:
        k, v = s.split("=", 1)
        keys.append(k)
        values.append([type(getattr(cp.TrainConfig(), k))(x) for x in v.split(",")])
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _summary(m: dict[str, np.ndarray]) -> dict[str, float]:
    return {"hr@10": float(m["hr"].mean()), "ndcg@10": float(m["ndcg"].mean()),
            "mrr": float(m["rr"].mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="instacart-sample")
    p.add_argument("--grid", nargs="*", default=["weight_decay=0.0001,0.01"],
                   help="learned-model settings tried on validation, key=v1,v2")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lift-min-count", default="1,2,3,5,8")
    p.add_argument("--svd-dim", default="32,64")
    p.add_argument("--out-json", default=None, help="also write every figure to this file")
    args = p.parse_args(argv)

    t0 = time.time()
    src = registry.open_source({"name": args.dataset})
    baskets, item_ids = cp.baskets_from_source(src)
    train, val, test = cp.split_last_baskets(baskets)
    trainval = cp.Baskets(*_concat(train, val))
    vq = cp.hide_one(val, seed=1)
    tq = cp.hide_one(test, seed=2)
    out: dict[str, float] = {
        "baskets": len(baskets), "items": baskets.num_items, "users": src.num_users,
        "train_baskets": len(train), "val_queries": len(vq[1]), "test_queries": len(tq[1])}
    for k, v in out.items():
        print(f"{k}: {v}")

    def run(name, fit, settings):
        """Scores ``fit(baskets, setting)`` for each setting on validation; returns the best
        setting's test metrics (refit on train+validation)."""
        best = None
        for s in settings:
            m = _summary(cp.evaluate(fit(train, s), *vq))
            print(f"val/{name}[{_label(s)}]/ndcg@10: {m['ndcg@10']:.4f}")
            if best is None or m["ndcg@10"] > best[1]["ndcg@10"]:
                best = (s, m)
        s, vm = best
        per_query = cp.evaluate(fit(trainval, s), *tq)
        tm = _summary(per_query)
        print(f"chosen/{name}: {_label(s)}")
        for k, v in vm.items():
            out[f"val/{name}/{k}"] = v
        for k, v in tm.items():
            out[f"test/{name}/{k}"] = v
            print(f"test/{name}/{k}: {v:.4f}")
        out[f"chosen/{name}"] = _label(s)
        return per_query

    nu = src.num_users
    pq = {}
    pq["popularity"] = run("popularity", lambda b, s: (
        lambda c, u, f=cp.CoPurchase.from_baskets(b).popularity(): np.broadcast_to(f, (len(c), len(f)))),
        [{}])
    pq["cooccurrence"] = run("cooccurrence", lambda b, s: cp.CoPurchase.from_baskets(b).cooccurrence,
                             [{}])
    pq["lift"] = run("lift", lambda b, s: cp.CoPurchase.from_baskets(b).lift_scorer(s["min_count"]),
                     [{"min_count": int(x)} for x in args.lift_min_count.split(",")])
    pq["cosine"] = run("cosine", lambda b, s: cp.cosine_scorer(
        cp.svd_item_factors(b, s["dim"], nu), np.bincount(b.items, minlength=b.num_items)),
        [{"dim": int(x)} for x in args.svd_dim.split(",")])

    def fit_learned(b, s):
        cfg = cp.TrainConfig(**{"epochs": args.epochs, **s})
        t = time.time()
        model = cp.train(b, item_ids, cfg)
        print(f"train_seconds[{_label(s)}]: {time.time() - t:.1f}")
        return model.scores
    init = cp.train(train, item_ids, cp.TrainConfig(epochs=0, **{
        k: v for k, v in _grid(args.grid)[0].items() if k not in ("epochs", "lr")}))
    out["val/learned_untrained/ndcg@10"] = float(cp.evaluate(init.scores, *vq)["ndcg"].mean())
    print(f"val/learned_untrained/ndcg@10: {out['val/learned_untrained/ndcg@10']:.4f}")
    pq["learned"] = run("learned", fit_learned, _grid(args.grid))

    base = max(("popularity", "cooccurrence", "lift", "cosine"),
               key=lambda n: out[f"test/{n}/ndcg@10"])
    gain = out["test/learned/ndcg@10"] - out[f"test/{base}/ndcg@10"]
    lo, hi = cp.paired_bootstrap(pq["learned"]["ndcg"], pq[base]["ndcg"])
    out.update({"best_baseline": base, "learned_minus_best_ndcg@10": gain,
                "learned_over_best_ndcg@10_relative": gain / out[f"test/{base}/ndcg@10"],
                "learned_minus_best_ndcg@10_ci95_lo": lo,
                "learned_minus_best_ndcg@10_ci95_hi": hi,
                "seconds": time.time() - t0})
    for k in ("best_baseline", "learned_minus_best_ndcg@10", "learned_over_best_ndcg@10_relative",
              "learned_minus_best_ndcg@10_ci95_lo", "learned_minus_best_ndcg@10_ci95_hi",
              "seconds"):
        v = out[k]
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _label(s: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in s.items()) or "-"


def _concat(a: cp.Baskets, b: cp.Baskets):
    """Fields of the union of two basket sets, ordered by (user, time)."""
    sizes = np.concatenate([a.sizes(), b.sizes()])
    user = np.concatenate([a.user, b.user])
    t = np.concatenate([a.time, b.time])
    items = [a.items, b.items]
    ptr = np.concatenate([[0], np.cumsum(sizes)])
    order = np.lexsort((t, user))
    allb = cp.Baskets(ptr.astype(np.int64), np.concatenate(items), user, t, a.num_items)
    s = allb.select(order)
    return s.ptr, s.items, s.user, s.time, s.num_items


if __name__ == "__main__":
    from jaxreco.runtime import configure_xla
    configure_xla()   # before JAX starts (jaxreco/runtime.py: XLA:CPU's scheduler can wedge solves)
    sys.exit(main())
