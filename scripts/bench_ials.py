"""iALS (``optimizer=ials``) against ``implicit`` ALS, in the same run on the same cores.

    JAXRECO_CACHE=... python scripts/bench_ials.py                # ML-1M leave-last-out, d 64/192
    python scripts/bench_ials.py --synthetic                      # ML-1M-shaped random positives
    python scripts/bench_ials.py --dims 192 --epochs 4 --cg_steps 3

Data: the prepared split of ``experiment=ml1m_ncf_mf_uniform`` (MovieLens 1M, last item per
user held out, 99 stored negatives), read through the trainer's own task
(``jaxreco.train.tasks``). If it cannot be prepared (no network, no cached copy) the script
says so and times both libraries on synthetic long-tailed positives of the same shape,
without metrics.

Per factor count ``d`` (same epochs for all, ``implicit`` on ``--threads`` threads, XLA on the
same cores): jaxreco with ``optimizer.solver=cholesky`` (exact) and ``optimizer.solver=cg``,
then ``implicit.als.AlternatingLeastSquares`` (its default: 3 CG steps per row). Each is scored
by the same jaxreco evaluator (``ImplicitTask.evaluate``: sampled HR/NDCG@10 against the stored
negatives, full-ranking HR@10); ``implicit``'s factors are copied into the jaxreco tables.

Same confidence weights: jaxreco's loss is ``Σ_obs c (ŷ−1)² + α₀ Σ_all ŷ² + Σ λ_u‖p_u‖²``;
``implicit`` minimises ``Σ_all C (ŷ − P)²  + λ Σ‖·‖²`` with ``C = 1`` where unobserved. Divided
by α₀ ours has the same Hessian when an observed pair's ``C = 1 + c/α₀``; ``implicit`` has one
λ for every row, given the mean of ours over all rows, ``(λ/α₀)(n + α₀N)^ν``.

Prints ``name: value`` lines, ``<lib>`` in ``jaxreco_cholesky``, ``jaxreco_cg``, ``implicit``:

  <lib>_epoch_s_d<d>                 median seconds per epoch (jaxreco: after the compiling one)
  <lib>_hr10_d<d>, _ndcg10_d<d>, _full_hr10_d<d>   test metrics after the last epoch
  ials_vs_implicit_epoch_ratio_d<d>          jaxreco cg / implicit seconds per epoch
  ials_cholesky_vs_implicit_epoch_ratio_d<d> jaxreco cholesky / implicit
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import time

from jaxreco.runtime import compose_config, configure_xla

configure_xla()     # before jax starts: XLA:CPU's concurrency-optimised scheduler wedges iALS

import jax  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from jaxreco import config  # noqa: E402
from jaxreco.sharding import batch_sharding, make_mesh  # noqa: E402
from jaxreco.train import ials, setup  # noqa: E402
from jaxreco.train import tasks as tasks_lib  # noqa: E402

EXPERIMENT = "ml1m_ncf_mf_uniform"


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 192])
    p.add_argument("--epochs", type=int, default=4, help="the experiment's own 4")
    p.add_argument("--cg_steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic", action="store_true", help="skip ML-1M")
    return p.parse_args()


def compose_cfg(dim: int, epochs: int, solver: str, cg_steps: int, seed: int):
    cfg = compose_config([
        f"experiment={EXPERIMENT}", f"model.mf_dim={dim}",
        f"model.init_std={0.1 / dim ** 0.5}", f"trainer.epochs={epochs}",
        f"optimizer.solver={solver}", f"optimizer.cg_steps={cg_steps}", "mesh=single",
        f"seed={seed}", "trainer.progress_bar=false", "logger.tensorboard=false"])
    config.validate(cfg)
    return cfg


def positives(users: int, items: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct (user, item) pairs, both sides long-tailed (Zipf-like weights)."""
    rng = np.random.default_rng(seed)
    wu = 1.0 / np.arange(1, users + 1) ** 0.8
    wi = 1.0 / np.arange(1, items + 1) ** 0.9
    keys = np.unique(rng.choice(users, 2 * n, p=wu / wu.sum()).astype(np.int64) * items
                     + rng.choice(items, 2 * n, p=wi / wi.sum()))[:n]
    return (keys // items).astype(np.int32), (keys % items).astype(np.int32)


def _timed_epochs(step_fn, state, data, epochs: int):
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        state, m = step_fn(state, data)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return state, times, float(m["loss"])


def _metrics(task, state) -> dict[str, float]:
    m = task.evaluate(state, "test", full=True)
    return {"hr10": m["hr@10"], "ndcg10": m["ndcg@10"], "full_hr10": m["full/hr@10"]}


def run_jaxreco(cfg, task, mesh):
    """Seconds per epoch (after the compiling first one), metrics, and the task's model
    state (for scoring ``implicit``'s factors with the same evaluator)."""
    ms = setup.model_state(cfg, task, mesh)
    step_fn, data = setup.ials_step(cfg, task, ms, mesh)
    state, times, loss = _timed_epochs(step_fn, ms.state, data, cfg.trainer.epochs + 1)
    task.setup(ms.graphdef, ms.tables, ms.abstract_model,
               batch_sharding(mesh, dict(cfg.mesh.rules)), mesh)
    return statistics.median(times[1:]), times[0], loss, _metrics(task, state), state


def implicit_params(u, i, conf, num_users, num_items, *, alpha0, reg, nu):
    """``(C matrix, λ)`` for ``implicit``: see the module docstring."""
    c = 1.0 + np.asarray(conf, np.float64) / alpha0
    cui = sp.csr_matrix((c.astype(np.float32), (u, i)), shape=(num_users, num_items))
    fu = np.bincount(u, minlength=num_users)
    fi = np.bincount(i, minlength=num_items)
    lam = np.concatenate([(fu[fu > 0] + alpha0 * num_items) ** nu,
                          (fi[fi > 0] + alpha0 * num_users) ** nu]) * reg / alpha0
    return cui, float(lam.mean())


def run_implicit(cui, lam, dim, epochs, threads, seed):
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, "blas"):      # implicit's advice: its own threads, not BLAS's
        model = AlternatingLeastSquares(factors=dim, regularization=lam, alpha=1.0,
                                        iterations=epochs, num_threads=threads,
                                        random_state=seed, use_cg=True)
        stamps = [time.perf_counter()]
        model.fit(cui, show_progress=False,
                  callback=lambda *_: stamps.append(time.perf_counter()))
    return statistics.median(np.diff(stamps)), model


