"""Complete the cart: items that go with a set of items, learned from baskets.

A *basket* is the set of items one user bought in one order (Instacart's ``order_id``).
The question is "given the items already in the cart, what else goes in it?": a
complement, not a substitute (cosine of item embeddings finds items bought *instead of*
each other, e.g. two brands of milk).

The learned model (:class:`BasketModel`, trained by :func:`train`) is a basket-completion
softmax with a factored and a sparse pairwise part (Koren's 2008 "factor + neighbourhood"
form). An item has a context vector ``e_j`` and an output vector ``o_i`` with a bias ``b_i``;
item ``j`` has a learned weight ``w_ji`` for each of its ``partners`` most co-purchased items
``i`` (``N(j)``, from the training baskets; initialised at their positive PMI, the lift
baseline's terms). A cart ``C`` scores every item ``i``::

    s(i | C) = o_i · (1/|C|) Σ_{j∈C} e_j  +  Σ_{j∈C, i∈N(j)} w_ji  +  b_i

Training hides each item ``t`` of every training basket ``B`` in turn and maximises
``log softmax_i s(i | B∖{t})`` at ``t`` over the whole catalogue, the items of ``B∖{t}``
masked out (they are in the cart, never an answer) — exactly the evaluation question.
AdamW on all parameters, full softmax (catalogues of ~10⁴–10⁵ items fit a CPU step).

Baselines, all from the same training baskets (:class:`CoPurchase`): popularity (baskets
holding ``i``), co-occurrence ``Σ_{j∈C} n_ij``, lift / PMI ``Σ_{j∈C} max(0, log(n_ij N /
(n_i n_j)))`` over pairs seen at least ``min_count`` times, and embedding cosine (mean cosine
to the cart of truncated-SVD item factors of the user × item matrix, what a CLI export's
``similar_items`` does with a model's embeddings). Every scorer breaks its ties by
popularity (a ``1e-6``-scaled term), so an item never seen with the cart is not ranked by id.

Category preference: with item categories, :func:`prefer_other_categories` moves the items
of the cart's categories behind all others (stable), and ``one_per_category`` keeps the best
item of each category.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.sparse as sp


from jaxreco.scenarios.basket import BasketModel, ComplementError

__all__ = ["BasketModel", "Baskets", "ComplementError", "CoPurchase", "TrainConfig", "train"]


# ------------------------------------------------------------------------------ baskets
@dataclasses.dataclass(frozen=True)
class Baskets:
    """Baskets in CSR form: basket ``b`` holds ``items[ptr[b]:ptr[b+1]]`` (distinct, sorted),
    bought by ``user[b]`` at ``time[b]``; baskets ordered by (user, time)."""

    ptr: np.ndarray     # int64 [B+1]
    items: np.ndarray   # int32 [nnz]
    user: np.ndarray    # int32 [B]
    time: np.ndarray    # int64 [B]
    num_items: int

    def __len__(self) -> int:
        return len(self.user)

    def sizes(self) -> np.ndarray:
        return np.diff(self.ptr)

    def basket(self, b: int) -> np.ndarray:
        return self.items[self.ptr[b]:self.ptr[b + 1]]

    def select(self, idx: np.ndarray) -> "Baskets":
        idx = np.asarray(idx, np.int64)
        sizes = self.sizes()[idx]
        ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        take = (np.repeat(self.ptr[idx], sizes)
                + np.arange(ptr[-1]) - np.repeat(ptr[:-1], sizes))
        return Baskets(ptr, self.items[take], self.user[idx], self.time[idx], self.num_items)


def baskets_from_rows(user: np.ndarray, item: np.ndarray, basket: np.ndarray,
                      timestamp: np.ndarray, num_items: int) -> Baskets:
    """Groups order lines ``(user, item, basket id, timestamp)`` into :class:`Baskets`; a
    basket's time is its earliest line's, an item counted once per basket."""
    user, item = np.asarray(user, np.int64), np.asarray(item, np.int64)
    basket, timestamp = np.asarray(basket, np.int64), np.asarray(timestamp, np.int64)
    if not (len(user) == len(item) == len(basket) == len(timestamp)):
        raise ComplementError("baskets_from_rows: user, item, basket and timestamp must have "
                              f"one entry per row; got {len(user)}, {len(item)}, {len(basket)}, "
                              f"{len(timestamp)}")
    if len(item) and (item.min() < 0 or item.max() >= num_items):
        raise ComplementError(f"baskets_from_rows: item indices must lie in [0, {num_items})")
    _, bid = np.unique(basket, return_inverse=True)
    nb = int(bid.max()) + 1 if len(bid) else 0
    b_time = np.full(nb, np.iinfo(np.int64).max)
    np.minimum.at(b_time, bid, timestamp)
    b_user = np.zeros(nb, np.int64)
    b_user[bid] = user
    order = np.lexsort((np.arange(nb), b_time, b_user))        # baskets by (user, time)
    rank = np.empty(nb, np.int64)
    rank[order] = np.arange(nb)
    pairs = np.unique(np.stack([rank[bid], item], 1), axis=0)  # distinct (basket, item)
    ptr = np.concatenate([[0], np.cumsum(np.bincount(pairs[:, 0], minlength=nb))])
    return Baskets(ptr.astype(np.int64), pairs[:, 1].astype(np.int32),
                   b_user[order].astype(np.int32), b_time[order], int(num_items))


def baskets_from_source(src) -> tuple[Baskets, np.ndarray]:
    """``(baskets, item ids)`` of a :class:`jaxreco.data.readers.Source` whose rows carry a
    basket column (``order_id``, as ``instacart-sample``) or a ``basket`` column."""
    cols: dict[str, list[np.ndarray]] = {}
    for block in src.blocks():
        key = "order_id" if "order_id" in block else "basket"
        if key not in block:
            raise ComplementError(f"{src.name}: rows have no basket column (order_id or basket); "
                                  f"columns: {sorted(block)}")
        for c, v in (("user", block["user"]), ("item", block["item"]),
                     ("basket", block[key]), ("timestamp", block["timestamp"])):
            keep = block["label"] > 0 if "label" in block else slice(None)
            cols.setdefault(c, []).append(np.asarray(v)[keep])
    if not cols:
        raise ComplementError(f"{src.name}: no rows")
    c = {k: np.concatenate(v) for k, v in cols.items()}
    return (baskets_from_rows(c["user"], c["item"], c["basket"], c["timestamp"], src.num_items),
            np.asarray(src.vocab("item")).astype(str))


def split_last_baskets(b: Baskets) -> tuple[Baskets, Baskets, Baskets]:
    """``(train, validation, test)``: each user's last basket is test, the one before it
    validation, the rest train (users with fewer than 3 baskets keep all in train)."""
    n = len(b)
    last = np.ones(n, bool)
    last[:-1] = b.user[1:] != b.user[:-1]
    count = np.bincount(b.user, minlength=int(b.user.max()) + 1 if n else 0)[b.user]
    test = last & (count >= 3)
    val = np.zeros(n, bool)
    val[:-1] = test[1:]
    train = ~(test | val)
    return (b.select(np.flatnonzero(train)), b.select(np.flatnonzero(val)),
            b.select(np.flatnonzero(test)))


def hide_one(b: Baskets, seed: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """For each basket of at least 2 items: one item drawn uniformly (seeded) is hidden.
    Returns ``(carts, hidden items, users)``."""
    rng = np.random.default_rng(seed)
    carts, targets, users = [], [], []
    for k in range(len(b)):
        items = b.basket(k)
        if len(items) < 2:
            continue
        h = int(rng.integers(len(items)))
        carts.append(np.delete(items, h))
        targets.append(int(items[h]))
        users.append(int(b.user[k]))
    return carts, np.asarray(targets, np.int64), np.asarray(users, np.int64)


def training_pairs(b: Baskets, max_basket: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (cart, hidden item) of every training basket of 2..``max_basket`` items:
    ``(context int32 [n, max_basket-1] padded with -1, target int32 [n])``."""
    ctx, tgt = [], []
    sizes = b.sizes()
    for s in np.unique(sizes[(sizes >= 2) & (sizes <= max_basket)]):
        rows = b.items[b.ptr[:-1][sizes == s, None] + np.arange(s)[None, :]]   # [m, s]
        m = len(rows)
        off = ~np.eye(s, dtype=bool)
        c = np.broadcast_to(rows[:, None, :], (m, s, s))[:, off].reshape(m * s, s - 1)
        pad = np.full((m * s, max_basket - 1), -1, np.int32)
        pad[:, :s - 1] = c
        ctx.append(pad)
        tgt.append(rows.reshape(-1))
    if not ctx:
        raise ComplementError(f"no training basket holds 2..{max_basket} items")
    return np.concatenate(ctx).astype(np.int32), np.concatenate(tgt).astype(np.int32)


