"""User-level differentially private SGD (``privacy=dp`` with a gradient optimizer).

The unit of privacy is a user's whole history (add or remove one user), as in
:mod:`jaxreco.privacy.dp_ials`. One step (Abadi et al. 2016, "Deep Learning with Differential
Privacy", with the user as the unit, as in McMahan et al. 2018, "Learning Differentially
Private Recurrent Language Models"):

1. **Poisson sampling of users.** Each user joins the step independently with probability
   ``q = users_per_step / num_users`` (the sampling dp-accounting's
   ``PoissonSampledDpEvent`` assumes; the number of users per step varies). The draw is
   ``np.random.default_rng([seed, step])``: a resumed run draws the same users.
2. **Bounded examples per user.** Each user keeps at most ``k = max_examples_per_user`` of
   their training examples (a uniform sample without replacement, drawn once per run, as
   DP iALS samples positives), laid out as a padded ``[num_users, k]`` block.
3. **Per-user gradient.** For a sampled user ``u`` with examples ``E_u`` the loss is
   ``L_u = (1/|E_u|) Σ_{e ∈ E_u} ℓ(e)`` (the task's per-example loss, its regulariser
   included; a mean, so every user weighs the same before clipping). Its gradient splits
   into

   * the *private* part: the rows of tables indexed by the user id alone (``user_embed``,
     ``user_bias``, ...). Only user ``u``'s examples touch row ``u``;
   * the *shared* part ``g_u``: the gradient of every other table (items, side features)
     and of every dense parameter (global bias, MLP weights).

4. **Clipping.** ``ḡ_u = g_u · min(1, C / ‖g_u‖)`` with ``‖g_u‖`` the norm of the whole
   shared gradient, jointly over the table rows (repeated ids of one user summed first,
   so the bound holds for what the user adds to each row) and the dense parameters.
5. **Gaussian mechanism on every shared coordinate.** ``G = (Σ_u ḡ_u + N(0, σ²C² I)) / (q ·
   num_users)`` with ``σ = noise_multiplier``; the noise goes on **every row** of every
   shared table and every dense parameter, not only on the rows the sampled users touched
   (which rows moved would tell who was sampled, and so who rated what). One user changes
   ``Σ_u ḡ_u`` by at most ``C`` in L2: a subsampled Gaussian mechanism of multiplier ``σ``.
6. **Dense update (post-processing).** The table optimizer runs on all rows of the shared
   tables (``RowOptimizer.apply`` with every row id: its slots are functions of the noisy
   ``G`` only, so any row optimizer is safe), optax on the dense parameters. This is the
   price of DP-SGD here: a step reads and writes the whole item table and its optimizer
   slots instead of the batch's rows (the page measures it).

**User rows: joint DP.** Row ``p_u`` is updated, when ``u`` is sampled, by the table
optimizer with user ``u``'s own gradient ``∇_{p_u} L_u`` (unclipped, unnoised), which
depends on ``u``'s data and on the shared parameters — DP outputs. The released model is
the shared part; ``p_u`` is only ever shown to user ``u`` (their own recommendations):
joint differential privacy (Kearns et al. 2014), the billboard model of Chien et al. 2021
and of :mod:`jaxreco.privacy.dp_ials`. Noising the user rows too
would add ``N(0, σ²C²)`` to each of ``num_users × dim`` coordinates per step for nothing a
billboard release needs.

**The sequential model** (``model=sequential``, ``task.kind=next_item``). A user's
examples are windows of their own train sequence, not rows, so step 2 differs: each sampled
user contributes **one window per step**, the task's own (``task.next_item.crop``: the
latest ``L + 1`` train items, or a window ending at a uniformly drawn position), built on
the host for the sampled users only by the task's ``transform``; of its ``L`` targets only
the latest ``k' = min(L, max_examples_per_user)`` count (the earlier positions stay inputs).
So a sampled user adds the gradient of ``L_u = (1/n_u) Σ_{t} ℓ_t`` over ``n_u ≤ k'`` targets
of one window. That gradient reaches every parameter the window touches: the item-table
rows of its inputs, of its targets and of the softmax candidates (the table is both the
input embedding and the output layer: all three sum into one row gradient before the
norm), the position embeddings and every attention/FFN/LayerNorm parameter; all of it is
the shared part, clipped jointly to ``C`` (step 4) and noised on every row and parameter
(step 5). There is no private user table: the user's representation is the encoder run on
their own latest items at recommendation time (joint DP, as for user rows above). The
crop positions, the dropout seeds and the sampled softmax candidates come from
``default_rng([seed, step, 0])``, public randomness independent of the data; the
candidates are drawn from the uniform proposal (``task.sampler=uniform``) or are every item
(``loss=full``): a popularity proposal is computed from the training counts and is refused.

Steps compose adaptively: ε from dp-accounting over
``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), steps)``
(:mod:`jaxreco.privacy.accounting`). Noise is drawn from ``fold_in(fold_in(key, step), leaf)``.

Not covered by the guarantee: the logged ``train/loss`` and validation metrics
(diagnostics on the raw data), early stopping and hyper-parameters chosen by looking at
the validation split. The initial global bias is public (the midpoint of
``dataset.rating_range``; click heads start at logit 0), not the training mean.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxreco import models, optim
from jaxreco.embedding import ShardedTables
from jaxreco.privacy import accounting, dp_ials
from jaxreco.train import step as step_lib

log = logging.getLogger("jaxreco")

# Tasks whose loss is a mean of per-example terms and whose batch transform is a fixed
# function of the rows (no per-step sampling): a user's loss is then the sum over their rows.
ROW_TASKS = ("rating", "ctr")
# Tasks whose examples are drawn per step from each sampled user's sequence (one window).
WINDOW_TASKS = ("next_item",)
TASKS = ROW_TASKS + WINDOW_TASKS


@dataclasses.dataclass(frozen=True)
class Plan:
    """The mechanism of a run: noise ``noise_std = noise_multiplier · clip_norm`` on each
    shared coordinate of the summed clipped gradients, users sampled at rate
    ``sampling_rate``; ``epsilon`` at ``delta`` after ``steps`` steps."""
    noise_multiplier: float
    clip_norm: float
    noise_std: float
    sampling_rate: float
    num_users: int
    max_examples_per_user: int
    delta: float
    steps: int
    epsilon: float
    accountant: str
    seed: int

    @property
    def expected_users(self) -> float:
        """``q · num_users``: the fixed denominator of the noisy mean gradient."""
        return self.sampling_rate * self.num_users

    def metrics(self, steps: int | None = None) -> dict[str, float]:
        """``privacy/*`` figures after ``steps`` steps (default: all planned)."""
        n = self.steps if steps is None else int(steps)
        eps = (accounting.epsilon(self.noise_multiplier, n, self.delta, self.accountant,
                                  self.sampling_rate) if n >= 1 else 0.0)
        return {"privacy/epsilon": eps, "privacy/delta": self.delta,
                "privacy/noise_multiplier": self.noise_multiplier,
                "privacy/noise_std": self.noise_std, "privacy/clip_norm": self.clip_norm,
                "privacy/sampling_rate": self.sampling_rate,
                "privacy/max_examples_per_user": float(self.max_examples_per_user),
                "privacy/releases": float(n)}


def sampling_rate(privacy_cfg, num_users: int) -> float:
    """``q = min(1, users_per_step / num_users)``."""
    return min(1.0, int(privacy_cfg.users_per_step) / max(int(num_users), 1))


def steps_per_epoch(privacy_cfg, num_users: int) -> int:
    """``⌈1 / q⌉``: the steps in which each user is sampled once on average."""
    return max(1, math.ceil(1.0 / sampling_rate(privacy_cfg, num_users)))


def plan(privacy_cfg, *, num_users: int, steps: int, seed: int,
         max_examples: int | None = None) -> Plan:
    """The :class:`Plan` of a ``privacy`` config node: the noise multiplier given, or
    calibrated to ``privacy.epsilon`` over ``steps`` sampled steps; δ defaults to
    1/num_users. ``max_examples``: a bound the task itself puts on a user's examples per
    step (a window task: its ``max_len`` targets); the plan's k is the smaller of the two."""
    pc = privacy_cfg
    delta = float(pc.delta) if pc.delta is not None else 1.0 / max(int(num_users), 2)
    acc = str(getattr(pc.accountant, "value", pc.accountant))
    if (pc.epsilon is None) == (pc.noise_multiplier is None):
        raise ValueError(f"privacy=dp: give exactly one of privacy.epsilon (got {pc.epsilon}) "
                         f"and privacy.noise_multiplier (got {pc.noise_multiplier})")
    q = sampling_rate(pc, num_users)
    if pc.noise_multiplier is not None:
        z = float(pc.noise_multiplier)
    else:
        z = accounting.noise_multiplier(float(pc.epsilon), int(steps), delta, acc, q)
    c = float(pc.clip_norm)
    return Plan(noise_multiplier=z, clip_norm=c, noise_std=z * c, sampling_rate=q,
                num_users=int(num_users),
                max_examples_per_user=min(int(pc.max_examples_per_user),
                                          int(max_examples or pc.max_examples_per_user)),
                delta=delta, steps=int(steps),
                epsilon=accounting.epsilon(z, int(steps), delta, acc, q), accountant=acc,
                seed=int(seed if pc.seed is None else pc.seed))


# ----------------------------------------------------------------------------- data
def user_blocks(cols: Mapping[str, np.ndarray], num_users: int, k: int,
                seed: int) -> dict[str, np.ndarray]:
    """Each user's examples as ``{column: [num_users, m]}`` plus ``_mask`` (``m = min(k,
    largest user's count)``): at most ``k`` per user, sampled without replacement
    (:func:`jaxreco.privacy.dp_ials.sample_per_user`); padding slots repeat the user's id in
    ``user``, hold row 0's values elsewhere, and are masked out."""
    user = np.asarray(cols["user"], np.int64)
    keep = dp_ials.sample_per_user(user, k, seed)
    keep = keep[np.argsort(user[keep], kind="stable")]                 # grouped by user
    ku = user[keep]
    counts = np.bincount(ku, minlength=num_users)
    m = max(1, int(counts.max()) if len(counts) else 1)
    rank = np.arange(len(keep)) - np.searchsorted(ku, ku, side="left")
    idx = np.zeros((num_users, m), np.int64)
    mask = np.zeros((num_users, m), bool)
    idx[ku, rank] = keep
    mask[ku, rank] = True
    out = {c: np.asarray(v)[idx] for c, v in cols.items()}
    out["user"] = np.broadcast_to(np.arange(num_users, dtype=np.asarray(cols["user"]).dtype)
                                  [:, None], (num_users, m)).copy()
    out["_mask"] = mask
    return out


def chunk_size(plan_: Plan) -> int:
    """Users per compiled chunk: the expected sample plus 4 standard deviations, a multiple
    of 8 (a larger sample runs as several chunks: nothing is truncated)."""
    e = plan_.expected_users
    b = e + 4.0 * math.sqrt(max(e * (1 - plan_.sampling_rate), 1.0)) + 1
    return int(min(-(-int(math.ceil(b)) // 8) * 8, -(-plan_.num_users // 8) * 8))


def sample_users(plan_: Plan, step: int, chunk: int) -> np.ndarray:
    """The users of ``step``: each with probability ``q`` (Poisson sampling), as
    ``[chunks, chunk]`` int32 padded with ``num_users`` (no user)."""
    rng = np.random.default_rng([plan_.seed, int(step)])
    users = np.flatnonzero(rng.random(plan_.num_users) < plan_.sampling_rate)
    n = max(1, -(-len(users) // chunk))
    out = np.full(n * chunk, plan_.num_users, np.int32)
    out[:len(users)] = users
    return out.reshape(n, chunk)


# ----------------------------------------------------------------------------- model
def private_tables(table_features: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """Tables indexed by the user id alone: one row per user, touched only by that user's
    examples (updated under joint DP, never noised or released)."""
    return tuple(t for t, f in table_features.items() if tuple(f) == ("user",))


def public_model_fn(cfg, task) -> Callable[[], nnx.Module]:
    """``task``'s model with data-independent initial biases: the rating head/global bias at
    the midpoint of ``dataset.rating_range`` (0 without one), click heads at logit 0 (the
    non-private tasks start them at training statistics, which no mechanism covers). The
    sequential model has no data-dependent initial value: the task's own."""
    if task.kind in WINDOW_TASKS:
        return task.model_fn()
    lo, hi = cfg.dataset.get("rating_range", None) or (None, None)
    mid = 0.5 * (float(lo) + float(hi)) if lo is not None and hi is not None else 0.0
    heads = list(cfg.model.get("heads", None) or [])
    return models.build(cfg.model, num_users=task.num_users, num_items=task.num_items,
                        global_bias=mid, seed=cfg.seed, side_vocab=task.side_vocab,
                        context_vocab=task.context_vocab, negatives=False,
                        head_bias={h: 0.0 for h in heads if h != "rating"})


def check(cfg, task, mesh) -> None:
    """ValueError naming the option when a DP-SGD run asks for what is not covered."""
    if task.kind not in TASKS:
        raise ValueError(
            f"privacy=dp with optimizer={cfg.optimizer.name}: task.kind={task.kind!r} is not "
            f"supported by DP-SGD (supported: {list(TASKS)}); implicit feedback draws "
            "negatives per example from the user's own rows, which the per-user examples do "
            "not hold yet. For implicit feedback use DP iALS: optimizer=ials "
            "(experiment=dp_ials)")
    if task.kind in WINDOW_TASKS:
        ni = cfg.task.next_item
        loss = str(getattr(ni.loss, "value", ni.loss))
        sampler = str(getattr(cfg.task.sampler, "value", cfg.task.sampler))
        if loss == "sampled" and sampler != "uniform":
            raise ValueError(
                f"privacy=dp with task.next_item.loss=sampled: task.sampler={sampler!r} draws "
                "the softmax candidates from the training item counts, which the mechanism "
                "does not cover; use task.sampler=uniform (public randomness) or "
                "task.next_item.loss=full")
    if mesh.devices.size > 1 or jax.process_count() > 1:
        raise ValueError(f"privacy=dp (DP-SGD) runs on one device: mesh.axes="
                         f"{dict(cfg.mesh.axes)} gives {mesh.devices.size} devices and "
                         f"{jax.process_count()} processes; use mesh=single")
    if cfg.model.get("pretrained_gmf") or cfg.model.get("pretrained_mlp"):
        raise ValueError("privacy=dp: model.pretrained_gmf / pretrained_mlp start from "
                         "non-private runs; their parameters are not covered (set them to null)")


# ----------------------------------------------------------------------------- step
def _per_example(loss_fn, model, rows, batch):
    """``[m]`` per-example losses: ``loss_fn`` on batches of one example each."""
    def one(r, b):
        add = lambda x: x[None]  # noqa: E731
        return loss_fn(model, jax.tree.map(add, r), jax.tree.map(add, b))[0]
    return jax.vmap(one)(rows, batch)


def make_functions(graphdef, tables: ShardedTables, loss_fn, plan_: Plan,
                   table_rows: Mapping[str, int]):
    """``(user_gradients, clip)`` (``table_rows``: rows of each table):

    * ``user_gradients(state, data, users) -> (g_rows, g_dense, ex, loss_sum, count)``: for
      the users ``[B]`` (``num_users`` = padding), the gradient of each one's mean loss
      over their examples in ``data`` (:func:`user_blocks` on device): rows ``[B, m, d]``
      per table and feature, dense leaves ``[B, ...]``; ``ex`` the examples ``[B, m]``;
    * ``clip(g_rows, g_dense, ex) -> (scale [B], norm [B])``: the factor ``min(1, C/‖g_u‖)``
      of each user's shared gradient (private tables excluded; repeated ids summed).
    """
    tf = tables.table_features
    private = private_tables(tf)
    num_users = plan_.num_users

    def user_gradients(state, data, users):
        values = state.table_values()
        safe = jnp.minimum(users, num_users - 1)
        ex = {c: v[safe] for c, v in data.items() if c != "_mask"}          # [B, m]
        mask = data["_mask"][safe] & (users < num_users)[:, None]
        b, m = mask.shape
        flat = {c: v.reshape(-1) for c, v in ex.items()}
        rows = jax.tree.map(lambda r: r.reshape(b, m, *r.shape[1:]), tables.lookup(values, flat))

        def one_user(rows_u, ex_u, mask_u, dense):
            def objective(rows_u, dense):
                model = nnx.merge(graphdef, state.tables, dense)
                per = _per_example(loss_fn, model, rows_u, ex_u)
                total = jnp.sum(jnp.where(mask_u, per, 0.0))
                return total / jnp.maximum(jnp.sum(mask_u), 1).astype(total.dtype), total
            (g_rows, g_dense), total = jax.grad(objective, argnums=(0, 1), has_aux=True)(
                rows_u, dense)
            return g_rows, g_dense, total

        g_rows, g_dense, totals = jax.vmap(one_user, in_axes=(0, 0, 0, None))(
            rows, ex, mask, state.dense)
        return g_rows, g_dense, ex, jnp.sum(totals), jnp.sum(mask)

    def clip(g_rows, g_dense, ex):
        sq = sum(jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1)
                 for g in jax.tree.leaves(g_dense))
        for t, feats in tf.items():
            if t in private:
                continue
            ids = jnp.concatenate([ex[f] for f in feats], axis=1)               # [B, m·nf]
            g = jnp.concatenate([g_rows[t][f] for f in feats], axis=1)          # [B, m·nf, d]
            num_rows = int(table_rows[t])
            _, ug = jax.vmap(lambda i, x: optim.dedup(i, x, num_rows))(ids, g)
            sq = sq + jnp.sum(jnp.square(ug), axis=(1, 2))
        norm = jnp.sqrt(sq)
        return jnp.minimum(1.0, plan_.clip_norm / jnp.maximum(norm, 1e-30)), norm

    return user_gradients, clip


def window_batch(task, users: np.ndarray, step: int, k: int):
    """``(shared, xs)``: the examples of a window task (``next_item``) for the sampled
    ``users`` ``[chunks, chunk]`` (padding ``num_users``): one window per user from the
    task's own ``transform`` at ``step`` (crop, dropout seeds and candidates from
    ``default_rng([seed, step, 0])``), each feature ``[chunks, chunk, n]`` in ``xs`` (with
    ``user``); only the latest ``k`` of the ``L`` targets of a window kept (earlier targets
    set to -1; inputs unchanged); padding users have no input and no target. ``shared``:
    the step's shared softmax candidates ``cand_item [C]``."""
    users = np.asarray(users)
    flat = users.reshape(-1)
    real = flat < task.num_users
    b = task.transform({"user": np.where(real, flat, 0).astype(np.int32)}, int(step), 0)
    L = int(task.max_len)
    xs = {"user": flat.astype(np.int32)}
    for c, v in b.items():
        if c not in ("user", "cand_item"):
            xs[c] = np.array(v).reshape(len(flat), -1)
    xs["item"][~real] = -1
    xs["seq_item"][~real] = -1
    if k < L:
        xs["item"][:, :L - k] = -1
    xs = {c: v.reshape(users.shape + v.shape[1:]) for c, v in xs.items()}
    return {"cand_item": np.asarray(b["cand_item"])}, xs


def make_window_gradients(graphdef, tables: ShardedTables, loss_fn,
                          table_rows: Mapping[str, int]):
    """``user_gradients(state, shared, xs) -> (g_rows, g_dense, ex, loss_sum, count)`` of a
    window task, as :func:`make_functions`' for per-user rows: ``xs`` one chunk of
    :func:`window_batch` (``[B, n]`` per user and feature), ``shared`` the step's shared
    features (``cand_item [C]``, every user's rows of them broadcast, so that each user's
    gradient on the candidate rows is their own). The per-user loss is the task's loss on
    that user's window alone: the mean over its valid targets. ``ex``: each feature's ids
    ``[B, n]`` with padding (negative ids) moved to the table's row count, which the clip
    and the scatter ignore; ``count``: the valid targets (``item >= 0``)."""
    feat_rows = {f: int(table_rows[t]) for t, fs in tables.table_features.items() for f in fs}

    def user_gradients(state, shared, xs):
        values = state.table_values()
        b = xs["user"].shape[0]
        per_user = {c: v for c, v in xs.items() if c != "user"}
        looked = tables.lookup(values, {**{c: v.reshape(-1) for c, v in per_user.items()
                                           if c in feat_rows}, **shared})
        rows = {t: {f: (r.reshape(b, -1, r.shape[-1]) if f in per_user
                        else jnp.broadcast_to(r[None], (b,) + r.shape))
                    for f, r in fr.items()} for t, fr in looked.items()}

        def one_user(rows_u, batch_u, dense):
            def objective(rows_u, dense):
                model = nnx.merge(graphdef, state.tables, dense)
                loss, _ = loss_fn(model, rows_u, {**batch_u, **shared})
                n = jnp.sum(batch_u["item"] >= 0).astype(loss.dtype)
                return loss, loss * n
            (g_rows, g_dense), total = jax.grad(objective, argnums=(0, 1), has_aux=True)(
                rows_u, dense)
            return g_rows, g_dense, total

        g_rows, g_dense, totals = jax.vmap(one_user, in_axes=(0, 0, None))(
            rows, per_user, state.dense)
        ex = {}
        for f, n in feat_rows.items():
            ids = per_user[f] if f in per_user else jnp.broadcast_to(shared[f][None],
                                                                     (b,) + shared[f].shape)
            ex[f] = jnp.where(ids >= 0, ids, n)
        return g_rows, g_dense, ex, jnp.sum(totals), jnp.sum(per_user["item"] >= 0)

    return user_gradients


def make_dp_step(graphdef, tables: ShardedTables, loss_fn, dense_tx: optax.GradientTransformation,
                 plan_: Plan, table_rows: Mapping[str, int], user_gradients=None):
    """``step(state, data, xs) -> (state, {"loss": mean per-example loss})``: one DP-SGD
    step (module docstring) over the sampled users in ``xs``, scanned over its leading
    ``chunks`` axis: ``users [chunks, chunk]`` (padding ``num_users``) whose examples are in
    ``data`` (:func:`user_blocks`), or, with ``user_gradients`` from
    :func:`make_window_gradients`, the ``xs`` of :func:`window_batch` and its ``shared``
    features as ``data``."""
    tf = tables.table_features
    private = private_tables(tf)
    row_opt = tables.row_opt
    row_gradients, clip = make_functions(graphdef, tables, loss_fn, plan_, table_rows)
    user_gradients = user_gradients or row_gradients
    key0 = jax.random.key(plan_.seed)

    def step(state, data, xs):
        values = state.table_values()
        users = xs["user"] if isinstance(xs, Mapping) else xs

        def chunk(carry, u):
            shared, dense_sum, loss_sum, count = carry
            g_rows, g_dense, ex, total, n = user_gradients(state, data, u)
            scale, _ = clip(g_rows, g_dense, ex)
            new_shared = {}
            for t, feats in tf.items():
                if t in private:
                    continue
                acc = shared[t]
                for f in feats:
                    g = g_rows[t][f] * scale[:, None, None]
                    acc = acc.at[ex[f].reshape(-1)].add(g.reshape(-1, g.shape[-1]), mode="drop")
                new_shared[t] = acc
            dense_sum = jax.tree.map(lambda a, g: a + jnp.tensordot(scale, g, axes=1),
                                     dense_sum, g_dense)
            priv = {t: sum(jnp.sum(g_rows[t][f], axis=1) for f in tf[t]) for t in private}
            return (new_shared, dense_sum, loss_sum + total, count + n), priv

        init = ({t: jnp.zeros_like(values[t]) for t in tf if t not in private},
                jax.tree.map(jnp.zeros_like, state.dense), jnp.float32(0), jnp.int32(0))
        (shared, dense_sum, loss_sum, count), priv = jax.lax.scan(chunk, init, xs)

        key = jax.random.fold_in(key0, state.step)
        denom = plan_.expected_users
        names = sorted(shared)
        noisy = {t: (shared[t] + plan_.noise_std * jax.random.normal(
            jax.random.fold_in(key, i), shared[t].shape, shared[t].dtype)) / denom
            for i, t in enumerate(names)}
        leaves, treedef = jax.tree.flatten(dense_sum)
        g_dense = jax.tree.unflatten(treedef, [
            (x + plan_.noise_std * jax.random.normal(jax.random.fold_in(key, len(names) + i),
                                                     x.shape, x.dtype)) / denom
            for i, x in enumerate(leaves)])

        new_values, new_slots = dict(values), dict(state.table_opt)
        for t in names:                                   # every row: a dense update
            all_rows = jnp.arange(values[t].shape[0], dtype=jnp.int32)
            new_values[t], new_slots[t] = row_opt.apply(values[t], state.table_opt[t], all_rows,
                                                        noisy[t], state.step)
        flat_users = users.reshape(-1)
        for t in private:                                 # joint DP: each user's own row
            g = priv[t].reshape(-1, priv[t].shape[-1])
            new_values[t], new_slots[t] = row_opt.update(values[t], state.table_opt[t],
                                                         flat_users, g, state.step)
        new_state = step_lib.apply_updates(state, new_values, new_slots, g_dense, dense_tx)
        return new_state, {"loss": loss_sum / jnp.maximum(count, 1).astype(jnp.float32)}

    return step


def task_plan(cfg, task, ms) -> Plan:
    """The :class:`Plan` of a DP-SGD run of ``task`` over the run's steps (a window task's
    k is at most its ``max_len`` targets: what a user can contribute in one window)."""
    return plan(cfg.privacy, num_users=task.num_users, steps=ms.total_steps, seed=int(cfg.seed),
                max_examples=int(task.max_len) if task.kind in WINDOW_TASKS else None)


def _jit_step(task, ms, pl: Plan, windows: bool = False):
    """The jitted :func:`make_dp_step` of ``task``'s loss on ``ms`` (state donated); with
    ``windows`` its per-user gradients are :func:`make_window_gradients`'."""
    values_shape = {t: int(v.shape[0]) for t, v in ms.state.table_values().items()}
    loss_fn = task.loss_fn(ms.abstract_model)
    grads = (make_window_gradients(ms.graphdef, ms.tables, loss_fn, values_shape)
             if windows else None)
    step = make_dp_step(ms.graphdef, ms.tables, loss_fn, ms.dense_tx, pl, values_shape, grads)
    return jax.jit(step, out_shardings=(ms.shardings, None), donate_argnums=0)


def build(cfg, task, ms, mesh):
    """``(step_fn(state, users) -> (state, metrics), next_batch(step) -> users, plan)`` for
    a ``privacy=dp`` run of ``task`` with a gradient optimizer (``ms``: the
    :class:`jaxreco.train.setup.ModelState`)."""
    check(cfg, task, mesh)
    pl = task_plan(cfg, task, ms)
    if task.kind in WINDOW_TASKS:
        return _build_windows(cfg, task, ms, pl)
    cols = task.transform(dict(task.train_cols), 0, 0)
    blocks = user_blocks(cols, task.num_users, pl.max_examples_per_user, pl.seed)
    data = jax.device_put(blocks)
    chunk = chunk_size(pl)
    jitted = _jit_step(task, ms, pl)
    log.info("privacy=dp (DP-SGD): (ε=%.4g, δ=%.3g) over %d steps (%s accountant); noise "
             "multiplier %.4g, clip C=%g, σC=%.4g; users sampled at q=%.4g (%.1f expected, "
             "chunks of %d); %d of %d examples kept (≤ %d per user); private (joint-DP) "
             "tables %s, every row of %s noised and updated each step",
             pl.epsilon, pl.delta, pl.steps, pl.accountant, pl.noise_multiplier, pl.clip_norm,
             pl.noise_std, pl.sampling_rate, pl.expected_users, chunk,
             int(blocks["_mask"].sum()), len(cols["user"]), pl.max_examples_per_user,
             list(private_tables(ms.tables.table_features)),
             [t for t in ms.tables.table_features
              if t not in private_tables(ms.tables.table_features)])

    def step_fn(state, users):
        return jitted(state, data, users)

    def next_batch(step: int) -> Any:
        return sample_users(pl, step, chunk)

    return step_fn, next_batch, pl


def _build_windows(cfg, task, ms, pl: Plan):
    """:func:`build` for a window task: the sampled users' windows are built on the host
    each step (:func:`window_batch`), then one jitted DP step."""
    k = pl.max_examples_per_user                # ≤ max_len (task_plan)
    chunk = chunk_size(pl)
    jitted = _jit_step(task, ms, pl, windows=True)
    log.info("privacy=dp (DP-SGD, %s): (ε=%.4g, δ=%.3g) over %d steps (%s accountant); noise "
             "multiplier %.4g, clip C=%g, σC=%.4g; users sampled at q=%.4g (%.1f expected, "
             "chunks of %d); one window per sampled user per step, at most %d targets of it "
             "(L=%d); every row of %s and every dense parameter noised and updated each step",
             task.kind, pl.epsilon, pl.delta, pl.steps, pl.accountant, pl.noise_multiplier,
             pl.clip_norm, pl.noise_std, pl.sampling_rate, pl.expected_users, chunk, k,
             int(task.max_len), list(ms.tables.table_features))

    def step_fn(state, batch):
        shared, xs = batch
        return jitted(state, shared, xs)

    def next_batch(step: int) -> Any:
        return window_batch(task, sample_users(pl, step, chunk), step, k)

    return step_fn, next_batch, pl
