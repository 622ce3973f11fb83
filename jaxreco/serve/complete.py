"""``POST /complete``: items that go with a cart ("complete the look", "frequently bought
together"), as a FastAPI router the app includes.

    POST /complete {"items": ["196", "14084"], "k": 10, "user": "1",
                    "one_per_category": false, "explain": true}

What scores the catalogue, per served model version (files under ``assets.extra/``, see
:mod:`jaxreco.scenarios.basket`):

1. ``complement.npz``, a trained basket model (``jaxreco-export --complement``): the learned
   complement score of every item given the cart;
2. else ``co_purchase.npz`` (written by the export whenever the training data has baskets):
   lift, positive PMI summed over the cart items;
3. else the version cannot answer: 409 naming what is missing (cosine of embeddings finds
   substitutes, not complements, so it is not a fallback).

Then: the cart's items, the rules' excluded items are never answered; with item categories,
items of categories absent from the cart come first (``prefer_other_categories``, default
true) and ``one_per_category`` keeps the best item of each category. With a known ``user``,
the best ``4k`` complements are re-ordered by the sum of the two standardised scores
(complement and the model's personal score); this weighting is a fixed choice, not tuned.
``explain`` gives per answered item the cart items that contributed most to its score (the
exact decomposition: they sum with ``base`` to the score) and business reasons: ``promoted``
(the rules boost it, not applied to the ranking here), ``bought_together`` (baskets holding
it and a cart item, from the co-purchase counts).
"""


import asyncio
import threading
from typing import Annotated, Any, Callable, Union

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from jaxreco.scenarios import basket
from jaxreco.serve import layout

Id = Annotated[Union[StrictStr, StrictInt], Field(description="A raw id as in the training data.")]


class Complementer:
    """The complement scorer of one served model version (module docstring)."""

    def __init__(self, model):
        extra = model.path / "assets.extra"
        self.version = model.version
        self.learned = self.stats = None
        if (extra / basket.COMPLEMENT_FILE).is_file():
            self.learned = basket.BasketModel.load(extra / basket.COMPLEMENT_FILE).reindexed(
                model.item_ids.astype(str))
        if (extra / basket.CO_PURCHASE_FILE).is_file():
            self.stats = basket.CoPurchaseStats.load(extra / basket.CO_PURCHASE_FILE)
            if self.stats.num_items != model.num_items:
                raise basket.ComplementError(
                    f"version {model.version}: {basket.CO_PURCHASE_FILE} has "
                    f"{self.stats.num_items} items, the model {model.num_items}")
            self.stats.pmi()
        self.source = "learned" if self.learned else ("co_purchase" if self.stats else None)
        self.category = np.full(model.num_items, -1, np.int64)
        cat_file = model.path / "assets" / layout.ITEM_CATEGORY_FILE
        self.has_category = cat_file.is_file()
        if self.has_category:
            names = cat_file.read_text(encoding="utf-8").split("\n")[:-1]
            uniq, inv = np.unique(np.asarray(names), return_inverse=True)
            self.category = np.where(np.asarray(names) == "", -1, inv).astype(np.int64)
            self.category_names = uniq

    def scores(self, cart: np.ndarray) -> np.ndarray:
        scorer = self.learned if self.learned is not None else self.stats
        return np.asarray(scorer.scores([cart])[0], np.float64)

    def explain(self, cart: np.ndarray, item: int, score: float, top: int = 3) -> dict:
        """``base`` (the score less every cart item's contribution) and the ``top`` cart
        items by contribution, from the scorer's exact decomposition."""
        scorer = self.learned if self.learned is not None else self.stats
        contrib = scorer.contributions(cart, item)
        order = np.argsort(-contrib, kind="stable")
        return {"base": float(score) - float(contrib.sum()),
                "contributions": [(int(cart[j]), float(contrib[j])) for j in order[:top]]}


