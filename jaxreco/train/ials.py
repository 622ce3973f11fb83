"""iALS: matrix factorization by implicit alternating least squares (``optimizer=ials``).

The model is the dot product ``ŷ(u, i) = p_u · q_i`` (``model=embed_mlp
model.combiner=dot model.bias=false``), or ``p_u · q_i + b_i`` with ``model.bias=true`` (the
item bias solved with the item row); one epoch solves every user row exactly with the
item table fixed, then every item row with the user table fixed, for the loss of Hu et al.
(2008) in the form of Rendle et al. (2022, "Revisiting the performance of iALS on item
recommendation benchmarks"):

    L = Σ_{(u,i) ∈ S} c_ui (ŷ(u,i) − 1)²  +  α₀ Σ_u Σ_i ŷ(u,i)²
        + λ Σ_u (|I_u| + α₀|I|)^ν ‖p_u‖²  +  λ Σ_i (|U_i| + α₀|U|)^ν ‖q_i‖²

(``S`` the training positives, ``c_ui`` their confidence — 1, or recency weights, see
:func:`recency_weights` — ``α₀`` = ``optimizer.unobserved_weight``, ``λ`` =
``model.reg``, ``ν`` = ``optimizer.reg_exponent``: frequency-scaled regularization). Row
``u``'s solution is ``(Σ_{i∈I_u} c_ui q_i q_iᵀ + α₀ QᵀQ + λ_u I)⁻¹ Σ_{i∈I_u} c_ui q_i``: the all-pairs
term costs one Gramian ``QᵀQ`` per half-epoch, so no negatives are sampled and every
unobserved pair counts.

Rows are grouped by history length into buckets (lengths chosen to minimise padding,
:func:`bucket_lengths`) and solved in chunks of ``R`` rows (gather ``[R, L, d]`` → ``R``
Gram matrices → batched Cholesky), one ``lax.map`` per bucket inside a single jitted epoch,
buckets one after another, so memory is bounded by ``chunk_elements`` whatever the
catalogue size. A chunk is small enough (8 MiB) to stay in cache while its rows are solved:
on a CPU, reading the gathered rows from memory, not arithmetic, is what a row solve costs.
The tables keep their mesh sharding (the epoch is jitted with the train state's shardings).

``solver="cg"`` (``optimizer.solver=cg``) replaces the exact solve by ``cg_steps`` steps
of conjugate gradients per row, warm-started from the row's current value (Takács, Pilászy &
Tikk 2011; what ``implicit`` does). The system matrix is never formed: one product

    A p = Σ_{i∈I_u} c_ui q_i (q_iᵀ p) + α₀ w_u (QᵀQ) p + λ_u p

costs ``O(|I_u| d + d²)``, so a row costs ``O(cg_steps · (|I_u| d + d²))`` instead of
``O(|I_u| d² + d³)``. Each step lowers the row's quadratic objective, so the loss still never
increases (up to float32 rounding); with ``cg_steps ≥ d`` it reaches the exact solution.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
SOLVERS = ("cholesky", "cg")


def _precision():
    """``HIGHEST`` for the row solves' products, except on the CPU: there every float32
    product is float32 whatever the precision (checked: equal results), but ``HIGHEST``
    steers XLA:CPU off its fast dot kernels (2-3x slower batched products here)."""
    return None if jax.default_backend() == "cpu" else HIGHEST


@dataclasses.dataclass(frozen=True)
class Side:
    """The rows of one side (users or items) that have positives, in padded chunks.

    ``rows[b]``: int32 ``[chunks, R]`` row ids (padding: ``pad_row``, dropped by the scatter);
    ``cols[b]``: int32 ``[chunks, R, L]`` the other side's ids (padding: ``num_cols``, a zero
    row); ``counts[b]``: float32 ``[chunks, R]`` history lengths; one entry per bucket.
    ``weights[b]``: float32 ``[chunks, R, L]`` each positive's confidence ``c`` (0 on
    padding), or ``None`` when every positive weighs 1.
    ``values[b]``: float32 ``[chunks, R, L]`` a value carried with each positive (a rating,
    0 on padding), or ``None``.
    ``freq``: float32 ``[num_rows]`` every row's number of positives.
    """

    rows: tuple[np.ndarray, ...]
    cols: tuple[np.ndarray, ...]
    counts: tuple[np.ndarray, ...]
    freq: np.ndarray
    num_rows: int
    num_cols: int
    nnz: int
    weights: tuple[np.ndarray, ...] | None = None
    values: tuple[np.ndarray, ...] | None = None

    @property
    def padded(self) -> int:
        return int(sum(c.size for c in self.cols))


def group_rows(row_ids: np.ndarray, col_ids: np.ndarray, num_rows: int, num_cols: int, *,
               pad_row: int, dim: int, chunk_elements: int = 1 << 21,
               gram_elements: int = 1 << 22, min_len: int = 8,
               weights: np.ndarray | None = None, values: np.ndarray | None = None) -> Side:
    """Groups the positives ``(row_ids[k], col_ids[k])`` (confidence ``weights[k]``, default
    1; any finite ``values[k]`` carried along, e.g. a rating) by row into padded chunks.

    A row with ``n`` positives goes to the shortest bucket of length ``L ≥ max(n, min_len)``;
    the bucket lengths are chosen by :func:`bucket_lengths` (as many buckets as powers of
    two would give, placed to minimise the padded slots). A chunk holds ``R`` rows with
    ``R·L·dim ≤ chunk_elements`` (the gathered rows: the default, 8 MiB of float32, keeps a
    chunk in cache while the row solve reads it several times) and ``R·dim² ≤
    gram_elements`` (the Gram matrices of the exact solve); a bucket's rows are spread evenly
    over its chunks, so fewer than one row per chunk is padding.
    """
    row_ids = np.asarray(row_ids, np.int64)
    col_ids = np.asarray(col_ids, np.int64)
    if len(row_ids) != len(col_ids):
        raise ValueError(f"{len(row_ids)} row ids but {len(col_ids)} column ids")
    if len(row_ids) and (row_ids.min() < 0 or row_ids.max() >= num_rows
                         or col_ids.min() < 0 or col_ids.max() >= num_cols):
        raise ValueError(f"ids out of range: rows in [{row_ids.min()}, {row_ids.max()}] of "
                         f"{num_rows}, columns in [{col_ids.min()}, {col_ids.max()}] of {num_cols}")
    if weights is not None:
        weights = np.asarray(weights, np.float64)
        if weights.shape != row_ids.shape:
            raise ValueError(f"{len(weights)} weights for {len(row_ids)} positives")
        if len(weights) and not (np.isfinite(weights).all() and weights.min() > 0):
            raise ValueError(f"positive weights must be finite and > 0; got min "
                             f"{weights.min()}, max {weights.max()}")
    if values is not None:
        values = np.asarray(values, np.float64)
        if values.shape != row_ids.shape:
            raise ValueError(f"{len(values)} values for {len(row_ids)} positives")
        if len(values) and not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise ValueError(f"values must be finite; value {bad} is {values[bad]}")
    order = np.lexsort((col_ids, row_ids))
    cols_sorted = col_ids[order].astype(np.int32)
    w_sorted = None if weights is None else weights[order].astype(np.float32)
    v_sorted = None if values is None else values[order].astype(np.float32)
    freq = np.bincount(row_ids, minlength=num_rows)
    starts = np.concatenate([[0], np.cumsum(freq)[:-1]])
    present = np.flatnonzero(freq)
    lens = bucket_lengths(freq[present], min_len)
    rows_out, cols_out, counts_out, weights_out, values_out = [], [], [], [], []
    for L in np.unique(lens):
        rs = present[lens == L]
        cap = max(1, min(chunk_elements // (int(L) * dim), gram_elements // (dim * dim)))
        n_chunks = -(-len(rs) // cap)
        R = -(-len(rs) // n_chunks)                  # rows spread evenly over the chunks
        pad = n_chunks * R - len(rs)
        r = np.concatenate([rs, np.full(pad, pad_row, np.int64)])
        n = np.concatenate([freq[rs], np.zeros(pad, np.int64)])
        pos = np.arange(int(L))[None, :]
        idx = np.concatenate([starts[rs], np.zeros(pad, np.int64)])[:, None] + pos
        src = np.minimum(idx, max(len(cols_sorted) - 1, 0))
        c = np.where(pos < n[:, None], cols_sorted[src], num_cols)
        if w_sorted is not None:
            weights_out.append(np.where(pos < n[:, None], w_sorted[src], 0.0)
                               .reshape(n_chunks, R, int(L)).astype(np.float32))
        if v_sorted is not None:
            values_out.append(np.where(pos < n[:, None], v_sorted[src], 0.0)
                              .reshape(n_chunks, R, int(L)).astype(np.float32))
        rows_out.append(r.reshape(n_chunks, R).astype(np.int32))
        cols_out.append(c.reshape(n_chunks, R, int(L)).astype(np.int32))
        counts_out.append(n.reshape(n_chunks, R).astype(np.float32))
    return Side(tuple(rows_out), tuple(cols_out), tuple(counts_out), freq.astype(np.float32),
                num_rows, num_cols, len(row_ids),
                None if weights is None else tuple(weights_out),
                None if values is None else tuple(values_out))


def bucket_lengths(n: np.ndarray, min_len: int = 8, num_buckets: int | None = None
                   ) -> np.ndarray:
    """The padded length ``L ≥ max(n_r, min_len)`` of each row ``r`` (``n``: the rows'
    history lengths, all ≥ 1), taking at most ``num_buckets`` distinct values, chosen to
    minimise ``Σ_r L_r`` (the padded slots every row solve reads).

    Default ``num_buckets``: the number of distinct powers of two ``max(min_len,
    2^⌈log2 n⌉)``, so a program holds no more bucket loops than with power-of-two buckets,
    and padding is never worse (ML-1M: 1.43x / 1.46x the positives with powers of two,
    1.31x / 1.27x here). Dynamic programming over the candidate lengths (``n`` rounded up
    to 32 steps per octave: at most ~32 per power of two, so ``O(buckets · candidates²)``
    stays small for any history length).
    """
    n = np.maximum(np.asarray(n, np.int64), 1)
    if not len(n):
        return n
    pow2 = np.maximum(min_len, 2 ** np.ceil(np.log2(n))).astype(np.int64)
    if num_buckets is None:
        num_buckets = len(np.unique(pow2))
    q = 2 ** np.maximum(0, np.floor(np.log2(n)).astype(np.int64) - 5)
    cand = np.maximum(min_len, -(-n // q) * q)
    v, cnt = np.unique(cand, return_counts=True)
    m = len(v)
    below = np.concatenate([[0], np.cumsum(cnt)])                 # rows with length < v[j]
    # cost[b, j]: least padded slots for the rows of the j shortest candidates in b buckets
    cost = np.full((num_buckets + 1, m + 1), np.inf)
    cost[0, 0] = 0.0
    first = np.zeros((num_buckets + 1, m + 1), np.int64)
    for b in range(1, num_buckets + 1):
        for j in range(1, m + 1):       # the last bucket holds candidates i..j-1, L = v[j-1]
            c = cost[b - 1, :j] + v[j - 1] * (below[j] - below[:j])
            first[b, j] = int(np.argmin(c))
            cost[b, j] = c[first[b, j]]
    b = int(np.argmin(cost[:, m]))
    edges, j = [], m
    while j > 0:
        edges.append(v[j - 1])
        j, b = first[b, j], b - 1
    edges = np.array(sorted(edges), np.int64)
    return edges[np.searchsorted(edges, cand)]


def recency_weights(user: np.ndarray, timestamp: np.ndarray, *, strength: float,
                    half_life: float) -> np.ndarray:
    """Confidence of each positive: ``c = 1 + strength · 2^(−k / half_life)``, ``k`` the
    number of the same user's positives after it (0 for the latest), ordered by
    ``(timestamp, row order)``. A user's recent positives say more about the next one."""
    user = np.asarray(user, np.int64)
    timestamp = np.asarray(timestamp, np.int64)
    if user.shape != timestamp.shape:
        raise ValueError(f"{len(user)} users but {len(timestamp)} timestamps")
    if not strength >= 0 or not half_life > 0:
        raise ValueError(f"recency weights: strength={strength} must be >= 0 and "
                         f"half_life={half_life} > 0")
    order = np.lexsort((np.arange(len(user)), timestamp, user))
    u_sorted = user[order]
    freq = np.bincount(u_sorted, minlength=int(u_sorted.max()) + 1 if len(user) else 0)
    ends = np.cumsum(freq)
    k = np.empty(len(user), np.int64)
    k[order] = ends[u_sorted] - 1 - np.arange(len(user))
    return 1.0 + strength * np.exp2(-k / half_life)


