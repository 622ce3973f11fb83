"""Optimizers: row-sparse ones for embedding tables, optax chains for dense parameters.

A batch of ``B`` examples touches at most ``B`` rows of each table, so the update of a
table must cost ``O(B · dim)``, not ``O(rows · dim)``: a dense optax step over a 10M-row
table reads and writes every row (and its moments) every step. The optimizers here

1. deduplicate the batch's row ids (``jnp.unique`` with a static size) and sum the
   gradients of repeated ids (``segment_sum``), giving the exact gradient of each row;
2. read only those rows (and their optimizer slots), update them, scatter them back.
   Padding slots use the out-of-range id ``num_rows`` and are dropped by the scatter.

Updates on the touched rows equal the dense update restricted to those rows for SGD and
Adagrad; for Adam this is "lazy Adam" (moments of untouched rows are not decayed), the
usual choice for embeddings (TF ``LazyAdam``, FBGEMM's row-wise optimizers).

* ``sgd``:          w ← w − η g
* ``adagrad``:      row-wise Adagrad (one accumulator per row, FBGEMM/TPU-embedding style):
                    a ← a + mean_j g_j²;   w ← w − η g / (√a + ε)
* ``lazy_adam``:    m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
                    w ← w − η m̂ / (√v̂ + ε) with global-step bias correction.
* ``adam``:         the same on *every* row (untouched rows have g = 0 but still move with
                    their momentum): dense Adam, ``O(rows · dim)`` per step, for small tables.
* ``ials``:         not a gradient optimizer: alternating least squares over whole tables,
                    one solve per epoch (``jaxreco.train.ials``).
* ``bpmf``:         not a gradient optimizer: Bayesian MF, one Gibbs sweep over whole tables
                    per epoch (``jaxreco.train.bpmf``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def sort_positions(keys: jax.Array, bound: int) -> tuple[jax.Array, jax.Array]:
    """``(sorted keys, pos)`` for int keys in ``[0, bound]``: ``sorted[pos[i]] == keys[i]``.

    Equal keys may map to different (equal-keyed) positions, so anything computed per
    sorted position and constant over runs of equal keys (a unique index, a buffer slot)
    is read back per key as ``value[pos]``. XLA:CPU sorts one int32 array several times
    faster than a key/value pair, so only single-operand sorts are used: when
    ``bound · 2^⌈log2 n⌉`` fits in int32 the index is packed under the key (one sort, one
    scatter), otherwise the keys are sorted alone and located with a binary search.
    """
    n = keys.shape[0]
    bits = max(1, (n - 1).bit_length())
    keys = keys.astype(jnp.int32)
    if (bound + 1) << bits <= 2 ** 31:
        iota = jnp.arange(n, dtype=jnp.int32)
        packed = jnp.sort((keys << bits) | iota)
        pos = jnp.zeros((n,), jnp.int32).at[packed & ((1 << bits) - 1)].set(
            iota, unique_indices=True)
        return packed >> bits, pos
    skey = jnp.sort(keys)
    return skey, jnp.searchsorted(skey, keys).astype(jnp.int32)


def take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table[ids]`` along axis 0 (ids clipped into range): the rows' values unchanged.

    XLA:CPU emits a gather whose result is materialised as-is as a scalar copy loop that
    keeps few cache misses in flight; on a table larger than the caches it is ~5x slower
    than the vectorised loop emitted when the gather feeds arithmetic in its fusion. The
    arithmetic here is ``r / (1 + 0·r)``: exactly ``r`` for finite values (non-finite rows
    become NaN, as any loss over them would), and a division, which XLA never duplicates
    into consumers, so the gather stays inside the one vectorised fusion.
    """
    rows = table.at[ids].get(mode="clip")
    if not jnp.issubdtype(table.dtype, jnp.floating):
        return rows
    return rows / (1 + 0 * rows)


