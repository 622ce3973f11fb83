"""Train-step throughput of biased MF: table-size scaling and mesh layouts.

    python scripts/bench_train.py                       # everything below, on the CPU
    python scripts/bench_train.py --rows 1000000 20000000 --batch 131072 --meshes single   # GPU

Runs the trainer's own jitted ``train_step`` (sharded lookup, row-sparse optimizer, donated
state) on synthetic uniformly random ids. Prints ``name: value`` lines:

  step_ms_<rows>              median step time, ``single`` mesh, per row count; every config
                              is timed once per round, round-robin (``--repeats`` rounds), so
                              a slow spell of a shared machine hits all of them alike
  mf_examples_per_s_rows_<rows>  the same as examples/s (every platform)
  train_examples_per_s        ``single`` at the smallest row count
  table_scaling_ratio         step time at the largest / smallest row count, the median of the
                              rounds' ratios (≤ 1.5: the step
                              cost does not grow with the catalogue)
  <mesh>_examples_per_s       per mesh preset, on ``--devices`` devices (CPU: fake devices)
  cpu_dp_mp_vs_single         dp_mp / single examples/s (``cpu_dp_vs_single``, ``cpu_mp_vs_single``
                              likewise)
  load_average_1m             the machine's load when the run ended (other jobs share the cores)
  mf_examples_per_s_<N>_rows  on a GPU, per row count

``--peers`` instead runs the ``ml1m_mf`` experiment's settings against LibMF (PyPI ``libmf``,
the ``bench`` extra) on the experiment's prepared random 90/10 split, both fitted on the same
90% (train + validation rows) and scored on the same test rows, on the same cores::

    python scripts/bench_train.py --peers          # JAXRECO_CACHE with ML-1M prepared

  mf_seconds_to_rmse / libmf_seconds_to_rmse      training seconds until test RMSE <= the
                                                  target (``--target-rmse``, LibMF's tuned
                                                  0.8394); compile and data loading included
  mf_final_rmse / libmf_final_rmse                test RMSE after the last epoch / iteration
  mf_vs_libmf_time_to_rmse_ratio                  jaxreco seconds / LibMF seconds (<= 1: ahead)
  ..._spc<K>                                      the same with ``trainer.steps_per_call=K``
                                                  (``--steps-per-call``, default 1 and 8;
                                                  the same updates, K per jitted call)

``--sequential`` instead runs the trainer's own step of ``model=sequential`` /
``task.kind=next_item`` (the ``ml1m_sasrec`` experiment's settings unless overridden) on a
generated synthetic-ecommerce catalogue of ML-1M size (no download, so it runs the same on a
GPU machine)::

    python scripts/bench_train.py --sequential [--seq-len 50 --seq-loss sampled]

  device                                 the JAX device the steps ran on
  sequential_examples_per_s              training sequences (examples) per second
  sequential_positions_per_s             predicted positions (non-padding targets) per second
  sequential_step_ms                     median step time
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 10_000_000])
    p.add_argument("--mesh-rows", type=int, default=1_000_000,
                   help="rows per table for the mesh comparison")
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--optimizer", default="adagrad", choices=["sgd", "adagrad", "lazy_adam"])
    p.add_argument("--meshes", nargs="*", default=["single", "dp", "mp", "dp_mp"])
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices (CPU only)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peers", action="store_true",
                   help="only the ml1m_mf vs LibMF time-to-RMSE comparison (one device)")
    p.add_argument("--target-rmse", type=float, default=0.8394)
    p.add_argument("--libmf-threads", type=int, default=2)
    p.add_argument("--libmf-iters", type=int, default=100)
    p.add_argument("--steps-per-call", type=int, nargs="+", default=[1, 8],
                   help="--peers: jaxreco-train runs with trainer.steps_per_call=K for each K")
    p.add_argument("--compilation-cache", metavar="DIR",
                   help="--peers: JAX's persistent compilation cache in DIR (as "
                        "JAX_COMPILATION_CACHE_DIR does for jaxreco-train): a rerun with the "
                        "same DIR loads the compiled steps instead of compiling them")
    p.add_argument("--sequential", action="store_true",
                   help="only the sequential model's training examples/s (one device)")
    p.add_argument("--seq-len", type=int, default=50, help="--sequential: model.max_len")
    p.add_argument("--seq-batch", type=int, default=128, help="--sequential: batch size")
    p.add_argument("--seq-loss", default="sampled", choices=["full", "sampled"])
    p.add_argument("--seq-sampled", type=int, default=512, help="--sequential: negatives")
    return p.parse_args()


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:
    if ARGS.compilation_cache:                       # read by jax at import
        os.environ.update(JAX_COMPILATION_CACHE_DIR=ARGS.compilation_cache,
                          JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                          JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    from jaxreco.runtime import configure_xla

    configure_xla()                                  # the XLA flags jaxreco-train runs with
if ARGS is not None and ARGS.devices > 1 and not (ARGS.peers or ARGS.sequential):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={ARGS.devices}")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from jaxreco import config, losses, optim  # noqa: E402
from jaxreco.cli import CONF_DIR  # noqa: E402
from jaxreco.embedding import ShardedTables  # noqa: E402
from jaxreco.models.mf import MF  # noqa: E402
from jaxreco.sharding import batch_sharding, make_mesh  # noqa: E402
from jaxreco.train.state import create_state, table_axes  # noqa: E402
from jaxreco.train.step import make_train_step  # noqa: E402


def preset(name: str):
    config.register()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=[f"mesh={name}"])
    return dict(cfg.mesh.axes), dict(cfg.mesh.rules)


def make_bench(mesh_name: str, rows: int, batch: int, dim: int, optimizer: str, steps: int):
    """A compiled, warmed-up train step on ``mesh_name``; returns ``time_once() -> seconds
    per step`` over ``steps`` steps (call it repeatedly, interleaved with other configs)."""
    axes, rules = preset(mesh_name)
    mesh = make_mesh(axes)
    row_opt = optim.row_optimizer(optimizer, lr=0.01)
    tx = optim.dense_optimizer("adam", 1e-3)
    graphdef, state, shardings = create_state(
        lambda: MF(rows, rows, dim=dim, init_std=0.01, global_bias=3.5, rngs=nnx.Rngs(0)),
        row_opt, tx, mesh, rules)
    tables = ShardedTables(mesh, rules, table_axes(state.tables), MF.table_features, row_opt)

    def loss_fn(model, r, b):
        pred = model.score(r, b)
        return losses.mse_frobenius(pred, b["rating"], r, embedding_tables=MF.embedding_tables,
                                    reg=0.05), {}

    bs = batch_sharding(mesh, rules)
    step = jax.jit(make_train_step(graphdef, tables, loss_fn, tx),
                   in_shardings=(shardings, bs), out_shardings=(shardings, None),
                   donate_argnums=0)
    rng = np.random.default_rng(0)
    batches = [jax.device_put({"user": rng.integers(0, rows, batch, dtype=np.int32),
                               "item": rng.integers(0, rows, batch, dtype=np.int32),
                               "rating": rng.uniform(1, 5, batch).astype(np.float32)}, bs)
               for _ in range(8)]
    multi_cpu = len(mesh.devices.flat) > 1 and jax.devices()[0].platform == "cpu"
    for b in batches[:3]:                                     # compile + warm up
        state, _ = step(state, b)
    jax.block_until_ready(state)
    holder = [state]

    def time_once() -> float:
        state = holder.pop()
        t = time.perf_counter()
        for k in range(steps):
            state, _ = step(state, batches[k % len(batches)])
            if multi_cpu:       # the trainer syncs every step on multi-device CPU (see loop.py)
                jax.block_until_ready(state)
        jax.block_until_ready(state)
        holder.append(state)
        return (time.perf_counter() - t) / steps

    return time_once


def interleaved(benches: dict, repeats: int) -> tuple[dict, list[dict]]:
    """Each of ``benches`` (name -> ``time_once``) timed once per round, ``repeats`` rounds,
    round-robin: a slow spell of a shared machine hits every config alike. Returns the
    median seconds per step of each and the per-round times (for ratios of medians of
    per-round ratios)."""
    rounds = [{n: f() for n, f in benches.items()} for _ in range(repeats)]
    return {n: statistics.median(r[n] for r in rounds) for n in benches}, rounds


def round_ratio(rounds: list[dict], num: str, den: str) -> float:
    """Median over rounds of ``rounds[i][num] / rounds[i][den]`` (same-round pairs)."""
    return statistics.median(r[num] / r[den] for r in rounds)


# ---------------------------------------------------------------------- --peers: vs LibMF
def _ml1m_mf_task():
    """The ``ml1m_mf`` experiment's config and rating task, its train rows extended by the
    validation rows: the 90% of the random split LibMF fits on too."""
    from jaxreco.train import tasks as tasks_lib

    config.register()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=["experiment=ml1m_mf", "name=peers",
                                          "trainer.progress_bar=false"])
    task = tasks_lib.build(cfg, tasks_lib.PreparedData.prepare(cfg))
    tr, va = task.split["train"], task.split["val"]
    task.train_cols = {c: np.concatenate([tr[c], va[c]]) for c in ("user", "item", "rating")}
    return cfg, task


def mf_time_to_rmse(cfg, task, target: float, steps_per_call: int = 1
                    ) -> tuple[list[tuple[float, float]], float]:
    """``jaxreco-train``'s own loop (:func:`jaxreco.train.loop.train_and_evaluate`) on
    ``task`` with ``trainer.steps_per_call=K`` for ``trainer.epochs`` epochs (no early stop,
    no checkpoints, no TensorBoard): ``([(training seconds so far, test RMSE) per epoch],
    seconds to reach target)``. The loop's per-epoch validation is pointed at the test rows
    (the validation rows are in ``task.train_cols``). The clock starts at the first batch
    (so the first step's compile counts) and stops while the test set is scored."""
    import tempfile

    from omegaconf import OmegaConf

    from jaxreco.train import loop

    epochs = int(cfg.trainer.epochs)
    cfg = OmegaConf.merge(cfg, {"trainer": {"steps_per_call": steps_per_call,
                                            "checkpoint": False, "patience": epochs + 1,
                                            "progress_bar": False},
                                "logger": {"tensorboard": False}})
    clock = {"t0": None, "eval": 0.0}
    curve: list[tuple[float, float]] = []
    transform, evaluate = task.transform, task.evaluate

    def first_batch_starts_the_clock(batch, step, shard_index):
        if clock["t0"] is None:
            clock["t0"] = time.perf_counter()
        return transform(batch, step, shard_index)

    def epoch_end_scores_test(state, split, full=False):
        if split != "val" or len(curve) == epochs:        # the final report: as it is
            return evaluate(state, split, full)
        jax.block_until_ready(state)
        t = time.perf_counter()
        out = evaluate(state, "test", full)
        curve.append((t - clock["t0"] - clock["eval"], out["rmse"]))
        clock["eval"] += time.perf_counter() - t
        return out

    task.transform, task.evaluate = first_batch_starts_the_clock, epoch_end_scores_test
    try:
        with tempfile.TemporaryDirectory() as workdir:
            loop.train_and_evaluate(cfg, workdir, task=task)
    finally:
        del task.transform, task.evaluate               # the class's methods again
    if len(curve) != epochs:
        raise RuntimeError(f"expected {epochs} epoch-end scores, got {len(curve)}")
    hit = next((s for s, r in curve if r <= target), float("nan"))
    return curve, hit


def _libmf():
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):       # it prints where its .so is
        from libmf import mf
    return mf


