"""The training loop: one linear function, phases marked by banner comments.

``train_and_evaluate(cfg, workdir)`` runs data → state → (resume) → compile → train with
per-epoch validation, early stopping and checkpoints → test with the best checkpoint, and
writes into ``workdir``:

* ``config.yaml``   the resolved config;
* ``splits.json``   sizes and sha256 of each split;
* ``metrics.json``  final figures (flat, namespaced keys; ``perf/*`` are wall-clock
                    measurements, every other key is a deterministic function of the config);
* ``checkpoints/``  Orbax steps (state + data iterator + loop bookkeeping);
* ``tb/``           TensorBoard events.

``cfg.task.kind`` picks what is learnt (:data:`TASKS`): ``rating`` (explicit MF, the
registry loader's random split, RMSE/MAE — unchanged), ``implicit`` (sampled negatives,
BCE/BPR, sampled + full ranking metrics) or ``ctr`` (labelled impressions, BCE,
AUC/logloss/calibration). The two last read a dataset prepared by ``jaxreco.data.prepare``;
every task shares the loop below: resume, SIGTERM, checkpoints, multi-process batches.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from jaxreco import evaluate as evaluate_lib, losses, metrics as metrics_lib, models, optim, tracking
from jaxreco.checkpoint import Checkpointer, abstract_like
from jaxreco.data import pipeline, registry, split as split_lib
from jaxreco.data.dataset import Interactions
from jaxreco.data.negatives import PositiveSet
from jaxreco.embedding import ShardedTables
from jaxreco.sharding import batch_sharding, make_mesh
from jaxreco.train.state import create_state, table_axes
from jaxreco.train.step import make_eval_step, make_train_step

log = logging.getLogger("jaxreco")


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temp file + rename): a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _columns(x: Interactions) -> dict[str, np.ndarray]:
    return {"user": x.user, "item": x.item, "rating": x.rating}


def process_batch_shard(sharding, batch_size: int) -> tuple[int, int]:
    """``(shard_index, shard_count)``: the contiguous slice of every global batch whose rows
    this process's devices hold under ``sharding`` (the whole batch when it is replicated)."""
    idx = sharding.addressable_devices_indices_map((batch_size,)).values()
    if not idx:
        raise ValueError(f"mesh {dict(sharding.mesh.shape)} holds none of process "
                         f"{jax.process_index()}'s devices; with {jax.process_count()} processes "
                         "use a mesh over all devices (e.g. mesh=dp, mesh=dp_mp; -1 = the rest)")
    starts = sorted({(i[0].start or 0, i[0].stop or batch_size) for i in idx})
    lo, hi = starts[0][0], starts[-1][1]
    if hi - lo != sum(b - a for a, b in starts) or batch_size % (hi - lo):
        raise ValueError(f"this process's batch rows {starts} are not one contiguous equal slice")
    return lo // (hi - lo), batch_size // (hi - lo)


