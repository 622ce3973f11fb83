"""User-level differentially private iALS (``privacy=dp``): the private alternating least
squares of Chien, Jain, Krichene, Rendle, Song, Thakurta & Zhang (2021, "Private Alternating
Least Squares: Practical Private Matrix Completion with Tighter Rates"), for the iALS
objective of :mod:`jaxreco.train.ials` (dot product ``p_u · q_i``, no biases).

The unit of privacy is a user's whole history (add or remove one user). One epoch:

1. **User half-step, exact and unreleased.** Every ``p_u`` is solved from the user's own
   positives and the current item table ``Q`` (the code of :func:`jaxreco.train.ials._solve_side`,
   unchanged). ``Q`` is a DP output, so each ``p_u`` is a function of user ``u``'s data and of
   DP outputs only: the model is private in the *joint* DP sense (Kearns et al. 2014), the
   billboard model — ``Q`` is published, ``p_u`` is only ever given to user ``u`` (serving a
   user their own recommendations).
2. **Bounded contributions.** Each user keeps at most ``k = max_items_per_user`` positives
   for the item side (a uniform sample without replacement, drawn once per run from the
   seed; the user's own row still sees all of them), and the vector entering the item
   statistics is clipped, ``p̄_u = p_u · min(1, C / ‖p_u‖)`` (``C = clip_norm``).
3. **Gaussian mechanism on the item statistics.** The item half-step needs, for every item
   ``i``, ``G_i = Σ_{u ∈ S_i} p̄_u p̄_uᵀ``, ``b_i = Σ_{u ∈ S_i} p̄_u`` and the count ``n_i = |S_i|``
   (for the frequency-scaled λ), and the all-users Gramian ``G = Σ_u p̄_u p̄_uᵀ`` (the
   unobserved term). They are released as one vector ``V`` = (for each item: the upper
   triangle of ``G_i`` with off-diagonal entries times √2, ``b_i``, ``C · n_i``; then ``G`` the
   same way), so that ``‖vec‖₂ = ‖G_i‖_F`` for the matrix parts. One user changes ``V`` by at
   most ``k`` item blocks plus ``G``:

       ‖ΔV‖² ≤ k (‖p̄p̄ᵀ‖_F² + ‖p̄‖² + C²) + ‖p̄p̄ᵀ‖_F² ≤ k (C⁴ + 2C²) + C⁴ = Δ²

   (``‖p̄p̄ᵀ‖_F = ‖p̄‖² ≤ C²``). Gram and right-hand side are covered *together* by this one
   bound. Every coordinate of ``V`` gets ``N(0, σ²)`` with ``σ = z Δ`` — every item, those
   without any sampled positive included (whether an item has positives is private) — which
   for a symmetric matrix means ``σ (N + Nᵀ)/2`` (variance σ² on the diagonal, σ²/2 off it).
   Other users' ``p_v`` do not depend on user ``u``'s data given ``Q`` (step 1), so this is a
   Gaussian mechanism of sensitivity ``Δ``, noise multiplier ``z``.
4. **Item solve (post-processing).** ``q_i = (Ĝ_i + α₀ Ĝ)₊ + λ_i I)⁻¹ b̂_i`` with hats the
   noisy statistics, ``(·)₊`` the projection on the positive semi-definite cone (noise can
   make the sum indefinite; eigenvalues below 0 are set to 0) and ``λ_i = λ (max(n̂_i, 0) +
   α₀|U|)^ν`` (``|U|``, the size of the user id space, is public).

Epochs compose adaptively (epoch ``t+1`` uses ``Q_t``): ε comes from dp-accounting's
accountant of ``SelfComposedDpEvent(GaussianDpEvent(z), epochs)``
(:mod:`jaxreco.privacy.accounting`). Noise is drawn from ``fold_in(fold_in(key, epoch),
item)``: the same seed gives the same run, whatever the chunking.

Not covered by the guarantee: the logged ``train/loss`` and validation metrics (diagnostics
computed on the raw data), and hyper-parameters chosen by looking at the data.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxreco.privacy import accounting
from jaxreco.train import ials

HIGHEST = jax.lax.Precision.HIGHEST
log = logging.getLogger("jaxreco")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The mechanism of a run: ``noise_std = noise_multiplier · sensitivity`` per coordinate,
    and ``epsilon`` at ``delta`` after ``epochs`` releases."""
    noise_multiplier: float
    sensitivity: float
    noise_std: float
    clip_norm: float
    max_items_per_user: int
    delta: float
    epochs: int
    epsilon: float
    accountant: str
    seed: int

    def metrics(self, releases: int | None = None) -> dict[str, float]:
        """``privacy/*`` figures for ``releases`` epochs run (default: all planned)."""
        n = self.epochs if releases is None else int(releases)
        eps = (accounting.epsilon(self.noise_multiplier, n, self.delta, self.accountant)
               if n >= 1 else 0.0)
        return {"privacy/epsilon": eps, "privacy/delta": self.delta,
                "privacy/noise_multiplier": self.noise_multiplier,
                "privacy/noise_std": self.noise_std, "privacy/sensitivity": self.sensitivity,
                "privacy/clip_norm": self.clip_norm,
                "privacy/max_items_per_user": float(self.max_items_per_user),
                "privacy/releases": float(n)}


