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

from jaxreco.config import SyntheticCouponsConfig, SyntheticEcommerceConfig
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


# ---------------------------------------------------------------------- coupons
# ``synthetic-coupons`` (conf/dataset/synthetic-coupons.yaml): a randomized coupon-exposure
# log with a known per-user price sensitivity, so the true uplift of every (user, coupon) is
# known. Users' category preferences π_u and latents w_u come from the same story as above
# (``user_truth``, centroids c_k of ``item_truth``). Per user, a segment s_u (shares
# ``segment_share``) and a sensitivity β_u = segment_sensitivity[s_u] · exp(noise · N(0, 1));
# per category, an elasticity e_k = exp(U(−spread, spread)), a basket value B_k (log-normal,
# like prices) and a margin rate m_k ~ U(0.2, 0.5). An exposure shows user u a coupon of
# category k (drawn from share·π_u + (1 − share)·uniform) at a discount level l drawn
# uniformly from ``discount_levels`` (percent d_l; d_0 = 0 is the control: no coupon), and
# the user buys with
#
#     P(buy | u, k, l) = σ(base_bias + affinity · w_u·c_k / √d + β_u e_k d_l / 10),
#
# so the true uplift of coupon (k, l) for u is P(buy | u, k, l) − P(buy | u, k, 0) and its
# expected incremental value uplift · B_k m_k (:class:`CouponTruth`). Rows: ``user``,
# ``item`` = the coupon's category ``c<k>`` (the unit a coupon targets), ``timestamp``,
# ``label`` (bought), ``discount`` (the level index l, int8). Deterministic by seed; the
# ``synthetic-ecommerce`` rows above are untouched by it.

COUPON_BLOCK_USERS = 50_000


@dataclasses.dataclass(frozen=True)
class CouponTruth:
    """The ground truth of a ``synthetic-coupons`` log (:func:`coupon_truth`)."""

    levels: np.ndarray        # float64 [L] discount percent per level, levels[0] == 0
    prefs: np.ndarray         # float32 [U, K] category preferences
    affinity: np.ndarray      # float64 [U, K] affinity · w_u·c_k / √d
    segment: np.ndarray       # int32 [U]
    sensitivity: np.ndarray   # float64 [U] β_u (logit per 10% discount)
    elasticity: np.ndarray    # float64 [K] e_k
    basket_value: np.ndarray  # float64 [K] B_k
    margin_rate: np.ndarray   # float64 [K] m_k
    base_bias: float

    def p_buy(self, users, cats, levels) -> np.ndarray:
        """``P(buy | u, k, l)`` of raw user ids, category indices and level indices."""
        u, k, lv = (np.asarray(x, np.int64) for x in (users, cats, levels))
        z = (self.base_bias + self.affinity[u, k]
             + self.sensitivity[u] * self.elasticity[k] * self.levels[lv] / 10.0)
        return 1.0 / (1.0 + np.exp(-z))

    def uplift(self, users, cats, levels) -> np.ndarray:
        """``P(buy | u, k, l) − P(buy | u, k, 0)``: the true uplift of the coupon."""
        return self.p_buy(users, cats, levels) - self.p_buy(users, cats, np.zeros_like(levels))

    def margin(self, cats) -> np.ndarray:
        """``B_k m_k``: the money margin of an order of category k."""
        k = np.asarray(cats, np.int64)
        return self.basket_value[k] * self.margin_rate[k]


def _check_coupons(c: Mapping[str, Any]) -> None:
    where = "dataset (synthetic-coupons)"
    lv = list(c["discount_levels"])
    if len(lv) < 2 or lv[0] != 0 or any(b <= a for a, b in zip(lv, lv[1:])) or lv[-1] >= 100:
        raise ValueError(f"{where}.discount_levels={lv}: must start at 0 (the control), rise "
                         "strictly and stay below 100 (percent)")
    share, sens = list(c["segment_share"]), list(c["segment_sensitivity"])
    if len(share) != len(sens) or not share:
        raise ValueError(f"{where}.segment_share ({len(share)} values) and "
                         f"segment_sensitivity ({len(sens)}) must have the same length >= 1")
    if min(share) < 0 or abs(sum(share) - 1.0) > 1e-6:
        raise ValueError(f"{where}.segment_share={share}: must be >= 0 and sum to 1")
    if min(sens) < 0:
        raise ValueError(f"{where}.segment_sensitivity={sens}: must be >= 0 (a discount never "
                         "lowers the purchase probability)")
    for f in ("num_users", "num_categories", "dim"):
        if int(c[f]) < 1:
            raise ValueError(f"{where}.{f}={c[f]}: must be >= 1")
    if not 0.0 <= float(c["relevant_share"]) <= 1.0:
        raise ValueError(f"{where}.relevant_share={c['relevant_share']}: must lie in [0, 1]")


