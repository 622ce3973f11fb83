"""Train-step throughput of biased MF: table-size scaling and mesh layouts.

    python scripts/bench_train.py                       # everything below, on the CPU
    python scripts/bench_train.py --rows 1000000 20000000 --batch 131072 --meshes single   # GPU

Runs the trainer's own jitted ``train_step`` (sharded lookup, row-sparse optimizer, donated
state) on synthetic uniformly random ids. Prints ``name: value`` lines:

  step_ms_<rows>              median step time, ``single`` mesh, per row count
  train_examples_per_s        ``single`` at the smallest row count
  table_scaling_ratio         step time at the largest / smallest row count (≤ 1.5: the step
                              cost does not grow with the catalogue)
  <mesh>_examples_per_s       per mesh preset, on ``--devices`` devices (CPU: fake devices)
  cpu_dp_mp_vs_single         dp_mp / single examples/s
  mf_examples_per_s_<N>_rows  on a GPU, per row count
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
    return p.parse_args()


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.devices > 1:
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


def bench(mesh_name: str, rows: int, batch: int, dim: int, optimizer: str, steps: int,
          repeats: int) -> float:
    """Median seconds per step."""
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
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for k in range(steps):
            state, _ = step(state, batches[k % len(batches)])
            if multi_cpu:       # the trainer syncs every step on multi-device CPU (see loop.py)
                jax.block_until_ready(state)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t) / steps)
    del state
    return statistics.median(times)


def main() -> None:
    a = ARGS
    dev = jax.devices()[0]
    gpu = dev.platform != "cpu"
    print(f"device: {dev.device_kind} ({dev.platform}) x{jax.device_count()}")
    print(f"config: batch={a.batch} dim={a.dim} optimizer={a.optimizer} "
          f"tables=2x(rows,{a.dim})+2x(rows,1)")
    times = {}
    for rows in sorted(a.rows):
        times[rows] = bench("single", rows, a.batch, a.dim, a.optimizer, a.steps, a.repeats)
        print(f"step_ms_{rows}: {times[rows] * 1e3:.3f}", flush=True)
        if gpu:
            print(f"mf_examples_per_s_{rows // 1_000_000}m_rows: {a.batch / times[rows]:.0f}  "
                  f"[{dev.device_kind}]", flush=True)
    lo, hi = min(times), max(times)
    print(f"train_examples_per_s: {a.batch / times[lo]:.0f}")
    print(f"table_scaling_ratio: {times[hi] / times[lo]:.3f}")
    per_mesh = {}
    for m in a.meshes:
        per_mesh[m] = a.batch / bench(m, a.mesh_rows, a.batch, a.dim, a.optimizer, a.steps,
                                      a.repeats)
        print(f"{m}_examples_per_s: {per_mesh[m]:.0f}  [{dev.device_kind} x{jax.device_count()}, "
              f"{a.mesh_rows} rows]", flush=True)
    if "single" in per_mesh and "dp_mp" in per_mesh:
        print(f"{'cpu_' if not gpu else ''}dp_mp_vs_single: {per_mesh['dp_mp'] / per_mesh['single']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
