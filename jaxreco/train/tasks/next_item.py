"""``task.kind=next_item``: next-item prediction from each user's train sequence
(``model=sequential``), ranked by :class:`jaxreco.evaluate.RankingEvaluator` under the
sampled (stored negatives) and full protocols, like ``task.kind=implicit``.

**Sequences.** A user's sequence is their train interactions (``label > 0`` when the data
has labels) in ``(timestamp, row)`` order; the val/test splits are never part of it, so a
held-out item is never an input. Evaluation encodes the latest ``L`` train items (with
their event types and time gaps when the model uses them).

**Examples.** One example per user with at least two train items per epoch: ``L + 1``
consecutive items ``s_0 … s_L``, inputs ``s_0 … s_{L-1}`` (left-padded with -1), and every
input position ``t`` predicts ``s_{t+1}`` (causal attention). ``task.next_item.crop=last``
takes the latest ``L + 1`` items (SASRec); ``random`` a window ending at a position drawn
uniformly from ``[min(n, L+1), n]`` each time the user is batched.

**Losses** over the position outputs ``h_t`` and item vectors ``e_j`` (the item table):

* ``full``: ``−log softmax_j(h_t·e_j)[s_{t+1}]`` over every item;
* ``sampled``: one set ``S`` of ``task.next_item.num_sampled`` items drawn per batch with
  replacement from ``Q`` (``task.sampler``: uniform, or ∝ train count^``task.pop_alpha``),
  shared by every position, and the log-Q corrected softmax (Bengio & Senécal 2008; Yi et
  al. 2019) ``−log [exp(o⁺) / (exp(o⁺) + Σ_{j∈S, j≠s_{t+1}} exp(o_j))]`` with
  ``o_j = h_t·e_j − log Q(j)`` (sampled copies of the target are removed);

plus ``model.reg · (‖e_{s_t}‖² + ‖e_{s_{t+1}}‖²)`` per position, averaged over the valid
positions of the batch.

Everything random (crop windows, sampled items, dropout) is drawn from
``default_rng([seed, step, shard])``, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxreco import models
from jaxreco.train.tasks.base import PreparedData, Task
from jaxreco.train.tasks.implicit import rankers, ranking_figures

log = logging.getLogger("jaxreco")
_NEG = -1e9


def check_sequential(cfg) -> None:
    if cfg.model.name != "sequential":
        raise ValueError(f"task.kind=next_item needs model=sequential; got model.name="
                         f"{cfg.model.name!r}")


class Sequences:
    """Per-user train sequences in ``(timestamp, row)`` order, as CSR arrays.

    ``item``, ``event`` (data event + 1; 0 = unknown) and ``gap`` (seconds since the user's
    previous train interaction, 0 for the first) are concatenated per user; user ``u``'s
    sequence is ``[start[u], start[u + 1])``.
    """

    def __init__(self, user: np.ndarray, item: np.ndarray, num_users: int,
                 timestamp: np.ndarray | None = None, event: np.ndarray | None = None):
        user = np.asarray(user, np.int64)
        row = np.arange(len(user))
        ts = np.zeros(len(user), np.int64) if timestamp is None else np.asarray(timestamp, np.int64)
        order = np.lexsort((row, ts, user))
        self.user = user[order]
        self.item = np.asarray(item, np.int32)[order]
        self.event = (np.zeros(len(user), np.int32) if event is None
                      else np.asarray(event, np.int32)[order] + 1)
        ts = ts[order]
        first = np.ones(len(user), bool)
        first[1:] = self.user[1:] != self.user[:-1]
        gap = np.zeros(len(user), np.float32)
        gap[1:] = (ts[1:] - ts[:-1]).astype(np.float32)
        self.gap = np.where(first, 0.0, gap).astype(np.float32)
        self.start = np.searchsorted(self.user, np.arange(num_users + 1)).astype(np.int64)
        self.length = np.diff(self.start)

    def window(self, users: np.ndarray, end: np.ndarray, width: int):
        """``(item, event, gap)``, each ``[len(users), width]``: the ``width`` items of each
        user ending before position ``end`` (exclusive) of their sequence, left-padded with
        item -1 / event 0 / gap 0."""
        pos = np.asarray(end, np.int64)[:, None] - width + np.arange(width)
        valid = pos >= 0
        g = self.start[np.asarray(users, np.int64)][:, None] + np.maximum(pos, 0)
        g = np.minimum(g, max(len(self.item) - 1, 0))
        if not len(self.item):
            z = np.zeros(pos.shape)
            return (np.full(pos.shape, -1, np.int32), z.astype(np.int32), z.astype(np.float32))
        return (np.where(valid, self.item[g], -1).astype(np.int32),
                np.where(valid, self.event[g], 0).astype(np.int32),
                np.where(valid, self.gap[g], 0.0).astype(np.float32))

    def latest(self, width: int):
        """``(item, event, gap)`` ``[num_users, width]``: every user's latest ``width``."""
        users = np.arange(len(self.length))
        return self.window(users, self.length, width)