def unique_inverse(ids: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """``jnp.unique(ids, size=m, fill_value=num_rows, return_inverse=True)`` for ids in
    ``[0, num_rows]`` (others count as ``num_rows``), with one single-operand sort.

    ``m = min(len(ids), num_rows + 1)``: a batch cannot touch more distinct rows than the
    table has (plus the padding id), so on a small table (a catalogue of a few thousand
    items looked up by a batch with many sampled negatives) the unique buffer, and every
    per-unique-row array built from it, is the table's size, not the batch's.
    """
    n = ids.shape[0]
    m = min(n, num_rows + 1)
    ids = jnp.where((ids >= 0) & (ids < num_rows), ids, num_rows)
    skey, pos = sort_positions(ids, num_rows)
    first = jnp.concatenate([jnp.ones((1,), bool), skey[1:] != skey[:-1]])
    uidx = jnp.cumsum(first.astype(jnp.int32)) - 1
    uids = jnp.full((m,), num_rows, jnp.int32).at[jnp.where(first, uidx, m)].set(
        skey, mode="drop")
    return uids, uidx[pos]


def dedup(ids: jax.Array, grads: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """Unique ids (padded with ``num_rows``) and the summed gradient of each.

    Args:
      ids: int [n] row ids, possibly repeated; ids outside ``[0, num_rows)`` are ignored.
      grads: [n, dim] per-occurrence gradients.
    Returns:
      ``(uids [m], ugrads [m, dim])`` with ``m = min(n, num_rows + 1)``; slots past the
      number of distinct ids hold id
      ``num_rows`` (out of range: gathers clamp, scatters with ``mode='drop'`` ignore them)
      and zero gradient.
    """
    uids, inv = unique_inverse(ids, num_rows)
    ugrads = jax.ops.segment_sum(grads, inv, num_segments=uids.shape[0])
    return uids, ugrads


@dataclasses.dataclass(frozen=True)
class RowOptimizer:
    """A row-sparse optimizer.

    ``init(table) -> slots``; ``apply(table, slots, uids, ugrads, step) -> (table, slots)``
    updates the distinct rows ``uids`` (out-of-range ids are ignored) with their summed
    gradients ``ugrads``; ``update(table, slots, ids, grads, step)`` first deduplicates.
    """
    name: str
    init: Callable[[jax.Array], dict[str, jax.Array]]
    apply: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]

    def update(self, table, slots, ids, grads, step):
        uids, ugrads = dedup(ids, grads, table.shape[0])
        return self.apply(table, slots, uids, ugrads, step)


def lr_at(lr, step):
    """The learning rate at ``step``: ``lr`` itself, or ``lr(step)`` for a schedule."""
    return lr(step) if callable(lr) else lr


def schedule(lr: float, kind: str, total_steps: int):
    """``constant`` (the float ``lr``), or ``linear`` / ``cosine`` decay from ``lr`` to 0 at
    ``total_steps`` (an optax schedule of the step)."""
    if kind == "constant":
        return lr
    if total_steps < 1:
        raise ValueError(f"optimizer.schedule={kind!r} needs a run of at least one step")
    if kind == "linear":
        return optax.linear_schedule(lr, 0.0, total_steps)
    if kind == "cosine":
        return optax.cosine_decay_schedule(lr, total_steps)
    raise ValueError(f"optimizer.schedule={kind!r}: must be constant, linear or cosine")


def _rows(x: jax.Array, ids: jax.Array) -> jax.Array:
    return x.at[ids].get(mode="clip")


def _put(x: jax.Array, ids: jax.Array, v: jax.Array) -> jax.Array:
    return x.at[ids].set(v, mode="drop")


def sgd(lr: float) -> RowOptimizer:
    def init(table):
        return {}

    def apply(table, slots, uids, g, step):
        return table.at[uids].add((-lr_at(lr, step) * g).astype(table.dtype), mode="drop"), slots

    return RowOptimizer("sgd", init, apply)


def adagrad(lr: float, eps: float = 1e-8, initial_accumulator: float = 0.0) -> RowOptimizer:
    def init(table):
        return {"acc": jnp.full(table.shape[:1], initial_accumulator, jnp.float32)}

    def apply(table, slots, uids, g, step):
        acc = _rows(slots["acc"], uids) + jnp.mean(g * g, axis=-1)
        w = _rows(table, uids) - lr_at(lr, step) * g / (jnp.sqrt(acc)[:, None] + eps)
        return _put(table, uids, w), {"acc": _put(slots["acc"], uids, acc)}

    return RowOptimizer("adagrad", init, apply)


def lazy_adam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> RowOptimizer:
    def init(table):
        return {"m": jnp.zeros_like(table), "v": jnp.zeros_like(table)}

    def apply(table, slots, uids, g, step):
        m = b1 * _rows(slots["m"], uids) + (1 - b1) * g
        v = b2 * _rows(slots["v"], uids) + (1 - b2) * g * g
        t = (step + 1).astype(jnp.float32)
        mhat = m / (1 - b1 ** t)
        vhat = v / (1 - b2 ** t)
        w = _rows(table, uids) - lr_at(lr, step) * mhat / (jnp.sqrt(vhat) + eps)
        return _put(table, uids, w), {"m": _put(slots["m"], uids, m), "v": _put(slots["v"], uids, v)}

    return RowOptimizer("lazy_adam", init, apply)


def adam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> RowOptimizer:
    """Dense Adam on the whole table: every row's moments decay and every row moves each
    step (as Keras/TF1 Adam did on embedding tables, e.g. the NCF reference code). Costs
    ``O(rows · dim)`` per step: for tables of thousands of rows, not for large catalogues."""
    def init(table):
        return {"m": jnp.zeros_like(table), "v": jnp.zeros_like(table)}

    def apply(table, slots, uids, g, step):
        grad = jnp.zeros_like(table).at[uids].add(g.astype(table.dtype), mode="drop")
        m = b1 * slots["m"] + (1 - b1) * grad
        v = b2 * slots["v"] + (1 - b2) * grad * grad
        t = (step + 1).astype(jnp.float32)
        w = table - lr_at(lr, step) * (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps)
        return w, {"m": m, "v": v}

    return RowOptimizer("adam", init, apply)


def ials(lr: Any = None) -> RowOptimizer:
    """No per-batch update: ``optimizer=ials`` solves whole tables once per epoch
    (``jaxreco.train.ials``); the trainer never calls ``apply``."""
    def init(table):
        return {}

    def apply(table, slots, uids, g, step):
        raise ValueError("optimizer.name='ials' has no gradient update: the trainer solves "
                         "the tables with jaxreco.train.ials")

    return RowOptimizer("ials", init, apply)


def bpmf(lr: Any = None) -> RowOptimizer:
    """No per-batch update: ``optimizer=bpmf`` samples whole tables once per epoch
    (``jaxreco.train.bpmf``). Its one slot, ``sample``, is the Gibbs chain's current draw of
    the table (the table itself holds the average of the draws so far)."""
    def init(table):
        return {"sample": table}

    def apply(table, slots, uids, g, step):
        raise ValueError("optimizer.name='bpmf' has no gradient update: the trainer samples "
                         "the tables with jaxreco.train.bpmf")

    return RowOptimizer("bpmf", init, apply)


ROW_OPTIMIZERS: dict[str, Callable[..., RowOptimizer]] = {
    "sgd": sgd, "adagrad": adagrad, "lazy_adam": lazy_adam, "adam": adam, "ials": ials,
    "bpmf": bpmf,
}


def row_optimizer(name: str, **kwargs: Any) -> RowOptimizer:
    if name not in ROW_OPTIMIZERS:
        raise ValueError(f"optimizer.table.name={name!r} is unknown; choose one of "
                         f"{sorted(ROW_OPTIMIZERS)}")
    return ROW_OPTIMIZERS[name](**kwargs)


def dense_optimizer(name: str, lr, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """optax chain for the dense (non-table) parameters (``lr``: a float or a schedule)."""
    if name == "adam":
        return optax.adam(lr)
    if name == "adamw":
        return optax.adamw(lr, weight_decay=weight_decay)
    if name == "sgd":
        return optax.sgd(lr)
    if name == "adagrad":
        return optax.adagrad(lr)
    raise ValueError(f"optimizer.dense.name={name!r} is unknown; choose one of "
                     "['adagrad', 'adam', 'adamw', 'sgd']")