def _c_stdout_to(path: str):
    """Context manager: the C library's stdout (LibMF's per-iteration table) into ``path``."""
    import contextlib
    import ctypes

    @contextlib.contextmanager
    def redirect():
        libc = ctypes.CDLL(None)
        sys.stdout.flush()
        saved = os.dup(1)
        with open(path, "wb") as f:
            os.dup2(f.fileno(), 1)
            try:
                yield
            finally:
                libc.fflush(None)
                os.dup2(saved, 1)
                os.close(saved)
    return redirect()


def libmf_time_to_rmse(train: np.ndarray, test: np.ndarray, target: float, iters: int,
                       threads: int, rating_range) -> dict:
    """LibMF (k 128, η 0.03, L2 0.05 on P and Q, no L1) fitted on ``train`` rows
    ``[user, item, rating]``. Run 1 (``iters`` iterations) prints the test RMSE of every
    iteration; run 2 refits from scratch with just enough iterations to reach ``target``,
    timed alone. RMSEs are recomputed from LibMF's predictions, clipped to the rating range
    like jaxreco's evaluator."""
    import tempfile

    mf = _libmf()

    def model(n, quiet):
        return mf.MF(k=128, nr_iters=n, eta=0.03, lambda_p1=0.0, lambda_q1=0.0,
                     lambda_p2=0.05, lambda_q2=0.05, nr_threads=threads, quiet=quiet)

    u, i = test[:, 0].astype(np.int64), test[:, 1].astype(np.int64)

    def rmse(m):
        # The binding's predict() misreads its input here; LibMF's own prediction is p_u·q_i,
        # or the global mean b for an id it never saw (NaN or out-of-range factors).
        p, q, b = m.p_factors(), m.q_factors(), float(m.model.b)
        ok = (u < p.shape[0]) & (i < q.shape[0])
        pred = np.einsum("nk,nk->n", p[np.where(ok, u, 0)], q[np.where(ok, i, 0)])
        pred = np.where(ok & ~np.isnan(pred), pred, b)
        if rating_range is not None:
            pred = np.clip(pred, *rating_range)
        return float(np.sqrt(np.mean((pred - test[:, 2]) ** 2)))

    with tempfile.NamedTemporaryFile(suffix=".txt") as log_file:
        m = model(iters, quiet=False)
        t = time.perf_counter()
        with _c_stdout_to(log_file.name):
            m.mf_train_test(train, test)
        seconds_logged = time.perf_counter() - t
        rows = [line.split() for line in open(log_file.name)]
    va = [float(r[2]) for r in rows if len(r) >= 3 and r[0].isdigit()]
    if len(va) != iters:
        raise RuntimeError(f"LibMF printed {len(va)} per-iteration rows, expected {iters}: "
                           f"{rows[:5]}")
    final = rmse(m)
    first = next((i + 1 for i, v in enumerate(va) if v <= target), None)
    out = {"curve": va, "final_rmse": final, "seconds_all_iters_logged": seconds_logged,
           "iters_to_target": first, "seconds_to_target": float("nan"), "rmse_at_target": None}
    if first is not None:
        m2 = model(first, quiet=True)
        t = time.perf_counter()
        m2.fit(train)
        out["seconds_to_target"] = time.perf_counter() - t
        out["rmse_at_target"] = rmse(m2)
    return out