class NextItemTask(Task):
    kind = "next_item"
    headline = ("test/hr@10", "test/ndcg@10", "test/full/hr@10", "test/full/ndcg@10")

    def __init__(self, cfg, data: PreparedData):
        super().__init__(cfg, data)
        check_sequential(cfg)
        self.select = cfg.task.select or "ndcg@10"
        self.mode = "min" if self.select in ("logloss", "rmse", "mae", "ece") else "max"
        ni = cfg.task.next_item
        self.loss_kind = str(getattr(ni.loss, "value", ni.loss))
        self.crop = str(getattr(ni.crop, "value", ni.crop))
        self.max_len = int(cfg.model.max_len)
        schema = data.schema
        if cfg.model.gaps and "timestamp" not in schema:
            raise ValueError(f"model.gaps=true needs timestamps; {data.path}/metadata.json has "
                             f"no timestamp column (columns {sorted(schema)})")
        if cfg.model.events and "event" not in schema:
            raise ValueError(f"model.events=true needs an event column; {data.path}/"
                             f"metadata.json has none (columns {sorted(schema)})")
        tr = self.split["train"]
        self._train_rows = tr["label"] > 0 if self.has_label else slice(None)
        user = np.asarray(tr["user"])[self._train_rows]
        item = np.asarray(tr["item"])[self._train_rows]
        ts = self.train_timestamps()
        event = np.asarray(tr["event"])[self._train_rows] if "event" in schema else None
        if event is not None and len(event) and event.min() < 0:
            raise ValueError(f"{data.path}: event column has a negative value {event.min()}")
        self.seq = Sequences(user, item, self.num_users, ts, event)
        self.num_events = (int(self.seq.event.max()) + 1 if len(self.seq.event) else 1)
        if event is not None:
            ev = np.concatenate([np.asarray(self.split[s]["event"]) for s in ("train", "val", "test")])
            self.num_events = max(self.num_events, int(ev.max()) + 2 if len(ev) else 1)
        trainable = np.flatnonzero(self.seq.length >= 2).astype(np.int32)
        if not len(trainable):
            raise ValueError(f"{data.path}: no user has two train interactions, so there is no "
                             "next item to learn")
        self.train_cols = {"user": trainable}
        self.train_items = item.astype(np.int32)
        counts = np.bincount(item, minlength=self.num_items).astype(np.float64)
        sampler = str(getattr(cfg.task.sampler, "value", cfg.task.sampler))
        q = (np.ones(self.num_items) if sampler == "uniform"
             else np.power(counts, float(cfg.task.pop_alpha)) + 1e-12)
        self.proposal = q / q.sum()
        self.candidates = {s: data.load(f"{s}_candidates") for s in ("val", "test")
                           if s in data.meta.get("candidates", {})}

    def log_summary(self) -> None:
        super().log_summary()
        n = self.seq.length
        mean_len = float(np.mean(n[n > 0])) if (n > 0).any() else 0.0
        log.info(
            "next_item: %d users with >= 2 train items, mean train sequence %.1f, L=%d, "
            "loss %s, crop %s", len(self.train_cols["user"]), mean_len, self.max_len,
            self.loss_kind, self.crop)

    def cold(self, split: str) -> dict[str, int]:
        tu = self.seq.length > 0
        ti = np.zeros(self.num_items, bool)
        ti[self.train_items] = True
        u, i = self.eval_rows(split)
        return {"cold_users": int(len(np.unique(u[~tu[u]]))),
                "cold_user_rows": int((~tu[u]).sum()), "cold_item_rows": int((~ti[i]).sum())}

    def model_fn(self):
        check_sequential(self.cfg)
        return models.build(self.cfg.model, num_users=self.num_users, num_items=self.num_items,
                            global_bias=0.0, seed=self.cfg.seed, num_events=self.num_events)

    # ------------------------------------------------------------------ training
    def _cand_len(self) -> int:
        if self.loss_kind == "full":
            return models.pad_rows(self.num_items, 128)
        return int(self.tc.next_item.num_sampled)

    def transform(self, batch, step, shard_index):
        users = np.asarray(batch["user"])
        rng = np.random.default_rng([int(self.cfg.seed), int(step), int(shard_index)])
        n = self.seq.length[users]
        L = self.max_len
        if self.crop == "random":
            end = rng.integers(np.minimum(n, L + 1), n + 1)
        else:
            end = n
        it, ev, gp = self.seq.window(users, end, L + 1)
        seq = it[:, :-1]
        target = np.where(seq >= 0, it[:, 1:], -1)
        out = {"user": users, "seq_item": seq.reshape(-1), "item": target.reshape(-1),
               "dropout_seed": rng.integers(0, 2 ** 31 - 1, len(users)).astype(np.int32)}
        mc = self.cfg.model
        if mc.events:
            out["seq_event"] = ev[:, :-1].reshape(-1)
        if mc.gaps:
            out["seq_gap"] = gp[:, :-1].reshape(-1)
        if self.loss_kind == "full":
            cand = np.full(self._cand_len(), -1, np.int32)
            cand[:self.num_items] = np.arange(self.num_items, dtype=np.int32)
        else:
            cand = rng.choice(self.num_items, size=self._cand_len(),
                              p=self.proposal).astype(np.int32)
        out["cand_item"] = cand
        return out

    def loss_fn(self, abstract_model):
        sampled = self.loss_kind == "sampled"
        logq = jnp.asarray(np.log(self.proposal), jnp.float32)
        d = int(abstract_model.dim)
        reg = float(self.cfg.model.reg)

        def loss_fn(model, rows, batch):
            items, events, gaps = model.sequence_inputs(batch)
            r = rows["item_embed"]["seq_item"].reshape(items.shape + (d,))
            h = model.encode_rows(r, items, events, gaps, deterministic=False,
                                  dropout_seeds=batch["dropout_seed"]).reshape(-1, d)
            tgt, cid = batch["item"], batch["cand_item"]
            valid = tgt >= 0
            pos = jnp.sum(h * rows["item_embed"]["item"], axis=-1)
            logits = h @ rows["item_embed"]["cand_item"].T
            if sampled:
                logits = logits - logq[jnp.maximum(cid, 0)][None]
                pos = pos - logq[jnp.maximum(tgt, 0)]
                drop = (cid[None, :] == tgt[:, None]) | (cid[None, :] < 0)
                logits = jnp.where(drop, _NEG, logits)
                lse = jax.nn.logsumexp(jnp.concatenate([pos[:, None], logits], axis=1), axis=1)
            else:
                lse = jax.nn.logsumexp(jnp.where(cid[None, :] >= 0, logits, _NEG), axis=1)
            per = lse - pos
            if reg:
                per = per + reg * (jnp.sum(jnp.square(rows["item_embed"]["item"]), -1)
                                   + jnp.sum(jnp.square(rows["item_embed"]["seq_item"]), -1))
            per = jnp.where(valid, per, 0.0)
            n = jnp.maximum(jnp.sum(valid), 1)
            return jnp.sum(per) / n, {}
        return loss_fn

    # ------------------------------------------------------------------ evaluation
    def user_features(self) -> dict[str, np.ndarray]:
        """``seq_item`` (and ``seq_event``/``seq_gap``) ``[num_users, L]``: every user's
        latest ``L`` train interactions, the encoder's input at evaluation."""
        it, ev, gp = self.seq.latest(self.max_len)
        out = {"seq_item": it}
        if self.cfg.model.events:
            out["seq_event"] = ev
        if self.cfg.model.gaps:
            out["seq_gap"] = gp
        return out

    def setup(self, graphdef, tables, abstract_model, in_sharding, mesh):
        self.rankers = rankers(self, graphdef, abstract_model,
                               (self.seq.user, self.seq.item.astype(np.int64)),
                               self.seq.length > 0, user_features=self.user_features())

    def evaluate(self, state, split: str, full: bool = False) -> dict[str, float]:
        return ranking_figures(self, state, split, full)
