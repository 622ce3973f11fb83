"""Epoch time of iALS (``optimizer=ials``) on synthetic long-tailed positives.

    python scripts/bench_ials.py                                   # ML-1M shape, dim 64/192
    python scripts/bench_ials.py --users 138493 --items 26744 --positives 20000000 --dims 128

The default shape is MovieLens 1M's (6,040 users x 3,706 items, 1M positives); user
activity and item popularity follow Zipf-like laws so the length buckets look like real
data. Runs the trainer's own jitted epoch (``jaxreco.train.ials.make_epoch``: every user
row solved, then every item row) on the default device. Prints ``name: value`` lines:

  ials_padded_fraction          padded / real history slots (bucketing overhead)
  ials_compile_s_<dim>          first epoch (compile + run)
  ials_epoch_s_<dim>            median epoch after it
  ials_positives_per_s_<dim>    positives / epoch time
  ials_epoch_s_<dim>_recency    median epoch with recency weights (``--recency_weight``,
                                random timestamps): the per-positive confidences' cost
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxreco import optim
from jaxreco.models.embed_mlp import EmbedMLP
from jaxreco.sharding import make_mesh
from jaxreco.train import ials
from jaxreco.train.state import create_state


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=6040)
    p.add_argument("--items", type=int, default=3706)
    p.add_argument("--positives", type=int, default=1_000_000)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 192])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recency_weight", type=float, default=60.0,
                   help="also time epochs with recency-weighted positives (0: skip)")
    return p.parse_args()


def positives(users: int, items: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct (user, item) pairs, both sides long-tailed (Zipf-like weights)."""
    rng = np.random.default_rng(seed)
    wu = 1.0 / np.arange(1, users + 1) ** 0.8
    wi = 1.0 / np.arange(1, items + 1) ** 0.9
    keys = np.unique(rng.choice(users, 2 * n, p=wu / wu.sum()).astype(np.int64) * items
                     + rng.choice(items, 2 * n, p=wi / wi.sum()))[:n]
    return (keys // items).astype(np.int32), (keys % items).astype(np.int32)


def main() -> None:
    a = _args()
    u, i = positives(a.users, a.items, a.positives, a.seed)
    print(f"device: {jax.devices()[0].device_kind}")
    print(f"ials_positives: {len(u)}")
    mesh = make_mesh({"data": 1, "model": 1}, devices=jax.devices()[:1])
    rules = {"batch": None, "user": None, "item": None, "embed": None}
    ts = np.random.default_rng(a.seed + 1).integers(0, 10**9, len(u))
    conf = (ials.recency_weights(u, ts, strength=a.recency_weight, half_life=3.0)
            if a.recency_weight else None)
    for dim in a.dims:
        for weights in ([None, conf] if conf is not None else [None]):
            suffix = "" if weights is None else "_recency"
            users = ials.group_rows(u, i, a.users, a.items, pad_row=a.users, dim=dim,
                                    weights=weights)
            items = ials.group_rows(i, u, a.items, a.users, pad_row=a.items, dim=dim,
                                    weights=weights)
            if dim == a.dims[0] and weights is None:
                print(f"ials_padded_fraction: {(users.padded + items.padded) / (2 * len(u)):.3f}")
            _time(a, dim, users, items, len(u), mesh, rules, suffix)


def _time(a, dim, users, items, n, mesh, rules, suffix) -> None:
    _, state, shardings = create_state(
        lambda: EmbedMLP(a.users, a.items, combiner="dot", mf_dim=dim, bias=False,
                         init_std=0.1 / dim ** 0.5, rngs=nnx.Rngs(a.seed)),
        optim.row_optimizer("ials"), optim.dense_optimizer("adam", 0.0), mesh, rules)
    epoch = jax.jit(ials.make_epoch(users, items, user_table="user_mf",
                                    item_table="item_mf", alpha0=0.2, reg=0.007, nu=1.0),
                    out_shardings=(shardings, None), donate_argnums=0)
    data = jax.device_put(ials.epoch_data(users, items), NamedSharding(mesh, P()))
    t = time.perf_counter()
    state, m = epoch(state, data)
    jax.block_until_ready(m)
    print(f"ials_compile_s_{dim}{suffix}: {time.perf_counter() - t:.2f}")
    times = []
    for _ in range(a.epochs):
        t = time.perf_counter()
        state, m = epoch(state, data)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(f"ials_epoch_s_{dim}{suffix}: {med:.3f}")
    print(f"ials_positives_per_s_{dim}{suffix}: {n / med:.0f}")
    print(f"ials_loss_{dim}{suffix}: {float(m['loss']):.4f}")


if __name__ == "__main__":
    main()
