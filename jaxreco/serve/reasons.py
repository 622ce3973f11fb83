"""``explain=true`` on ``/recommend``: per recommended item, the shopper's items that
contributed most to its score and the business reasons.

For a model exported with fold-in (dot / iALS models, session mode ``foldin``) the score is
decomposed exactly over the history the fold-in uses (:mod:`jaxreco.explain`): the user's
training items, plus the session's known items (the latest ``session_cap``) when the
request has a session of events, each once. ``score`` is the fold-in score the
contributions and ``base`` sum to; it is the served score for a session request, and close
to it for a known user without a session (module docstring of :mod:`jaxreco.explain`).

For a sequential model exported with the ``session_attention`` signature the history items
are those the encoder's last position attends to most (``method: "attention"``, attention
rollout over the blocks, :meth:`jaxreco.models.sequential.Sequential.attention`), over the
sequence the served scores were computed from: the user's latest items and the session's
(the latest ``session_cap`` known ones), or the user's own sequence without a session. An
item that occurs at several positions gets the sum of their weights; the weights of all the
sequence's items sum to 1. They do not depend on the recommended item, so every item of one
answer lists the same ones, and they say where the representation draws from, not a
decomposition of the score (no ``score``/``base``).
Other models get the business reasons only (``method: "none"``).

Business reasons: ``promoted`` (the rules boost the item: the served score is the model's
plus ``boost``), ``bought_together`` (baskets
holding it and one of the history items, when the version carries co-purchase counts).
"""

import threading

import numpy as np
from pydantic import BaseModel, Field

from jaxreco.explain import FoldInExplainer, top_contributions
from jaxreco.scenarios import basket


class HistoryItem(BaseModel):
    item: str
    contribution: float = Field(description="foldin: the item's term of the score; attention: "
                                            "its attention weight (all sum to 1).")


class Reason(BaseModel):
    kind: str = Field(description="promoted | bought_together | coupon")
    boost: float | None = Field(None, description="promoted: the rules' boost, added to the "
                                                  "served score (not part of the model's).")
    baskets: int | None = Field(None, description="bought_together: baskets holding the item "
                                                  "and one of the shopper's items.")
    coupon: str | None = Field(None, description="coupon: a coupon the shopper can use now "
                                                 "covers the item (jaxreco.serve.offers).")


class ItemReasons(BaseModel):
    method: str = Field(description="foldin (exact decomposition of a dot/iALS score), "
                                    "attention (a sequential model's attention rollout) or none")
    score: float | None = Field(None, description="The fold-in score: base + the sum of every "
                                                  "history item's contribution.")
    base: float | None = None
    history_items: list[HistoryItem] = Field(default_factory=list, description=(
        "The history items that contributed most (at most 3), largest first."))
    reasons: list[Reason] = Field(default_factory=list)


class _VersionData:
    def __init__(self, m):
        obj = m._obj
        meta = m.session_meta
        self.explainer = None
        if meta.get("mode") == "foldin" and hasattr(obj, "fold_q"):
            self.explainer = FoldInExplainer(
                obj.fold_q.numpy().astype(np.float64), obj.fold_bias.numpy().astype(np.float64),
                obj.fold_gram.numpy().astype(np.float64),
                obj.fold_rhs0.numpy().astype(np.float64),
                float(meta["alpha0"]), float(meta["reg"]), float(meta["nu"]))
        self.indptr = obj.seen_indptr.numpy()
        self.indices = obj.seen_indices.numpy()
        with open(m.path / "assets" / "user_vocab.txt", encoding="utf-8", newline="\n") as f:
            self.user_index = {s: i for i, s in enumerate(f.read().split("\n")[:-1])}
        co = m.path / "assets.extra" / basket.CO_PURCHASE_FILE
        self.stats = basket.CoPurchaseStats.load(co) if co.is_file() else None

    def seen(self, user: str | None) -> list[int]:
        u = self.user_index.get(user) if user is not None else None
        return [] if u is None else self.indices[self.indptr[u]:self.indptr[u + 1]].tolist()


