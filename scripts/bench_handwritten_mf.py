"""A hand-written biased-MF train step in plain JAX: the ceiling for the framework's step.

    python scripts/bench_handwritten_mf.py --rows 1000000 20000000 --batch 131072 --dim 64

No framework: two ``[rows, dim]`` tables and two bias vectors, a row-wise Adagrad
accumulator each; one jitted, donated step gathers the batch's rows, computes
``r̂ = μ + b_u + b_i + p_u·q_i`` and the gradient of ``mean((r̂ − r)² + λ(‖p_u‖² + ‖q_i‖²))``
by hand, and scatter-adds row-wise Adagrad updates (accumulator ``+= mean(g²)``, row
``−= lr · g / √acc``). Repeated ids in a batch are updated per occurrence (summed by the
scatter-add), not deduplicated first as jaxreco's row optimizer does: it is a speed ceiling
for the same shapes, not the same numbers. Same synthetic uniform ids as
``scripts/bench_train.py``. Prints ``handwritten_examples_per_s_<rows>: value`` per row count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def make_step(lr: float, reg: float, eps: float = 1e-8):
    def step(p, b):
        u, i, r = b["user"], b["item"], b["rating"]
        pu, qi = p["U"][u], p["I"][i]
        err = p["mu"] + p["bu"][u] + p["bi"][i] + jnp.sum(pu * qi, -1) - r
        scale = 2.0 / r.shape[0]
        gu = scale * (err[:, None] * qi + reg * pu)
        gi = scale * (err[:, None] * pu + reg * qi)
        gb = scale * err
        out = dict(p)
        for tab, acc, ids, g in (("U", "aU", u, gu), ("I", "aI", i, gi)):
            a = p[acc].at[ids].add(jnp.mean(g * g, -1))
            out[acc] = a
            out[tab] = p[tab].at[ids].add(-lr * g / (jnp.sqrt(a[ids])[:, None] + eps))
        for tab, acc, ids in (("bu", "abu", u), ("bi", "abi", i)):
            a = p[acc].at[ids].add(gb * gb)
            out[acc] = a
            out[tab] = p[tab].at[ids].add(-lr * gb / (jnp.sqrt(a[ids]) + eps))
        out["mu"] = p["mu"] - 1e-3 * jnp.sum(gb)
        return out, jnp.mean(err * err)
    return step


def bench(rows: int, batch: int, dim: int, steps: int, repeats: int) -> float:
    """Median seconds per step."""
    key = jax.random.PRNGKey(0)
    p = {"U": 0.01 * jax.random.normal(key, (rows, dim)),
         "I": 0.01 * jax.random.normal(jax.random.fold_in(key, 1), (rows, dim)),
         "bu": jnp.zeros((rows,)), "bi": jnp.zeros((rows,)),
         "aU": jnp.zeros((rows,)), "aI": jnp.zeros((rows,)),
         "abu": jnp.zeros((rows,)), "abi": jnp.zeros((rows,)), "mu": jnp.float32(3.5)}
    step = jax.jit(make_step(lr=0.01, reg=0.05), donate_argnums=0)
    rng = np.random.default_rng(0)
    batches = [jax.device_put({"user": rng.integers(0, rows, batch, dtype=np.int32),
                               "item": rng.integers(0, rows, batch, dtype=np.int32),
                               "rating": rng.uniform(1, 5, batch).astype(np.float32)})
               for _ in range(8)]
    for b in batches[:3]:
        p, loss = step(p, b)
    jax.block_until_ready(p)
    if not np.isfinite(float(loss)):
        raise RuntimeError(f"hand-written MF step diverged (loss {float(loss)})")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for k in range(steps):
            p, _ = step(p, batches[k % len(batches)])
        jax.block_until_ready(p)
        times.append((time.perf_counter() - t) / steps)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 20_000_000])
    ap.add_argument("--batch", type=int, default=131072)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform})")
    for rows in a.rows:
        s = bench(rows, a.batch, a.dim, a.steps, a.repeats)
        print(f"handwritten_examples_per_s_{rows}: {a.batch / s:.0f}", flush=True)


if __name__ == "__main__":
    main()
