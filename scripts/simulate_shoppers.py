"""Simulated shoppers for an online A/B test of a running ``jaxreco-serve`` (loopback only).

    python scripts/simulate_shoppers.py --url http://127.0.0.1:8501 \
        --dataset outputs/ab_simulated/<ts>/config.yaml --requests 500 --seconds 120 \
        --out truth.json

The shoppers are the ``synthetic-ecommerce`` generator's users, and they behave as its
ground truth says (``jaxreco/data/synthetic.py``; ``--dataset`` names the generator's
parameters: a run's ``config.yaml``, whose ``dataset`` node is used, or a dataset YAML;
``--set key=value`` overrides one):

* each ``/recommend`` call asks for ``--batch`` users drawn uniformly from the generator's
  users (raw ids ``"0"`` … ``"num_users-1"``), ``k`` items each; every answered list is
  shown whole (one ``impression`` event);
* **position bias** (a position-based model): the item at position ``p`` (1-based) is
  examined with probability ``p^-a`` (``--exam-exponent a``, default 0.5: 1, 0.71, 0.58, …),
  independently of the other positions;
* an examined item ``i`` is clicked with the generator's per-view click probability
  ``p_click(u, i) = σ(click_bias + w_u·c_{k_i} + 0.5 q_i)``; a click goes to the cart with
  ``cart_rate``; a cart is bought with ``purchase_rate``, one unit at the item's price (the
  generator's ``item_price``);
* events are posted to ``/events`` after each ``/recommend`` call (retried with the same
  ``event_id`` on a connection error or a 5xx answer: the server de-duplicates).

``--offline MODEL_VERSION_DIR`` (repeatable) needs no server: it prints the same ground truth
for a SavedModel's top-k (seen items excluded, as the server does) over every generator
user once, in-process (TensorFlow) — what that model should score online with uniform users.

The run stops after ``--requests`` ``/recommend`` calls or ``--seconds`` seconds, whichever
comes first. Printed (and written to ``--out`` as JSON), per arm: slates, shoppers,
impressions and the events sent, and the **ground truth** of what the arm served:

    expected CTR = mean over its slates s of  Σ_p exam(p) · p_click(u_s, i_{s,p}) / |s|

and the same with the funnel for add-to-cart (× cart_rate), conversion (× cart_rate ×
purchase_rate) and revenue per impression (× … × price) — the figures ``jaxreco-report``'s
measured rates estimate, so each should lie in the report's interval ~95% of the time.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jaxreco.data import synthetic

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def load_params(dataset: str | None, sets: list[str]) -> synthetic.Params:
    """The generator's parameters: defaults, then ``dataset`` (a run's config.yaml or a
    dataset YAML), then ``key=value`` overrides."""
    cfg: dict[str, Any] = {}
    if dataset:
        node = yaml.safe_load(Path(dataset).read_text()) or {}
        node = node.get("dataset", node)
        if node.get("name", "synthetic-ecommerce") != "synthetic-ecommerce":
            raise SystemExit(f"{dataset}: dataset {node.get('name')!r} is not "
                             "synthetic-ecommerce: the simulator needs its ground truth")
        cfg.update(node)
    names = {f.name: f.type for f in dataclasses.fields(synthetic.Params)}
    for s in sets:
        k, _, v = s.partition("=")
        if k not in names:
            raise SystemExit(f"--set {s}: unknown parameter; known: {sorted(names)}")
        cfg[k] = float(v) if names[k] in ("float", float) else int(v)
    return synthetic.Params.from_cfg(cfg)


class Http:
    """JSON POSTs over one keep-alive connection to a loopback server."""

    def __init__(self, url: str, timeout: float = 30.0):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or u.hostname not in LOOPBACK:
            raise SystemExit(f"--url {url}: the simulator only talks to a loopback server "
                             f"(http://127.0.0.1:PORT)")
        self.host, self.port, self.timeout = u.hostname, u.port or 80, timeout
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: dict, retries: int = 3) -> dict:
        data = json.dumps(body).encode()
        for attempt in range(retries + 1):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port,
                                                           timeout=self.timeout)
                self.conn.request("POST", path, data, {"Content-Type": "application/json"})
                r = self.conn.getresponse()
                text = r.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == retries:
                    raise
                time.sleep(0.2 * (attempt + 1))
                continue
            if r.status >= 500 and attempt < retries:
                time.sleep(0.2 * (attempt + 1))
                continue
            if r.status != 200:
                raise RuntimeError(f"POST {path}: {r.status} {text[:300]!r}")
            return json.loads(text)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclasses.dataclass
class ArmTally:
    slates: int = 0
    impressions: int = 0
    users: set = dataclasses.field(default_factory=set)
    versions: set = dataclasses.field(default_factory=set)
    # Σ over slates of the expected per-impression rates (divide by slates for the mean)
    exp_ctr: float = 0.0
    exp_cart: float = 0.0
    exp_conv: float = 0.0
    exp_rev: float = 0.0
    sent: dict = dataclasses.field(default_factory=lambda: {
        "clicks": 0, "carts": 0, "purchases": 0, "revenue": 0.0})

    def summary(self) -> dict[str, Any]:
        n = max(self.slates, 1)
        return {"slates": self.slates, "users": len(self.users),
                "impressions": self.impressions, "model_versions": sorted(self.versions),
                "truth": {"ctr": self.exp_ctr / n, "add_to_cart_rate": self.exp_cart / n,
                          "conversion_rate": self.exp_conv / n,
                          "revenue_per_impression": self.exp_rev / n},
                "sent": dict(self.sent)}


def simulate(url: str, p: synthetic.Params, *, requests: int, seconds: float, k: int = 10,
             batch: int = 8, exam_exponent: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """Drives the server (see the module docstring); returns the per-arm summary."""
    rng = np.random.default_rng(seed)
    truth = synthetic.item_truth(p)
    client = Http(url)
    tallies: dict[str, ArmTally] = {}
    t_start = time.monotonic()
    calls = 0
    try:
        while calls < requests and time.monotonic() - t_start < seconds:
            users = [str(u) for u in rng.integers(0, p.num_users, batch)]
            out = client.post("/recommend", {"users": users, "k": k})
            calls += 1
            evs = []
            for res in out["results"]:
                items = [x["item"] for x in res["items"]]
                if not items:
                    continue
                arm = str(res.get("arm"))
                rid = res.get("request_id") or f"r{calls}-{res['user']}"
                t = tallies.setdefault(arm, ArmTally())
                u = int(res["user"])
                ii = np.array([int(x) for x in items], np.int64)
                pc = synthetic.click_probability(p, np.full(len(ii), u), ii, truth)
                exam = np.arange(1, len(ii) + 1, dtype=np.float64) ** -exam_exponent
                price = truth.item_price[ii].astype(np.float64)
                n = len(ii)
                t.slates += 1
                t.impressions += n
                t.users.add(u)
                t.versions.add(str(res.get("model_version", out.get("model_version"))))
                t.exp_ctr += float((exam * pc).sum() / n)
                t.exp_cart += float((exam * pc).sum() / n) * p.cart_rate
                t.exp_conv += float((exam * pc).sum() / n) * p.cart_rate * p.purchase_rate
                t.exp_rev += float((exam * pc * price).sum() / n) * p.cart_rate * p.purchase_rate
                now = time.time()
                base = {"request_id": rid, "user": res["user"], "ts": now}
                evs.append({"event_id": f"{rid}-imp", "kind": "impression", "items": items,
                            **base})
                clicked = (rng.random(n) < exam) & (rng.random(n) < pc)
                for j in np.flatnonzero(clicked):
                    item, pos = items[j], int(j) + 1
                    evs.append({"event_id": f"{rid}-click-{pos}", "kind": "click",
                                "item": item, "position": pos, **base})
                    t.sent["clicks"] += 1
                    if rng.random() < p.cart_rate:
                        evs.append({"event_id": f"{rid}-cart-{pos}", "kind": "cart",
                                    "item": item, "position": pos, "quantity": 1, **base})
                        t.sent["carts"] += 1
                        if rng.random() < p.purchase_rate:
                            value = round(float(price[j]), 2)
                            evs.append({"event_id": f"{rid}-buy-{pos}", "kind": "purchase",
                                        "item": item, "position": pos, "quantity": 1,
                                        "value": value, **base})
                            t.sent["purchases"] += 1
                            t.sent["revenue"] += value
            for lo in range(0, len(evs), 1000):
                client.post("/events", {"events": evs[lo:lo + 1000]})
    finally:
        client.close()
    return {"url": url, "requests": calls, "seconds": round(time.monotonic() - t_start, 2),
            "k": k, "batch": batch, "exam": f"position^-{exam_exponent:g}", "seed": seed,
            "params": dataclasses.asdict(p),
            "arms": {a: t.summary() for a, t in sorted(tallies.items())}}


def _expected(p: synthetic.Params, truth: synthetic.Truth, users: np.ndarray,
              items: np.ndarray, exam: np.ndarray) -> dict[str, float]:
    """Mean expected per-impression rates of slates ``items [s, k]`` shown to ``users [s]``."""
    pc = synthetic.click_probability(p, np.repeat(users, items.shape[1]), items.ravel(),
                                     truth).reshape(items.shape)
    ctr = (exam * pc).mean(1)
    funnel = p.cart_rate * p.purchase_rate
    return {"ctr": float(ctr.mean()), "add_to_cart_rate": float(ctr.mean() * p.cart_rate),
            "conversion_rate": float(ctr.mean() * funnel),
            "revenue_per_impression": float(
                (exam * pc * truth.item_price[items]).mean(1).mean() * funnel)}


def model_truth(path: str, p: synthetic.Params, *, k: int = 10, exam_exponent: float = 0.5,
                chunk: int = 64) -> dict[str, float]:
    """The ground truth of a SavedModel version's top-``k`` for every generator user (the
    items the server would answer: :func:`jaxreco.serve.rules.top_k` of ``user_scores``,
    no business rules). Imports TensorFlow."""
    from jaxreco.serve.model import ServedModel
    from jaxreco.serve.rules import top_k

    m = ServedModel(path, max_batch=chunk)
    truth = synthetic.item_truth(p)
    exam = np.arange(1, k + 1, dtype=np.float64) ** -exam_exponent
    users, slates = [], []
    for lo in range(0, p.num_users, chunk):
        ids = [str(u) for u in range(lo, min(p.num_users, lo + chunk))]
        scores, _ = m.user_scores(ids)
        idx, _ = top_k(scores, k, None)
        for u, row in zip(range(lo, lo + len(ids)), idx):
            if len(row) == k:
                users.append(u)
                slates.append([int(m.item_ids[i]) for i in row])
    out = _expected(p, truth, np.asarray(users, np.int64), np.asarray(slates, np.int64), exam)
    out["users"] = len(users)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8501")
    ap.add_argument("--dataset", default=None,
                    help="the generator's parameters: a run's config.yaml or a dataset YAML")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one generator parameter (repeatable)")
    ap.add_argument("--requests", type=int, default=200, help="most /recommend calls")
    ap.add_argument("--seconds", type=float, default=60.0, help="most seconds")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8, help="users per /recommend call")
    ap.add_argument("--exam-exponent", type=float, default=0.5,
                    help="position p is examined with probability p^-a (default 0.5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the summary as JSON here")
    ap.add_argument("--offline", action="append", default=[], metavar="MODEL_VERSION_DIR",
                    help="no server: the ground truth of this SavedModel's top-k over every "
                         "user (repeatable)")
    a = ap.parse_args(argv)
    if a.requests < 1 or a.seconds <= 0 or a.k < 1 or a.batch < 1:
        ap.error("--requests, --k, --batch must be >= 1 and --seconds > 0")
    if a.offline:
        params = load_params(a.dataset, a.set)
        res = {m: model_truth(m, params, k=a.k, exam_exponent=a.exam_exponent)
               for m in a.offline}
        for m, t in res.items():
            print(f"{m}: {t['users']} users: truth/ctr {t['ctr']:.4f}  "
                  f"truth/conversion_rate {t['conversion_rate']:.4f}  "
                  f"truth/revenue_per_impression {t['revenue_per_impression']:.4f}")
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
        return 0
    res = simulate(a.url, load_params(a.dataset, a.set), requests=a.requests,
                   seconds=a.seconds, k=a.k, batch=a.batch, exam_exponent=a.exam_exponent,
                   seed=a.seed)
    print(f"{res['requests']} /recommend calls in {res['seconds']} s "
          f"(examination {res['exam']})")
    for arm, s in res["arms"].items():
        t = s["truth"]
        print(f"arm {arm} (versions {s['model_versions']}): {s['slates']} slates, "
              f"{s['users']} users, {s['impressions']} impressions; sent {s['sent']}")
        print(f"  truth/ctr {t['ctr']:.4f}  truth/add_to_cart_rate {t['add_to_cart_rate']:.4f}  "
              f"truth/conversion_rate {t['conversion_rate']:.4f}  "
              f"truth/revenue_per_impression {t['revenue_per_impression']:.4f}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2, default=str) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    from jaxreco.runtime import configure_xla
    configure_xla()   # before JAX starts (jaxreco/runtime.py: XLA:CPU's scheduler can wedge solves)
    sys.exit(main())
