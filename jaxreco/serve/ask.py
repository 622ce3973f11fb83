"""``POST /ask``: product questions, a free-text query over the catalogue re-ranked by the
shopper's personal scores (:mod:`jaxreco.ask`), as a FastAPI router the app includes.

    POST /ask {"query": "sci-fi comedy", "k": 10, "user": "1m_1"}
    POST /ask {"query": "pasta under 5", "session": ["196", "14084"]}

The served version must carry ``assets.extra/item_text.json`` (written by ``jaxreco-export``
whenever the dataset has item text), else 409. A price filter on a catalogue without
prices is a 422 naming ``query``. With ``user`` (known to the model) or ``session`` (item
ids, oldest first: the model's ``session_scores``, a fold-in for dot/iALS models), the
BM25 candidates are re-ordered by the mix of standardised text and personal scores, and
the items the model excludes for the shopper (already seen, the session's) are left out;
an unknown user without a session gets the same mix with the items' popularity (the
model's cold-start scores, ``ask.POPULAR_WEIGHT``; ``personalised: false``,
``reranked_by: "popularity"``). The rules' excluded items are never answered.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Annotated, Any, Callable, Union

import numpy as np
from fastapi import APIRouter, Body
from pydantic import (BaseModel, ConfigDict, Field, StrictInt, StrictStr,
                      ValidationError)
from starlette.exceptions import HTTPException

from jaxreco import ask
from jaxreco.serve import layout

Id = Annotated[Union[StrictStr, StrictInt], Field(description="A raw id as in the training data.")]


def _personal(model, user: str | None, session: list[str] | None) -> tuple[np.ndarray | None, dict]:
    """The shopper's score of every item (NaN = excluded for them), and what was used."""
    info: dict[str, Any] = {"user_known": None, "session_known": None}
    cut = [(x, "", 0.0) for x in session or () if x in model.item_index][-model.session_cap:]
    if session is not None:
        info["session_known"] = len(cut)
    if cut:
        if not model.has_session:
            raise HTTPException(409, f"model version {model.version} was exported without "
                                     "session_scores: export it again to use a session")
        s, known, sk = model.session_scores([user or ""], [cut])
        info["user_known"] = bool(known[0]) if user is not None else None
        info["session_known"] = int(sk[0])
        if int(sk[0]) == 0 and not known[0]:
            return None, info
        row = np.asarray(s[0], np.float64)
    elif user is not None:
        s, known = model.user_scores([user])
        info["user_known"] = bool(known[0])
        if not known[0]:
            return None, info
        row = np.asarray(s[0], np.float64)
    else:
        return None, info
    return np.where(row > layout.EXCLUDED_SCORE, row, np.nan), info


def answer(model, cat: ask.Catalogue, query: str, k: int, *, user: str | None = None,
           session: list[str] | None = None, weight: float = ask.PERSONAL_WEIGHT) -> dict:
    """The ``/ask`` answer (module docstring)."""
    personal, info = _personal(model, user, session)
    by, mix = ("personal", personal) if personal is not None else ("text", None)
    if personal is None:
        pop, known = model.user_scores([""])       # "" is nobody: the cold-start scores
        if not known[0] and np.isfinite(pop[0]).all():
            by, mix, weight = "popularity", np.asarray(pop[0], np.float64), ask.POPULAR_WEIGHT
    exclude = np.zeros(model.num_items, bool)
    if model.rules.exclude_idx.size:
        exclude[model.rules.exclude_idx] = True
    q = ask.parse_query(query)
    top, text = cat.ask(q, k, mix, weight, exclude)
    t = cat.text
    items = []
    for i, s in zip(top.tolist(), text.tolist()):
        row: dict[str, Any] = {"item": str(model.item_ids[i]), "title": t.title[i],
                               "tags": t.tags[i], "text_score": float(s)}
        if np.isfinite(t.price[i]):
            row["price"] = float(t.price[i])
        if personal is not None:
            row["personal_score"] = float(personal[i])
        elif mix is not None:
            row["popularity"] = float(mix[i])
        items.append(row)
    return {"model_version": model.version, "items": items, "words": cat.tokens(q.text),
            "min_price": q.min_price, "max_price": q.max_price,
            "personalised": personal is not None, "reranked_by": by, **info}


