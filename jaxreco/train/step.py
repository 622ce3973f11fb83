"""Pure train and eval steps.

``train_step(state, batch) -> (state, metrics)``:

1. gather the rows of every table the batch indexes;
2. differentiate the loss with respect to those rows and the dense parameters only;
3. apply the row-sparse optimizer to each table (the rows of all features that index it)
   and optax to the dense parameters.

No step touches a whole table, so its cost grows with the batch, not the catalogue.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxreco import metrics as metrics_lib
from jaxreco.models.layers import gather_rows
from jaxreco.optim import RowOptimizer
from jaxreco.train.state import TrainState

LossFn = Callable[[nnx.Module, Mapping, Mapping], tuple[jax.Array, dict[str, jax.Array]]]


def make_train_step(graphdef, table_features: Mapping[str, tuple[str, ...]], loss_fn: LossFn,
                    row_opt: RowOptimizer, dense_tx: optax.GradientTransformation):
    """Builds the (un-jitted) train step. ``loss_fn(model, rows, batch) -> (loss, aux)``."""

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        tables = state.table_values()
        rows = gather_rows(tables, batch, table_features)

        def objective(rows, dense):
            model = nnx.merge(graphdef, state.tables, dense)
            return loss_fn(model, rows, batch)

        (loss, aux), (g_rows, g_dense) = jax.value_and_grad(
            objective, argnums=(0, 1), has_aux=True)(rows, state.dense)

        new_tables, new_slots = {}, {}
        for t, feats in table_features.items():
            ids = jnp.concatenate([batch[f] for f in feats])
            grads = jnp.concatenate([g_rows[t][f] for f in feats])
            new_tables[t], new_slots[t] = row_opt.update(
                tables[t], state.table_opt[t], ids, grads, state.step)
        updates, dense_opt = dense_tx.update(g_dense, state.dense_opt, state.dense)
        dense = optax.apply_updates(state.dense, updates)
        tables_state = jax.tree.map(lambda v: v, state.tables)
        for t, v in new_tables.items():
            tables_state[t] = state.tables[t].replace(v)
        new_state = state.replace(step=state.step + 1, tables=tables_state, dense=dense,
                                  table_opt=new_slots, dense_opt=dense_opt)
        return new_state, {"loss": loss, **aux}

    return train_step


def make_eval_step(graphdef, clip: tuple[float, float] | None):
    """``eval_step(state, batch, num_valid) -> sums`` for RMSE/MAE (predictions clipped)."""

    def eval_step(state: TrainState, batch: Mapping[str, jax.Array], num_valid: jax.Array):
        model = nnx.merge(graphdef, state.tables, state.dense)
        pred = model(batch)
        if clip is not None:
            pred = jnp.clip(pred, clip[0], clip[1])
        mask = jnp.arange(pred.shape[0]) < num_valid
        return metrics_lib.regression_sums(pred, batch["rating"], mask)

    return eval_step


def make_predict(graphdef):
    """``predict(state, batch) -> scores`` (unclipped)."""

    def predict(state: TrainState, batch: Mapping[str, jax.Array]):
        return nnx.merge(graphdef, state.tables, state.dense)(batch)

    return predict