def _solve_side(x_table, y_table, side: dict, num_rows: int, num_cols: int, *,
                alpha0: float, reg: float, nu: float, with_loss: bool, y_bias=None,
                col_weight=None, row_weight=None, solver: str = "cholesky",
                cg_steps: int = 3):
    """New rows of ``x_table`` (the first ``num_rows``) given ``y_table`` fixed; and, when
    ``with_loss``, ``Σ_{observed} c (1 − ŷ)²`` at the new rows.

    ``y_bias`` (``[rows of y_table]``): a fixed per-column offset, ``ŷ = x·y + b_y``; the
    row solves become ``(…) x = Σ_obs (1 − b_y) y − α₀ Yᵀb``. ``col_weight`` / ``row_weight``
    (``[rows of y_table]`` / ``[rows of x_table]``, mean 1 over the real rows): the weight of
    an unobserved pair is ``α₀ · w_col · w_row`` instead of ``α₀``. ``solver``: ``"cholesky"``
    (the exact solve) or ``"cg"`` (``cg_steps`` conjugate-gradient steps from the current row).
    """
    if solver not in SOLVERS:
        raise ValueError(f"iALS solver={solver!r}: must be one of {SOLVERS}")
    if solver == "cg" and not (isinstance(cg_steps, int) and cg_steps >= 1):
        raise ValueError(f"iALS cg_steps={cg_steps!r}: must be an integer >= 1")
    prec = _precision()
    d = x_table.shape[1]
    y = y_table[:num_cols].astype(jnp.float32)
    yw = y if col_weight is None else y * col_weight[:num_cols, None].astype(jnp.float32)
    gram = jnp.matmul(yw.T, y, precision=prec)
    y_pad = jnp.concatenate([y, jnp.zeros((1, d), jnp.float32)])
    if y_bias is None:
        yb_pad, rhs0 = None, jnp.zeros((d,), jnp.float32)
    else:
        yb = y_bias[:num_cols].astype(jnp.float32)
        yb_pad = jnp.concatenate([yb, jnp.zeros((1,), jnp.float32)])
        rhs0 = alpha0 * jnp.matmul(yw.T, yb, precision=prec)
    eye = jnp.eye(d, dtype=jnp.float32)
    n_other = float(num_cols)
    obs = jnp.zeros((), jnp.float32)
    weights = side.get("weights") or (None,) * len(side["rows"])
    for rows, cols, counts, wts in zip(side["rows"], side["cols"], side["counts"], weights):
        # One bucket after the other (the barrier makes this bucket's inputs depend on the
        # previous one's result), so only one bucket's gathered rows and Gram matrices are
        # live at a time.
        x_table, y_pad, obs = jax.lax.optimization_barrier((x_table, y_pad, obs))

        def chunk(args):
            c, n, r, wt = args
            rw = (jnp.ones(r.shape, jnp.float32) if row_weight is None
                  else row_weight.at[r].get(mode="fill", fill_value=1.0).astype(jnp.float32))
            yc = y_pad[c]                                             # [R, L, d]
            lam = reg * (n + alpha0 * rw * n_other) ** nu
            target = 1.0 if yb_pad is None else 1.0 - yb_pad[c]      # [R, L]: y·x aims here
            if solver == "cg":
                x0 = x_table.at[r].get(mode="fill", fill_value=0.0).astype(jnp.float32)
                sol, s = _cg(yc, wt, target, gram, alpha0 * rw, lam, rhs0, x0, cg_steps, prec)
            else:
                ycw = yc if wt is None else yc * wt[..., None]        # c_ui · y_i
                b = jnp.einsum("rld,rl->rd", ycw, jnp.broadcast_to(target, c.shape),
                               precision=prec) - rhs0
                a = (jnp.einsum("rld,rle->rde", ycw, yc, precision=prec)
                     + alpha0 * rw[:, None, None] * gram + lam[:, None, None] * eye)
                chol = jnp.linalg.cholesky(a)
                z = jax.lax.linalg.triangular_solve(chol, b[..., None], left_side=True,
                                                    lower=True)
                sol = jax.lax.linalg.triangular_solve(chol, z, left_side=True, lower=True,
                                                      transpose_a=True)[..., 0]
                s = jnp.einsum("rld,rd->rl", yc, sol, precision=prec) if with_loss else None
            if not with_loss:
                return sol, jnp.zeros((), jnp.float32)
            err = jnp.square(target - s)                              # padding: y = 0, s = 0
            err = jnp.where(c < num_cols, err, 0.0) if wt is None else wt * err
            return sol, jnp.sum(err)

        sols, losses = jax.lax.map(chunk, (cols, counts, rows, wts))
        x_table = x_table.at[rows.reshape(-1)].set(sols.reshape(-1, d).astype(x_table.dtype),
                                                    mode="drop")
        obs = obs + jnp.sum(losses)
    return x_table, obs