def make_router(get_model: Callable[[], Any], executor, *, max_k: int = 1000,
                max_query_chars: int = 1000, max_session: int = 1000) -> APIRouter:
    """The ``/ask`` router; ``get_model()`` gives the served model (or raises the app's
    not-ready error), ``executor`` runs the scoring off the event loop."""
    router = APIRouter()
    cache: dict[tuple[str, int], ask.Catalogue | None] = {}
    lock = threading.Lock()

    class AskRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        query: StrictStr = Field(min_length=1, max_length=max_query_chars, description=(
            "Words to search titles and tags for, and optional price filters: 'under 20', "
            "'over 5', 'between 5 and 20'."))
        k: StrictInt = Field(10, ge=1, le=max_k)
        user: Id | None = Field(None, description="Optional shopper: the answer re-ranked by "
                                                  "their personal scores.")
        session: list[Id] | None = Field(None, max_length=max_session, description=(
            "Optional recent items of the shopper, oldest first (a fold-in of them ranks)."))

    class Answer(BaseModel):
        item: str
        title: str
        tags: str
        text_score: float = Field(description="BM25 score of the item's text for the query.")
        price: float | None = None
        personal_score: float | None = None
        popularity: float | None = Field(None, description=(
            "The item's cold-start score, when the shopper has no personal scores."))

    class AskResponse(BaseModel):
        model_version: int
        items: list[Answer]
        words: list[str] = Field(description="The query words the catalogue has (BM25 terms).")
        min_price: float | None
        max_price: float | None
        personalised: bool
        reranked_by: str = Field(description=(
            "What re-ordered the text matches: 'personal' (the shopper's scores), "
            "'popularity' (no personal scores) or 'text' (neither)."))
        user_known: bool | None
        session_known: int | None = Field(description="Session items the model knows.")

    def _catalogue(m) -> ask.Catalogue | None:
        key = (str(m.path), m.version)
        with lock:
            if key not in cache:
                f = m.path / "assets.extra" / ask.ITEM_TEXT_FILE
                c = None
                if f.is_file():
                    text = ask.ItemText.load(f)
                    if len(text) != m.num_items:
                        raise ask.AskError(f"{ask.ITEM_TEXT_FILE} has {len(text)} items, the "
                                           f"model {m.num_items}")
                    c = ask.Catalogue(text)
                cache.clear()            # one version at a time: the served one
                cache[key] = c
            return cache[key]

    @router.post("/ask", response_model=AskResponse,
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "application/json": {"schema": AskRequest.model_json_schema()}}}})
    async def ask_endpoint(body: Any = Body(...)):
        try:
            req = AskRequest.model_validate(body)
        except ValidationError as e:   # 422 naming the field (the app's own 400 is for JSON)
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err.get("loc", ())) or "body"
            raise HTTPException(422, f"{loc}: {err.get('msg', 'invalid')}"
                                     f" (got {str(err.get('input'))[:80]!r})") from None
        m = get_model()
        loop = asyncio.get_running_loop()
        try:
            cat = await loop.run_in_executor(executor, _catalogue, m)
        except ImportError:
            raise HTTPException(501, "/ask needs the bm25s library: pip install 'jaxreco[ask]'"
                                ) from None
        except ask.AskError as e:
            raise HTTPException(500, f"version {m.version}: item text unreadable: "
                                     f"{str(e).rsplit('/', 1)[-1]}") from None
        if cat is None:
            raise HTTPException(409, f"model version {m.version} has no item text "
                                     f"({ask.ITEM_TEXT_FILE}): export it from a run whose "
                                     "dataset has titles or categories")
        try:
            return await loop.run_in_executor(executor, lambda: answer(
                m, cat, req.query, req.k, user=None if req.user is None else str(req.user),
                session=None if req.session is None else [str(x) for x in req.session]))
        except ask.AskError as e:
            raise HTTPException(422, f"query: {e}") from None

    return router
