"""Federated iALS: the client and server halves of one iALS epoch, engine-independent
(:mod:`jaxreco.federated.flower` runs them on Flower).

Each client holds a shard of users: their positives and their user vectors, which never
leave it. One round is one epoch of :func:`jaxreco.train.ials.make_epoch` (plain dot
product, unit confidences):

* **client** (:meth:`Client.fit`): given the item table ``Q`` from the server, solve every
  local user row exactly (the trainer's code, :func:`jaxreco.train.ials._solve_side`), then
  send only item-side sufficient statistics: for each item ``i`` its local users touched,
  ``G_i = Σ p_u p_uᵀ`` (upper triangle), ``b_i = Σ p_u``, ``n_i``, and the local Gramian
  ``Σ_u p_u p_uᵀ`` (:class:`Statistics`).
* **server** (:func:`item_solve`): sum the clients' statistics and solve every item row,
  ``q_i = (G_i + α₀ G + λ (n_i + α₀|U|)^ν I)⁻¹ b_i`` — the iALS item half-step, which needs
  nothing but these sums. Without noise the result is central iALS (up to float rounding).

With ``privacy`` (a :class:`jaxreco.privacy.dp_ials.Plan`), clients clip ``p_u`` to ``C`` and
use at most ``k`` sampled positives per user for the statistics (their own row still uses
all), and the server adds the Gaussian noise of :mod:`jaxreco.privacy.dp_ials` to the sums
before solving with the PSD projection (central DP: the server is trusted with the sums, as
with secure aggregation plus server-side noise).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxreco.privacy import dp_ials
from jaxreco.train import ials

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass
class Statistics:
    """What a client sends in a round: ``items`` (int32 ``[m]``, the items its users touched),
    ``gram_upper`` (``[m, d(d+1)/2]``), ``rhs`` (``[m, d]``), ``count`` (``[m]``) and
    ``user_gram`` (``[d(d+1)/2]``), all float32."""
    items: np.ndarray
    gram_upper: np.ndarray
    rhs: np.ndarray
    count: np.ndarray
    user_gram: np.ndarray

    def arrays(self) -> list[np.ndarray]:
        return [self.items, self.gram_upper, self.rhs, self.count, self.user_gram]

    @classmethod
    def from_arrays(cls, arrays) -> "Statistics":
        return cls(*[np.asarray(a) for a in arrays])

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays()))


def shard_users(num_users: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """The user ids of each client: a seeded random partition into near-equal shards."""
    if not 1 <= num_clients <= num_users:
        raise ValueError(f"num_clients={num_clients}: must be in [1, {num_users}] (users)")
    perm = np.random.default_rng(seed).permutation(num_users)
    return [np.sort(s) for s in np.array_split(perm, num_clients)]


class Client:
    """One client: the positives ``(user, item)`` of its users ``users`` (global ids) and
    their vectors; :meth:`fit` is one round."""

    def __init__(self, users: np.ndarray, user: np.ndarray, item: np.ndarray, num_items: int,
                 dim: int, *, alpha0: float, reg: float, nu: float,
                 privacy: dp_ials.Plan | None = None):
        self.users = np.asarray(users, np.int64)
        local = np.searchsorted(self.users, np.asarray(user, np.int64))
        if len(user) and not np.array_equal(self.users[local], user):
            raise ValueError("a client's positives must belong to its own users")
        self.n, self.num_items, self.dim = len(self.users), int(num_items), int(dim)
        self.kw = dict(alpha0=alpha0, reg=reg, nu=nu)
        self.privacy = privacy
        side = ials.group_rows(local, item, self.n, num_items, pad_row=self.n, dim=dim)
        self.side = ials.epoch_data(side, side)["users"]
        if privacy is not None:
            keep = dp_ials.sample_per_user(local, privacy.max_items_per_user,
                                           privacy.seed + int(self.users[0]) if self.n else 0)
            local, item = local[keep], np.asarray(item)[keep]
        items = ials.group_rows(item, local, num_items, self.n, pad_row=num_items, dim=dim)
        self.item_side = {"rows": items.rows, "cols": items.cols}
        self.touched = np.flatnonzero(items.freq).astype(np.int32)
        self.count = items.freq[self.touched].astype(np.float32)
        self.p = np.zeros((self.n + 1, dim), np.float32)
        self._solve_bucket = jax.jit(self._user_bucket)
        self._stats = jax.jit(self._item_statistics)

    def buckets(self) -> list[dict]:
        """The user side split into one single-bucket side per length bucket."""
        return [{k: [v[j]] for k, v in self.side.items()} for j in range(len(self.side["rows"]))]

    def _user_bucket(self, p, q, bucket):
        return ials._solve_side(p, q, bucket, self.n, self.num_items, with_loss=False,
                                **self.kw)[0]

    def _item_statistics(self, p, item_side):
        d = self.dim
        pu = p[:self.n].astype(jnp.float32)
        if self.privacy is not None:
            pu = dp_ials.clip_rows(pu, self.privacy.clip_norm)
        p_pad = jnp.concatenate([pu, jnp.zeros((1, d), jnp.float32)])
        iu = np.triu_indices(d)
        g = jnp.zeros((self.num_items, len(iu[0])), jnp.float32)
        b = jnp.zeros((self.num_items, d), jnp.float32)
        for rows, cols in zip(item_side["rows"], item_side["cols"]):
            def chunk(c):
                yc = p_pad[c]                                          # [R, L, d]
                gm = jnp.einsum("rld,rle->rde", yc, yc, precision=HIGHEST)
                return gm[:, iu[0], iu[1]], jnp.sum(yc, axis=1)
            gc, bc = jax.lax.map(chunk, cols)
            r = rows.reshape(-1)
            g = g.at[r].set(gc.reshape(-1, len(iu[0])), mode="drop")
            b = b.at[r].set(bc.reshape(-1, d), mode="drop")
        ug = jnp.matmul(pu.T, pu, precision=HIGHEST)[iu[0], iu[1]]
        return g[self.touched], b[self.touched], ug

    def fit(self, q: np.ndarray) -> Statistics:
        """Solves the local user rows against ``q`` (``[num_items, d]``) and returns the
        item-side statistics of the touched items."""
        q_pad = np.concatenate([np.asarray(q, np.float32), np.zeros((1, self.dim), np.float32)])
        # One program per length bucket. The buckets' Cholesky solves depend on q alone, so
        # in one program XLA's CPU runtime runs them concurrently (the trainer's
        # optimization barrier between buckets does not survive compilation), and jaxlib
        # 0.10.2's batched LAPACK kernels (ParallelBatchMap) then block every thread of the
        # intra-op pool waiting for sub-tasks queued on that same pool: a deadlock at 0% CPU
        # (2 pool threads on 2 cores; seen on ML-1M shards). Chained through p, the
        # programs run one after the other, each with a single Cholesky.
        p = self.p
        for bucket in self.buckets():
            p = self._solve_bucket(p, q_pad, bucket)
        g, b, ug = self._stats(p, self.item_side)
        self.p = np.asarray(p)
        return Statistics(self.touched, np.asarray(g), np.asarray(b), self.count.copy(),
                          np.asarray(ug))

    @property
    def user_vectors(self) -> np.ndarray:
        return self.p[:self.n]


def aggregate(stats: list[Statistics], num_items: int, dim: int):
    """Sums of the clients' statistics: ``(G [num_items, d, d], b, n, user Gram [d, d])``."""
    t = dim * (dim + 1) // 2
    gu, b = np.zeros((num_items, t), np.float64), np.zeros((num_items, dim), np.float64)
    n, ug = np.zeros(num_items, np.float64), np.zeros(t, np.float64)
    for s in stats:
        np.add.at(gu, s.items, s.gram_upper)
        np.add.at(b, s.items, s.rhs)
        np.add.at(n, s.items, s.count)
        ug += s.user_gram
    return _full(gu, dim), b, n, _full(ug[None], dim)[0]


