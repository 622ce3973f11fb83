"""``synthetic-ecommerce``: a seeded e-commerce log generator with a known ground truth.

The generative story, per user ``u`` and item ``i`` (``K`` categories, latent dim ``d``):

* category centroids ``c_k ~ N(0, I_d)``; item ``i`` has category ``k_i`` (uniform),
  latent ``v_i = c_{k_i} + 0.5 ε``, quality ``q_i ~ N(0, 1)`` and price
  ``log p_i ~ N(μ_{k_i}, 0.4)``. Within a category, items are ranked by popularity and
  drawn with Zipf probability ``∝ rank^-a`` (inverse CDF of the continuous power law, O(1)).
* user ``u`` has category preferences ``π_u ~ Dirichlet(α)`` and latent
  ``w_u = Σ_k π_uk c_k + 0.3 ε``; activity (number of views) is log-normal.
* a user's views fall into sessions (geometric length, mean ``session_length``); each session
  picks one category from ``π_u`` and views items of it; events in a session are seconds to
  minutes apart, sessions uniform over ``days`` days from ``start_ts``.
* funnel: a view of item ``i`` in a session of category ``k`` is clicked with
  ``σ(click_bias + w_u·c_k + 0.5 q_i)``; a click goes to the
  cart with ``cart_rate``; a cart is purchased with ``purchase_rate``. Every stage is a row
  (``event`` 0 view, 1 click, 2 cart, 3 purchase); ``label`` = 1 for event >= 1.

So the truth is: a user's views and clicks concentrate on their preferred categories (and
clicks on categories near ``w_u`` and on high-quality items); a model that learns that beats global popularity (tests check it). Generation is
vectorised per block of users and seeded per block, so any block can be regenerated alone
and the output is identical for a fixed config, whatever the block processing order.
Exactly ``num_interactions`` rows are produced (the planned views are sized from a pilot
estimate of rows per view; the stream is cut at the target, with an extra round if short).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import numpy as np

from jaxreco.config import SyntheticEcommerceConfig
from jaxreco.data.readers import Source


def _from_cfg(cls, cfg: Mapping[str, Any]) -> "Params":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(cfg).items() if k in names})


# The generator's parameters: the fields of the dataset schema (its one definition, with the
# defaults), less the name, as an immutable record. ``Params.from_cfg(cfg)`` takes a
# ``conf/dataset/synthetic-ecommerce.yaml`` node or dict and ignores other keys.
Params = dataclasses.make_dataclass(
    "Params", [(f.name, f.type, dataclasses.field(default=f.default))
               for f in dataclasses.fields(SyntheticEcommerceConfig) if f.name != "name"],
    frozen=True, namespace={"from_cfg": classmethod(_from_cfg), "__module__": __name__})


@dataclasses.dataclass
class Truth:
    """Item-side ground truth (users' is regenerated per block by :func:`user_truth`)."""

    item_category: np.ndarray  # int32 [I]
    item_latent: np.ndarray    # float32 [I, d]
    item_quality: np.ndarray   # float32 [I]
    item_price: np.ndarray     # float32 [I]
    centroids: np.ndarray      # float32 [K, d]
    cat_items: np.ndarray      # int32: items ordered by (category, popularity rank)
    cat_start: np.ndarray      # int64 [K+1]


def item_truth(p: Params) -> Truth:
    rng = np.random.default_rng([p.seed, 0xC0FFEE])
    K, I, d = p.num_categories, p.num_items, p.dim
    centroids = rng.standard_normal((K, d)).astype(np.float32)
    cat = rng.integers(0, K, I).astype(np.int32)
    latent = (centroids[cat] + 0.5 * rng.standard_normal((I, d))).astype(np.float32)
    quality = rng.standard_normal(I).astype(np.float32)
    mu = rng.normal(3.0, 1.0, K)
    price = np.exp(rng.normal(mu[cat], 0.4)).astype(np.float32)
    # popularity rank within category: a random order of the category's items
    order = np.lexsort((rng.random(I), cat)).astype(np.int32)
    start = np.searchsorted(cat[order], np.arange(K + 1)).astype(np.int64)
    return Truth(cat, latent, quality, price, centroids, order, start)


def user_truth(p: Params, truth: Truth, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """``(prefs [n, K], latent [n, d])`` of users ``lo..hi-1`` (regenerated from the seed)."""
    rng = np.random.default_rng([p.seed, 0xBEEF, lo])
    prefs = rng.dirichlet(np.full(p.num_categories, p.dirichlet_alpha), size=hi - lo)
    latent = prefs @ truth.centroids + 0.3 * rng.standard_normal((hi - lo, p.dim))
    return prefs.astype(np.float32), latent.astype(np.float32)


def _views_block(p: Params, truth: Truth, lo: int, hi: int, views: np.ndarray, rnd: int,
                 ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([p.seed, rnd, lo])
    f32 = np.float32
    prefs, latent = user_truth(p, truth, lo, hi)
    n = int(views.sum())
    if n == 0:
        return {}
    local = np.repeat(np.arange(hi - lo, dtype=np.int32), views)
    new_session = rng.random(n, dtype=f32) < f32(1.0 / p.session_length)
    ends = np.cumsum(views)
    new_session[ends[:-1][views[1:] > 0]] = True       # first view of each user
    new_session[0] = True
    s_first = np.flatnonzero(new_session)
    sess = np.cumsum(new_session, dtype=np.int32) - 1
    S = len(s_first)
    # session: category from the user's preferences, affinity w_u . c_k, start time
    s_user = local[s_first]
    cdf = np.cumsum(prefs, axis=1)
    r = rng.random(S, dtype=f32) * cdf[s_user, -1]
    s_cat = np.minimum((cdf[s_user] < r[:, None]).sum(1), p.num_categories - 1)
    s_aff = np.einsum("sd,sd->s", latent[s_user], truth.centroids[s_cat]).astype(f32)
    s_start = p.start_ts + rng.integers(0, p.days * 86400, S)
    # item: Zipf rank inside the session's category (continuous inverse CDF, float32)
    cat = s_cat[sess]
    size = np.diff(truth.cat_start).astype(np.float64)
    e = 1.0 - p.zipf_a if abs(p.zipf_a - 1.0) > 1e-6 else 1e-6
    scale = ((size + 1.0) ** e - 1.0).astype(f32)
    x = (rng.random(n, dtype=f32) * scale[cat] + f32(1.0)) ** f32(1.0 / e)
    rank = np.minimum(x.astype(np.int32) - 1, np.maximum(size.astype(np.int32)[cat] - 1, 0))
    item = truth.cat_items[np.minimum(truth.cat_start[cat] + np.maximum(rank, 0),
                                      p.num_items - 1)]
    # timestamps: session start + cumulative gaps of 1..119 s
    cum = np.cumsum(rng.integers(1, 120, n, dtype=np.int32), dtype=np.int64)
    ts = s_start[sess] + (cum - cum[s_first][sess])
    # funnel: click ~ sigmoid(bias + w_u . c_k + 0.5 q_i); cart, purchase at fixed rates
    logit = f32(p.click_bias) + s_aff[sess] + f32(0.5) * truth.item_quality[item]
    click = rng.random(n, dtype=f32) * (f32(1.0) + np.exp(-logit)) < f32(1.0)
    reps = 1 + click.astype(np.int8)
    ci = np.flatnonzero(click)
    cart = rng.random(len(ci), dtype=f32) < f32(p.cart_rate)
    buy = cart & (rng.random(len(ci), dtype=f32) < f32(p.purchase_rate))
    reps[ci] += cart.astype(np.int8) + buy
    idx = np.repeat(np.arange(n, dtype=np.int32), reps)
    first = np.cumsum(reps, dtype=np.int64) - reps
    event = (np.arange(len(idx), dtype=np.int64) - first[idx]).astype(np.int8)
    return {"user": local[idx] + np.int32(lo), "item": item[idx].astype(np.int32),
            "timestamp": ts[idx] + 5 * event, "label": (event >= 1).astype(f32),
            "event": event}


def _rows_per_view(p: Params, truth: Truth) -> float:
    """Pilot estimate of rows produced per planned view."""
    m = min(p.num_users, 2000)
    v = np.full(m, 20, np.int64)
    b = _views_block(dataclasses.replace(p, seed=p.seed + 7919), truth, 0, m, v, 99)
    return len(b["user"]) / v.sum()


def _plan(p: Params, truth: Truth) -> tuple[np.ndarray, int]:
    """``(planned views per user, users per block)``: the block partition every per-user
    draw is seeded by."""
    rng = np.random.default_rng([p.seed, 0xAC71])
    act = rng.lognormal(0.0, 1.0, p.num_users)
    plan_total = p.num_interactions / _rows_per_view(p, truth) * 1.05
    views = np.floor(act / act.sum() * plan_total).astype(np.int64)
    mean_views = max(1.0, plan_total / p.num_users)
    return views, max(1, int(p.block_rows / 1.3 / mean_views))


def blocks(p: Params, truth: Truth | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Exactly ``p.num_interactions`` rows, in blocks of whole users (grouped by user)."""
    truth = truth or item_truth(p)
    views, users_per_block = _plan(p, truth)
    emitted = 0
    rnd = 1
    while emitted < p.num_interactions:
        for lo in range(0, p.num_users, users_per_block):
            hi = min(p.num_users, lo + users_per_block)
            b = _views_block(p, truth, lo, hi, views[lo:hi], rnd)
            if not b:
                continue
            take = min(len(b["user"]), p.num_interactions - emitted)
            if take < len(b["user"]):   # cut at a user boundary when possible
                b = {k: v[:take] for k, v in b.items()}
            emitted += take
            yield b
            if emitted >= p.num_interactions:
                return
        rnd += 1
        views = np.maximum(1, views // 4)   # short: another, smaller round of sessions


def click_probability(p: Params, users: np.ndarray, items: np.ndarray,
                      truth: Truth | None = None) -> np.ndarray:
    """The generator's per-view click probability ``σ(click_bias + w_u·c_{k_i} + 0.5 q_i)``
    of raw ``(user, item)`` pairs (a view of item ``i`` is always in a session of its own
    category ``k_i``)."""
    truth = truth or item_truth(p)
    users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
    if len(users) and (users.min() < 0 or users.max() >= p.num_users or items.min() < 0
                       or items.max() >= p.num_items):
        raise ValueError(f"click_probability: ids outside the generator's {p.num_users} users"
                         f" / {p.num_items} items")
    _, users_per_block = _plan(p, truth)
    latent = np.concatenate([user_truth(p, truth, lo, min(p.num_users, lo + users_per_block))[1]
                             for lo in range(0, p.num_users, users_per_block)])
    cat = truth.item_category[items]
    logit = (p.click_bias + np.einsum("nd,nd->n", latent[users], truth.centroids[cat])
             + 0.5 * truth.item_quality[items])
    return 1.0 / (1.0 + np.exp(-logit))


def view_counts(p: Params, users: np.ndarray, items: np.ndarray,
                truth: Truth | None = None) -> np.ndarray:
    """How many times each raw ``(user, item)`` pair was viewed in the generated log."""
    truth = truth or item_truth(p)
    keys = []
    for b in blocks(p, truth):
        v = b["event"] == 0
        keys.append(b["user"][v].astype(np.int64) * p.num_items + b["item"][v])
    uniq, counts = np.unique(np.concatenate(keys), return_counts=True)
    want = np.asarray(users, np.int64) * p.num_items + np.asarray(items, np.int64)
    at = np.minimum(np.searchsorted(uniq, want), len(uniq) - 1)
    return np.where(uniq[at] == want, counts[at], 0)


def ground_truth(cfg: Mapping[str, Any], users: np.ndarray, items: np.ndarray
                 ) -> dict[str, np.ndarray]:
    """For raw pairs: ``p_view`` (per-view click probability) and ``p_any`` =
    ``1 − (1 − p_view)^views``, the probability of the label "any click on the pair" given
    how often the pair was viewed — the Bayes-optimal score, so its AUC is the ceiling of
    any model (which sees the pair, not its view count)."""
    p = Params.from_cfg(cfg)
    truth = item_truth(p)
    pv = click_probability(p, users, items, truth)
    n = view_counts(p, users, items, truth)
    return {"p_view": pv, "p_any": 1.0 - (1.0 - pv) ** n, "views": n}


def source(cfg: Mapping[str, Any], *, on_bad_rows: str = "error") -> Source:
    """The :class:`Source` for ``conf/dataset/synthetic-ecommerce.yaml`` (generated rows are
    never bad, so ``on_bad_rows`` has nothing to do)."""
    p = Params.from_cfg(cfg)
    truth = item_truth(p)
    return Source(
        name=str(cfg.get("name", "synthetic-ecommerce")),
        user_vocab=lambda: np.arange(p.num_users).astype(str),
        item_vocab=np.arange(p.num_items).astype(str),
        blocks=lambda: blocks(p, truth),
        num_rows_hint=p.num_interactions,
        item_side={"category": truth.item_category, "price": truth.item_price},
        category_vocab=np.array([f"c{k}" for k in range(p.num_categories)]),
        fingerprint={"generator": dataclasses.asdict(p), "version": 1},
        extra_columns={"label": "float32", "event": "int8"},
    )