def _process_rows(batch: dict[str, np.ndarray], sharding) -> dict[str, np.ndarray]:
    """The rows of a full (every-process) batch that belong to this process."""
    if jax.process_count() == 1:
        return batch
    n = len(next(iter(batch.values())))
    i, c = process_batch_shard(sharding, n)
    return {k: v[i * (n // c):(i + 1) * (n // c)] for k, v in batch.items()}


def _to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array | np.ndarray]:
    """This process's rows -> global arrays. One process: jit transfers numpy itself (cheaper)."""
    if jax.process_count() == 1:
        return batch
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


class PreemptionWatcher:
    """SIGTERM → stop at a step boundary that every process agrees on.

    One process: a signal handler sets a flag, checked after each step. Several: JAX's
    preemption sync point (the coordination service relays the notice so all processes stop
    at the same step, keeping their collectives matched).
    """

    def __init__(self):
        self.flag = False
        self.previous = None
        self.multi = jax.process_count() > 1
        if not self.multi and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def reached(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.flag

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


class Results(dict):
    """The final metrics (what ``metrics.json`` holds), plus :attr:`objective`: the
    validation metric a sweeper minimises (``val/rmse``; ``−val/ndcg@10`` or ``−val/auc``
    for the implicit/ctr tasks; NaN without a validation split)."""

    objective: float = float("nan")


class _Writer:
    """TensorBoard scalars from process 0 only (tensorboardX: no TensorFlow needed)."""

    def __init__(self, logdir: Path | None):
        self.w = None
        if logdir is not None:
            from tensorboardX import SummaryWriter
            self.w = SummaryWriter(str(logdir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.w is not None:
            for k, v in values.items():
                self.w.add_scalar(k.replace("@", "_"), v, step)   # TensorBoard tags: no '@'


    def close(self) -> None:
        if self.w is not None:
            self.w.close()

# ----------------------------------------------------------------------------- tasks
class RatingTask:
    """Explicit ratings: the dataset's random split, MSE + Frobenius, RMSE/MAE."""

    select, mode, has_val = "rmse", "min", True
    headline = ("test/rmse", "test/mae")

    def __init__(self, cfg: DictConfig, workdir: Path, is_main: bool):
        self.cfg = cfg
        data = registry.load(OmegaConf.to_container(cfg.dataset, resolve=True))
        sc = cfg.dataset.split
        if sc.kind != "random":
            raise ValueError(f"dataset.split.kind={sc.kind!r}: this loader supports 'random'")
        splits = split_lib.random_split(data, test_fraction=sc.test_fraction,
                                        val_fraction=sc.val_fraction, seed=sc.seed)
        sha = split_lib.split_sha256(splits)
        train = splits["train"]
        if is_main:
            OmegaConf.save(cfg, workdir / "config.yaml", resolve=True)
            write_json(workdir / "splits.json", {
                "dataset": data.name, "users": data.num_users, "items": data.num_items,
                **{f"{k}/size": len(v) for k, v in splits.items()},
                **{f"{k}/sha256": h for k, h in sha.items()}})
            tracking.write_run_info(cfg, workdir, sha)
        log.info("data %s: %d users, %d items; train %d / val %d / test %d", data.name,
                 data.num_users, data.num_items, len(train), len(splits["val"]),
                 len(splits["test"]))
        self.data, self.splits, self.train_cols = data, splits, _columns(train)

    def model_fn(self):
        return models.build(self.cfg.model, num_users=self.data.num_users,
                            num_items=self.data.num_items,
                            global_bias=float(self.splits["train"].rating.mean()),
                            seed=self.cfg.seed)

    def loss_fn(self, abstract_model):
        cfg = self.cfg
        embedding_tables = tuple(abstract_model.embedding_tables)
        bias_tables = tuple(t for t in abstract_model.table_features
                            if t not in embedding_tables)

        def loss_fn(model, rows, batch):
            pred = model.score(rows, batch)
            loss = losses.mse_frobenius(pred, batch["rating"], rows,
                                        embedding_tables=embedding_tables,
                                        bias_tables=bias_tables,
                                        reg=cfg.model.reg, bias_reg=cfg.model.bias_reg)
            return loss, {}
        return loss_fn

    def setup(self, graphdef, tables, abstract_model, in_sharding, mesh):
        lo, hi = self.cfg.dataset.get("rating_range", None) or (None, None)
        self.eval_step = jax.jit(make_eval_step(graphdef, tables,
                                                (lo, hi) if lo is not None else None))
        self.in_sharding = in_sharding

    def transform(self, batch, step, shard_index):
        return batch

    def evaluate(self, state, split: str) -> dict[str, float]:
        sums = None
        for batch, n in pipeline.eval_batches(_columns(self.splits[split]),
                                              self.cfg.trainer.eval_batch_size):
            batch = _to_global(_process_rows(batch, self.in_sharding), self.in_sharding)
            sums = metrics_lib.merge(sums, jax.device_get(self.eval_step(state, batch, n)))
        return metrics_lib.regression_metrics(sums)

    def final(self, state) -> dict[str, float]:
        results = {"val/" + k: v for k, v in self.evaluate(state, "val").items() if k != "count"}
        results.update({"test/" + k: v for k, v in self.evaluate(state, "test").items()
                        if k != "count"})
        return results


def prepared_dir(cfg: DictConfig) -> str:
    """``task.prepare.output_dir``, or a cache directory named by the dataset and a hash of
    the dataset + prepare options + prepare's version (so differently prepared copies, or
    copies made by code that splits differently, never overwrite each other)."""
    prep = OmegaConf.to_container(cfg.task.prepare, resolve=True) or {}
    if prep.get("output_dir"):
        return str(prep["output_dir"])
    import hashlib
    from jaxreco.data.prepare import PREPARE_VERSION
    ds = OmegaConf.to_container(cfg.dataset, resolve=True)
    key = hashlib.sha256(json.dumps([ds, prep, PREPARE_VERSION], sort_keys=True,
                                    default=str).encode()).hexdigest()
    root = os.environ.get("JAXRECO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "jaxreco")
    return os.path.join(root, "prepared-datasets", f"{ds['name']}-{key[:12]}")


class PreparedTask:
    """``implicit`` and ``ctr`` tasks on a prepared dataset (``jaxreco.data.prepare``).

    Item-side features (``task.side_features``, from ``item_features.parquet``; unknown
    ``-1`` becomes index 0) and context features (``task.context_features``, interaction
    columns) are added to every batch. ``implicit``: each positive (``label > 0`` when the
    data has labels) gets ``k`` negatives drawn in numpy from ``default_rng([seed, step,
    shard])`` — a function of the step, so a resumed run draws the same ones — uniformly or
    by popularity, redrawn (up to 20 times) while they are train positives of that user.
    """

    def __init__(self, cfg: DictConfig, workdir: Path, is_main: bool):
        from jaxreco.data.prepare import load_split, load_table, prepare
        self.cfg, self.tc = cfg, cfg.task
        self.kind = cfg.task.kind
        self.select = cfg.task.select or ("ndcg@10" if self.kind == "implicit" else "auc")
        self.mode = "min" if self.select in ("logloss", "rmse", "mae", "ece") else "max"
        self.ks = tuple(int(k) for k in cfg.task.ks)
        out = prepared_dir(cfg)
        prep = OmegaConf.to_container(cfg.task.prepare, resolve=True) or {}
        prep = {"progress": False, **prep, "output_dir": out}
        meta = prepare({"dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
                        "prepare": prep})
        self.meta, self.path = meta, out
        self.num_users, self.num_items = int(meta["num_users"]), int(meta["num_items"])
        schema = meta["schema"]["interactions"]
        self.has_label = "label" in schema
        if self.kind == "ctr" and not self.has_label:
            raise ValueError(f"task.kind=ctr needs a 'label' column; {meta['dataset']} "
                             f"({out}) has {sorted(schema)}")
        for f in cfg.task.context_features:
            if f not in schema:
                raise ValueError(f"task.context_features: {f!r} is not a column of "
                                 f"{meta['dataset']} ({out}/metadata.json has {sorted(schema)})")
        item_f = load_table(out, "item_features")
        self.item_side, self.side_vocab = {}, {}
        for f in cfg.task.side_features:
            if f not in item_f:
                raise ValueError(f"task.side_features: {f!r} is not in {out}/item_features.parquet"
                                 f" (columns {sorted(item_f)})")
            v = np.asarray(item_f[f]).astype(np.int64) + 1        # -1 (unknown) -> 0
            if (v < 0).any():
                raise ValueError(f"{out}/item_features.parquet: {f} has values below -1")
            self.item_side[f] = v.astype(np.int32)
            self.side_vocab[f] = int(v.max()) + 1
        cols = [c for c in ("user", "item", "label", "rating", "event") if c in schema]
        cols += [c for c in cfg.task.context_features if c not in cols]
        self.split = {s: load_split(out, s, cols) for s in ("train", "val", "test")}
        self.context_vocab = {}
        for f in cfg.task.context_features:
            allv = np.concatenate([np.asarray(self.split[s][f]) for s in self.split])
            if len(allv) and allv.min() < 0:
                raise ValueError(f"{out}: context feature {f} has a negative value {allv.min()}")
            self.context_vocab[f] = int(allv.max()) + 1 if len(allv) else 1
            for s in self.split:
                self.split[s][f] = np.asarray(self.split[s][f], np.int32)
        tr = self.split["train"]
        self._train_rows = slice(None)  # the train rows behind train_cols
        if self.kind == "implicit":
            pos = tr["label"] > 0 if self.has_label else slice(None)
            self._train_rows = pos
            self.train_cols = {"user": np.ascontiguousarray(tr["user"][pos], np.int32),
                               "item": np.ascontiguousarray(tr["item"][pos], np.int32)}
        else:
            self.train_cols = {c: np.ascontiguousarray(v) for c, v in tr.items()}
        self.has_val = len(self.split["val"]["user"]) > 0
        self.candidates = {}
        for s in ("val", "test"):
            if s in meta.get("candidates", {}):
                self.candidates[s] = load_split(out, f"{s}_candidates")
        self.headline = (("test/hr@10", "test/ndcg@10", "test/full/hr@10", "test/full/ndcg@10")
                         if self.kind == "implicit" else ("test/auc", "test/logloss"))
        # negative sampling tables
        ui = self.train_cols
        self.positives = PositiveSet(
            np.unique(ui["user"].astype(np.int64) * self.num_items + ui["item"]))
        counts = np.bincount(ui["item"], minlength=self.num_items).astype(np.float64)
        if cfg.task.sampler == "popularity":
            w = counts ** float(cfg.task.pop_alpha)
            self.neg_cdf = np.cumsum(w) / w.sum()
        elif cfg.task.sampler == "uniform":
            self.neg_cdf = None
        else:
            raise ValueError(f"task.sampler={cfg.task.sampler!r}: must be uniform or popularity")
        if self.kind == "implicit" and cfg.task.num_negatives < 1:
            raise ValueError(f"task.num_negatives={cfg.task.num_negatives}: implicit training "
                             "needs at least 1 negative per positive")
        if is_main:
            OmegaConf.save(cfg, workdir / "config.yaml", resolve=True)
            sha = {s: meta["splits"][s]["sha256"] for s in ("train", "val", "test")}
            write_json(workdir / "splits.json", {
                "dataset": meta["dataset"], "prepared": out, "users": self.num_users,
                "items": self.num_items,
                **{f"{s}/size": meta["splits"][s]["rows"] for s in sha},
                **{f"{s}/sha256": h for s, h in sha.items()},
                **{f"{s}_candidates/sha256": c["sha256"]
                   for s, c in meta.get("candidates", {}).items()}})
            tracking.write_run_info(cfg, workdir, sha)
        log.info("data %s (%s): %d users, %d items; train %d / val %d / test %d", meta["dataset"],
                 out, self.num_users, self.num_items, len(self.train_cols["user"]),
                 len(self.split["val"]["user"]), len(self.split["test"]["user"]))

    def train_timestamps(self) -> np.ndarray | None:
        """int64 timestamps of the rows of ``train_cols`` (None: the data has none); read
        from the prepared train split only when asked (optimizer=ials recency weights)."""
        from jaxreco.data.prepare import load_split
        if "timestamp" not in self.meta["schema"]["interactions"]:
            return None
        ts = load_split(self.path, "train", ["timestamp"])["timestamp"]
        return np.asarray(ts, np.int64)[self._train_rows]

    # ------------------------------------------------------------------ model and loss
    def model_fn(self):
        if self.cfg.model.name != "embed_mlp":
            raise ValueError(f"task.kind={self.kind} needs model=embed_mlp (its combiner: dot = "
                             f"MF); got model.name={self.cfg.model.name!r}")
        heads = list(self.cfg.model.heads)
        if self.kind == "implicit" and heads[0] != "click":
            raise ValueError(f"task.kind=implicit scores with the first head; model.heads="
                             f"{heads} must start with 'click'")
        head_bias = {}
        if self.kind == "ctr":           # start each click-like head at its training log-odds
            tr = self.train_cols
            for h in heads:
                if h != "rating":
                    p = float(np.clip(np.mean(evaluate_lib.head_labels(tr, h)), 1e-6, 1 - 1e-6))
                    head_bias[h] = float(np.log(p / (1 - p)))
        rating = self.train_cols.get("rating")
        return models.build(self.cfg.model, num_users=self.num_users, num_items=self.num_items,
                            global_bias=float(np.mean(rating)) if rating is not None and len(rating)
                            else 0.0, seed=self.cfg.seed, side_vocab=self.side_vocab,
                            context_vocab=self.context_vocab,
                            negatives=self.kind == "implicit", head_bias=head_bias)

    def loss_fn(self, abstract_model):
        mc, tc = self.cfg.model, self.tc
        emb = tuple(abstract_model.embedding_tables)
        bias_t = tuple(t for t in abstract_model.table_features if t not in emb)
        k = int(tc.num_negatives)
        reg_per = mc.get("reg_per", "positive")
        if reg_per not in ("positive", "pair"):
            raise ValueError(f"model.reg_per={reg_per!r}: must be 'positive' or 'pair'")
        # user-side rows are shared by the positive and its k negatives
        user_weight = 1 + k if self.kind == "implicit" and reg_per == "pair" else 1
        item_side = set(abstract_model.item_features)

        def reg_term(rows):
            r = 0.0
            if mc.reg:
                r = r + mc.reg * _row_norms(rows, emb, k, item_side, user_weight)
            if mc.bias_reg and bias_t:
                r = r + mc.bias_reg * _row_norms(rows, bias_t, k, item_side, user_weight)
            return r

        if self.kind == "implicit":
            def loss_fn(model, rows, batch):
                u = model.user_repr(rows, batch)
                pos = model.interact(u, model.item_repr(rows), "point")["click"]
                neg_i = jax.tree.map(lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]),
                                     model.item_repr(rows, "neg_"))
                neg = model.interact(u, neg_i, "rows")["click"]
                per = losses.sampled_implicit(pos, neg, tc.loss) + reg_term(rows)
                return jnp.mean(per), {}
            return loss_fn

        heads = list(mc.heads)

        def loss_fn(model, rows, batch):
            out = model.score_heads(rows, batch)
            per = reg_term(rows)
            for h in heads:
                if h == "rating":
                    per = per + jnp.square(out[h] - batch["rating"])
                else:
                    per = per + losses.bce_with_logits(out[h], batch[f"_y_{h}"])
            return jnp.mean(per), {}
        return loss_fn

    # ------------------------------------------------------------------ batches
    def _sample(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        k, ni = int(self.tc.num_negatives), self.num_items
        n = len(users) * k

        def draw(m):
            if self.neg_cdf is None:
                return rng.integers(0, ni, m)
            return np.minimum(np.searchsorted(self.neg_cdf, rng.random(m), side="right"), ni - 1)
        neg = draw(n)
        if self.tc.exclude_positives:
            uu = np.repeat(users.astype(np.int64), k)
            bad = np.flatnonzero(self.positives.contains(uu * ni + neg))
            for _ in range(20):            # only the redrawn slots are checked again
                if not len(bad):
                    break
                neg[bad] = draw(len(bad))
                bad = bad[self.positives.contains(uu[bad] * ni + neg[bad])]
        return neg.astype(np.int32)

    def _add_side(self, batch, prefix=""):
        for f, v in self.item_side.items():
            batch[prefix + f] = v[batch[prefix + "item"]]

    def transform(self, batch, step, shard_index):
        batch = dict(batch)
        self._add_side(batch)
        if self.kind == "implicit":
            rng = np.random.default_rng([int(self.cfg.seed), int(step), int(shard_index)])
            batch["neg_item"] = self._sample(batch["user"], rng)
            self._add_side(batch, "neg_")
        else:
            for h in self.cfg.model.heads:
                if h != "rating":
                    batch[f"_y_{h}"] = evaluate_lib.head_labels(batch, h)
                    batch.pop("event", None) if h == "purchase" else None
            batch.pop("label", None)
        return batch

    # ------------------------------------------------------------------ evaluation
    def setup(self, graphdef, tables, abstract_model, in_sharding, mesh):
        self.graphdef, self.abstract = graphdef, abstract_model
        self.rankers = {}
        if self.kind != "implicit":
            return
        tr = self.split["train"]
        pos = tr["label"] > 0 if self.has_label else slice(None)
        seen = [np.asarray(tr["user"][pos]), np.asarray(tr["item"][pos])]
        for s in ("val", "test"):
            d = self.split[s]
            if not len(d["user"]):
                continue
            p = d["label"] > 0 if self.has_label else slice(None)
            self.rankers[s] = evaluate_lib.RankingEvaluator(
                graphdef, abstract_model, num_users=self.num_users, num_items=self.num_items,
                seen=tuple(seen), held_out=(d["user"][p], d["item"][p]),
                candidates=self.candidates.get(s), item_side=self.item_side, ks=self.ks,
                chunk_elements=int(self.tc.eval_chunk_elements))
            # testing excludes the val interactions too: they are known before the test item
            seen = [np.concatenate([seen[0], d["user"][p]]), np.concatenate([seen[1], d["item"][p]])]

    def evaluate(self, state, split: str, full: bool = False) -> dict[str, float]:
        if self.kind == "implicit":
            r = self.rankers[split]
            out = {}
            if split in self.candidates:
                out.update(r.sampled(state))
            if full or split not in self.candidates:
                t = time.time()
                out.update({f"full/{k}": v for k, v in r.full(state).items()})
                out["full/seconds"] = time.time() - t
            return out
        d = dict(self.split[split])
        self._add_side(d)
        feats = ["user", "item"] + list(self.item_side) + list(self.tc.context_features)
        return evaluate_lib.pointwise_eval(self.graphdef, state, d, features=feats,
                                           batch_size=self.cfg.trainer.eval_batch_size)

    def final(self, state) -> dict[str, float]:
        results = {}
        full = bool(self.tc.full_ranking)
        for s in ("val", "test"):
            if s == "val" and not self.has_val:
                continue
            for k, v in self.evaluate(state, s, full=full).items():
                if k.endswith("seconds"):
                    results[f"perf/{s}_{k.replace('/', '_')}"] = v
                elif k != "count" and k != "full/count":
                    results[f"{s}/{k}"] = v
        if self.kind == "ctr" and self.cfg.dataset.name == "synthetic-ecommerce":
            results.update(self._truth_ceiling("test"))
        return results

    def _truth_ceiling(self, split: str) -> dict[str, float]:
        """The generator's own click probabilities on ``split``: the AUC ceiling a model of
        the pair can reach (``truth_auc``: Bayes score of "any click" given the pair's view
        count; ``truth_auc_per_view``: the per-view probability alone)."""
        from jaxreco.data import synthetic
        from jaxreco.data.prepare import load_table
        raw_u = load_table(self.path, "user_vocab")["raw_id"].astype(np.int64)
        raw_i = load_table(self.path, "item_vocab")["raw_id"].astype(np.int64)
        d = self.split[split]
        g = synthetic.ground_truth(OmegaConf.to_container(self.cfg.dataset, resolve=True),
                                   raw_u[d["user"]], raw_i[d["item"]])
        label = np.asarray(d["label"]) > 0
        p_any = np.clip(g["p_any"], 1e-7, 1 - 1e-7)
        return {f"{split}/truth_auc": metrics_lib.auc(p_any, label),
                f"{split}/truth_auc_per_view": metrics_lib.auc(g["p_view"], label),
                f"{split}/truth_logloss": float(-np.mean(np.where(label, np.log(p_any),
                                                                  np.log1p(-p_any))))}


def _profile_window(steps) -> tuple[int, int] | None:
    """``trainer.profile_steps`` checked: ``[first, last)`` with ``0 <= first < last``."""
    if steps is None:
        return None
    steps = list(steps)
    if (len(steps) != 2 or not all(isinstance(s, int) for s in steps)
            or not 0 <= steps[0] < steps[1]):
        raise ValueError(f"trainer.profile_steps={steps}: must be [first, last) with "
                         "0 <= first < last (train step numbers)")
    return steps[0], steps[1]


def _row_norms(rows, tables, k: int, item_side=(), user_weight: int = 1) -> jax.Array:
    """Per-positive ``Σ‖row‖²`` over ``tables``; ``neg_*`` rows ([B·k]) summed per positive;
    rows of features other than the item's (``item_side``) weighted by ``user_weight``."""
    total = 0.0
    for t in tables:
        for f, r in rows[t].items():
            sq = jnp.sum(r * r, axis=-1)
            if f.startswith("neg_"):
                sq = jnp.sum(sq.reshape(-1, k), axis=-1)
            elif user_weight != 1 and f not in item_side:
                sq = user_weight * sq
            total = total + sq
    return total


TASKS = {"rating": RatingTask, "implicit": PreparedTask, "ctr": PreparedTask}


def train_and_evaluate(cfg: DictConfig, workdir: str | os.PathLike) -> dict[str, float]:
    t_start = time.time()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    if not is_main:                       # one voice: other processes log warnings only
        log.setLevel(logging.WARNING)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"missing mandatory config values (???): {', '.join(missing)}; set "
                         "them on the command line, e.g. " + f"{missing[0]}=...")
    tc = cfg.trainer
    profile = _profile_window(tc.profile_steps)

    # ------------------------------------------------------------------ data
    kind = cfg.task.kind
    if kind not in TASKS:
        raise ValueError(f"task.kind={kind!r}: must be one of {list(TASKS)}")
    task = TASKS[kind](cfg, workdir, is_main)
    train_cols = task.train_cols

    # ------------------------------------------------------------------ mesh, model, state
    mesh = make_mesh(cfg.mesh.axes)
    rules = dict(cfg.mesh.rules)
    model_fn = task.model_fn()
    n_train = len(next(iter(train_cols.values())))
    # optimizer=ials: one step = one epoch of alternating least squares over whole tables
    solver = cfg.optimizer.name == "ials"
    if solver and kind != "implicit":
        raise ValueError(f"optimizer=ials fits implicit feedback; task.kind={kind!r} needs a "
                         "gradient optimizer (sgd, adagrad, lazy_adam, adam)")
    steps_per_epoch = 1 if solver else pipeline.batches_per_epoch(n_train, tc.batch_size)
    examples_per_step = n_train if solver else tc.batch_size
    # rates decay over the configured epochs (not max_steps: a run stopped early and resumed
    # follows the same schedule as an uninterrupted one)
    sched = cfg.optimizer.get("schedule", "constant")
    table_lr = optim.schedule(cfg.optimizer.lr, sched, tc.epochs * steps_per_epoch)
    row_opt = optim.row_optimizer(cfg.optimizer.name, lr=table_lr)
    dense_tx = optim.dense_optimizer(
        cfg.optimizer.dense_name,
        optim.schedule(cfg.optimizer.dense_lr, sched, tc.epochs * steps_per_epoch))
    graphdef, state, shardings = create_state(model_fn, row_opt, dense_tx, mesh, rules)
    abstract_model = nnx.eval_shape(model_fn)
    table_features = dict(abstract_model.table_features)
    tables = ShardedTables(mesh, rules, table_axes(state.tables), table_features, row_opt)
    loss_fn = task.loss_fn(abstract_model)

    # ------------------------------------------------------------------ input pipeline
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    in_sharding = batch_sharding(mesh, rules)
    shard_index, shard_count = process_batch_shard(in_sharding, tc.batch_size)
    # optimizer=ials reads whole tables, not batches: no input pipeline (nor a batch size
    # that must fit the data)
    data_iter = None if solver else iter(pipeline.train_dataset(
        train_cols, batch_size=tc.batch_size, num_epochs=tc.epochs, seed=cfg.seed,
        shard_index=shard_index, shard_count=shard_count))

    # ------------------------------------------------------------------ resume
    # Order: fresh state and iterator above; then the newest readable checkpoint step
    # replaces state, iterator position and loop bookkeeping together.
    select, mode = task.select, task.mode
    ckpt = Checkpointer(workdir / "checkpoints", keep=tc.keep_checkpoints,
                        best_metric=f"val/{select}" if task.has_val else None, best_mode=mode,
                        async_save=tc.async_checkpoint) if tc.checkpoint else None
    loop = {"step": 0, "best_val": math.inf if mode == "min" else -math.inf, "best_step": -1,
            "bad_epochs": 0,
            "loss_sum": 0.0, "loss_count": 0, "last_loss": float("nan"), "history": []}
    abstract_state = abstract_like(state, shardings)
    if ckpt is not None:
        restored = ckpt.restore_latest(abstract_state, data_iter)
        if restored is not None:
            state, loop = restored
            log.info("resumed from %s step %d", ckpt.directory, loop["step"])
    if loop["step"] == 0 and (cfg.model.get("pretrained_gmf") or cfg.model.get("pretrained_mlp")):
        from jaxreco.train.pretrained import neumf_from_runs
        state = neumf_from_runs(state, cfg)

    # ------------------------------------------------------------------ compile
    if solver:
        from jax.sharding import NamedSharding, PartitionSpec
        from jaxreco.train import ials
        ut, it, ib = ials.check_model(cfg.model, abstract_model)
        dim = int(abstract_model.user_mf.shape[1])
        oc = cfg.optimizer
        conf = None
        if float(oc.recency_weight):
            timestamps = task.train_timestamps()
            if timestamps is None:
                raise ValueError(f"optimizer.recency_weight={oc.recency_weight} needs "
                                 f"timestamps; dataset {cfg.dataset.name!r} has no timestamp "
                                 "column (set optimizer.recency_weight=0, or for from-files "
                                 "name it: dataset.columns.timestamp=<column>)")
            conf = ials.recency_weights(train_cols["user"], timestamps,
                                        strength=float(oc.recency_weight),
                                        half_life=float(oc.recency_half_life))
        users = ials.group_rows(train_cols["user"], train_cols["item"], task.num_users,
                                task.num_items, pad_row=int(abstract_model.user_mf.shape[0]),
                                dim=dim, weights=conf)
        items = ials.group_rows(train_cols["item"], train_cols["user"], task.num_items,
                                task.num_users, pad_row=int(abstract_model.item_mf.shape[0]),
                                dim=dim, weights=conf)
        ials_data = jax.device_put(ials.epoch_data(users, items),
                                   NamedSharding(mesh, PartitionSpec()))
        train_step = jax.jit(ials.make_epoch(users, items, user_table=ut, item_table=it,
                                             alpha0=float(oc.unobserved_weight),
                                             reg=float(cfg.model.reg),
                                             nu=float(oc.reg_exponent),
                                             item_bias_table=ib,
                                             pop_exponent=float(oc.unobserved_exponent)),
                             out_shardings=(shardings, None), donate_argnums=0)
        log.info("ials: %d users, %d items, %d positives (%d padded slots per half-epoch)",
                 task.num_users, task.num_items, users.nnz, max(users.padded, items.padded))
    else:
        train_step = jax.jit(make_train_step(graphdef, tables, loss_fn, dense_tx),
                             in_shardings=(shardings, in_sharding),
                             out_shardings=(shardings, None), donate_argnums=0)
    task.setup(graphdef, tables, abstract_model, in_sharding, mesh)
    # Fake CPU devices share cores; bounding in-flight steps keeps collectives from timing out.
    sync_each_step = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"

    # ------------------------------------------------------------------ train
    writer = _Writer(workdir / "tb" if (is_main and cfg.logger.tensorboard) else None)
    step = int(loop["step"])
    pending: list[jax.Array] = []
    train_seconds, train_examples = 0.0, 0
    bar = tqdm(total=total_steps, initial=step, disable=not (is_main and tc.progress_bar),
               desc="train", unit="step", dynamic_ncols=True)
    t_mark, examples_since = time.time(), 0
    stopped_early = step < total_steps and loop["bad_epochs"] >= tc.patience
    preemption = PreemptionWatcher()
    if profile and profile[1] > total_steps:
        raise ValueError(f"trainer.profile_steps={list(profile)}: the run has only "
                         f"{total_steps} steps")
    tracing = False

    def flush_losses() -> None:
        if pending:
            loop["loss_sum"] += float(np.sum(jax.device_get(pending)))
            loop["loss_count"] += len(pending)
            pending.clear()

    while step < total_steps and not stopped_early:
        if profile and step == profile[0]:
            jax.block_until_ready(state)
            jax.profiler.start_trace(str(workdir / "tb"))
            tracing = True
        if solver:
            state, m = train_step(state, ials_data)
        else:
            batch = _to_global(task.transform(next(data_iter), step, shard_index), in_sharding)
            state, m = train_step(state, batch)
        if sync_each_step:
            jax.block_until_ready(state)
        step += 1
        if tracing and step == profile[1]:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            tracing = False
            log.info("profiled steps [%d, %d) -> %s", profile[0], profile[1], workdir / "tb")
        pending.append(m["loss"])
        examples_since += examples_per_step
        bar.update(1)
        end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
        if step % tc.log_every_steps == 0 or end_of_epoch:
            flush_losses()
            loop["last_loss"] = loop["loss_sum"] / loop["loss_count"]
            loop["loss_sum"], loop["loss_count"] = 0.0, 0
            dt = time.time() - t_mark
            train_seconds += dt
            train_examples += examples_since
            writer.scalars(step, {"train/loss": loop["last_loss"],
                                  "perf/examples_per_sec": examples_since / max(dt, 1e-9),
                                  **({} if solver else
                                     {"learning/lr": float(optim.lr_at(table_lr, step))})})
            bar.set_postfix(loss=f"{loop['last_loss']:.4f}")
            t_mark, examples_since = time.time(), 0
        loop["step"] = step
        if end_of_epoch:
            # ---------------------------------------------------------- validate
            val = task.evaluate(state, "val") if task.has_val else None
            if val is not None:
                writer.scalars(step, {f"eval/val/{k}": v for k, v in val.items() if k != "count"})
                v = val[select]
                improved = v < loop["best_val"] if mode == "min" else v > loop["best_val"]
                if improved:
                    loop.update(best_val=v, best_step=step, bad_epochs=0)
                else:
                    loop["bad_epochs"] += 1
                loop["history"].append({"step": step, f"val/{select}": v,
                                        "train/loss": loop["last_loss"]})
                log.info("epoch %g step %d: train/loss %.4f  val/%s %.4f%s",
                         step / steps_per_epoch, step, loop["last_loss"], select, v,
                         "  (best)" if improved else "")
            else:                 # no validation split: the last step is the model tested
                loop.update(best_step=step)
                loop["history"].append({"step": step, "train/loss": loop["last_loss"]})
                log.info("epoch %g step %d: train/loss %.4f", step / steps_per_epoch, step,
                         loop["last_loss"])
            stopped_early = loop["bad_epochs"] >= tc.patience
            if ckpt is not None:
                ckpt.save(step, state, data_iter, loop,
                          metrics={f"val/{select}": val[select]} if val is not None else None)
            if stopped_early:
                log.info("early stop: no val improvement for %d epochs", tc.patience)
            t_mark = time.time()
        elif ckpt is not None and tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0:
            flush_losses()
            ckpt.save(step, state, data_iter, loop)
        # -------------------------------------------------------------- preemption
        if preemption.reached(step):
            flush_losses()
            if ckpt is not None:
                if ckpt.latest_step() != step:
                    ckpt.save(step, state, data_iter, loop)
                ckpt.close()
            bar.close()
            writer.close()
            log.warning("preempted (SIGTERM): saved step %d to %s; rerun the same command "
                        "to resume", step, ckpt.directory if ckpt else "(checkpointing off)")
            raise SystemExit(0)
    if tracing:                            # stopped early inside the profiled window
        jax.profiler.stop_trace()
    bar.close()
    preemption.close()

    # ------------------------------------------------------------------ test the best model
    if ckpt is not None:
        ckpt.wait()
        if loop["best_step"] >= 0 and loop["best_step"] != step:
            state, _ = ckpt.restore(loop["best_step"], abstract_state)
        ckpt.close()
    results = Results(task.final(state))
    sel = results.get(f"val/{select}", float("nan"))
    results.objective = sel if mode == "min" else -sel
    results.update({
        "train/loss": loop["last_loss"], "train/steps": step, "train/best_step": loop["best_step"],
        "train/epochs": step / steps_per_epoch, "train/stopped_early": stopped_early,
        "perf/train_seconds": train_seconds,
        "perf/examples_per_sec": train_examples / max(train_seconds, 1e-9),
        "perf/total_seconds": time.time() - t_start,
    })
    writer.scalars(step, {f"eval/test/{k[5:]}": v for k, v in results.items()
                          if k.startswith("test/")})
    writer.close()
    if is_main:
        if cfg.logger.tensorboard:
            tracking.write_hparams(workdir / "tb", cfg, results)
        write_json(workdir / "metrics.json", results)
    log.info("%s  (best step %d)  -> %s", "  ".join(
        f"{k} {results[k]:.4f}" for k in task.headline if k in results), loop["best_step"],
        workdir / "metrics.json")
    return results