def peers(a) -> None:
    """``ml1m_mf`` (refit on train + validation) vs LibMF on the same rows and cores."""
    dev = jax.devices()[0]
    cfg, task = _ml1m_mf_task()
    cols, te = task.train_cols, task.split["test"]
    rating_range = cfg.dataset.get("rating_range", None)
    print(f"device: {dev.device_kind} ({dev.platform}), libmf threads: {a.libmf_threads}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if a.compilation_cache:
        n = len(os.listdir(a.compilation_cache)) if os.path.isdir(a.compilation_cache) else 0
        print(f"compilation cache: {a.compilation_cache} ({n} entries before this run: "
              f"{'warm' if n else 'cold'})")
    print(f"split: ml1m_mf random 90/10 (seed {cfg.task.prepare.split.seed}): "
          f"{len(cols['user'])} train+val rows, {len(te['user'])} test rows")
    print(f"config: jaxreco ml1m_mf dim={cfg.model.dim} reg={cfg.model.reg} "
          f"{cfg.optimizer.name} lr={cfg.optimizer.lr} schedule={cfg.optimizer.schedule} "
          f"batch={cfg.trainer.batch_size} epochs={cfg.trainer.epochs}; libmf k=128 "
          f"iters={a.libmf_iters} eta=0.03 l2=0.05", flush=True)
    hits = {}
    for k in a.steps_per_call:
        curve, hits[k] = mf_time_to_rmse(cfg, task, a.target_rmse, k)
        sfx = "" if k == 1 else f"_spc{k}"
        print(f"  jaxreco-train loop, trainer.steps_per_call={k}:")
        for e, (s, r) in enumerate(curve, 1):
            print(f"  mf{sfx} epoch {e}: {s:.2f} s  test rmse {r:.4f}")
        print(f"mf_seconds_to_rmse{sfx}: {hits[k]:.2f}")
        print(f"mf_seconds_all_epochs{sfx}: {curve[-1][0]:.2f}")
        print(f"mf_final_rmse{sfx}: {curve[-1][1]:.4f}", flush=True)
    to_rows = lambda d: np.stack([d["user"], d["item"], d["rating"]], 1).astype(np.float32)  # noqa: E731
    lm = libmf_time_to_rmse(to_rows(cols), to_rows(te), a.target_rmse, a.libmf_iters,
                            a.libmf_threads, rating_range)
    print(f"  libmf iterations to rmse {a.target_rmse} (its own unclipped log): "
          f"{lm['iters_to_target']}; every 10th: "
          + " ".join(f"{v:.4f}" for v in lm["curve"][9::10]))
    print(f"libmf_seconds_to_rmse: {lm['seconds_to_target']:.2f}"
          + (f"  (refit with {lm['iters_to_target']} iterations: test rmse "
             f"{lm['rmse_at_target']:.4f})" if lm["rmse_at_target"] is not None else ""))
    print(f"libmf_seconds_all_iters: {lm['seconds_all_iters_logged']:.2f}  (per-iteration "
          f"test RMSE logged)")
    print(f"libmf_final_rmse: {lm['final_rmse']:.4f}")
    for k, hit in hits.items():
        sfx = "" if k == 1 else f"_spc{k}"
        print(f"mf_vs_libmf_time_to_rmse_ratio{sfx}: {hit / lm['seconds_to_target']:.3f}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


# ---------------------------------------------------------------------- --sequential
def bench_sequential(a) -> None:
    """Examples/s of the sequential model through the trainer's own step and batches."""
    import tempfile

    from jaxreco.train import setup, tasks as tasks_lib

    config.register()
    over = ["experiment=ml1m_sasrec", "name=bench", "dataset=synthetic-ecommerce",
            "dataset.num_interactions=1000000", "dataset.num_users=6040",
            "dataset.num_items=3706", "task.prepare.negatives.num=0",
            f"model.max_len={a.seq_len}", f"trainer.batch_size={a.seq_batch}",
            f"task.next_item.loss={a.seq_loss}", f"task.next_item.num_sampled={a.seq_sampled}",
            "task.next_item.crop=random", "mesh=single", "trainer.progress_bar=false"]
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=over)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("JAXRECO_CACHE", tmp)
        task = tasks_lib.build(cfg, tasks_lib.PreparedData.prepare(cfg))
    mesh = make_mesh(dict(cfg.mesh.axes))
    ms = setup.model_state(cfg, task, mesh)
    bs = batch_sharding(mesh, dict(cfg.mesh.rules))
    step_fn, _, next_batch = setup.train_step(cfg, task, ms, mesh, bs, (0, 1))
    batches = [jax.device_put(next_batch(k), bs) for k in range(8)]
    targets = [int((np.asarray(b["item"]) >= 0).sum()) for b in batches]
    state = ms.state
    for b in batches[:3]:                                     # compile + warm up
        state, _ = step_fn(state, b)
    jax.block_until_ready(state)
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        for k in range(a.steps):
            state, _ = step_fn(state, batches[k % len(batches)])
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t) / a.steps)
    dt = statistics.median(times)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}) x{jax.device_count()}")
    print(f"config: L={a.seq_len} batch={a.seq_batch} loss={a.seq_loss}"
          f"{f' ({a.seq_sampled} shared negatives)' if a.seq_loss == 'sampled' else ''} "
          f"dim={cfg.model.dim} blocks={cfg.model.num_blocks} items={task.num_items} "
          f"os.cpu_count={os.cpu_count()}")
    print(f"sequential_step_ms: {dt * 1e3:.2f}")
    print(f"sequential_examples_per_s: {a.seq_batch / dt:.0f}  [{dev.device_kind}]")
    print(f"sequential_positions_per_s: {statistics.mean(targets) / dt:.0f}  [{dev.device_kind}]")


