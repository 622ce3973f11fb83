"""Train-step throughput of biased MF and how it scales with the number of table rows.

    python scripts/bench_train.py [--rows 100000 10000000] [--batch 8192] [--dim 64]

Runs the trainer's own jitted ``train_step`` (row-sparse optimizer, donated state) on
synthetic uniformly random ids, so every step touches ~2·batch distinct rows spread over the
whole table. Prints ``name: value`` lines:

  train_examples_per_s        at the smallest row count
  step_ms_<rows>              median step time per row count
  table_scaling_ratio         step time at the largest / smallest row count (≤ 1.5 means
                              the step cost does not grow with the catalogue)
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreco import losses, optim
from jaxreco.models.mf import MF
from jaxreco.sharding import make_mesh
from jaxreco.embedding import ShardedTables
from jaxreco.train.state import create_state, table_axes
from jaxreco.train.step import make_train_step


def bench(rows: int, batch: int, dim: int, optimizer: str, steps: int, repeats: int) -> float:
    mesh = make_mesh({"data": 1, "model": 1}, jax.devices()[:1])
    rules = {"batch": "data", "user": "model", "item": "model", "embed": None}
    row_opt = optim.row_optimizer(optimizer, lr=0.01)
    tx = optim.dense_optimizer("adam", 1e-3)
    graphdef, state, shardings = create_state(
        lambda: MF(rows, rows, dim=dim, init_std=0.01, global_bias=3.5, rngs=nnx.Rngs(0)),
        row_opt, tx, mesh, rules)

    def loss_fn(model, r, b):
        pred = model.score(r, b)
        return losses.mse_frobenius(pred, b["rating"], r, embedding_tables=MF.embedding_tables,
                                    reg=0.05), {}

    tables = ShardedTables(mesh, rules, table_axes(state.tables), MF.table_features, row_opt)
    step = jax.jit(make_train_step(graphdef, tables, loss_fn, tx),
                   donate_argnums=0)
    rng = np.random.default_rng(0)
    batches = [jax.device_put({"user": rng.integers(0, rows, batch, dtype=np.int32),
                               "item": rng.integers(0, rows, batch, dtype=np.int32),
                               "rating": rng.uniform(1, 5, batch).astype(np.float32)})
               for _ in range(16)]
    for b in batches[:3]:                                     # compile + warm up
        state, m = step(state, b)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for k in range(steps):
            state, m = step(state, batches[k % len(batches)])
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t) / steps)
    del state
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 10_000_000])
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--optimizer", default="adagrad", choices=sorted(optim.ROW_OPTIMIZERS))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}")
    print(f"config: batch={a.batch} dim={a.dim} optimizer={a.optimizer} tables=2x(rows, dim)+2x(rows, 1)")
    times = {}
    for rows in sorted(a.rows):
        times[rows] = bench(rows, a.batch, a.dim, a.optimizer, a.steps, a.repeats)
        print(f"step_ms_{rows}: {times[rows] * 1e3:.3f}", flush=True)
    lo, hi = min(times), max(times)
    print(f"train_examples_per_s: {a.batch / times[lo]:.0f}")
    print(f"table_scaling_ratio: {times[hi] / times[lo]:.3f}")


if __name__ == "__main__":
    main()
