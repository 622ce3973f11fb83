"""``POST /offers`` and ``POST /redeem``: the coupons a shopper can use now, ranked by
expected incremental value, and the budget they consume.

    POST /offers {"user": "17", "k": 3, "cart": [{"item": "42", "price": 12.5,
                  "quantity": 2}], "now": "2026-03-10T12:00:00Z"}

**Which coupons.** Those of the promotions catalogue (:mod:`jaxreco.promotions`, hot
reloaded) that the user can use at ``now`` (default: the server's clock): inside their
validity window, budget not spent, the user eligible, and, when a ``cart`` is given, its
total (Σ price × quantity, before any discount) at least the coupon's ``min_spend``. Without
a cart the minimum spend is not checked (each offer says how much it needs). No other
coupon is ever answered; the answer counts the ones left out, by reason.

**Ranking.** The uplift model (a ``task.kind=ctr`` export whose context feature
``discount`` is a discount level, e.g. ``experiment=synthetic_coupons``; its items are the
coupon categories and its metadata ``model_info.discount_levels`` their percents) gives
``P(buy | user, category, level)``. A coupon of ``p`` percent gets the probability
interpolated between the levels around ``p`` (:func:`jaxreco.scenarios.coupons.
interpolate_levels`); an ``amount`` coupon is ``100 · amount / reference`` percent, the
reference being the cart total (else ``min_spend``; with neither, its uplift is unknown).
Over the categories the coupon covers (its ``categories``, the categories of its
``items`` in the served recommender's ``item_category.txt``, or every category for a
coupon without either) the uplift is the largest ``P(buy | p) − P(buy | 0)``, and

    value = uplift × margin            (margin: the coupon's, from the catalogue)

Offers are ranked by value, best first; coupons whose uplift is unknown (a user or
categories the uplift model does not know) come last, by id, with ``uplift: null``.

**Budget.** An offer reserves nothing. ``POST /redeem {"coupon", "user", "order_id",
"discount"}`` records that an order used the coupon and gave ``discount`` money: it is
accepted only while the coupon is usable by that user now and ``discount`` fits in the
budget left; the same ``order_id`` is counted once. The spent amounts live in this
process (:class:`BudgetLedger`), appended to a JSON-lines file when the server has one
(``--redemptions FILE``) and replayed from it at start: one server process (or one
ledger file per coupon budget) keeps budgets exact; replicas sharing a budget need a
shared ledger, which this is not.

**Where the uplift model lives.** ``<model_dir>/uplift/<version>/`` by default (TF Serving's
versioned layout, polled and swapped like the recommender: :class:`~jaxreco.serve.model.
ModelManager`), or ``--uplift-model-dir``; written by ``jaxreco-export --run-dir <uplift
run> --out-dir <model_dir>/uplift``.
"""


import asyncio
import datetime as dt
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Union

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from jaxreco.promotions import Catalogue, CatalogueWatcher, Coupon, parse_time
from jaxreco.scenarios import coupons as coupons_lib
from jaxreco.serve import layout

log = logging.getLogger(__name__)

UPLIFT_SUBDIR = "uplift"
DISCOUNT = "discount"
Id = Annotated[Union[StrictStr, StrictInt], Field(description="A raw id as in the training data.")]
Number = Union[StrictInt, StrictFloat]


class OfferError(ValueError):
    """A request or model the offers cannot be computed for (message for the client)."""


