"""Pure train and eval steps.

``train_step(state, batch) -> (state, metrics)``:

1. look up the rows of every table the batch indexes (``ShardedTables.lookup``);
2. differentiate the loss with respect to those rows and the dense parameters only;
3. apply the row-sparse optimizer to the touched rows of each table
   (``ShardedTables.update``) and optax to the dense parameters.

No step touches a whole table, so its cost grows with the batch, not the catalogue, and
no device ever holds more than its own shard of a table.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxreco import metrics as metrics_lib
from jaxreco.embedding import ShardedTables
from jaxreco.train.state import TrainState

LossFn = Callable[[nnx.Module, Mapping, Mapping], tuple[jax.Array, dict[str, jax.Array]]]


def apply_updates(state: TrainState, new_values: Mapping[str, jax.Array],
                  new_slots, g_dense, dense_tx: optax.GradientTransformation) -> TrainState:
    """The next state: the tables' new values and optimizer slots, optax on the dense
    parameters, the step counter advanced (the tail every train step shares)."""
    updates, dense_opt = dense_tx.update(g_dense, state.dense_opt, state.dense)
    dense = optax.apply_updates(state.dense, updates)
    tables_state = jax.tree.map(lambda v: v, state.tables)
    for t, v in new_values.items():
        tables_state[t] = state.tables[t].replace(v)
    return state.replace(step=state.step + 1, tables=tables_state, dense=dense,
                         table_opt=new_slots, dense_opt=dense_opt)


def make_train_step(graphdef, tables: ShardedTables, loss_fn: LossFn,
                    dense_tx: optax.GradientTransformation):
    """Builds the (un-jitted) train step. ``loss_fn(model, rows, batch) -> (loss, aux)``."""

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        values = state.table_values()
        rows, plans = tables.lookup_and_plan(values, batch)     # routing reused by update

        def objective(rows, dense):
            model = nnx.merge(graphdef, state.tables, dense)
            return loss_fn(model, rows, batch)

        (loss, aux), (g_rows, g_dense) = jax.value_and_grad(
            objective, argnums=(0, 1), has_aux=True)(rows, state.dense)
        new_values, new_slots = tables.update(values, state.table_opt, batch, g_rows, state.step,
                                              plans)
        return apply_updates(state, new_values, new_slots, g_dense, dense_tx), {"loss": loss, **aux}

    return train_step


def make_group_step(train_step, k: int):
    """``group_step(state, batches, count) -> (state, metrics)``: ``train_step`` applied to
    the first ``count`` (1..``k``, a traced int) of ``k`` batches stacked on a leading axis,
    in order, in one dispatch (a ``fori_loop``; the rest of the stack is ignored). What
    ``trainer.steps_per_call=k`` runs: one compiled program serves full groups and the
    shorter ones that end at an epoch, log or checkpoint boundary. ``metrics``: each step's,
    stacked to ``[k, ...]`` (rows from ``count`` on are zeros)."""

    def group_step(state: TrainState, batches: Mapping[str, jax.Array], count: jax.Array):
        first = jax.tree.map(lambda x: x[0], batches)
        shapes = jax.eval_shape(train_step, state, first)[1]
        stacked = jax.tree.map(lambda s: jnp.zeros((k, *s.shape), s.dtype), shapes)

        def body(i, carry):
            state, stacked = carry
            batch = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False),
                                 batches)
            state, m = train_step(state, batch)
            return state, jax.tree.map(lambda a, v: a.at[i].set(v), stacked, m)

        return jax.lax.fori_loop(0, count, body, (state, stacked))

    return group_step


def make_predict(graphdef, tables: ShardedTables):
    """``predict(state, batch) -> scores`` through the sharded lookup."""

    def predict(state: TrainState, batch: Mapping[str, jax.Array]):
        model = nnx.merge(graphdef, state.tables, state.dense)
        return model.score(tables.lookup(state.table_values(), batch), batch)

    return predict


def make_eval_step(graphdef, tables: ShardedTables, clip: tuple[float, float] | None):
    """``eval_step(state, batch, num_valid) -> sums`` for RMSE/MAE (predictions clipped)."""
    predict = make_predict(graphdef, tables)

    def eval_step(state: TrainState, batch: Mapping[str, jax.Array], num_valid: jax.Array):
        pred = predict(state, batch)
        if clip is not None:
            pred = jnp.clip(pred, clip[0], clip[1])
        mask = jnp.arange(pred.shape[0]) < num_valid
        return metrics_lib.regression_sums(pred, batch["rating"], mask)

    return eval_step
