"""From a config and a task to what the loop runs: the sharded state, and a train step with
its batches. Shared by the training loop and :func:`jaxreco.run.restore_run`, so a restored
run has exactly the model, optimizer (learning-rate schedule included) and shardings it
trained with.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from omegaconf import DictConfig

from jaxreco import optim
from jaxreco.data import pipeline
from jaxreco.distributed import to_global
from jaxreco.embedding import ShardedTables
from jaxreco.privacy import dp_ials, dp_sgd
from jaxreco.train import bpmf, ials
from jaxreco.train.state import create_state, table_axes
from jaxreco.train.step import make_group_step, make_train_step

log = logging.getLogger("jaxreco")


class ModelState(NamedTuple):
    graphdef: Any
    state: Any                  # TrainState, laid out on the mesh
    shardings: Any
    model_fn: Callable
    abstract_model: Any         # nnx.eval_shape(model_fn)
    tables: ShardedTables
    dense_tx: Any
    table_lr: Any               # float or optax schedule of the table rate
    steps_per_epoch: int
    total_steps: int
    examples_per_step: int


def is_solver(cfg: DictConfig) -> bool:
    """``optimizer=ials`` or ``bpmf``: one step = one epoch over whole tables (alternating
    least squares, or one Gibbs sweep), no learning rate."""
    return cfg.optimizer.name in ("ials", "bpmf")


def is_bpmf(cfg: DictConfig) -> bool:
    """``optimizer=bpmf``: Bayesian MF by Gibbs sampling (:mod:`jaxreco.train.bpmf`)."""
    return cfg.optimizer.name == "bpmf"


def is_dp_sgd(cfg: DictConfig) -> bool:
    """``privacy=dp`` with a gradient optimizer: user-level DP-SGD
    (:mod:`jaxreco.privacy.dp_sgd`)."""
    return cfg.privacy.name == "dp" and not is_solver(cfg)


def model_state(cfg: DictConfig, task, mesh) -> ModelState:
    """The model of ``task``, its optimizers (rates decay over the configured epochs, not
    ``max_steps``: a run stopped early and resumed follows the same schedule as an
    uninterrupted one) and a fresh state created in its sharding."""
    tc, rules = cfg.trainer, dict(cfg.mesh.rules)
    n_train = len(next(iter(task.train_cols.values())))
    solver = is_solver(cfg)
    if is_bpmf(cfg):
        if task.kind != "rating":
            raise ValueError(f"optimizer=bpmf samples a rating model; task.kind={task.kind!r} "
                             "needs a gradient optimizer (sgd, adagrad, lazy_adam, adam) or, "
                             "for implicit feedback, optimizer=ials")
        if cfg.privacy.name == "dp":
            raise ValueError("optimizer=bpmf with privacy=dp: the Gibbs sampler has no "
                             "privacy accounting; use privacy=none, or a gradient optimizer "
                             "(DP-SGD) for a private rating model")
    elif solver and task.kind != "implicit":
        raise ValueError(f"optimizer=ials fits implicit feedback; task.kind={task.kind!r} "
                         "needs a gradient optimizer (sgd, adagrad, lazy_adam, adam), or "
                         "optimizer=bpmf for ratings")
    steps_per_epoch = 1 if solver else pipeline.batches_per_epoch(n_train, tc.batch_size)
    if is_dp_sgd(cfg):                   # an epoch: ⌈1/q⌉ steps of Poisson-sampled users
        steps_per_epoch = dp_sgd.steps_per_epoch(cfg.privacy, task.num_users)
    elif steps_per_epoch < 1:
        raise ValueError(f"trainer.batch_size={tc.batch_size} is larger than the {n_train} "
                         f"training examples of {task.data.name}: no full batch per epoch")
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    sched = cfg.optimizer.get("schedule", "constant")
    table_lr = optim.schedule(cfg.optimizer.lr, sched, tc.epochs * steps_per_epoch)
    row_opt = optim.row_optimizer(cfg.optimizer.name, lr=table_lr)
    if is_bpmf(cfg):                     # the chain's noise precision α, no update
        dense_tx = bpmf.noise_state(float(cfg.optimizer.noise_precision))
    else:
        dense_tx = optim.dense_optimizer(
            cfg.optimizer.dense_name,
            optim.schedule(cfg.optimizer.dense_lr, sched, tc.epochs * steps_per_epoch))
    model_fn = dp_sgd.public_model_fn(cfg, task) if is_dp_sgd(cfg) else task.model_fn()
    graphdef, state, shardings = create_state(model_fn, row_opt, dense_tx, mesh, rules)
    abstract_model = nnx.eval_shape(model_fn)
    tables = ShardedTables(mesh, rules, table_axes(state.tables),
                           dict(abstract_model.table_features), row_opt)
    return ModelState(graphdef, state, shardings, model_fn, abstract_model, tables, dense_tx,
                      table_lr, steps_per_epoch, total_steps,
                      n_train if solver else
                      -(-n_train // steps_per_epoch) if is_dp_sgd(cfg) else tc.batch_size)


def train_step(cfg: DictConfig, task, ms: ModelState, mesh, in_sharding, shard: tuple[int, int]):
    """``(step_fn, data_iter, next_batch)``: the jitted ``step_fn(state, batch) -> (state,
    metrics)``, the grain iterator whose position is checkpointed (None for iALS), and
    ``next_batch(step)``, the global batch of a step.

    Gradient optimizers: shuffled batches of ``task.train_cols`` (this process's
    ``shard``), extended by ``task.transform``. ``optimizer=ials``: every step gets the
    whole bucketed interaction data and solves one epoch (:func:`jaxreco.train.ials.make_epoch`).
    """
    if is_solver(cfg):
        step_fn, data = (bpmf_step if is_bpmf(cfg) else ials_step)(cfg, task, ms, mesh)
        return step_fn, None, lambda step: data
    if is_dp_sgd(cfg):                   # sampled users, drawn from (seed, step): no iterator
        step_fn, next_users, _ = dp_sgd.build(cfg, task, ms, mesh)
        return step_fn, None, next_users
    tc = cfg.trainer
    data_iter = iter(pipeline.train_dataset(
        task.train_cols, batch_size=tc.batch_size, num_epochs=tc.epochs, seed=cfg.seed,
        shard_index=shard[0], shard_count=shard[1]))
    step_fn = jax.jit(make_train_step(ms.graphdef, ms.tables, task.loss_fn(ms.abstract_model),
                                      ms.dense_tx),
                      in_shardings=(ms.shardings, in_sharding),
                      out_shardings=(ms.shardings, None), donate_argnums=0)

    def next_batch(step: int):
        return to_global(task.transform(next(data_iter), step, shard[0]), in_sharding)
    return step_fn, data_iter, next_batch


def group_step(cfg: DictConfig, task, ms: ModelState, mesh, in_sharding,
               shard: tuple[int, int], data_iter):
    """``trainer.steps_per_call`` K > 1 (gradient optimizers): ``(group_fn, next_group)``.
    ``group_fn(state, batches, count) -> (state, metrics)`` runs ``count`` <= K train steps
    in one jitted call (:func:`jaxreco.train.step.make_group_step`: the same updates as
    ``count`` calls of the step); ``next_group(step, count)`` reads the ``count`` batches of
    steps ``step .. step+count-1`` from ``data_iter`` (the iterator the step's batches come
    from, so its checkpointed position stays the step's), stacks them on the host (one
    transfer per column) and pads the stack to K with the last batch."""
    k = int(cfg.trainer.steps_per_call)
    stacked = NamedSharding(mesh, PartitionSpec(None, *in_sharding.spec))
    group_fn = jax.jit(make_group_step(make_train_step(ms.graphdef, ms.tables,
                                                       task.loss_fn(ms.abstract_model),
                                                       ms.dense_tx), k),
                       in_shardings=(ms.shardings, stacked, None),
                       out_shardings=(ms.shardings, None), donate_argnums=0)

    def next_group(step: int, count: int):
        if not 1 <= count <= k:
            raise ValueError(f"a group of {count} steps with trainer.steps_per_call={k}")
        batches = [task.transform(next(data_iter), step + j, shard[0]) for j in range(count)]
        batches += [batches[-1]] * (k - count)
        return (to_global({c: np.stack([b[c] for b in batches]) for c in batches[0]}, stacked),
                np.int32(count))
    return group_fn, next_group


def ials_step(cfg: DictConfig, task, ms: ModelState, mesh):
    """The iALS epoch as a step: ``(step_fn, data)`` with the interactions grouped by row
    length (:func:`jaxreco.train.ials.group_rows`), recency weights when configured."""
    am, oc, cols = ms.abstract_model, cfg.optimizer, task.train_cols
    ut, it, ib = ials.check_model(cfg.model, am)
    ials.check_mesh(mesh)
    if cfg.privacy.name == "dp":                 # user-level DP iALS (jaxreco/privacy)
        epoch, data, _ = dp_ials.build(cfg, task, am, ut, it, ms.total_steps)
        data = jax.device_put(data, NamedSharding(mesh, PartitionSpec()))
        return jax.jit(epoch, out_shardings=(ms.shardings, None), donate_argnums=0), data
    dim = int(am.user_mf.shape[1])
    conf = None
    if float(oc.recency_weight):
        timestamps = task.train_timestamps()
        if timestamps is None:
            raise ValueError(f"optimizer.recency_weight={oc.recency_weight} needs timestamps; "
                             f"dataset {cfg.dataset.name!r} has no timestamp column (set "
                             "optimizer.recency_weight=0, or for from-files name it: "
                             "dataset.columns.timestamp=<column>)")
        conf = ials.recency_weights(cols["user"], timestamps, strength=float(oc.recency_weight),
                                    half_life=float(oc.recency_half_life))
    users = ials.group_rows(cols["user"], cols["item"], task.num_users, task.num_items,
                            pad_row=int(am.user_mf.shape[0]), dim=dim, weights=conf)
    items = ials.group_rows(cols["item"], cols["user"], task.num_items, task.num_users,
                            pad_row=int(am.item_mf.shape[0]), dim=dim, weights=conf)
    data = jax.device_put(ials.epoch_data(users, items), NamedSharding(mesh, PartitionSpec()))
    step_fn = jax.jit(ials.make_epoch(users, items, user_table=ut, item_table=it,
                                      alpha0=float(oc.unobserved_weight),
                                      reg=float(cfg.model.reg), nu=float(oc.reg_exponent),
                                      item_bias_table=ib,
                                      pop_exponent=float(oc.unobserved_exponent),
                                      solver=str(oc.solver), cg_steps=int(oc.cg_steps)),
                      out_shardings=(ms.shardings, None), donate_argnums=0)
    log.info("ials: %d users, %d items, %d positives (%d padded slots per half-epoch)",
             task.num_users, task.num_items, users.nnz, max(users.padded, items.padded))
    return step_fn, data


def bpmf_step(cfg: DictConfig, task, ms: ModelState, mesh):
    """One Gibbs sweep as a step: ``(step_fn, data)`` with the training ratings grouped by
    user and by item (:func:`jaxreco.train.bpmf.build_sides`)."""
    am, cols = ms.abstract_model, task.train_cols
    bpmf.check_model(cfg.model, am)
    ials.check_mesh(mesh, "bpmf")
    users, items = bpmf.build_sides(cols["user"], cols["item"], cols["rating"], task.num_users,
                                    task.num_items, user_rows=int(am.user_embed.shape[0]),
                                    item_rows=int(am.item_embed.shape[0]),
                                    dim=int(am.user_embed.shape[1]))
    data = jax.device_put(ials.epoch_data(users, items), NamedSharding(mesh, PartitionSpec()))
    step_fn = jax.jit(bpmf.make_sweep(users, items, burn_in=int(cfg.optimizer.burn_in),
                                      seed=int(cfg.seed)),
                      out_shardings=(ms.shardings, None), donate_argnums=0)
    log.info("bpmf: %d users, %d items, %d ratings; the tables average the draws after "
             "sweep %d", task.num_users, task.num_items, users.nnz, int(cfg.optimizer.burn_in))
    return step_fn, data


def privacy_metrics(cfg: DictConfig, task, ms: ModelState, steps: int) -> dict[str, float]:
    """``privacy/epsilon``, ``privacy/delta``, ... of a ``privacy=dp`` run after ``steps``
    epochs (item releases); nothing without privacy."""
    if cfg.privacy.name != "dp":
        return {}
    if is_dp_sgd(cfg):
        pl = dp_sgd.task_plan(cfg, task, ms)
        out = pl.metrics(steps)
        log.info("privacy=dp (DP-SGD): (ε=%.4g, δ=%.3g)-DP after %d steps (noise multiplier "
                 "%.4g, q=%.4g)", out["privacy/epsilon"], pl.delta, steps, pl.noise_multiplier,
                 pl.sampling_rate)
        return out
    pl = dp_ials.plan(cfg.privacy, num_users=task.num_users, epochs=ms.total_steps,
                      seed=int(cfg.seed))
    out = pl.metrics(steps)
    log.info("privacy=dp: (ε=%.4g, δ=%.3g)-DP after %d epochs (noise multiplier %.4g)",
             out["privacy/epsilon"], pl.delta, steps, pl.noise_multiplier)
    return out


def patience_starts(cfg: DictConfig) -> int:
    """The step after which epochs without a validation gain count towards
    ``trainer.patience``: ``optimizer.burn_in`` for BPMF (the tables hold single draws until
    then, so validation goes up and down), else 0."""
    return int(cfg.optimizer.burn_in) if is_bpmf(cfg) else 0


def learning_rate(ms: ModelState, cfg: DictConfig, step: int) -> dict[str, float]:
    """``{"learning/lr": rate}`` at ``step`` (nothing for iALS, which has no rate)."""
    if is_solver(cfg):
        return {}
    return {"learning/lr": float(optim.lr_at(ms.table_lr, step))}