# ---------------------------------------------------------------------- the budget
class BudgetLedger:
    """Money each coupon has given (``spent[coupon id]``), from accepted redemptions.

    ``path``: a JSON-lines file of redemptions, replayed at start and appended to (flushed
    and fsynced) before a redemption is acknowledged."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else None
        self.spent: dict[str, float] = {}
        self._orders: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        if self.path is not None and self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        r = json.loads(line)
                        self._add(str(r["coupon"]), str(r["order_id"]), float(r["discount"]))
                    except (ValueError, KeyError, TypeError) as e:
                        raise OfferError(f"{self.path}:{n}: not a redemption record ({e}): "
                                         f"{line.strip()[:200]}") from e

    def _add(self, coupon: str, order: str, amount: float) -> bool:
        if (coupon, order) in self._orders:
            return False
        self._orders.add((coupon, order))
        self.spent[coupon] = self.spent.get(coupon, 0.0) + amount
        return True

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.spent)

    def redeem(self, c: Coupon, user: str, order: str, amount: float, now: float) -> dict:
        """Records a redemption; raises :class:`OfferError` when the coupon is not usable by
        ``user`` at ``now`` or ``amount`` does not fit in its budget left."""
        with self._lock:
            spent = self.spent.get(c.id, 0.0)
            if (c.id, order) in self._orders:
                return {"accepted": False, "duplicate": True, "budget_left": c.budget - spent}
            if not c.active(now):
                raise OfferError(f"coupon {c.id!r} is outside its validity window at {now}")
            if c.users is not None and user not in c.users:
                raise OfferError(f"coupon {c.id!r}: user {user!r} is not eligible")
            if amount > c.budget - spent + 1e-9:
                raise OfferError(f"coupon {c.id!r}: discount {amount} exceeds the budget left "
                                 f"{max(c.budget - spent, 0.0):.2f}")
            if self.path is not None:
                rec = {"coupon": c.id, "user": user, "order_id": order, "discount": amount,
                       "ts": now}
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            self._add(c.id, order, amount)
            return {"accepted": True, "duplicate": False,
                    "budget_left": c.budget - self.spent[c.id]}


# ---------------------------------------------------------------------- the uplift model
class UpliftScorer:
    """``P(buy | user, category, level)`` from a served uplift model version."""

    def __init__(self, m):
        info = m.meta.get("model_info") or {}
        if not m.has_predict_ctr or DISCOUNT not in m.context_features:
            raise OfferError(f"uplift model version {m.version} has no predict_ctr with a "
                             f"{DISCOUNT!r} context feature: export a run of "
                             "experiment=synthetic_coupons (task.kind=ctr)")
        if not info.get("discount_levels"):
            raise OfferError(f"uplift model version {m.version}: metadata model_info has no "
                             "discount_levels (export it again with this jaxreco)")
        self.model, self.version = m, m.version
        self.levels = np.asarray(info["discount_levels"], np.float64)
        if len(self.levels) != int(m.context_features[DISCOUNT]["vocab_size"]):
            raise OfferError(f"uplift model version {m.version}: {len(self.levels)} discount "
                             f"levels but a vocabulary of "
                             f"{m.context_features[DISCOUNT]['vocab_size']}")
        self.categories = [str(x) for x in m.item_ids]

    def p_levels(self, user: str, categories: list[str]) -> tuple[np.ndarray, bool]:
        """``(P [len(categories), L], known)``: the probabilities at every level."""
        L = len(self.levels)
        users = [user] * (len(categories) * L)
        items = [c for c in categories for _ in range(L)]
        lv = [lv for _ in categories for lv in range(L)]
        out, known = [], True
        b = self.model.max_batch
        for s in range(0, len(users), b):
            r = self.model.predict_ctr(users[s:s + b], items[s:s + b], {DISCOUNT: lv[s:s + b]})
            out.append(np.asarray(r[self.model.heads[0]], np.float64))
            known &= bool(np.all(r["known"]))
        p = np.concatenate(out) if out else np.zeros(0)
        return p.reshape(len(categories), L), known


# ---------------------------------------------------------------------- ranking
def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat().replace("+00:00", "Z")


def category_names(model) -> list[str] | None:
    """The served recommender's item categories by item index (``item_category.txt``)."""
    cached = getattr(model, "_offers_categories", False)
    if cached is not False:
        return cached
    path = model.path / "assets" / layout.ITEM_CATEGORY_FILE
    names = None
    if path.is_file():
        with open(path, encoding="utf-8", newline="\n") as f:
            names = f.read().split("\n")[:-1]
    model._offers_categories = names
    return names


