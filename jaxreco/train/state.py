"""The training state: one pytree, created directly in its final sharding.

``TrainState`` holds the step, the embedding tables and the dense parameters (as
``nnx.State`` so the model is rebuilt with ``nnx.merge``), and both optimizers' slots.
``create_state`` follows shapes → shardings → ``jax.jit(init, out_shardings=...)``: a large
table is initialised on the devices that own its rows, never built whole on one device.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxreco.models.layers import Table
from jaxreco.optim import RowOptimizer
from jaxreco.sharding import logical_to_spec


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    tables: nnx.State          # {table name: Table[rows, dim]}
    dense: nnx.State           # every other parameter
    table_opt: dict[str, dict[str, jax.Array]]
    dense_opt: Any

    def table_values(self) -> dict[str, jax.Array]:
        return {k: v[...] for k, v in self.tables.items()}


def split_model(model: nnx.Module):
    """``(graphdef, tables, dense)``; tables must be the model's top-level attributes."""
    graphdef, tables, dense = nnx.split(model, Table, ...)
    for path in jax.tree_util.tree_flatten_with_path(tables)[0]:
        if len(path[0]) != 2:  # (DictKey(name), GetAttrKey('value'))
            raise TypeError(f"Table at {path[0]} is nested: tables must be top-level attributes")
    return graphdef, tables, dense


def table_axes(tables: nnx.State) -> dict[str, tuple]:
    """``{table: logical axes}`` from the tables' ``axes`` metadata."""
    return {k: tuple(v.get_metadata().get("axes")) for k, v in tables.items()}


def _axes_of(variable_state) -> Any:
    return jax.tree.map(lambda v: v.get_metadata().get("axes"), variable_state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_state(model_fn: Callable[[], nnx.Module], row_opt: RowOptimizer,
                 dense_tx: optax.GradientTransformation, mesh: Mesh,
                 rules: Mapping[str, Any]):
    """Returns ``(graphdef, state, shardings)`` with ``state`` laid out on ``mesh``."""

    def init() -> TrainState:
        _, tables, dense = split_model(model_fn())
        return TrainState(
            step=jnp.zeros((), jnp.int32), tables=tables, dense=dense,
            table_opt={k: row_opt.init(v[...]) for k, v in tables.items()},
            dense_opt=dense_tx.init(dense))

    graphdef, abs_tables, abs_dense = split_model(nnx.eval_shape(model_fn))
    abstract = jax.eval_shape(init)
    shardings = state_shardings(abstract, abs_tables, abs_dense, mesh, rules)
    state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, shardings


def state_shardings(abstract: TrainState, abs_tables, abs_dense, mesh: Mesh,
                    rules: Mapping[str, Any]) -> TrainState:
    """NamedShardings for every leaf of the state, from the parameters' logical axes.

    Table optimizer slots follow their table's rows; dense optimizer slots and scalars are
    replicated (dense parameters are small next to the tables).
    """
    def ns(spec):
        return NamedSharding(mesh, spec)

    def var_sharding(state):
        return jax.tree.map(
            lambda v: v.replace(ns(logical_to_spec(v.get_metadata().get("axes"), rules))),
            state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    table_axes = _axes_of(abs_tables)
    tables = var_sharding(abs_tables)
    dense = var_sharding(abs_dense)
    table_opt = {}
    for name, slots in abstract.table_opt.items():
        row_spec = logical_to_spec(table_axes[name][:1], rules)
        full_spec = logical_to_spec(table_axes[name], rules)
        table_opt[name] = {s: ns(full_spec if v.ndim == 2 else row_spec) for s, v in slots.items()}
    dense_opt = jax.tree.map(lambda _: ns(P()), abstract.dense_opt)
    return TrainState(step=ns(P()), tables=tables, dense=dense, table_opt=table_opt,
                      dense_opt=dense_opt)