def _full(upper: np.ndarray, d: int) -> np.ndarray:
    iu = np.triu_indices(d)
    m = np.zeros((len(upper), d, d), upper.dtype)
    m[:, iu[0], iu[1]] = upper
    m[:, iu[1], iu[0]] = upper
    return m


def item_solve(g, b, n, user_gram, *, num_users: int, alpha0: float, reg: float, nu: float,
               privacy: dp_ials.Plan | None = None, round_index: int = 0,
               previous: np.ndarray | None = None, chunk: int = 1024) -> np.ndarray:
    """The server's item half-step from the summed statistics (float64 sums, float32
    solves as in the trainer). Without ``privacy``, an item no client touched (``n = 0``)
    keeps its row of ``previous`` (the item table sent this round), as the trainer's item
    half-step leaves items without positives alone (given no ``previous``: solved, 0).
    With ``privacy``: Gaussian noise of the plan's σ on every item's (G, b, n) and on the
    Gramian (keys ``fold_in(key(seed), round)``, as
    :func:`jaxreco.privacy.dp_ials.dp_item_solve`), then the PSD-projected solve of every
    item (which items were touched is itself private)."""
    num_items, d = b.shape
    if privacy is None:
        q = np.asarray(_exact_solve(jnp.asarray(g, jnp.float32), jnp.asarray(b, jnp.float32),
                                    jnp.asarray(n, jnp.float32),
                                    jnp.asarray(user_gram, jnp.float32),
                                    float(num_users), alpha0, reg, nu))
        if previous is not None:
            q = np.where((np.asarray(n) > 0)[:, None], q, np.asarray(previous, np.float32))
        return q
    key = jax.random.fold_in(jax.random.key(privacy.seed), round_index)
    k_items, k_global = jax.random.split(key)
    sigma = privacy.noise_std
    ug = jnp.asarray(user_gram, jnp.float32) + sigma * dp_ials.symmetric_noise(k_global, d)
    out = []
    for s in range(0, num_items, chunk):
        rows = jnp.arange(s, min(s + chunk, num_items))
        out.append(_noisy_solve(jnp.asarray(g[s:s + chunk], jnp.float32),
                                jnp.asarray(b[s:s + chunk], jnp.float32),
                                jnp.asarray(n[s:s + chunk], jnp.float32), ug, rows, k_items,
                                sigma, privacy.clip_norm, float(num_users), alpha0, reg, nu))
    return np.concatenate([np.asarray(o) for o in out])


