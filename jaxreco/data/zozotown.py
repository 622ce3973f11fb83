"""``zozotown-obd``: real fashion e-commerce impressions from the Open Bandit Dataset sample.

The ``obp==0.4.1`` wheel ships ``obp/dataset/obd/{random,bts}/{all,men,women}/*.csv`` (10K
impressions each: timestamp, item_id, position, click, propensity_score, four hashed user
features, user-item affinities) and ``item_context.csv`` (item_feature_0 numeric, 1..3
hashed categoricals). OBD has no user id: a user is the combination of the four hashed user
features (the "user context"). Each impression is a row with ``label`` = click, plus
``position``, ``propensity_score`` (kept for off-policy evaluation) and ``policy`` (0
random, 1 bts). Item category is ``item_feature_1``; OBD has no price (NaN). Since the same
user context sees the same item many times, ``prepare.dedup=aggregate`` (label = any click,
``count`` = impressions) or ``none`` suit it better than ``last``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jaxreco.data import fetch
from jaxreco.data.dataset import DataError
from jaxreco.data.readers import BadRows, Field, IdMapper, Source, concat_blocks, read_csv

PACKAGE, VERSION = "obp", "0.4.1"
POLICIES = ("random", "bts")
CAMPAIGNS = ("all", "men", "women")

FIELDS = [
    Field("timestamp", "datetime", out="timestamp"),
    Field("item_id", "id", out="item"),
    Field("position", "int", lo=1, hi=3),
    Field("click", "int", lo=0, hi=1),
    Field("propensity_score", "float", lo=0, hi=1),
] + [Field(f"user_feature_{k}", "id") for k in range(4)]

ITEM_FIELDS = [Field("item_id", "id"), Field("item_feature_0", "float"),
               Field("item_feature_1", "id")]


def parse(files: dict[str, bytes], item_context: tuple[str, bytes], bad_rows: BadRows,
          name: str = "zozotown-obd", fingerprint: Any = None) -> Source:
    """``files``: label -> CSV bytes of impression logs; ``item_context``: (label, bytes)."""
    parts = []
    for label, data in files.items():
        c = concat_blocks(read_csv(data, FIELDS, label=label, bad_rows=bad_rows))
        c["policy"] = np.full(len(c["position"]), POLICIES.index(label.split("/")[-3])
                              if label.split("/")[-3] in POLICIES else -1, np.int8)
        parts.append(c)
    cols = {k: (pa.concat_arrays([p[k] for p in parts]) if isinstance(parts[0][k], pa.Array)
                else np.concatenate([p[k] for p in parts])) for k in parts[0]}
    user_raw = pc.binary_join_element_wise(*[cols[f"user_feature_{k}"] for k in range(4)], "|")
    users, items = IdMapper(), IdMapper()
    u = users.encode(user_raw)
    ic = concat_blocks(read_csv(item_context[1], ITEM_FIELDS, label=item_context[0],
                                bad_rows=bad_rows))
    items.encode(ic["item_id"])                 # item vocabulary in item_context order
    i = items.encode(cols["item"])
    cats = IdMapper()
    cat_of = np.full(len(items), -1, np.int32)
    cat_of[items.encode(ic["item_id"], grow=False)] = cats.encode(ic["item_feature_1"])
    n = len(u)
    arrays = {"user": u, "item": i, "timestamp": cols["timestamp"].astype(np.int64),
              "label": cols["click"].astype(np.float32),
              "position": cols["position"].astype(np.int8),
              "propensity_score": cols["propensity_score"].astype(np.float32),
              "policy": cols["policy"]}

    def blocks():
        if n:
            yield arrays
    return Source(name=name, user_vocab=users.vocab, item_vocab=items.vocab, blocks=blocks,
                  num_rows_hint=n, fingerprint=fingerprint, bad_rows=bad_rows,
                  extra_columns={"label": "<f4", "position": "|i1", "propensity_score": "<f4",
                                 "policy": "|i1"},
                  item_side={"category": cat_of}, category_vocab=cats.vocab,
                  report={"impressions": n, "clicks": int(arrays["label"].sum())})


def source(cfg: Mapping[str, Any], *, on_bad_rows: str = "error") -> Source:
    """The source for ``conf/dataset/zozotown-obd.yaml``: ``policies`` (random, bts) and
    ``campaign`` (all, men, women) pick the files."""
    policies = list(cfg.get("policies") or ["random", "bts"])
    campaign = cfg.get("campaign", "all")
    bad_p = [p for p in policies if p not in POLICIES]
    if bad_p or campaign not in CAMPAIGNS:
        raise DataError(f"zozotown-obd: policies={policies} must be in {POLICIES}, "
                        f"campaign={campaign!r} in {CAMPAIGNS}")
    wheel = fetch.fetch_wheel(PACKAGE, cfg.get("version", VERSION), cfg.get("cache_dir"))
    base = "obp/dataset/obd"
    files = {f"{wheel.name}!{base}/{p}/{campaign}/{campaign}.csv":
             fetch.read_member(wheel, f"{base}/{p}/{campaign}/{campaign}.csv") for p in policies}
    item_member = f"{base}/{policies[0]}/{campaign}/item_context.csv"
    return parse(files, (f"{wheel.name}!{item_member}", fetch.read_member(wheel, item_member)),
                 BadRows(on_bad_rows),
                 fingerprint={"wheel": wheel.name, "policies": policies, "campaign": campaign})