# ----------------------------------------------------------------------------- metrics
def rank_of(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of ``target[r]`` in ``scores[r]`` (ties count against the target)."""
    t = scores[np.arange(len(target)), target]
    return (scores >= t[:, None]).sum(1) - 1


def evaluate(score_fn: Callable[[list[np.ndarray], np.ndarray], np.ndarray],
             carts: list[np.ndarray], targets: np.ndarray, users: np.ndarray, *,
             k: int = 10, batch: int = 256) -> dict[str, np.ndarray]:
    """Per-query ``hr``, ``ndcg`` at ``k`` and reciprocal rank ``rr`` of the hidden item over
    the whole catalogue, cart items excluded. ``score_fn(carts, users) -> [n, num_items]``."""
    ranks = []
    for lo in range(0, len(carts), batch):
        c = carts[lo:lo + batch]
        s = np.array(score_fn(c, users[lo:lo + batch]), np.float64)
        for r, items in enumerate(c):
            s[r, items] = -np.inf
        ranks.append(rank_of(s, targets[lo:lo + batch]))
    rank = np.concatenate(ranks) if ranks else np.zeros(0, np.int64)
    return {"hr": (rank < k).astype(np.float64),
            "ndcg": np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0),
            "rr": 1.0 / (rank + 1.0)}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, n: int = 2000, seed: int = 0
                     ) -> tuple[float, float]:
    """95% interval of ``mean(a) - mean(b)`` over queries resampled with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (n, len(a)))
    d = (a - b)[idx].mean(1)
    return float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))