def _print(name, value, fmt=".4f"):
    print(f"{name}: {value:{fmt}}", flush=True)


def main() -> None:
    a = _args()
    print(f"device: {jax.devices()[0].device_kind}; cpu cores: {os.cpu_count()}; "
          f"implicit {importlib.metadata.version('implicit')} on {a.threads} threads")
    mesh = make_mesh({"data": 1, "model": 1}, devices=jax.devices()[:1])
    task, why = None, "--synthetic"
    if not a.synthetic:
        try:
            cfg0 = compose_cfg(a.dims[0], a.epochs, "cholesky", a.cg_steps, a.seed)
            task = tasks_lib.build(cfg0, tasks_lib.PreparedData.prepare(cfg0))
        except Exception as e:  # noqa: BLE001  (no network, no cached copy: say so, go on)
            why = f"{type(e).__name__}: {e}"[:300]
    if task is None:
        print(f"data: SYNTHETIC ML-1M-shaped positives (6040 x 3706, 1M), no metrics: "
              f"ML-1M could not be prepared ({why})")
        return synthetic(a)
    u, i = task.train_cols["user"], task.train_cols["item"]
    print(f"data: {EXPERIMENT} prepared split {task.data.path}: {task.num_users} users, "
          f"{task.num_items} items, {len(u)} train positives, epochs {a.epochs}")
    for dim in a.dims:
        res = {}
        for solver in ("cholesky", "cg"):
            cfg = compose_cfg(dim, a.epochs, solver, a.cg_steps, a.seed)
            task = tasks_lib.build(cfg, tasks_lib.PreparedData.prepare(cfg))
            sec, first, loss, met, state = run_jaxreco(cfg, task, mesh)
            res[solver] = sec
            name = f"jaxreco_{solver}"
            _print(f"{name}_compile_epoch_s_d{dim}", first, ".2f")
            _print(f"{name}_epoch_s_d{dim}", sec, ".3f")
            _print(f"{name}_loss_d{dim}", loss)
            for k, v in met.items():
                _print(f"{name}_{k}_d{dim}", v)
        oc = cfg.optimizer
        cui, lam = implicit_params(u, i, np.ones(len(u)), task.num_users, task.num_items,
                                   alpha0=float(oc.unobserved_weight), reg=float(cfg.model.reg),
                                   nu=float(oc.reg_exponent))
        sec, model = run_implicit(cui, lam, dim, a.epochs, a.threads, a.seed)
        _print(f"implicit_regularization_d{dim}", lam)
        _print(f"implicit_epoch_s_d{dim}", sec, ".3f")
        vals = state.table_values()
        tables = jax.tree.map(lambda v: v, state.tables)
        for t, f in (("user_mf", model.user_factors), ("item_mf", model.item_factors)):
            full = np.zeros(vals[t].shape, np.float32)
            full[:f.shape[0]] = np.asarray(f)
            tables[t] = state.tables[t].replace(
                jax.device_put(full, vals[t].sharding))
        st = state.replace(tables=tables)
        for k, v in _metrics(task, st).items():
            _print(f"implicit_{k}_d{dim}", v)
        _print(f"ials_vs_implicit_epoch_ratio_d{dim}", res["cg"] / sec, ".3f")
        _print(f"ials_cholesky_vs_implicit_epoch_ratio_d{dim}", res["cholesky"] / sec, ".3f")