def _cg(yc, wt, target, gram, g_scale, lam, rhs0, x, steps: int, prec):
    """``steps`` conjugate-gradient steps from ``x`` (``[R, d]``) on ``A x = b`` for each of
    ``R`` rows, ``A = Σ_l c_l y_l y_lᵀ + g_scale · gram + lam · I``, ``b = Σ_l c_l target_l y_l
    − rhs0`` (``y_l = yc[:, l]``, ``c = wt``, or 1), neither formed.

    Returns ``x`` and the scores ``s_l = y_l · x`` at it, without another pass over ``yc``:
    the first residual ``b − A x = Σ_l c_l (target_l − y_l·x) y_l − …`` takes the scores at
    the start, and each step's ``A p`` computes ``y_l · p``, so ``s`` follows ``x`` by the
    same step. ``yc`` is read twice per step. A row whose residual is 0 (padding, or already
    solved) stays where it is."""
    def weighted(t):
        return t if wt is None else wt * t

    def dense(v):                     # the unobserved and regularisation parts of A v
        return g_scale[:, None] * jnp.matmul(v, gram, precision=prec) + lam[:, None] * v

    def step(_, carry):
        x, s, r, p, rs = carry
        t = jnp.einsum("rld,rd->rl", yc, p, precision=prec)
        ap = jnp.einsum("rld,rl->rd", yc, weighted(t), precision=prec) + dense(p)
        pap = jnp.sum(p * ap, axis=1)
        alpha = jnp.where(pap > 0, rs / jnp.where(pap > 0, pap, 1.0), 0.0)
        x = x + alpha[:, None] * p
        s = s + alpha[:, None] * t
        r = r - alpha[:, None] * ap
        rs_new = jnp.sum(r * r, axis=1)
        beta = jnp.where(rs > 0, rs_new / jnp.where(rs > 0, rs, 1.0), 0.0)
        return x, s, r, r + beta[:, None] * p, rs_new

    s = jnp.einsum("rld,rd->rl", yc, x, precision=prec)
    r = jnp.einsum("rld,rl->rd", yc, weighted(target - s), precision=prec) - rhs0 - dense(x)
    rs = jnp.sum(r * r, axis=1)
    x, s, *_ = jax.lax.fori_loop(0, steps, step, (x, s, r, r, rs))
    return x, s


