"""``task.kind=rating``: explicit ratings, MSE + Frobenius, RMSE/MAE.

The splits are the prepared ones: for MovieLens the rating protocol's random split
(``task.prepare.split.kind=random_global``: one permutation of all ratings, as
:func:`jaxreco.data.split.random_split`), for ``dataset=from-files`` exactly the rows of
the user's train / val / test files.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxreco import losses, metrics as metrics_lib, models
from jaxreco.data import pipeline
from jaxreco.distributed import process_rows, to_global
from jaxreco.train.step import make_eval_step
from jaxreco.train.tasks.base import PreparedData, Task


class RatingTask(Task):
    kind = "rating"
    select, mode = "rmse", "min"
    headline = ("test/rmse", "test/mae")
    base_columns = ("user", "item", "rating")

    def __init__(self, cfg, data: PreparedData):
        if "rating" not in data.schema:
            raise ValueError(f"task.kind=rating needs a rating column; {data.name} "
                             f"({data.path}) has {sorted(data.schema)} (for from-files name "
                             "it: dataset.columns.rating=<column>)")
        super().__init__(cfg, data)
        self.has_val = True
        tr = self.split["train"]
        self.train_cols = {c: np.ascontiguousarray(tr[c]) for c in ("user", "item", "rating")}

    def model_fn(self):
        return models.build(self.cfg.model, num_users=self.num_users, num_items=self.num_items,
                            global_bias=float(self.train_cols["rating"].mean()),
                            seed=self.cfg.seed)

    def loss_fn(self, abstract_model):
        mc = self.cfg.model
        embedding_tables = tuple(abstract_model.embedding_tables)
        bias_tables = tuple(t for t in abstract_model.table_features
                            if t not in embedding_tables)

        def loss_fn(model, rows, batch):
            pred = model.score(rows, batch)
            return losses.mse_frobenius(pred, batch["rating"], rows,
                                        embedding_tables=embedding_tables,
                                        bias_tables=bias_tables, reg=mc.reg,
                                        bias_reg=mc.bias_reg), {}
        return loss_fn

    def setup(self, graphdef, tables, abstract_model, in_sharding, mesh):
        for s in ("val", "test"):
            if len(self.split[s]["user"]):
                self.check_evaluable(s)
        lo, hi = self.cfg.dataset.get("rating_range", None) or (None, None)
        self.eval_step = jax.jit(make_eval_step(graphdef, tables,
                                                (lo, hi) if lo is not None else None))
        self.in_sharding = in_sharding

    def evaluate(self, state, split: str, full: bool = False) -> dict[str, float]:
        d = self.split[split]
        if not len(d["user"]):
            raise ValueError(f"{self.path}: the {split} split is empty; a rating run needs "
                             f"{split} rows (from-files: dataset.{split}=<file>)")
        sums = None
        cols = {c: d[c] for c in ("user", "item", "rating")}
        for batch, n in pipeline.eval_batches(cols, self.cfg.trainer.eval_batch_size):
            batch = to_global(process_rows(batch, self.in_sharding), self.in_sharding)
            sums = metrics_lib.merge(sums, jax.device_get(self.eval_step(state, batch, n)))
        return metrics_lib.regression_metrics(sums)