# --------------------------------------------------------------------------- baselines
def cart_matrix(carts: Sequence[np.ndarray], num_items: int) -> sp.csr_matrix:
    """``[n, num_items]`` 0/1 rows, one per cart."""
    rows = np.repeat(np.arange(len(carts)), [len(c) for c in carts])
    cols = np.concatenate(carts) if len(carts) else np.zeros(0, np.int64)
    return sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)),
                         shape=(len(carts), num_items))


@dataclasses.dataclass
class CoPurchase:
    """Co-purchase statistics of training baskets: ``counts[i, j]`` baskets holding both
    (diagonal 0), ``freq[i]`` baskets holding ``i``, ``num_baskets``."""

    counts: sp.csr_matrix
    freq: np.ndarray
    num_baskets: int

    @classmethod
    def from_baskets(cls, b: Baskets, max_basket: int = 64) -> "CoPurchase":
        sizes = b.sizes()
        keep = np.flatnonzero(sizes <= max_basket)
        kb = b.select(keep)
        x = sp.csr_matrix((np.ones(len(kb.items), np.float32),
                           (np.repeat(np.arange(len(kb)), kb.sizes()), kb.items)),
                          shape=(len(kb), b.num_items))
        c = (x.T @ x).tocsr()
        c.setdiag(0)
        c.eliminate_zeros()
        freq = np.bincount(b.items, minlength=b.num_items).astype(np.float64)
        return cls(c.astype(np.float32), freq, len(b))

    @classmethod
    def from_csr(cls, indptr, indices, data, freq, num_baskets) -> "CoPurchase":
        n = len(freq)
        return cls(sp.csr_matrix((np.asarray(data, np.float32), np.asarray(indices),
                                  np.asarray(indptr)), shape=(n, n)),
                   np.asarray(freq, np.float64), int(num_baskets))

    def popularity(self) -> np.ndarray:
        return self.freq

    def _tie(self, n: int) -> np.ndarray:
        return np.broadcast_to(1e-6 * self.freq / max(1.0, self.freq.max()), (n, len(self.freq)))

    def cooccurrence(self, carts, users=None) -> np.ndarray:
        s = (cart_matrix(carts, len(self.freq)) @ self.counts).toarray()
        return s / max(1.0, float(self.counts.max())) + self._tie(len(carts))

    def pmi_matrix(self, min_count: int = 1) -> sp.csr_matrix:
        """Positive PMI ``max(0, log(n_ij N / (n_i n_j)))`` of pairs seen ``>= min_count``."""
        c = self.counts.tocoo()
        keep = c.data >= min_count
        r, k, v = c.row[keep], c.col[keep], c.data[keep].astype(np.float64)
        pmi = np.log(v * self.num_baskets / (self.freq[r] * self.freq[k]))
        pos = pmi > 0
        return sp.csr_matrix((pmi[pos].astype(np.float32), (r[pos], k[pos])), shape=c.shape)

    def lift_scorer(self, min_count: int = 1):
        m = self.pmi_matrix(min_count)
        scale = max(1.0, float(m.max()) if m.nnz else 1.0)

        def score(carts, users=None):
            s = (cart_matrix(carts, len(self.freq)) @ m).toarray()
            return s / scale + self._tie(len(carts))
        return score