def make_epoch(users: Side, items: Side, *, user_table: str, item_table: str,
               alpha0: float, reg: float, nu: float, item_bias_table: str | None = None,
               pop_exponent: float = 0.0, solver: str = "cholesky", cg_steps: int = 3):
    """``epoch(state, data) -> (state, {"loss": L / |S|})``: one user half-step, one item
    half-step. ``data`` is :func:`epoch_data` (passed as arguments, not baked into the
    program as constants).

    ``item_bias_table``: also fit an item bias, ``ŷ = p_u·q_i + b_i`` (λ on ``b_i`` as on
    ``q_i``): the item half-step solves ``[q_i, b_i]`` against ``[p_u, 1]``, the user
    half-step takes ``b`` as a fixed offset.

    ``pop_exponent`` β > 0: an unobserved (u, i) weighs ``α₀ w_i`` with ``w_i ∝ |U_i|^β``
    (mean 1 over the items; eALS, He et al. 2016): popular items are pushed harder towards
    0 where unobserved, and the item's regularization counts ``|U_i| + α₀ w_i |U|`` terms.

    ``solver``: ``"cholesky"`` solves every row exactly; ``"cg"`` takes ``cg_steps``
    conjugate-gradient steps per row from its current value (every option above included:
    the item half-step with a bias warm-starts from ``[q_i, b_i]``).
    """
    if solver not in SOLVERS:
        raise ValueError(f"iALS solver={solver!r}: must be one of {SOLVERS}")
    solve = dict(solver=solver, cg_steps=cg_steps)
    nu_, nu_i = users.num_rows, items.num_rows

    def epoch(state, data):
        values = state.table_values()
        p, q = values[user_table], values[item_table]
        d = q.shape[1]
        bias = values[item_bias_table][:, 0] if item_bias_table else None
        w = None
        if pop_exponent:
            f = data["item_freq"] ** pop_exponent
            w = jnp.zeros((q.shape[0],), jnp.float32).at[:nu_i].set(f * (nu_i / jnp.sum(f)))
        p, _ = _solve_side(p, q, data["users"], nu_, nu_i, alpha0=alpha0, reg=reg, nu=nu,
                           with_loss=False, y_bias=bias, col_weight=w, **solve)
        if bias is not None:                # augmented: [q_i, b_i] against [p_u, 1]
            p_side = jnp.concatenate([p, jnp.ones((p.shape[0], 1), p.dtype)], axis=1)
            q = jnp.concatenate([q, bias[:, None].astype(q.dtype)], axis=1)
        else:
            p_side = p
        q, obs = _solve_side(q, p_side, data["items"], nu_i, nu_, alpha0=alpha0, reg=reg,
                             nu=nu, with_loss=True, row_weight=w, **solve)
        pu, qi = p_side[:nu_], q[:nu_i]
        wi = jnp.ones((nu_i,), jnp.float32) if w is None else w[:nu_i]
        gp = jnp.matmul(pu.T, pu, precision=_precision())
        gq = jnp.matmul((qi * wi[:, None]).T, qi, precision=_precision())
        pp = pu[:, :d]
        penalty = reg * (jnp.sum((data["user_freq"] + alpha0 * nu_i) ** nu * jnp.sum(pp * pp, 1))
                         + jnp.sum((data["item_freq"] + alpha0 * wi * nu_) ** nu
                                   * jnp.sum(qi * qi, 1)))
        loss = (obs + alpha0 * jnp.sum(gp * gq) + penalty) / users.nnz
        tables = jax.tree.map(lambda v: v, state.tables)
        tables[user_table] = state.tables[user_table].replace(p)
        tables[item_table] = state.tables[item_table].replace(q[:, :d])
        if bias is not None:
            tables[item_bias_table] = state.tables[item_bias_table].replace(q[:, d:])
        return state.replace(step=state.step + 1, tables=tables), {"loss": loss}

    return epoch