def sensitivity(max_items_per_user: int, clip_norm: float) -> float:
    """``Δ = sqrt(k (C⁴ + 2C²) + C⁴)``: the L2 norm bound of one user's contribution to the
    released statistics (module docstring, step 3)."""
    k, c2 = int(max_items_per_user), float(clip_norm) ** 2
    return math.sqrt(k * (c2 * c2 + 2 * c2) + c2 * c2)


def plan(privacy_cfg, *, num_users: int, epochs: int, seed: int) -> Plan:
    """The :class:`Plan` of a ``privacy`` config node: the noise multiplier given, or
    calibrated to ``privacy.epsilon`` over ``epochs`` releases; δ defaults to 1/num_users."""
    pc = privacy_cfg
    delta = float(pc.delta) if pc.delta is not None else 1.0 / max(int(num_users), 2)
    acc = str(getattr(pc.accountant, "value", pc.accountant))
    if (pc.epsilon is None) == (pc.noise_multiplier is None):
        raise ValueError(f"privacy=dp: give exactly one of privacy.epsilon (got {pc.epsilon}) "
                         f"and privacy.noise_multiplier (got {pc.noise_multiplier})")
    if pc.noise_multiplier is not None:
        z = float(pc.noise_multiplier)
    else:
        z = accounting.noise_multiplier(float(pc.epsilon), int(epochs), delta, acc)
    k, c = int(pc.max_items_per_user), float(pc.clip_norm)
    s = sensitivity(k, c)
    return Plan(noise_multiplier=z, sensitivity=s, noise_std=z * s, clip_norm=c,
                max_items_per_user=k, delta=delta, epochs=int(epochs),
                epsilon=accounting.epsilon(z, int(epochs), delta, acc), accountant=acc,
                seed=int(seed if pc.seed is None else pc.seed))


def sample_per_user(user: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices of the positives kept: at most ``k`` per user, uniformly without replacement
    (a user with ``<= k`` keeps all), sorted; deterministic in ``seed``."""
    user = np.asarray(user, np.int64)
    u = np.random.default_rng(seed).random(len(user))
    order = np.lexsort((u, user))                     # by user, random order within a user
    us = user[order]
    first = np.searchsorted(us, us, side="left")
    rank = np.arange(len(us)) - first
    return np.sort(order[rank < k])


def clip_rows(x: jax.Array, clip_norm: float) -> jax.Array:
    """Each row scaled to norm ``<= clip_norm``."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
    return x * jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))


def user_statistics(p_clipped: jax.Array, items_of_user: jax.Array, num_items: int,
                    clip_norm: float) -> jax.Array:
    """One user's contribution to the released vector ``V`` (module docstring, step 3) as
    ``[num_items + 1, d(d+1)/2 + d + 1]``: per item, the scaled upper triangle of
    ``p̄p̄ᵀ``, ``p̄`` and ``C`` where the item is among the user's sampled positives; the last
    row, the user's ``p̄p̄ᵀ`` term of ``G``. For tests: ``‖·‖ ≤`` :func:`sensitivity`."""
    d = p_clipped.shape[0]
    iu = np.triu_indices(d)
    scale = jnp.where(iu[0] == iu[1], 1.0, math.sqrt(2.0))
    outer = jnp.outer(p_clipped, p_clipped)[iu] * scale
    block = jnp.concatenate([outer, p_clipped, jnp.array([clip_norm], p_clipped.dtype)])
    v = jnp.zeros((num_items + 1, block.shape[0]), p_clipped.dtype)
    v = v.at[items_of_user].set(block)
    return v.at[num_items].set(jnp.concatenate([outer, jnp.zeros((d + 1,), outer.dtype)]))