def _z(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    v = x[valid]
    sd = float(v.std()) if v.size else 1.0
    return (x - (float(v.mean()) if v.size else 0.0)) / (sd if sd > 0 else 1.0)


def complete(model, comp: Complementer, items: list[str], k: int, *, user: str | None = None,
             one_per_category: bool = False, prefer_other_categories: bool = True,
             explain: bool = False) -> dict:
    """The ``/complete`` answer for one cart (module docstring)."""
    cart_ids = list(dict.fromkeys(items))
    unknown = [x for x in cart_ids if x not in model.item_index]
    cart = np.asarray([model.item_index[x] for x in cart_ids if x in model.item_index], np.int64)
    s = comp.scores(cart)
    banned = np.zeros(model.num_items, bool)
    banned[cart] = True
    if model.rules.exclude_idx.size:
        banned[model.rules.exclude_idx] = True
    valid = ~banned
    personal_used = False
    user_known = None
    rank_key = s.copy()
    if comp.has_category and prefer_other_categories and cart.size:
        rank_key = basket.prefer_other_categories(rank_key[None], [cart], comp.category)[0]
    rank_key[banned] = -np.inf
    order = np.argsort(-rank_key, kind="stable")
    order = order[np.isfinite(rank_key[order])]
    if user is not None:
        p, known = model.user_scores([user])
        user_known = bool(known[0])
        if user_known:
            p = np.asarray(p[0], np.float64)
            pv = p > layout.EXCLUDED_SCORE
            p = np.where(pv, p, p[pv].min() if pv.any() else 0.0)
            head = order[:4 * k]
            mix = _z(s, valid)[head] + _z(p, valid & pv)[head]
            if comp.has_category and prefer_other_categories and cart.size:
                same = np.isin(comp.category[head], comp.category[cart][comp.category[cart] >= 0])
                mix = mix - 1e6 * same
            order = np.concatenate([head[np.argsort(-mix, kind="stable")], order[4 * k:]])
            personal_used = True
    top = (basket.one_per_category(order, comp.category, k) if one_per_category
           else order[:k])
    out_items = []
    for i in top.tolist():
        row: dict[str, Any] = {"item": str(model.item_ids[i]), "score": float(s[i])}
        if comp.has_category:
            c = comp.category[i]
            row["category"] = str(comp.category_names[c]) if c >= 0 else None
        if explain:
            e = comp.explain(cart, i, s[i]) if cart.size else {"base": float(s[i]),
                                                         "contributions": []}
            reasons = []
            if model.rules.is_promoted[i]:
                reasons.append({"kind": "promoted"})
            if comp.stats is not None and cart.size:
                n = sum(comp.stats.pair_count(j, i) for j in cart.tolist())
                if n:
                    reasons.append({"kind": "bought_together", "baskets": int(n)})
            row["explain"] = {
                "base": e["base"],
                "cart_items": [{"item": str(model.item_ids[j]), "contribution": c}
                               for j, c in e["contributions"]],
                "reasons": reasons}
        out_items.append(row)
    return {"model_version": model.version, "source": comp.source, "items": out_items,
            "unknown_items": unknown, "user_known": user_known,
            "personalised": personal_used}


def make_router(get_model: Callable[[], Any], executor, *, max_items: int = 1000,
                max_k: int = 1000) -> APIRouter:
    """The ``/complete`` router; ``get_model()`` gives the served model (or raises the
    app's not-ready error), ``executor`` runs the scoring off the event loop."""
    router = APIRouter()
    cache: dict[tuple[str, int], Complementer] = {}
    lock = threading.Lock()

    class CompleteRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        items: list[Id] = Field(min_length=1, max_length=max_items,
                                description="The cart: items already chosen.")
        k: StrictInt = Field(10, ge=1, le=max_k)
        user: Id | None = Field(None, description="Optional shopper: the best 4k complements "
                                                  "re-ordered with their personal scores.")
        one_per_category: StrictBool = False
        prefer_other_categories: StrictBool = Field(True, description=(
            "Items of categories absent from the cart first (a substitute is not a "
            "complement); needs exported item categories."))
        explain: StrictBool = False

    class CartItem(BaseModel):
        item: str
        contribution: float

    class Reason(BaseModel):
        kind: StrictStr = Field(description="promoted | bought_together")
        baskets: int | None = None

    class Explanation(BaseModel):
        base: float = Field(description="The score less the cart items' contributions.")
        cart_items: list[CartItem] = Field(description="The cart items that contributed "
                                                       "most, best first (at most 3).")
        reasons: list[Reason]

    class Completion(BaseModel):
        item: str
        score: float
        category: str | None = None
        explain: Explanation | None = None

    class CompleteResponse(BaseModel):
        model_version: int
        source: str = Field(description="learned (a trained basket model) or co_purchase "
                                        "(lift from the exported co-purchase counts).")
        items: list[Completion]
        unknown_items: list[str] = Field(description="Cart items the model does not know.")
        user_known: bool | None
        personalised: bool

    def _complementer(m) -> Complementer:
        key = (str(m.path), m.version)
        with lock:
            c = cache.get(key)
            if c is None:
                c = Complementer(m)
                cache.clear()          # one version at a time: the served one
                cache[key] = c
        return c

    @router.post("/complete", response_model=CompleteResponse, response_model_exclude_none=True)
    async def complete_endpoint(req: CompleteRequest):
        m = get_model()
        try:
            comp = await asyncio.get_running_loop().run_in_executor(executor, _complementer, m)
        except basket.ComplementError as e:
            raise HTTPException(500, f"version {m.version}: complement data unreadable: "
                                     f"{str(e).rsplit('/', 1)[-1]}") from None
        if comp.source is None:
            raise HTTPException(409, f"model version {m.version} has no complement data: export "
                                     "it from a run whose data has baskets (order_id) or with "
                                     "jaxreco-export --complement")
        if req.one_per_category and not comp.has_category:
            raise HTTPException(400, f"one_per_category needs item categories, and model "
                                     f"version {m.version} was exported without them")
        return await asyncio.get_running_loop().run_in_executor(
            executor, lambda: complete(
                m, comp, [str(x) for x in req.items], req.k,
                user=None if req.user is None else str(req.user),
                one_per_category=req.one_per_category,
                prefer_other_categories=req.prefer_other_categories, explain=req.explain))

    return router
