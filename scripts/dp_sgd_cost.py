"""The cost of DP-SGD's dense table update (jaxreco/privacy/dp_sgd.py, step 6) against the
row-sparse update of a non-private step, on one table of ``--dim`` columns.

    python scripts/dp_sgd_cost.py --rows 3706 100000 1000000 --touched 65536

Per table size prints ``dense_ms_rows<N>`` (Gaussian noise on every row, then the row
optimizer on every row: what a DP-SGD step does) and ``sparse_ms_rows<N>`` (the row
optimizer on the ``--touched`` ids of one batch, deduplicated: what a non-private step
does), each the median of ``--repeat`` jitted calls after a warm-up, in milliseconds.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxreco import optim


def _time(fn, table, slots, *args, repeat: int) -> float:
    """Median ms of ``table, slots = fn(table, slots, *args)`` (buffers donated, as in a
    training step, so neither update copies the table)."""
    table, slots = fn(table, slots, *args)
    jax.block_until_ready(table)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        table, slots = fn(table, slots, *args)
        jax.block_until_ready(table)
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[3706, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--touched", type=int, default=65536)
    ap.add_argument("--optimizer", default="lazy_adam")
    ap.add_argument("--repeat", type=int, default=10)
    a = ap.parse_args()
    opt = optim.row_optimizer(a.optimizer, lr=1e-3)
    for n in a.rows:
        table = jax.random.normal(jax.random.key(0), (n, a.dim)) * 0.01
        slots = opt.init(table)
        ids = jax.random.randint(jax.random.key(1), (a.touched,), 0, n)
        grads = jax.random.normal(jax.random.key(2), (a.touched, a.dim))

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def dense(table, slots, key, step):
            g = jax.random.normal(key, table.shape, table.dtype)
            return opt.apply(table, slots, jnp.arange(n, dtype=jnp.int32), g, step)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def sparse(table, slots, ids, grads, step):
            return opt.update(table, slots, ids, grads, step)

        step = jnp.int32(10)
        d = _time(dense, table, slots, jax.random.key(3), step, repeat=a.repeat)
        table = jax.random.normal(jax.random.key(0), (n, a.dim)) * 0.01
        s = _time(sparse, table, opt.init(table), ids, grads, step, repeat=a.repeat)
        print(f"dense_ms_rows{n}: {d:.2f}", flush=True)
        print(f"sparse_ms_rows{n}: {s:.2f}", flush=True)


if __name__ == "__main__":
    from jaxreco.runtime import configure_xla
    configure_xla()   # before JAX starts (jaxreco/runtime.py: XLA:CPU's scheduler can wedge solves)
    main()
