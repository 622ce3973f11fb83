"""Offline evaluation of embedding models on a prepared dataset (``jaxreco.data.prepare``).

* **Ranking** (:class:`RankingEvaluator`): HR@K, NDCG@K, Recall@K, MRR and item
  coverage@K under two protocols that share one code path
  (:func:`jaxreco.metrics.ranking_sums`):

  - ``full``: each user with a held-out item ranks every item they did not interact with
    before the evaluated split (train; and val when testing), in chunks of users on device
    — ``[users, items]`` score blocks of bounded size, so 10^5+ items fit;
  - ``sampled``: each held-out row ranks its item against the fixed negatives stored with
    the split (the NCF protocol: 1 held-out item + 99 negatives).

* **Pointwise** (:func:`pointwise_eval`): AUC, logloss and calibration of click logits;
  RMSE/MAE of a rating head.

The model must expose ``user_repr``/``item_repr``/``interact`` (``jaxreco.models.embed_mlp``):
item representations are computed once per evaluation, so a user chunk costs one matmul
(dot) or the MLP layers above the first (mlp).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreco import metrics as metrics_lib
from jaxreco.models.layers import gather_rows, present_features


def _model(graphdef, state):
    return nnx.merge(graphdef, state.tables, state.dense)


def _rows(model, state, batch):
    tables = {t: state.tables[t][...] for t in model.table_features}
    return gather_rows(tables, batch, present_features(model.table_features, batch))


def _pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


class RankingEvaluator:
    """HR/NDCG/Recall/MRR/coverage of one held-out split, full and sampled protocols.

    Args:
      graphdef, abstract_model: the model's graph and ``nnx.eval_shape`` of its constructor.
      seen: ``(user, item)`` columns of every interaction to exclude from full ranking
        (train, plus val when evaluating test).
      held_out: ``(user, item)`` columns of the evaluated split's positives.
      candidates: the split's fixed candidates ``{user, item, negatives [R, n]}`` or None.
      item_side: ``{feature: int array [num_items]}`` item-side features for the model.
      chunk_elements: bound on ``chunk × items`` scores per device block (and on
        ``chunk × items × width`` floats of MLP activations without ``tower_elements``).
      tower_elements: the MLP tower (``mlp``/``both``) runs on blocks of users whose
        ``[users, items, width]`` activations hold about this many floats (a few MiB, so
        they stay in cache) inside one jitted loop per chunk; ``None`` runs it on the
        whole chunk at once (the same numbers, several times slower on CPU).
      user_features: ``{feature: array [num_users, ...]}`` per-user inputs the model's
        ``user_repr(rows, batch)`` reads besides ``user`` (e.g. a sequential model's recent
        items ``seq_item``); each chunk's batch carries the rows of its users.
    """

    def __init__(self, graphdef, abstract_model, *, num_users: int, num_items: int, seen: tuple[np.ndarray, np.ndarray],
                 held_out: tuple[np.ndarray, np.ndarray],
                 candidates: Mapping[str, np.ndarray] | None,
                 item_side: Mapping[str, np.ndarray] | None = None,
                 ks: Sequence[int] = (10,), head: str | None = None,
                 chunk_elements: int = 1 << 25, tower_elements: int | None = 1 << 19,
                 user_features: Mapping[str, np.ndarray] | None = None):
        self.graphdef = graphdef
        self.user_features = {k: np.asarray(v) for k, v in (user_features or {}).items()}
        self.num_users, self.num_items = int(num_users), int(num_items)
        self.ks = tuple(sorted({int(k) for k in ks}))
        if not self.ks or self.ks[0] < 1:
            raise ValueError(f"ranking ks={list(ks)}: need positive integers")
        self.item_side = {k: np.asarray(v, np.int32) for k, v in (item_side or {}).items()}
        abstract = abstract_model
        self.head = head or abstract.heads[0]
        width = max([1] + ([abstract.b_1.shape[0]] if abstract.use_mlp else []))
        self.width = width
        self.chunk_elements = int(chunk_elements)
        self.use_mlp = bool(abstract.use_mlp)
        # users per tower block: a power of two, so it divides the (power-of-two) chunk
        self.tower_users = (None if tower_elements is None or not self.use_mlp else
                            max(1, _pow2(int(tower_elements) // max(1, self.num_items * width) + 1) // 2))
        # ---- full protocol: users with a held-out item, CSR of seen items, relevant matrix
        su, si = (np.asarray(x, np.int64) for x in seen)
        order = np.lexsort((si, su))
        self.seen_user, self.seen_item = su[order], si[order]
        self.seen_start = np.searchsorted(self.seen_user, np.arange(self.num_users + 1))
        hu, hi = (np.asarray(x, np.int64) for x in held_out)
        order = np.lexsort((hi, hu))
        hu, hi = hu[order], hi[order]
        self.users = np.unique(hu)
        cnt = np.bincount(hu, minlength=self.num_users)
        t = max(1, int(cnt.max()) if len(cnt) else 1)
        self.rel = np.zeros((self.num_users, t), np.int32)
        self.rel_mask = np.zeros((self.num_users, t), bool)
        start = np.searchsorted(hu, np.arange(self.num_users + 1))
        pos = np.arange(len(hu)) - start[hu]
        self.rel[hu, pos] = hi
        self.rel_mask[hu, pos] = True
        self.candidates = None if candidates is None else {
            k: np.asarray(candidates[k]) for k in ("user", "item", "negatives")}
        self._jit_items = jax.jit(self._item_reprs)
        self._jit_full = jax.jit(self._full_chunk)
        self._jit_sampled = jax.jit(self._sampled_chunk)

    # ------------------------------------------------------------------ device functions
    def _item_reprs(self, state, item_batch):
        model = _model(self.graphdef, state)
        return model.item_repr(_rows(model, state, item_batch))

    def _user_reprs(self, model, state, users, user_feats=None):
        batch = {"user": users, **(user_feats or {})}
        return model.user_repr(_rows(model, state, batch), batch)

    def _score_all(self, model, u, items):
        """``[C, N]`` scores of every user of ``u`` against all ``items``; the MLP tower
        runs on blocks of ``tower_users`` users in a loop (``lax.map``)."""
        c = jax.tree.leaves(u)[0].shape[0]
        b = self.tower_users
        if b is None or b >= c or c % b:
            return model.interact(u, items, "all")[self.head]
        ub = jax.tree.map(lambda x: x.reshape((c // b, b) + x.shape[1:]), u)
        s = jax.lax.map(lambda blk: model.interact(blk, items, "all")[self.head], ub)
        return s.reshape(c, s.shape[-1])

    def _full_chunk(self, state, items, users, seen_r, seen_c, rel, rel_mask, user_feats):
        model = _model(self.graphdef, state)
        u = self._user_reprs(model, state, users, user_feats)
        scores = self._score_all(model, u, items)
        c = users.shape[0]
        seen = jnp.zeros((c + 1, scores.shape[1]), bool).at[seen_r, seen_c].set(True)[:c]
        cand = ~seen
        sums = metrics_lib.ranking_sums(scores, cand, rel, rel_mask, self.ks)
        top, valid = metrics_lib.top_k_candidates(scores, cand, self.ks[-1])
        return sums, top, valid

    def _sampled_chunk(self, state, items, users, cand_items, valid_rows, user_feats):
        model = _model(self.graphdef, state)
        u = self._user_reprs(model, state, users, user_feats)
        it = jax.tree.map(lambda x: x[cand_items], items)
        scores = model.interact(u, it, "rows")[self.head]
        cand = jnp.broadcast_to(valid_rows[:, None], scores.shape)
        rel = jnp.zeros((scores.shape[0], 1), jnp.int32)
        sums = metrics_lib.ranking_sums(scores, cand, rel, valid_rows[:, None], self.ks)
        top, valid = metrics_lib.top_k_candidates(scores, cand, self.ks[-1])
        return sums, jnp.take_along_axis(cand_items, top, axis=1), valid

    # ------------------------------------------------------------------ host drivers
    def _items(self, state):
        batch = {"item": np.arange(self.num_items, dtype=np.int32),
                 **{f: v[:self.num_items] for f, v in self.item_side.items()}}
        return self._jit_items(state, batch)

    def _chunk(self, n_cols: int, width: int | None = None) -> int:
        w = self.width if width is None else width
        return int(max(8, min(4096, self.chunk_elements // max(1, n_cols * w))))

    def _full_chunk_users(self) -> int:
        """Users per full-ranking chunk: at most ``chunk_elements`` scores (blocked MLP
        tower) or activations (otherwise) per chunk, the users spread evenly over the
        fewest such chunks (so the last one is not mostly padding), a multiple of the
        tower block."""
        n = max(1, len(self.users))
        cmax = self._chunk(self.num_items, 1 if self.tower_users else None)
        c = -(-n // -(-n // max(1, cmax)))
        if self.tower_users:
            c = -(-c // self.tower_users) * self.tower_users
        return c

    def full(self, state) -> dict[str, float]:
        """Full ranking of every not-yet-seen item for each user with a held-out item."""
        items = self._items(state)
        users = self.users
        c = self._full_chunk_users()
        n_chunks = math.ceil(len(users) / c)
        chunks = [users[k * c:(k + 1) * c] for k in range(n_chunks)]
        seen_counts = [int(np.sum(self.seen_start[ch + 1] - self.seen_start[ch])) for ch in chunks]
        p = _pow2(max(seen_counts + [1]))
        sums, tops, valids = None, [], []
        for ch in chunks:
            n = len(ch)
            uu = np.zeros(c, np.int64)
            uu[:n] = ch
            lo, hi = self.seen_start[ch], self.seen_start[ch + 1]
            lens = hi - lo
            rows = np.repeat(np.arange(n), lens)
            idx = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)]) if n else np.zeros(0, int)
            seen_r = np.full(p, c, np.int32)          # padding pairs land in the dropped row c
            seen_c = np.zeros(p, np.int32)
            seen_r[:len(rows)] = rows
            seen_c[:len(rows)] = self.seen_item[idx]
            rel = self.rel[uu]
            rel_mask = self.rel_mask[uu].copy()
            rel_mask[n:] = False
            s, top, valid = self._jit_full(state, items, uu.astype(np.int32), seen_r, seen_c,
                                           rel, rel_mask, self._user_feats(uu))
            sums = self._collect(sums, tops, valids, s, top, valid, n)
        return self._summarize(sums, tops, valids)

    def _user_feats(self, users: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[users] for k, v in self.user_features.items()}

    @staticmethod
    def _collect(sums, tops, valids, s, top, valid, n):
        """Merges one chunk's sums; keeps its first ``n`` (unpadded) top-k lists."""
        top, valid = jax.device_get((top, valid))
        tops.append(top[:n])
        valids.append(valid[:n])
        return metrics_lib.merge(sums, jax.device_get(s))

    def _summarize(self, sums, tops, valids) -> dict[str, float]:
        out = metrics_lib.ranking_metrics(sums)
        out.update(metrics_lib.coverage(np.concatenate(tops), np.concatenate(valids),
                                        self.num_items, self.ks))
        return out

    def sampled(self, state) -> dict[str, float]:
        """Each held-out row's item ranked against its fixed negatives."""
        if self.candidates is None:
            raise ValueError("sampled ranking needs the split's fixed negatives "
                             "(prepare.negatives.num > 0)")
        items = self._items(state)
        cu, ci, neg = (self.candidates[k] for k in ("user", "item", "negatives"))
        cand = np.concatenate([ci[:, None], neg], axis=1).astype(np.int32)
        r = min(self._chunk(cand.shape[1]), _pow2(len(cu)))
        sums, tops, valids = None, [], []
        for start in range(0, len(cu), r):
            n = min(r, len(cu) - start)
            uu = np.zeros(r, np.int32)
            cc = np.zeros((r, cand.shape[1]), np.int32)
            uu[:n], cc[:n] = cu[start:start + n], cand[start:start + n]
            ok = np.arange(r) < n
            s, top, valid = self._jit_sampled(state, items, uu, cc, ok, self._user_feats(uu))
            sums = self._collect(sums, tops, valids, s, top, valid, n)
        return self._summarize(sums, tops, valids)