_cache: dict[tuple[str, int], _VersionData] = {}
_lock = threading.Lock()


def _data(m) -> _VersionData:
    key = (str(m.path), m.version)
    with _lock:
        d = _cache.get(key)
        if d is None:
            d = _VersionData(m)
            if len(_cache) > 4:
                _cache.clear()
            _cache[key] = d
    return d


def attention_items(ids, weights, top: int = 3) -> list[dict]:
    """The ``top`` items of a sequence by attention weight (summed over an item's
    positions; padding, id "", skipped), largest first, as ``{"item", "contribution"}``."""
    total: dict[str, float] = {}
    for i, w in zip(ids, weights):
        if i:
            total[i] = total.get(i, 0.0) + float(w)
    order = sorted(total.items(), key=lambda kv: -kv[1])[:top]
    return [{"item": i, "contribution": w} for i, w in order]


def _attention(out: dict, models: dict, payload: dict) -> dict[int, list[dict]]:
    """``{result index: top attention items}`` for the results served by a sequential model
    with ``session_attention``: one call per model, with the session cut as the scores were."""
    rows: dict[int, list[int]] = {}
    for r, res in enumerate(out["results"]):
        m = models[res["arm"]]
        if getattr(m, "has_attention", False):
            rows.setdefault(id(m), []).append(r)
    found = {}
    for rs in rows.values():
        m = models[out["results"][rs[0]]["arm"]]
        sess = []
        if payload.get("session") is not None:
            sess = [e for e in payload["session"] if e[0] in m.item_index][-m.session_cap:]
        users = [out["results"][r]["user"] or "" for r in rs]
        w, ids, _ = m.session_attention(users, [sess] * len(rs))
        for n, r in enumerate(rs):
            found[r] = attention_items(ids[n], w[n])
    return found


def annotate(out: dict, arms: list, payload: dict) -> dict:
    """Adds ``explain`` (an :class:`ItemReasons`) to every item of a ``/recommend`` answer
    ``out`` computed for ``payload`` by the ``arms`` ``[(name, ServedModel)]``."""
    models = dict(arms)
    boosts: dict = {}
    attention = _attention(out, models, payload)
    for n_res, res in enumerate(out["results"]):
        m = models[res["arm"]]
        d = _data(m)
        hist = [] if res["cold_start"] else d.seen(res["user"])
        if payload.get("session") is not None:
            ok = [m.item_index[e[0]] for e in payload["session"] if e[0] in m.item_index]
            hist = list(dict.fromkeys(hist + ok[-m.session_cap:]))
        items = [m.item_index[x["item"]] for x in res["items"]]
        if d.explainer is not None and hist and items:
            score, base, contrib = d.explainer.explain(hist, items)
        else:
            score = base = contrib = None
        ids = [str(m.item_ids[j]) for j in hist]
        for r, (x, i) in enumerate(zip(res["items"], items)):
            reasons = []
            if m.rules.is_promoted[i]:
                if id(m) not in boosts:
                    boosts[id(m)] = dict(zip(m.rules.promo_idx.tolist(),
                                             m.rules.promo_boost.tolist()))
                reasons.append({"kind": "promoted", "boost": float(boosts[id(m)][i])})
            if d.stats is not None and hist:
                n = sum(d.stats.pair_count(j, i) for j in hist)
                if n:
                    reasons.append({"kind": "bought_together", "baskets": int(n)})
            e = {"method": "none", "history_items": [], "reasons": reasons}
            if contrib is not None:
                e.update(method="foldin", score=float(score[r]), base=float(base[r]),
                         history_items=top_contributions(ids, contrib[r]))
            elif n_res in attention:
                e.update(method="attention", history_items=attention[n_res])
            x["explain"] = e
    return out
