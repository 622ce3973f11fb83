"""A federated iALS simulation of a ``jaxreco-train`` config, next to the central run.

:func:`simulate` prepares the config's task and initial state exactly as the trainer does,
splits the users into ``num_clients`` shards, runs ``rounds`` Flower rounds
(:func:`jaxreco.federated.flower.run`) and, for reference, the trainer's own iALS epoch
(:func:`jaxreco.train.setup.ials_step`) the same number of times from the same state; both
models are scored by the task's evaluator.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from omegaconf import DictConfig

from jaxreco import config as config_lib
from jaxreco.federated import ials as fed
from jaxreco.privacy import dp_ials
from jaxreco.sharding import batch_sharding, make_mesh
from jaxreco.train import ials, setup, tasks as tasks_lib


def _with_tables(state, tables: dict[str, np.ndarray]):
    new = jax.tree.map(lambda v: v, state.tables)
    for name, rows in tables.items():
        full = np.array(state.table_values()[name])
        full[:len(rows)] = rows
        new[name] = state.tables[name].replace(jax.numpy.asarray(full))
    return state.replace(tables=new)


def local_rounds(clients: list[fed.Client], q0: np.ndarray, rounds: int, **solve_kw):
    """The same rounds as :func:`jaxreco.federated.flower.run` without an engine (a plain
    loop in this process: the reference the Flower run is checked against)."""
    q, records = np.asarray(q0, np.float32), []
    for r in range(rounds):
        t0 = time.time()
        stats = [c.fit(q) for c in clients]
        q = fed.item_solve(*fed.aggregate(stats, *q.shape), round_index=r, previous=q,
                           **solve_kw)
        records.append({"round": r + 1, "clients": len(stats),
                        "bytes_per_client": float(np.mean([s.nbytes for s in stats])),
                        "bytes_per_client_max": float(max(s.nbytes for s in stats)),
                        "seconds": time.time() - t0})
    return q, records


def simulate(cfg: DictConfig, *, num_clients: int, rounds: int, dp: bool = False,
             central: bool = True, engine: str = "flower") -> dict:
    """``{"federated": {...}, "central": {...}, "rounds": [...], "tables": {...}}``: test
    metrics, wall time and per-round traffic of the federated run, and the central run's
    metrics (``central=False``: skipped). ``engine="local"``: :func:`local_rounds` instead of
    Flower. ``dp``: clients clip and sample, the server adds the
    noise of ``cfg.privacy`` (which must then be ``privacy=dp``)."""
    if engine not in ("flower", "local"):
        raise ValueError(f"engine={engine!r}: must be 'flower' or 'local'")
    config_lib.validate(cfg)
    if cfg.optimizer.name != "ials":
        raise ValueError(f"federated iALS needs optimizer=ials; got optimizer.name="
                         f"{cfg.optimizer.name}")
    task = tasks_lib.build(cfg, tasks_lib.PreparedData.prepare(cfg))
    mesh = make_mesh(cfg.mesh.axes)
    ms = setup.model_state(cfg, task, mesh)
    ut, it, ib = ials.check_model(cfg.model, ms.abstract_model)
    dp_ials.check_options(cfg)                      # plain dot product, unit confidences
    task.setup(ms.graphdef, ms.tables, ms.abstract_model,
               batch_sharding(mesh, dict(cfg.mesh.rules)), mesh)
    oc = cfg.optimizer
    kw = dict(alpha0=float(oc.unobserved_weight), reg=float(cfg.model.reg),
              nu=float(oc.reg_exponent))
    plan = None
    if dp:
        if cfg.privacy.name != "dp":
            raise ValueError("dp=True needs privacy=dp in the config (its ε, k, C, seed)")
        plan = dp_ials.plan(cfg.privacy, num_users=task.num_users, epochs=rounds,
                            seed=int(cfg.seed))
    q0 = np.asarray(ms.state.table_values()[it])[:task.num_items]
    dim = q0.shape[1]
    user, item = np.asarray(task.train_cols["user"]), np.asarray(task.train_cols["item"])
    clients = []
    for users in fed.shard_users(task.num_users, num_clients, int(cfg.seed)):
        mine = np.isin(user, users)
        clients.append(fed.Client(users, user[mine], item[mine], task.num_items, dim,
                                  privacy=plan, **kw))
    t0 = time.time()
    if engine == "flower":
        from jaxreco.federated import flower       # optional dependency: flwr
        # compile every client's round here, before Flower starts, so that the rounds'
        # timings hold no compile; the rows it solves are solved again in round 1 (the
        # exact solve does not start from them)
        for c in clients:
            c.fit(q0)
        q, records = flower.run(clients, q0, rounds, num_users=task.num_users, privacy=plan,
                                **kw)
    else:
        q, records = local_rounds(clients, q0, rounds, num_users=task.num_users, privacy=plan,
                                  **kw)
    wall = time.time() - t0
    p = np.zeros((task.num_users, dim), np.float32)
    for c in clients:
        p[c.users] = c.user_vectors
    state = _with_tables(ms.state, {ut: p, it: q})
    out = {"federated": {**task.final(state), "perf/wall_seconds": wall},
           "rounds": records, "tables": {"user": p, "item": q}}
    if plan is not None:
        out["federated"].update(plan.metrics(rounds))
    if central:
        cfg_c = cfg.copy()
        cfg_c.privacy.name = "none"
        step_fn, data = setup.ials_step(cfg_c, task, ms, mesh)
        st = ms.state
        t0 = time.time()
        for _ in range(rounds):
            st, _ = step_fn(st, data)
        jax.block_until_ready(st)
        out["central"] = {**task.final(st), "perf/wall_seconds": time.time() - t0}
        vals = st.table_values()
        out["central_tables"] = {"user": np.asarray(vals[ut])[:task.num_users],
                                 "item": np.asarray(vals[it])[:task.num_items]}
    return out