@jax.jit
def _exact_solve(g, b, n, ug, num_users, alpha0, reg, nu):
    d = b.shape[1]
    lam = reg * (n + alpha0 * num_users) ** nu
    a = g + alpha0 * ug + lam[:, None, None] * jnp.eye(d, dtype=jnp.float32)
    chol = jnp.linalg.cholesky(a)
    z = jax.lax.linalg.triangular_solve(chol, b[..., None], left_side=True, lower=True)
    return jax.lax.linalg.triangular_solve(chol, z, left_side=True, lower=True,
                                           transpose_a=True)[..., 0]


@jax.jit
def _noisy_solve(g, b, n, ug, rows, key, sigma, clip, num_users, alpha0, reg, nu):
    d = b.shape[1]
    gn, bn, nn = jax.vmap(lambda i: dp_ials.item_noise(key, i, d))(rows)
    g = g + sigma * gn + alpha0 * ug
    b = b + sigma * bn
    n = n + (sigma / clip) * nn
    lam = reg * (jnp.maximum(n, 0.0) + alpha0 * num_users) ** nu
    e, v = jnp.linalg.eigh(g)
    coef = jnp.einsum("rde,rd->re", v, b, precision=HIGHEST) / (jnp.maximum(e, 0.0) + lam[:, None])
    return jnp.einsum("rde,re->rd", v, coef, precision=HIGHEST)