def _coupon_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    c = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
         for f in dataclasses.fields(SyntheticCouponsConfig)}
    c.update({k: (list(v) if isinstance(c[k], list) else v)
              for k, v in dict(cfg).items() if k in c})
    _check_coupons(c)
    return c


def coupon_truth(cfg: Mapping[str, Any]) -> CouponTruth:
    """The ground truth of the ``synthetic-coupons`` dataset ``cfg`` (a config node or dict;
    missing keys take the schema's defaults)."""
    c = _coupon_cfg(cfg)
    U, K, d = int(c["num_users"]), int(c["num_categories"]), int(c["dim"])
    p = Params(num_users=U, num_categories=K, dim=d,
               dirichlet_alpha=float(c["dirichlet_alpha"]), seed=int(c["seed"]))
    truth = item_truth(p)
    prefs, latent = user_truth(p, truth, 0, U)
    aff = float(c["affinity"]) * (latent.astype(np.float64) @ truth.centroids.T.astype(
        np.float64)) / np.sqrt(d)
    rng = np.random.default_rng([int(c["seed"]), 0xC0C0])
    share = np.asarray(c["segment_share"], np.float64)
    segment = rng.choice(len(share), size=U, p=share / share.sum()).astype(np.int32)
    sens = (np.asarray(c["segment_sensitivity"], np.float64)[segment]
            * np.exp(float(c["sensitivity_noise"]) * rng.standard_normal(U)))
    spread = float(c["elasticity_spread"])
    elasticity = np.exp(rng.uniform(-spread, spread, K))
    basket_value = np.exp(rng.normal(3.0, 0.5, K))
    margin_rate = rng.uniform(0.2, 0.5, K)
    return CouponTruth(np.asarray(c["discount_levels"], np.float64), prefs, aff, segment, sens,
                       elasticity, basket_value, margin_rate, float(c["base_bias"]))


def coupon_blocks(cfg: Mapping[str, Any], truth: CouponTruth | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
    """The exposure log in blocks of whole users (each block seeded by its first user),
    rows of a user in time order."""
    c = _coupon_cfg(cfg)
    truth = truth or coupon_truth(c)
    U, K, L = int(c["num_users"]), int(c["num_categories"]), len(truth.levels)
    share = float(c["relevant_share"])
    for lo in range(0, U, COUPON_BLOCK_USERS):
        hi = min(U, lo + COUPON_BLOCK_USERS)
        rng = np.random.default_rng([int(c["seed"]), 0xC0C1, lo])
        n = rng.poisson(float(c["exposures_per_user"]), hi - lo)
        user = np.repeat(np.arange(lo, hi, dtype=np.int64), n)
        m = len(user)
        mix = share * truth.prefs[user] + (1.0 - share) / K
        cdf = np.cumsum(mix, axis=1)
        r = rng.random(m) * cdf[:, -1]
        cat = np.minimum((cdf < r[:, None]).sum(1), K - 1)
        level = rng.integers(0, L, m)
        bought = rng.random(m) < truth.p_buy(user, cat, level)
        ts = int(c["start_ts"]) + rng.integers(0, int(c["days"]) * 86400, m)
        order = np.lexsort((ts, user))
        yield {"user": user[order].astype(np.int32), "item": cat[order].astype(np.int32),
               "timestamp": ts[order].astype(np.int64),
               "label": bought[order].astype(np.float32),
               "discount": level[order].astype(np.int8)}


def coupon_source(cfg: Mapping[str, Any], *, on_bad_rows: str = "error") -> Source:
    """The :class:`Source` for ``conf/dataset/synthetic-coupons.yaml``: items are the coupon
    categories ``c<k>`` (with ``category`` and ``price`` = basket value side features)."""
    c = _coupon_cfg(cfg)
    truth = coupon_truth(c)
    K = int(c["num_categories"])
    return Source(
        name=str(c["name"]),
        user_vocab=lambda: np.arange(int(c["num_users"])).astype(str),
        item_vocab=np.array([f"c{k}" for k in range(K)]),
        blocks=lambda: coupon_blocks(c, truth),
        num_rows_hint=int(round(float(c["exposures_per_user"]) * int(c["num_users"]))),
        item_side={"category": np.arange(K, dtype=np.int32),
                   "price": truth.basket_value.astype(np.float32)},
        category_vocab=np.array([f"c{k}" for k in range(K)]),
        fingerprint={"generator": {k: v for k, v in c.items() if k != "name"}, "version": 1},
        extra_columns={"label": "float32", "discount": "int8"},
    )