def covered_categories(c: Coupon, all_categories: list[str], rec_model=None) -> list[str]:
    """The categories ``c`` covers among ``all_categories`` (module docstring)."""
    if not c.items and not c.categories:
        return list(all_categories)
    cats = set(c.categories)
    if c.items and rec_model is not None:
        names = category_names(rec_model)
        if names is not None:
            cats |= {names[rec_model.item_index[i]] for i in c.items if i in rec_model.item_index}
    return [x for x in all_categories if x in cats]


def coverage(model, c: Coupon) -> np.ndarray:
    """Indices of the served model's items ``c`` covers (cached per model and coupon)."""
    cache = model.__dict__.setdefault("_offers_coverage", {})
    hit = cache.get(c)
    if hit is None:
        names = category_names(model)
        hit = np.asarray([j for j, i in enumerate(model.item_ids)
                          if c.covers(str(i), None if names is None else names[j])], np.int64)
        if len(cache) > 1000:
            cache.clear()
        cache[c] = hit
    return hit


def coupon_reasons(out: dict, arms: list, payload: dict) -> dict:
    """Adds ``{"kind": "coupon", "coupon": id}`` to the ``explain`` reasons of every item of
    a ``/recommend`` answer covered by a coupon its user can use now (``payload["coupons"]``,
    one list per result, as ``/recommend`` found them)."""
    per_user = payload.get("coupons")
    if not per_user:
        return out
    models = dict(arms)
    for res, cands in zip(out["results"], per_user):
        m = models[res["arm"]]
        cov = {c.id: set(coverage(m, c).tolist()) for c in cands}
        for x in res["items"]:
            j = m.item_index[x["item"]]
            for cid in sorted(cid for cid, s in cov.items() if j in s):
                x.setdefault("explain", {"method": "none", "history_items": [], "reasons": []})
                x["explain"]["reasons"].append({"kind": "coupon", "coupon": cid})
    return out


def usable(catalogue: Catalogue, spent: dict[str, float], user: str | None, now: float,
           cart_total: float | None) -> tuple[list[Coupon], dict[str, int]]:
    """The coupons ``user`` can use at ``now`` and, by reason, how many were left out."""
    out, left = [], {"outside_window": 0, "budget_spent": 0, "not_eligible": 0,
                     "min_spend": 0}
    for c in catalogue.coupons:
        if not c.active(now):
            left["outside_window"] += 1
        elif spent.get(c.id, 0.0) >= c.budget:
            left["budget_spent"] += 1
        elif c.users is not None and (user is None or user not in c.users):
            left["not_eligible"] += 1
        elif cart_total is not None and cart_total < c.min_spend:
            left["min_spend"] += 1
        else:
            out.append(c)
    return out, left