def synthetic(a) -> None:
    from flax import nnx

    from jaxreco import optim
    from jaxreco.models.embed_mlp import EmbedMLP
    from jaxreco.train.state import create_state
    nu_, ni = 6040, 3706
    u, i = positives(nu_, ni, 1_000_000, a.seed)
    mesh = make_mesh({"data": 1, "model": 1}, devices=jax.devices()[:1])
    rules = {"batch": None, "user": None, "item": None, "embed": None}
    alpha0, reg = 0.2, 0.007
    for dim in a.dims:
        users = ials.group_rows(u, i, nu_, ni, pad_row=nu_, dim=dim)
        items = ials.group_rows(i, u, ni, nu_, pad_row=ni, dim=dim)
        data = jax.device_put(ials.epoch_data(users, items), NamedSharding(mesh, P()))
        res = {}
        for solver in ("cholesky", "cg"):
            _, state, shardings = create_state(
                lambda: EmbedMLP(nu_, ni, combiner="dot", mf_dim=dim, bias=False,
                                 init_std=0.1 / dim ** 0.5, rngs=nnx.Rngs(a.seed)),
                optim.row_optimizer("ials"), optim.dense_optimizer("adam", 0.0), mesh, rules)
            epoch = jax.jit(ials.make_epoch(users, items, user_table="user_mf",
                                            item_table="item_mf", alpha0=alpha0, reg=reg,
                                            nu=1.0, solver=solver, cg_steps=a.cg_steps),
                            out_shardings=(shardings, None), donate_argnums=0)
            _, times, loss = _timed_epochs(epoch, state, data, a.epochs + 1)
            res[solver] = statistics.median(times[1:])
            _print(f"jaxreco_{solver}_epoch_s_d{dim}", res[solver], ".3f")
            _print(f"jaxreco_{solver}_loss_d{dim}", loss)
        cui, lam = implicit_params(u, i, np.ones(len(u)), nu_, ni, alpha0=alpha0, reg=reg,
                                   nu=1.0)
        sec, _ = run_implicit(cui, lam, dim, a.epochs, a.threads, a.seed)
        _print(f"implicit_epoch_s_d{dim}", sec, ".3f")
        _print(f"ials_vs_implicit_epoch_ratio_d{dim}", res["cg"] / sec, ".3f")
        _print(f"ials_cholesky_vs_implicit_epoch_ratio_d{dim}", res["cholesky"] / sec, ".3f")


if __name__ == "__main__":
    main()
