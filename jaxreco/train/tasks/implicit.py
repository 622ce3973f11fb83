"""``task.kind=implicit``: every train interaction (``label > 0`` when the data has labels)
a positive, ``task.num_negatives`` sampled negatives per positive, BCE or BPR; ranked by
:class:`jaxreco.evaluate.RankingEvaluator` under the sampled (stored negatives) and full
protocols.

Negatives are drawn in numpy from ``default_rng([seed, step, shard])`` — a function of the
step, so a resumed run draws the same ones — uniformly or by popularity, redrawn while they
are train positives of that user (:class:`jaxreco.data.negatives.TrainingNegatives`).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxreco import evaluate as evaluate_lib, losses, models
from jaxreco.data.negatives import TrainingNegatives
from jaxreco.train.tasks.base import PreparedData, Task


def row_norms(rows, tables, k: int, item_side=(), user_weight: int = 1) -> jax.Array:
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


def reg_term_fn(model_cfg, abstract_model, k: int, user_weight: int):
    """``rows -> per-example λ Σ‖row‖² + λ_b Σ b²`` over the rows an example touches."""
    emb = tuple(abstract_model.embedding_tables)
    bias_t = tuple(t for t in abstract_model.table_features if t not in emb)
    item_side = set(abstract_model.item_features)

    def reg_term(rows):
        r = 0.0
        if model_cfg.reg:
            r = r + model_cfg.reg * row_norms(rows, emb, k, item_side, user_weight)
        if model_cfg.bias_reg and bias_t:
            r = r + model_cfg.bias_reg * row_norms(rows, bias_t, k, item_side, user_weight)
        return r
    return reg_term


def check_embed_mlp(cfg, kind: str) -> None:
    if cfg.model.name != "embed_mlp":
        raise ValueError(f"task.kind={kind} needs model=embed_mlp (its combiner: dot = MF); "
                         f"got model.name={cfg.model.name!r}")



def rankers(task: Task, graphdef, abstract_model, seen, warm: np.ndarray,
            **evaluator_kw) -> dict[str, evaluate_lib.RankingEvaluator]:
    """A :class:`~jaxreco.evaluate.RankingEvaluator` per held-out split of ``task``.

    ``seen``: the ``(user, item)`` interactions excluded from full ranking (training's);
    ``warm``: bool [num_users], users with something learnt. A user without it has no learnt
    vector: ranked by nothing the model learnt, such rows are left out (counted in
    ``<split>/cold_*``). Testing excludes the val interactions too: they are known before the
    test item."""
    out = {}
    seen = tuple(seen)
    for s in ("val", "test"):
        if not len(task.split[s]["user"]):
            continue
        held = task.positives(s)
        task.check_evaluable(s)
        ranked = tuple(x[warm[held[0]]] for x in held)
        cand = task.candidates.get(s)
        if cand is not None:
            cand = {k: v[warm[cand["user"]]] for k, v in cand.items()}
        out[s] = evaluate_lib.RankingEvaluator(
            graphdef, abstract_model, num_users=task.num_users, num_items=task.num_items,
            seen=seen, held_out=ranked, candidates=cand, ks=task.ks,
            chunk_elements=int(task.tc.eval_chunk_elements), **evaluator_kw)
        seen = (np.concatenate([seen[0], held[0]]), np.concatenate([seen[1], held[1]]))
    return out


def ranking_figures(task: Task, state, split: str, full: bool = False) -> dict[str, float]:
    """Sampled figures (when the split has stored candidates) and full-ranking ones (when
    asked, or without candidates; ``full/seconds`` their time) of ``task.rankers[split]``."""
    r = task.rankers[split]
    out = {}
    if split in task.candidates:
        out.update(r.sampled(state))
    if full or split not in task.candidates:
        t = time.time()
        out.update({f"full/{k}": v for k, v in r.full(state).items()})
        out["full/seconds"] = time.time() - t
    return out

class ImplicitTask(Task):
    kind = "implicit"
    headline = ("test/hr@10", "test/ndcg@10", "test/full/hr@10", "test/full/ndcg@10")

    def __init__(self, cfg, data: PreparedData):
        super().__init__(cfg, data)
        self.select = cfg.task.select or "ndcg@10"
        self.mode = "min" if self.select in ("logloss", "rmse", "mae", "ece") else "max"
        if cfg.task.num_negatives < 1:
            raise ValueError(f"task.num_negatives={cfg.task.num_negatives}: implicit training "
                             "needs at least 1 negative per positive")
        tr = self.split["train"]
        self._train_rows = tr["label"] > 0 if self.has_label else slice(None)
        self.train_cols = {c: np.ascontiguousarray(tr[c][self._train_rows], np.int32)
                           for c in ("user", "item")}
        self.negatives = TrainingNegatives(
            self.train_cols["user"], self.train_cols["item"], self.num_items,
            sampler=getattr(cfg.task.sampler, "value", cfg.task.sampler), pop_alpha=float(cfg.task.pop_alpha),
            exclude_positives=bool(cfg.task.exclude_positives))
        self.candidates = {s: data.load(f"{s}_candidates") for s in ("val", "test")
                           if s in data.meta.get("candidates", {})}

    def model_fn(self):
        check_embed_mlp(self.cfg, self.kind)
        heads = list(self.cfg.model.heads)
        if heads[0] != "click":
            raise ValueError(f"task.kind=implicit scores with the first head; model.heads="
                             f"{heads} must start with 'click'")
        return models.build(self.cfg.model, num_users=self.num_users, num_items=self.num_items,
                            global_bias=0.0, seed=self.cfg.seed, side_vocab=self.side_vocab,
                            context_vocab=self.context_vocab, negatives=True)

    def loss_fn(self, abstract_model):
        mc, tc = self.cfg.model, self.tc
        k = int(tc.num_negatives)
        reg_per = mc.get("reg_per", "positive")
        if reg_per not in ("positive", "pair"):
            raise ValueError(f"model.reg_per={reg_per!r}: must be 'positive' or 'pair'")
        # user-side rows are shared by the positive and its k negatives
        reg_term = reg_term_fn(mc, abstract_model, k, 1 + k if reg_per == "pair" else 1)

        def loss_fn(model, rows, batch):
            u = model.user_repr(rows, batch)
            pos = model.interact(u, model.item_repr(rows), "point")["click"]
            neg_i = jax.tree.map(lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]),
                                 model.item_repr(rows, "neg_"))
            neg = model.interact(u, neg_i, "rows")["click"]
            per = losses.sampled_implicit(pos, neg, tc.loss) + reg_term(rows)
            return jnp.mean(per), {}
        return loss_fn

    def transform(self, batch, step, shard_index):
        batch = dict(batch)
        self.add_side(batch)
        rng = np.random.default_rng([int(self.cfg.seed), int(step), int(shard_index)])
        batch["neg_item"] = self.negatives.draw(batch["user"], int(self.tc.num_negatives), rng)
        self.add_side(batch, "neg_")
        return batch

    def setup(self, graphdef, tables, abstract_model, in_sharding, mesh):
        warm = np.zeros(self.num_users, bool)
        warm[self.train_cols["user"]] = True
        self.rankers = rankers(self, graphdef, abstract_model, self.positives("train"), warm,
                               item_side=self.item_side)

    def evaluate(self, state, split: str, full: bool = False) -> dict[str, float]:
        return ranking_figures(self, state, split, full)
