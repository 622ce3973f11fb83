"""``task.kind=ctr``: labelled impressions (``label``; ``purchase`` heads from ``event``),
BCE per head; AUC, logloss and calibration (:func:`jaxreco.evaluate.pointwise_eval`). On
``synthetic-ecommerce`` the test figures include the generator's own ceiling
(``test/truth_auc``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from omegaconf import OmegaConf

from jaxreco import evaluate as evaluate_lib, losses, metrics as metrics_lib, models
from jaxreco.data import synthetic
from jaxreco.train.tasks.base import PreparedData, Task
from jaxreco.train.tasks.implicit import check_embed_mlp, reg_term_fn


class CtrTask(Task):
    kind = "ctr"
    headline = ("test/auc", "test/logloss")

    def __init__(self, cfg, data: PreparedData):
        if "label" not in data.schema:
            raise ValueError(f"task.kind=ctr needs a 'label' column; {data.name} "
                             f"({data.path}) has {sorted(data.schema)}")
        super().__init__(cfg, data)
        self.select = cfg.task.select or "auc"
        self.mode = "min" if self.select in ("logloss", "rmse", "mae", "ece") else "max"
        self.train_cols = {c: np.ascontiguousarray(v) for c, v in self.split["train"].items()}

    def model_fn(self):
        check_embed_mlp(self.cfg, self.kind)
        head_bias = {}            # start each click-like head at its training log-odds
        for h in self.cfg.model.heads:
            if h != "rating":
                p = float(np.clip(np.mean(evaluate_lib.head_labels(self.train_cols, h)),
                                  1e-6, 1 - 1e-6))
                head_bias[h] = float(np.log(p / (1 - p)))
        rating = self.train_cols.get("rating")
        return models.build(self.cfg.model, num_users=self.num_users, num_items=self.num_items,
                            global_bias=float(np.mean(rating)) if rating is not None
                            and len(rating) else 0.0, seed=self.cfg.seed,
                            side_vocab=self.side_vocab, context_vocab=self.context_vocab,
                            negatives=False, head_bias=head_bias)

    def loss_fn(self, abstract_model):
        heads = list(self.cfg.model.heads)
        reg_term = reg_term_fn(self.cfg.model, abstract_model, int(self.tc.num_negatives), 1)

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

    def transform(self, batch, step, shard_index):
        batch = dict(batch)
        self.add_side(batch)
        for h in self.cfg.model.heads:
            if h != "rating":
                batch[f"_y_{h}"] = evaluate_lib.head_labels(batch, h)
                if h == "purchase":
                    batch.pop("event", None)
        batch.pop("label", None)
        return batch

    def eval_rows(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Every impression is scored, clicked or not."""
        return np.asarray(self.split[split]["user"]), np.asarray(self.split[split]["item"])

    def setup(self, graphdef, tables, abstract_model, in_sharding, mesh):
        self.graphdef = graphdef
        for s in ("val", "test"):
            if len(self.split[s]["user"]):
                self.check_evaluable(s)

    def evaluate(self, state, split: str, full: bool = False) -> dict[str, float]:
        d = dict(self.split[split])
        self.add_side(d)
        feats = ["user", "item"] + list(self.item_side) + list(self.tc.context_features)
        return evaluate_lib.pointwise_eval(self.graphdef, state, d, features=feats,
                                           batch_size=self.cfg.trainer.eval_batch_size)

    def final(self, state) -> dict[str, float]:
        results = super().final(state)
        if self.cfg.dataset.name == "synthetic-ecommerce":
            results.update(self.truth_ceiling("test"))
        return results

    def truth_ceiling(self, split: str) -> dict[str, float]:
        """The generator's own click probabilities on ``split``: the AUC ceiling a model of
        the pair can reach (``truth_auc``: Bayes score of "any click" given the pair's view
        count; ``truth_auc_per_view``: the per-view probability alone)."""
        raw_u = self.data.table("user_vocab")["raw_id"].astype(np.int64)
        raw_i = self.data.table("item_vocab")["raw_id"].astype(np.int64)
        d = self.split[split]
        g = synthetic.ground_truth(OmegaConf.to_container(self.cfg.dataset, resolve=True),
                                   raw_u[d["user"]], raw_i[d["item"]])
        label = np.asarray(d["label"]) > 0
        p_any = np.clip(g["p_any"], 1e-7, 1 - 1e-7)
        return {f"{split}/truth_auc": metrics_lib.auc(p_any, label),
                f"{split}/truth_auc_per_view": metrics_lib.auc(g["p_view"], label),
                f"{split}/truth_logloss": float(-np.mean(np.where(label, np.log(p_any),
                                                                  np.log1p(-p_any))))}