def symmetric_noise(key: jax.Array, d: int) -> jax.Array:
    """``(N + Nᵀ)/2``, ``N`` iid ``N(0, 1)``: unit variance on the diagonal, 1/2 off it (a
    unit-variance Gaussian on each coordinate of the √2-scaled upper triangle)."""
    n = jax.random.normal(key, (d, d), jnp.float32)
    return 0.5 * (n + n.T)


def item_noise(key: jax.Array, item: jax.Array, d: int):
    """The standard-normal draws of item ``item``'s block: (Gram ``[d, d]``, RHS ``[d]``,
    count ``[]``)."""
    z = jax.random.normal(jax.random.fold_in(key, item), (d * d + d + 1,), jnp.float32)
    n = z[:d * d].reshape(d, d)
    return 0.5 * (n + n.T), z[d * d:d * d + d], z[-1]


def with_empty_rows(side: ials.Side, *, pad_row: int, dim: int,
                    chunk_elements: int = 1 << 24) -> ials.Side:
    """``side`` plus one bucket holding every row without positives (``L = 1``, its only
    column the padding): the DP item solve must solve (from noise alone) every item, not
    only those with positives."""
    empty = np.flatnonzero(side.freq == 0)
    if not len(empty):
        return side
    cap = max(1, chunk_elements // (dim * dim))
    R = min(1 << int(math.floor(math.log2(cap))), 1 << int(math.ceil(math.log2(len(empty)))))
    n_chunks = -(-len(empty) // R)
    r = np.concatenate([empty, np.full(n_chunks * R - len(empty), pad_row, np.int64)])
    rows = r.reshape(n_chunks, R).astype(np.int32)
    cols = np.full((n_chunks, R, 1), side.num_cols, np.int32)
    counts = np.zeros((n_chunks, R), np.float32)
    return dataclasses.replace(side, rows=side.rows + (rows,), cols=side.cols + (cols,),
                               counts=side.counts + (counts,))


def noisy_item_statistics(y_pad, cols, rows, num_users: int, *, key, noise_std, clip_norm):
    """``(Ĝ_i, b̂_i, n̂_i)`` of the items ``rows`` (``[R]``) whose sampled users are ``cols``
    (``[R, L]``, padding ``num_users``: the zero row of ``y_pad``): the exact sums over the
    clipped user rows plus ``σ·`` :func:`item_noise` (the count's noise is ``σ / C``: it is
    released as ``C · n_i``)."""
    d = y_pad.shape[1]
    yc = y_pad[cols]                                               # [R, L, d]
    g = jnp.einsum("rld,rle->rde", yc, yc, precision=HIGHEST)
    b = jnp.sum(yc, axis=1)
    n = jnp.sum((cols < num_users).astype(jnp.float32), axis=1)
    gn, bn, nn = jax.vmap(lambda i: item_noise(key, i, d))(rows)
    return g + noise_std * gn, b + noise_std * bn, n + (noise_std / clip_norm) * nn


def dp_item_solve(q_table, p_clipped, side: dict, num_items: int, num_users: int, *,
                  alpha0: float, reg: float, nu: float, clip_norm: float, noise_std,
                  key: jax.Array, solve_elements: int = 1 << 22):
    """New rows of ``q_table`` (every one of the first ``num_items``) from the noisy
    statistics of the clipped user rows ``p_clipped`` (``[num_users, d]``) over the sampled
    positives in ``side`` (module docstring, steps 3–4).

    The noisy statistics are gathered bucket by bucket (``lax.map`` over chunks) into dense
    ``[num_items, d, d]`` / ``[num_items, d]`` arrays; the eigen-solves then run on static
    slices of at most ``solve_elements`` matrix entries, outside any loop construct (an
    ``eigh`` inside ``lax.map`` stalled the XLA CPU runtime in some runs here)."""
    d = q_table.shape[1]
    y = p_clipped[:num_users].astype(jnp.float32)
    k_items, k_global = jax.random.split(key)
    gram = (jnp.matmul(y.T, y, precision=HIGHEST) + noise_std * symmetric_noise(k_global, d))
    y_pad = jnp.concatenate([y, jnp.zeros((1, d), jnp.float32)])
    n_users = float(num_users)
    g_all = jnp.zeros((num_items, d, d), jnp.float32)
    b_all = jnp.zeros((num_items, d), jnp.float32)
    n_all = jnp.zeros((num_items,), jnp.float32)
    for rows, cols in zip(side["rows"], side["cols"]):
        y_pad, g_all = jax.lax.optimization_barrier((y_pad, g_all))

        def chunk(args):
            c, r = args
            return noisy_item_statistics(y_pad, c, r, num_users, key=k_items,
                                         noise_std=noise_std, clip_norm=clip_norm)

        g, b, n = jax.lax.map(chunk, (cols, rows))
        r = rows.reshape(-1)
        g_all = g_all.at[r].set(g.reshape(-1, d, d), mode="drop")
        b_all = b_all.at[r].set(b.reshape(-1, d), mode="drop")
        n_all = n_all.at[r].set(n.reshape(-1), mode="drop")
    step = max(1, solve_elements // (d * d))
    for s in range(0, num_items, step):
        sl = slice(s, min(s + step, num_items))
        lam = reg * (jnp.maximum(n_all[sl], 0.0) + alpha0 * n_users) ** nu
        e, v = jnp.linalg.eigh(g_all[sl] + alpha0 * gram)
        coef = jnp.einsum("rde,rd->re", v, b_all[sl], precision=HIGHEST) / (
            jnp.maximum(e, 0.0) + lam[:, None])
        sol = jnp.einsum("rde,re->rd", v, coef, precision=HIGHEST)
        q_table = q_table.at[sl].set(sol.astype(q_table.dtype))
    return q_table


def observed_error(p, q, side: dict, num_cols: int):
    """``Σ_{observed (u, i)} (1 − p_u·q_i)²`` over the positives in the user-side ``side``."""
    d = q.shape[1]
    q_pad = jnp.concatenate([q[:num_cols].astype(jnp.float32), jnp.zeros((1, d), jnp.float32)])
    total = jnp.zeros((), jnp.float32)
    for rows, cols in zip(side["rows"], side["cols"]):
        def chunk(args):
            c, r = args
            pr = p.at[r].get(mode="fill", fill_value=0.0).astype(jnp.float32)
            s = jnp.einsum("rld,rd->rl", q_pad[c], pr, precision=HIGHEST)
            return jnp.sum(jnp.where(c < num_cols, jnp.square(1.0 - s), 0.0))
        total = total + jnp.sum(jax.lax.map(chunk, (cols, rows)))
    return total


def make_dp_epoch(users: ials.Side, dp_items: ials.Side, *, user_table: str,
                  item_table: str, alpha0: float, reg: float, nu: float, plan: Plan,
                  solver: str = "cholesky", cg_steps: int = 3):
    """``epoch(state, data) -> (state, {"loss": L / |S|})`` of DP iALS: the exact user
    half-step of :func:`jaxreco.train.ials.make_epoch`, then :func:`dp_item_solve` on the
    clipped user rows over ``dp_items`` (the sampled positives grouped by item, every item
    present: :func:`with_empty_rows`). ``data``: :func:`epoch_data`. The loss is the
    non-private iALS objective on all training positives (a diagnostic)."""
    nu_, nu_i = users.num_rows, dp_items.num_rows
    key = jax.random.key(plan.seed)
    solve = dict(solver=solver, cg_steps=cg_steps)

    def epoch(state, data):
        values = state.table_values()
        p, q = values[user_table], values[item_table]
        p, _ = ials._solve_side(p, q, data["users"], nu_, nu_i, alpha0=alpha0, reg=reg, nu=nu,
                                with_loss=False, **solve)
        pc = clip_rows(p[:nu_].astype(jnp.float32), plan.clip_norm)
        q = dp_item_solve(q, pc, data["dp_items"], nu_i, nu_, alpha0=alpha0, reg=reg, nu=nu,
                          clip_norm=plan.clip_norm, noise_std=plan.noise_std,
                          key=jax.random.fold_in(key, state.step))
        pu, qi = p[:nu_].astype(jnp.float32), q[:nu_i].astype(jnp.float32)
        gp = jnp.matmul(pu.T, pu, precision=HIGHEST)
        gq = jnp.matmul(qi.T, qi, precision=HIGHEST)
        penalty = reg * (jnp.sum((data["user_freq"] + alpha0 * nu_i) ** nu * jnp.sum(pu * pu, 1))
                         + jnp.sum((data["item_freq"] + alpha0 * nu_) ** nu
                                   * jnp.sum(qi * qi, 1)))
        obs = observed_error(p, q, data["users"], nu_i)
        loss = (obs + alpha0 * jnp.sum(gp * gq) + penalty) / users.nnz
        tables = jax.tree.map(lambda v: v, state.tables)
        tables[user_table] = state.tables[user_table].replace(p)
        tables[item_table] = state.tables[item_table].replace(q)
        return state.replace(step=state.step + 1, tables=tables), {"loss": loss}

    return epoch


def check_options(cfg) -> None:
    """ValueError naming the option when the iALS config uses what DP iALS does not cover."""
    oc = cfg.optimizer
    bad = []
    if cfg.model.get("bias"):
        bad.append("model.bias=true (set model.bias=false)")
    if float(oc.unobserved_exponent):
        bad.append(f"optimizer.unobserved_exponent={oc.unobserved_exponent} (set 0)")
    if float(oc.recency_weight):
        bad.append(f"optimizer.recency_weight={oc.recency_weight} (set 0)")
    if bad:
        raise ValueError("privacy=dp trains the plain dot product with unit confidences; "
                         "not supported: " + "; ".join(bad))


def build(cfg, task, abstract_model, user_table: str, item_table: str, epochs: int):
    """``(epoch_fn, data, plan)`` for a ``privacy=dp`` iALS run of ``task``."""
    check_options(cfg)
    pl = plan(cfg.privacy, num_users=task.num_users, epochs=epochs, seed=int(cfg.seed))
    cols = task.train_cols
    dim = int(abstract_model.user_mf.shape[1])
    users = ials.group_rows(cols["user"], cols["item"], task.num_users, task.num_items,
                            pad_row=int(abstract_model.user_mf.shape[0]), dim=dim)
    keep = sample_per_user(cols["user"], pl.max_items_per_user, pl.seed)
    pad_item = int(abstract_model.item_mf.shape[0])
    items = with_empty_rows(ials.group_rows(np.asarray(cols["item"])[keep],
                                            np.asarray(cols["user"])[keep], task.num_items,
                                            task.num_users, pad_row=pad_item, dim=dim),
                            pad_row=pad_item, dim=dim)
    item_freq = np.bincount(np.asarray(cols["item"], np.int64),
                            minlength=task.num_items).astype(np.float32)
    data = {"users": ials.epoch_data(users, users)["users"],
            "dp_items": {"rows": items.rows, "cols": items.cols},
            "user_freq": users.freq, "item_freq": item_freq}
    oc = cfg.optimizer
    epoch = make_dp_epoch(users, items, user_table=user_table, item_table=item_table,
                          alpha0=float(oc.unobserved_weight), reg=float(cfg.model.reg),
                          nu=float(oc.reg_exponent), plan=pl, solver=str(oc.solver),
                          cg_steps=int(oc.cg_steps))
    log.info("privacy=dp: (ε=%.4g, δ=%.3g) over %d epochs (%s accountant); noise multiplier "
             "%.4g, sensitivity %.4g (k=%d, C=%g), σ=%.4g; %d of %d positives kept",
             pl.epsilon, pl.delta, pl.epochs, pl.accountant, pl.noise_multiplier,
             pl.sensitivity, pl.max_items_per_user, pl.clip_norm, pl.noise_std, len(keep),
             len(cols["user"]))
    return epoch, data, pl