def pointwise_eval(graphdef, state, cols: Mapping[str, np.ndarray], *,
                   features: Sequence[str], batch_size: int = 65536,
                   label_column: str = "label") -> dict[str, float]:
    """AUC/logloss/calibration of every click-like head, RMSE/MAE of a ``rating`` head.

    ``cols`` holds the features (``user``, ``item``, side/context ones) and the labels;
    heads other than the first are reported as ``<head>/<metric>``.
    """
    fn = jax.jit(lambda state, batch: (lambda m: m.score_heads(_rows(m, state, batch), batch))(
        _model(graphdef, state)))
    n = len(cols["user"])
    outs: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        idx[min(batch_size, n - start):] = start
        batch = {f: cols[f][idx] for f in features}
        res = jax.device_get(fn(state, batch))
        for h, v in res.items():
            outs.setdefault(h, []).append(np.asarray(v)[:min(batch_size, n - start)])
    results: dict[str, float] = {}
    for i, (h, parts) in enumerate(outs.items()):
        z = np.concatenate(parts)
        if h == "rating":
            y = cols["rating"]
            m = {"rmse": float(np.sqrt(np.mean((z - y) ** 2))), "mae": float(np.mean(np.abs(z - y)))}
        else:
            y = head_labels(cols, h, label_column)
            m = metrics_lib.pointwise_metrics(z, y)
        prefix = "" if i == 0 else f"{h}/"
        results.update({prefix + k: v for k, v in m.items() if not (i and k == "count")})
    return results


def head_labels(cols: Mapping[str, np.ndarray], head: str, label_column: str = "label") -> np.ndarray:
    """The 0/1 target of a head: ``click`` ← ``label``; ``purchase`` ← ``event == 3``."""
    if head == "click":
        if label_column not in cols:
            raise ValueError(f"head 'click' needs a {label_column!r} column; the data has "
                             f"{sorted(cols)}")
        return (np.asarray(cols[label_column]) > 0).astype(np.float32)
    if head == "purchase":
        if "event" not in cols:
            raise ValueError(f"head 'purchase' needs an 'event' column; the data has {sorted(cols)}")
        return (np.asarray(cols["event"]) >= 3).astype(np.float32)
    raise ValueError(f"model.heads: {head!r} has no label (click, purchase or rating)")