def main() -> None:
    a = ARGS
    if a.peers:
        return peers(a)
    if a.sequential:
        return bench_sequential(a)
    dev = jax.devices()[0]
    gpu = dev.platform != "cpu"
    print(f"device: {dev.device_kind} ({dev.platform}) x{jax.device_count()}")
    print(f"config: batch={a.batch} dim={a.dim} optimizer={a.optimizer} "
          f"tables=2x(rows,{a.dim})+2x(rows,1)")
    times, rounds = interleaved(
        {rows: make_bench("single", rows, a.batch, a.dim, a.optimizer, a.steps)
         for rows in sorted(a.rows)}, a.repeats)
    for rows in sorted(a.rows):
        print(f"step_ms_{rows}: {times[rows] * 1e3:.3f}", flush=True)
        print(f"mf_examples_per_s_rows_{rows}: {a.batch / times[rows]:.0f}", flush=True)
        if gpu:
            print(f"mf_examples_per_s_{rows // 1_000_000}m_rows: {a.batch / times[rows]:.0f}  "
                  f"[{dev.device_kind}]", flush=True)
    lo, hi = min(times), max(times)
    print(f"train_examples_per_s: {a.batch / times[lo]:.0f}")
    print(f"table_scaling_ratio: {round_ratio(rounds, hi, lo):.3f}")
    del rounds
    benches = {m: make_bench(m, a.mesh_rows, a.batch, a.dim, a.optimizer, a.steps)
               for m in a.meshes}
    mesh_times, mesh_rounds = interleaved(benches, a.repeats)
    per_mesh = {m: a.batch / mesh_times[m] for m in a.meshes}
    for m in a.meshes:
        print(f"{m}_examples_per_s: {per_mesh[m]:.0f}  [{dev.device_kind} x{jax.device_count()}, "
              f"{a.mesh_rows} rows]", flush=True)
    for m in ("dp_mp", "dp", "mp"):        # examples/s ratio = single's time / m's time
        if "single" in per_mesh and m in per_mesh:
            print(f"{'cpu_' if not gpu else ''}{m}_vs_single: "
                  f"{round_ratio(mesh_rounds, 'single', m):.3f}")
    print(f"load_average_1m: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