def epoch_data(users: Side, items: Side) -> dict:
    def as_dict(s: Side) -> dict:
        d = {"rows": s.rows, "cols": s.cols, "counts": s.counts}
        if s.weights is not None:
            d["weights"] = s.weights
        if s.values is not None:
            d["values"] = s.values
        return d

    return {"users": as_dict(users), "items": as_dict(items),
            "user_freq": users.freq, "item_freq": items.freq}


def check_mesh(mesh, optimizer: str = "ials") -> None:
    """A ValueError for a mesh with more than one XLA:CPU device in this process: their
    programs run batched Cholesky solves at once in one thread pool, and at ML-100K size an
    epoch wedged with every thread parked (iALS and BPMF, 4 fake devices, ``mesh=mp``; a
    60-user test set did not). One CPU device per process (``mesh=single``, or several
    processes with one device each) runs; other backends are not refused."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if len(local) > 1 and local[0].platform == "cpu":
        raise ValueError(f"optimizer={optimizer} on {len(local)} CPU devices of one process "
                         f"(mesh axes {dict(mesh.shape)}): XLA:CPU can wedge running several "
                         "devices' Cholesky solves at once; use mesh=single, one CPU device "
                         "per process, or a GPU")


def check_model(model_cfg, abstract_model) -> tuple[str, str, str | None]:
    """``(user table, item table, item bias table or None)`` of a model iALS can train, else
    a ValueError naming the field: the dot combiner, no side or context features. With
    ``model.bias=true`` the item bias is fitted; the user and global biases stay at 0 (they
    cannot change a user's ranking)."""
    problems = []
    if model_cfg.get("name") != "embed_mlp" or model_cfg.get("combiner") != "dot":
        problems.append(f"model.name={model_cfg.get('name')!r} model.combiner="
                        f"{model_cfg.get('combiner')!r} (needs embed_mlp with combiner=dot)")
    allowed = {"user_mf", "item_mf", "user_bias", "item_bias"}
    extra = sorted(set(abstract_model.table_features) - allowed)
    if extra:
        problems.append(f"tables {extra} (side/context features are not supported)")
    if problems:
        raise ValueError("optimizer=ials trains a dot product p_u·q_i (+ b_i); got "
                         + "; ".join(problems))
    return "user_mf", "item_mf", ("item_bias" if "item_bias" in abstract_model.table_features
                                  else None)
