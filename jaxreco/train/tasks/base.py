"""What every task shares: the prepared data it reads, and the task interface.

A task is built from a validated config and a :class:`PreparedData` (a directory written by
:func:`jaxreco.data.prepare.prepare`); constructing one reads that directory and nothing
else: it writes no files and never runs ``prepare`` (the training loop prepares the data
first; a restored run opens the directory its ``splits.json`` recorded). Each task provides

* ``train_cols``: the columns the input pipeline batches (or iALS reads whole);
* ``model_fn()``: the model's constructor; ``loss_fn(abstract_model)``: the training loss;
* ``transform(batch, step, shard_index)``: host-side batch additions (negatives, side
  features, labels);
* ``setup(graphdef, tables, abstract_model, in_sharding, mesh)`` then ``evaluate(state,
  split)`` / ``final(state)``: the evaluation;
* ``select``/``mode``: the validation metric that picks the best checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from jaxreco.data import prepare as prepare_lib
from jaxreco.data import storage

log = logging.getLogger("jaxreco")

SPLITS = ("train", "val", "test")


class PreparedData:
    """A prepared dataset directory: its metadata and column readers."""

    def __init__(self, path: str, meta: dict[str, Any]):
        self.path, self.meta = str(path), meta
        self.name = meta["dataset"]
        self.num_users, self.num_items = int(meta["num_users"]), int(meta["num_items"])
        self.schema = meta["schema"]["interactions"]

    @classmethod
    def prepare(cls, cfg: DictConfig) -> "PreparedData":
        """Prepares ``cfg.dataset`` with ``cfg.task.prepare`` (a no-op when the directory is
        up to date) and opens the result."""
        ds = OmegaConf.to_container(cfg.dataset, resolve=True)
        prep = OmegaConf.to_container(cfg.task.prepare, resolve=True) or {}
        out = prepare_lib.prepared_dir(ds, prep)
        meta = prepare_lib.prepare({"dataset": ds, "prepare": {**prep, "output_dir": out,
                                                               "progress": False}})
        return cls(out, meta)

    @classmethod
    def open(cls, path: str) -> "PreparedData":
        """An existing prepared directory (no preparation)."""
        if not storage.exists(storage.join(str(path), storage.METADATA)):
            raise FileNotFoundError(f"{path}: no prepared dataset there ({storage.METADATA} "
                                    "missing)")
        return cls(str(path), storage.read_metadata(str(path)))

    def load(self, split: str, columns: list[str] | None = None) -> dict[str, np.ndarray]:
        return prepare_lib.load_split(self.path, split, columns)

    def table(self, name: str) -> dict[str, np.ndarray]:
        return prepare_lib.load_table(self.path, name)

    def sha256(self) -> dict[str, str]:
        return {s: self.meta["splits"][s]["sha256"] for s in SPLITS}

    def split_info(self) -> dict[str, Any]:
        """What ``splits.json`` records: the directory, sizes and sha256s of the splits and
        of the fixed evaluation candidates."""
        sha = self.sha256()
        return {"dataset": self.name, "prepared": self.path, "users": self.num_users,
                "items": self.num_items,
                **{f"{s}/size": self.meta["splits"][s]["rows"] for s in SPLITS},
                **{f"{s}/sha256": h for s, h in sha.items()},
                **{f"{s}_candidates/sha256": c["sha256"]
                   for s, c in self.meta.get("candidates", {}).items()}}


class Task:
    """The prepared splits as columns, and the item-side / context features a model uses.

    Item-side features (``task.side_features``, from ``item_features.parquet``; unknown
    ``-1`` becomes index 0) and context features (``task.context_features``, interaction
    columns, non-negative ints) are checked against the data here.
    """

    kind = ""
    select, mode = "", "max"
    headline: tuple[str, ...] = ()
    base_columns: tuple[str, ...] = ("user", "item", "label", "rating", "event")

    def __init__(self, cfg: DictConfig, data: PreparedData):
        self.cfg, self.tc, self.data = cfg, cfg.task, data
        self.path, self.meta = data.path, data.meta
        self.num_users, self.num_items = data.num_users, data.num_items
        schema = data.schema
        self.has_label = "label" in schema
        for f in cfg.task.context_features:
            if f not in schema:
                raise ValueError(f"task.context_features: {f!r} is not a column of "
                                 f"{data.name} ({data.path}/metadata.json has {sorted(schema)})")
        self.item_side, self.side_vocab = self._item_side(list(cfg.task.side_features))
        cols = [c for c in self.base_columns if c in schema]
        cols += [c for c in cfg.task.context_features if c not in cols]
        self.split = {s: data.load(s, cols) for s in SPLITS}
        self.context_vocab = {}
        for f in cfg.task.context_features:
            allv = np.concatenate([np.asarray(self.split[s][f]) for s in SPLITS])
            if len(allv) and allv.min() < 0:
                raise ValueError(f"{data.path}: context feature {f} has a negative value "
                                 f"{allv.min()}")
            self.context_vocab[f] = int(allv.max()) + 1 if len(allv) else 1
            for s in SPLITS:
                self.split[s][f] = np.asarray(self.split[s][f], np.int32)
        self.has_val = len(self.split["val"]["user"]) > 0
        self.ks = tuple(int(k) for k in cfg.task.ks)

    def _item_side(self, features: list[str]):
        if not features:
            return {}, {}
        item_f = self.data.table("item_features")
        side, vocab = {}, {}
        for f in features:
            if f not in item_f:
                raise ValueError(f"task.side_features: {f!r} is not in {self.path}/"
                                 f"item_features.parquet (columns {sorted(item_f)})")
            v = np.asarray(item_f[f]).astype(np.int64) + 1        # -1 (unknown) -> 0
            if (v < 0).any():
                raise ValueError(f"{self.path}/item_features.parquet: {f} has values below -1")
            side[f] = v.astype(np.int32)
            vocab[f] = int(v.max()) + 1
        return side, vocab

    def add_side(self, batch: dict[str, np.ndarray], prefix: str = "") -> None:
        """Adds the item-side features of ``batch[prefix + "item"]`` to ``batch``."""
        for f, v in self.item_side.items():
            batch[prefix + f] = v[batch[prefix + "item"]]

    def positives(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(user, item)`` of a split's positive rows (label > 0 when there are labels)."""
        d = self.split[split]
        p = d["label"] > 0 if self.has_label else slice(None)
        return np.asarray(d["user"])[p], np.asarray(d["item"])[p]

    def eval_rows(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(user, item)`` of the rows a split is evaluated on (its positives)."""
        return self.positives(split)

    def log_summary(self) -> None:
        log.info("data %s (%s): %d users, %d items; train %d / val %d / test %d",
                 self.data.name, self.path, self.num_users, self.num_items,
                 len(next(iter(self.train_cols.values()))), len(self.split["val"]["user"]),
                 len(self.split["test"]["user"]))

    def train_timestamps(self) -> np.ndarray | None:
        """int64 timestamps of the rows of ``train_cols`` (None: the data has none); read
        from the prepared train split only when asked (iALS recency weights)."""
        if "timestamp" not in self.data.schema:
            return None
        ts = self.data.load("train", ["timestamp"])["timestamp"]
        return np.asarray(ts, np.int64)[self._train_rows]

    _train_rows: Any = slice(None)   # the train rows behind train_cols

    # ------------------------------------------------------------------ interface
    train_cols: dict[str, np.ndarray]

    def model_fn(self):
        raise NotImplementedError

    def loss_fn(self, abstract_model):
        raise NotImplementedError

    def transform(self, batch, step: int, shard_index: int):
        return batch

    def setup(self, graphdef, tables, abstract_model, in_sharding, mesh) -> None:
        raise NotImplementedError

    def evaluate(self, state, split: str, full: bool = False) -> dict[str, float]:
        raise NotImplementedError

    def cold(self, split: str) -> dict[str, int]:
        """Users and items of ``split`` that training never saw: ``cold_users`` (distinct
        users without a train row), ``cold_user_rows`` (their rows), ``cold_item_rows`` (rows
        whose item has no train row). A model scores them as a cold-start model would (at
        their initial, near-zero embeddings: biases only); the counts say how many there
        are."""
        tu = np.zeros(self.num_users, bool)
        ti = np.zeros(self.num_items, bool)
        tu[self.train_cols["user"]] = True
        ti[self.train_cols["item"]] = True
        u, i = self.eval_rows(split)
        return {"cold_users": int(len(np.unique(u[~tu[u]]))),
                "cold_user_rows": int((~tu[u]).sum()), "cold_item_rows": int((~ti[i]).sum())}

    def check_evaluable(self, split: str) -> dict[str, int]:
        """:meth:`cold` counts, logged; a ValueError when every row of ``split`` belongs to a
        user training never saw (nothing the model learnt would be measured)."""
        c = self.cold(split)
        n = len(self.eval_rows(split)[0])
        if n and c["cold_user_rows"] == n:
            raise ValueError(f"{self.path}: none of the {c['cold_users']} users of the {split} "
                             "split has a train row, so there is nothing to evaluate; check "
                             "that the split files use the same user ids")
        if c["cold_user_rows"] or c["cold_item_rows"]:
            log.warning("%s: %d of %d rows have a user (%d distinct) and %d an item that "
                        "training never saw", split, c["cold_user_rows"], n, c["cold_users"],
                        c["cold_item_rows"])
        return c

    def final(self, state) -> dict[str, float]:
        """``val/*`` and ``test/*`` figures of ``state`` (``perf/*`` for timings), with the
        counts of rows that training never saw (:meth:`cold`)."""
        results = {}
        full = bool(self.tc.full_ranking)
        for s in ("val", "test"):
            if s == "val" and not self.has_val:
                continue
            results.update({f"{s}/{k}": v for k, v in self.cold(s).items()})
            for k, v in self.evaluate(state, s, full=full).items():
                if k.endswith("seconds"):
                    results[f"perf/{s}_{k.replace('/', '_')}"] = v
                elif k not in ("count", "full/count"):
                    results[f"{s}/{k}"] = v
        return results