def svd_item_factors(b: Baskets, dim: int, num_users: int) -> np.ndarray:
    """``[num_items, dim]`` item factors of the 0/1 user × item matrix (truncated SVD,
    singular values folded in), the embedding-cosine baseline's vectors."""
    x = sp.csr_matrix((np.ones(len(b.items), np.float32),
                       (np.repeat(b.user, b.sizes()), b.items)), shape=(num_users, b.num_items))
    x.data[:] = 1.0
    x.sum_duplicates()
    x.data[:] = 1.0
    dim = min(dim, min(x.shape) - 1)
    _, s, vt = sp.linalg.svds(x.astype(np.float64), k=dim, random_state=0)
    return (vt.T * s).astype(np.float32)


def cosine_scorer(vectors: np.ndarray, tie: np.ndarray):
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    t = 1e-6 * tie / max(1.0, tie.max())

    def score(carts, users=None):
        q = np.stack([unit[c].mean(0) for c in carts])
        return q @ unit.T + t
    return score


# ------------------------------------------------------------------------ learned model
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train` (choose them on a validation basket).
    ``partners=0`` drops the pairwise part (a pure factored model); ``epochs=0`` returns the
    initialisation (PMI pair weights, log-frequency biases), a reference point."""

    dim: int = 32
    partners: int = 100
    epochs: int = 5
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_basket: int = 64
    init_scale: float = 0.1
    seed: int = 0

    def __post_init__(self):
        for f, lo in (("dim", 1), ("epochs", 0), ("batch_size", 1), ("max_basket", 2),
                      ("partners", 0)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ComplementError(f"TrainConfig.{f} must be an integer >= {lo}; got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ComplementError(f"TrainConfig.lr must be > 0; got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ComplementError(f"TrainConfig.weight_decay must be >= 0; got {self.weight_decay!r}")


def partner_table(co: CoPurchase, partners: int) -> tuple[np.ndarray, np.ndarray]:
    """``(nbr int32 [I, P], pmi float32 [I, P])``: each item's ``P`` most co-purchased items
    (ties: lower index; padding: ``I``) and the pair's positive PMI (0 on padding)."""
    I = len(co.freq)
    c = co.counts.tocoo()
    order = np.lexsort((c.col, -c.data, c.row))
    r, k, v = c.row[order], c.col[order], c.data[order].astype(np.float64)
    pos = np.arange(len(r)) - np.searchsorted(r, r, side="left")
    keep = pos < partners
    r, k, v, pos = r[keep], k[keep], v[keep], pos[keep]
    nbr = np.full((I, max(1, partners)), I, np.int32)
    pmi = np.zeros((I, max(1, partners)), np.float32)
    nbr[r, pos] = k
    pmi[r, pos] = np.maximum(0.0, np.log(v * co.num_baskets / (co.freq[r] * co.freq[k])))
    return nbr, pmi


def _cart_vector(params, ctx):
    """Mean context vector of padded carts ``ctx int32 [n, L]`` (-1 = padding)."""
    valid = (ctx >= 0).astype(jnp.float32)
    e = params["ctx"][jnp.maximum(ctx, 0)] * valid[..., None]
    return e.sum(1) / jnp.maximum(valid.sum(1, keepdims=True), 1.0)


def _scores(params, nbr, ctx):
    n, num_items = ctx.shape[0], params["bias"].shape[0]
    s = _cart_vector(params, ctx) @ params["out"].T + params["bias"]
    if nbr is None:
        return s
    safe = jnp.maximum(ctx, 0)
    cols = jnp.where((ctx >= 0)[..., None], nbr[safe], num_items)           # [n, L, P]
    rows = jnp.broadcast_to(jnp.arange(n)[:, None, None], cols.shape)
    pair = jnp.zeros((n, num_items + 1), s.dtype).at[rows, cols].add(params["w"][safe])
    return s + pair[:, :num_items]


def _loss(params, nbr, ctx, tgt, w):
    logits = _scores(params, nbr, ctx)
    n = logits.shape[1]
    in_cart = jnp.zeros_like(logits, dtype=bool).at[
        jnp.arange(ctx.shape[0])[:, None], jnp.where(ctx >= 0, ctx, n)].set(True, mode="drop")
    logits = jnp.where(in_cart, -1e9, logits)
    ll = jax.nn.log_softmax(logits)[jnp.arange(len(tgt)), tgt]
    return -(ll * w).sum() / jnp.maximum(w.sum(), 1.0)


def train(b: Baskets, item_ids: np.ndarray, cfg: TrainConfig = TrainConfig(), *,
          log: Callable[[str], None] | None = None) -> BasketModel:
    """Trains :class:`BasketModel` on the training baskets ``b`` (module docstring)."""
    ctx, tgt = training_pairs(b, cfg.max_basket)
    n, I, d = len(tgt), b.num_items, cfg.dim
    if len(item_ids) != I:
        raise ComplementError(f"train: {len(item_ids)} item ids for {I} items")
    rng = np.random.default_rng(cfg.seed)
    k1, k2 = jax.random.split(jax.random.key(cfg.seed))
    freq = np.bincount(b.items, minlength=I).astype(np.float64)
    params = {"ctx": cfg.init_scale * jax.random.normal(k1, (I, d), jnp.float32),
              "out": cfg.init_scale * jax.random.normal(k2, (I, d), jnp.float32),
              "bias": jnp.asarray(np.log((freq + 1.0) / (freq.sum() + I)), jnp.float32)}
    if cfg.partners:
        nbr_np, pmi = partner_table(CoPurchase.from_baskets(b, cfg.max_basket), cfg.partners)
        nbr = jnp.asarray(nbr_np)
        params["w"] = jnp.asarray(pmi)
    else:
        nbr_np, nbr = np.full((I, 1), I, np.int32), None
        params["w"] = jnp.zeros((I, 1), jnp.float32)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    tx = optax.adamw(optax.cosine_decay_schedule(cfg.lr, max(1, steps_per_epoch * cfg.epochs)),
                     weight_decay=cfg.weight_decay)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, c, t, w):
        loss, g = jax.value_and_grad(_loss)(params, nbr, c, t, w)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    width = int((ctx >= 0).sum(1).max())   # trim padding to the longest cart
    ctx = ctx[:, :width]
    t0 = time.time()
    for epoch in range(cfg.epochs):
        perm = rng.permutation(n)
        total = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            w = np.ones(cfg.batch_size, np.float32)
            if len(idx) < cfg.batch_size:       # fixed shapes: pad the last batch, weight 0
                w[len(idx):] = 0.0
                idx = np.concatenate([idx, np.zeros(cfg.batch_size - len(idx), np.int64)])
            params, opt, loss = step(params, opt, ctx[idx], tgt[idx], w)
            total += float(loss)
        if log:
            log(f"complement epoch {epoch + 1}/{cfg.epochs}: train/loss "
                f"{total / steps_per_epoch:.4f} ({time.time() - t0:.0f} s)")
    p = jax.tree_util.tree_map(np.asarray, params)
    return BasketModel(p["ctx"], p["out"], p["bias"], nbr_np.astype(np.int64),
                       p["w"].astype(np.float32), np.asarray(item_ids).astype(str),
                       {"train": dataclasses.asdict(cfg), "train_pairs": int(n),
                        "train_baskets": int(len(b))})


def main(argv: list[str] | None = None) -> int:
    """``python -m jaxreco.complement --dataset instacart-sample --out complement.npz``:
    trains :class:`BasketModel` on every basket of a dataset (for serving; the protocol's
    held-out split is scripts/complement_eval.py's) and writes it for ``jaxreco-export
    --complement``. ``--set key=value`` overrides the dataset config."""
    import argparse
    import sys

    from jaxreco.data import registry
    from jaxreco.runtime import configure_xla

    configure_xla()
    p = argparse.ArgumentParser(prog="python -m jaxreco.complement",
                                description=main.__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="a dataset name with baskets (order_id)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dataset config overrides (ints and floats parsed)")
    p.add_argument("--out", required=True)
    for f in dataclasses.fields(TrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    ds: dict = {"name": args.dataset}
    for kv in args.set:
        k, _, v = kv.partition("=")
        for cast in (int, float, str):
            try:
                ds[k] = cast(v)
                break
            except ValueError:
                pass
    try:
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
        b, ids = baskets_from_source(registry.open_source(ds))
        model = train(b, ids, cfg, log=lambda m: print(m, file=sys.stderr))
    except (ComplementError, ValueError) as e:
        print(f"python -m jaxreco.complement: {e}", file=sys.stderr)
        return 2
    model.info["dataset"] = ds
    print(model.save(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