def rank_offers(cands: list[Coupon], p_fn: Callable[[list[str]], tuple[np.ndarray, bool]] | None,
                levels: np.ndarray | None, categories: list[str], spent: dict[str, float],
                cart_total: float | None, rec_model=None) -> list[dict]:
    """Every candidate with its uplift, value and why, best value first (module docstring).
    ``p_fn(categories) -> (P [n, L], known)`` gives the user's purchase probabilities at
    ``levels`` (None: no uplift model)."""
    need = sorted({k for c in cands for k in covered_categories(c, categories, rec_model)})
    P, known = (p_fn(need) if (p_fn is not None and need) else (None, False))
    row = {k: j for j, k in enumerate(need)}
    out = []
    for c in cands:
        left = c.budget - spent.get(c.id, 0.0)
        o: dict[str, Any] = {
            "coupon": c.id,
            "discount": {"percent": c.percent} if c.percent is not None else {"amount": c.amount},
            "category": None, "uplift": None, "p_buy": None, "p_buy_without": None,
            "margin": c.margin, "value": None, "budget_left": round(left, 6),
            "valid_until": _iso(c.valid_until), "min_spend": c.min_spend}
        why = [f"valid until {_iso(c.valid_until)}", f"budget left {left:.2f} of {c.budget:.2f}"]
        if c.min_spend > 0:
            why.append(f"min spend {c.min_spend:.2f} " + (
                "not checked (no cart)" if cart_total is None
                else f"met by the cart ({cart_total:.2f})"))
        if c.percent is not None:
            pct = c.percent
        else:
            ref = cart_total if cart_total else (c.min_spend or None)
            pct = None if ref is None else min(100.0, 100.0 * c.amount / ref)
        cats = covered_categories(c, categories, rec_model)
        if P is None:
            why.append("no uplift model loaded" if p_fn is None else
                       "no category of the uplift model is covered")
        elif not known:
            why.append("the uplift model does not know this user")
        elif pct is None:
            why.append("an amount coupon without a cart or min_spend: its percent is unknown")
        elif not cats:
            why.append("no category of the uplift model is covered")
        else:
            sub = P[[row[k] for k in cats]]
            with_c = coupons_lib.interpolate_levels(sub, levels, np.full(len(cats), pct))
            up = with_c - sub[:, 0]
            j = int(np.argmax(up))
            o.update(category=cats[j], uplift=float(up[j]), p_buy=float(with_c[j]),
                     p_buy_without=float(sub[j, 0]), value=float(up[j] * c.margin))
            why.append(f"uplift {up[j]:+.4f} on {cats[j]} (P(buy) {with_c[j]:.4f} with "
                       f"{pct:g}% off vs {sub[j, 0]:.4f} without) x margin {c.margin:g} = "
                       f"value {up[j] * c.margin:.4f}")
        o["why"] = "; ".join(why)
        out.append(o)
    out.sort(key=lambda o: (o["value"] is None, -(o["value"] or 0.0), o["coupon"]))
    return out


# ---------------------------------------------------------------------- the service
class OffersService:
    """The catalogue watcher, the budget ledger and the uplift model manager of a server."""

    def __init__(self, watcher: CatalogueWatcher, ledger: BudgetLedger | None = None,
                 uplift_manager=None, poll_interval_s: float = 5.0):
        self.watcher, self.ledger = watcher, ledger or BudgetLedger()
        self.uplift_manager = uplift_manager
        self.poll_interval_s = poll_interval_s
        self._scorers: dict[int, UpliftScorer] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.uplift_manager is not None:
            self.uplift_manager.start()
        self._thread = threading.Thread(target=self._run, name="promotions", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.uplift_manager is not None:
            self.uplift_manager.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.watcher.poll()
            except Exception:  # noqa: BLE001  (the poller must survive anything)
                log.exception("promotions: poll failed")

    def scorer(self) -> UpliftScorer | None:
        m = self.uplift_manager.current if self.uplift_manager is not None else None
        if m is None:
            return None
        s = self._scorers.get(m.version)
        if s is None or s.model is not m:
            s = UpliftScorer(m)
            self._scorers = {m.version: s}
        return s

    def user_coupons(self, user: str | None, now: float | None = None) -> list[Coupon]:
        """The coupons ``user`` can use now (no cart: minimum spend not checked)."""
        cands, _ = usable(self.watcher.current, self.ledger.snapshot(), user,
                          time.time() if now is None else now, None)
        return cands


def _now(v) -> float:
    if v is None:
        return time.time()
    t = parse_time(v)
    if t is not None:
        return t
    raise HTTPException(400, f"now={v!r:.100}: expected an ISO 8601 time with a zone "
                             "(2026-03-10T12:00:00Z) or unix seconds")


def make_router(get_model: Callable[[], Any], get_service: Callable[[], OffersService | None],
                executor, *, max_k: int = 1000, max_cart: int = 1000) -> APIRouter:
    """The ``/offers`` and ``/redeem`` router. ``get_model()`` gives the served recommender
    (or raises), ``get_service()`` the :class:`OffersService` (None: 409, as ``/complete``
    answers a version without what it needs)."""
    router = APIRouter()

    class CartLine(BaseModel):
        model_config = ConfigDict(extra="forbid")
        item: Id
        price: Number = Field(ge=0)
        quantity: StrictInt = Field(1, ge=1)

    class OffersRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        user: Id
        k: StrictInt = Field(10, ge=1, le=max_k)
        cart: list[CartLine] | None = Field(None, max_length=max_cart, description=(
            "The cart (prices before discounts): coupons whose min_spend exceeds its total "
            "are not offered; without it the minimum spend is not checked."))
        now: StrictStr | Number | None = Field(None, description=(
            "ISO 8601 time with a zone or unix seconds; default the server's clock."))

    class Offer(BaseModel):
        coupon: str
        discount: dict[str, float]
        category: str | None = Field(description="The covered category where the uplift "
                                                 "is largest.")
        uplift: float | None = Field(description="P(buy | coupon) − P(buy | no coupon).")
        p_buy: float | None
        p_buy_without: float | None
        margin: float
        value: float | None = Field(description="uplift × margin: the ranking key.")
        budget_left: float
        valid_until: str
        min_spend: float
        why: str

    class OffersResponse(BaseModel):
        user: str
        now: str
        uplift_model_version: int | None
        offers: list[Offer]
        not_offered: dict[str, int] = Field(description=(
            "Catalogue coupons left out, by reason: outside_window, budget_spent, "
            "not_eligible, min_spend."))
        catalogue_error: str | None = Field(None, description=(
            "Why the newest catalogue file was not loaded (the previous one serves)."))

    class RedeemRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        coupon: StrictStr
        user: Id
        order_id: Id
        discount: Number = Field(ge=0, description="The money the coupon took off the order.")
        now: StrictStr | Number | None = None

    def _service() -> OffersService:
        s = get_service()
        if s is None:
            raise HTTPException(409, "this server has no promotions catalogue: start "
                                     "jaxreco-serve with --promotions FILE_OR_URL")
        return s

    @router.post("/offers", response_model=OffersResponse)
    async def offers(req: OffersRequest):
        svc = _service()
        now = _now(req.now)
        user = str(req.user)
        cart_total = None if req.cart is None else float(
            sum(float(x.price) * x.quantity for x in req.cart))
        try:
            rec = get_model()
        except Exception:  # noqa: BLE001  (the recommender is optional for offers)
            rec = None

        def work():
            cat = svc.watcher.current
            spent = svc.ledger.snapshot()
            cands, left = usable(cat, spent, user, now, cart_total)
            try:
                sc = svc.scorer()
            except OfferError as e:
                raise HTTPException(409, str(e)) from None
            ranked = rank_offers(
                cands, None if sc is None else (lambda cats: sc.p_levels(user, cats)),
                None if sc is None else sc.levels, [] if sc is None else sc.categories,
                spent, cart_total, rec)
            return {"user": user, "now": _iso(now),
                    "uplift_model_version": None if sc is None else sc.version,
                    "offers": ranked[:req.k], "not_offered": left,
                    "catalogue_error": svc.watcher.last_error}

        return await asyncio.get_running_loop().run_in_executor(executor, work)

    @router.post("/redeem")
    async def redeem(req: RedeemRequest):
        """Records that order ``order_id`` used ``coupon`` and got ``discount`` off: it
        consumes that much of the coupon's budget (an offer reserves nothing). 409 when the
        coupon is not usable by the user now or the discount exceeds the budget left."""
        svc = _service()
        now = _now(req.now)
        c = next((x for x in svc.watcher.current.coupons if x.id == req.coupon), None)
        if c is None:
            raise HTTPException(404, f"coupon {req.coupon!r} is not in the catalogue")
        try:
            out = svc.ledger.redeem(c, str(req.user), str(req.order_id), float(req.discount), now)
        except OfferError as e:
            raise HTTPException(409, str(e)) from None
        return {"coupon": c.id, **out}

    return router
