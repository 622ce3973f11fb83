"""The HTTP service: TF-Serving-compatible REST plus ``/recommend`` and ``/similar``.

Endpoints (all JSON; errors are ``{"error": "<what was wrong>"}`` with a 4xx or 5xx status,
and never hold a filesystem path; the connection layer's own answers -- malformed HTTP,
slow clients, too many connections -- are JSON too, see :mod:`jaxreco.serve.guard`):

- ``GET  /healthz``                     liveness: the process answers.
- ``GET  /readyz``                      readiness: 200 once a model version is loaded, else 503.
- ``GET  /v1/models/{name}``            TF Serving model status.
- ``GET  /v1/models/{name}/metadata``   TF Serving signature metadata.
- ``POST /v1/models/{name}:predict``    TF Serving predict (``instances`` or ``inputs``).
- ``POST /recommend``                   top-k for users, business rules applied, cold start.
- ``POST /similar``                     items that go together with given items.
- ``POST /complete``                    items that complete a cart (:mod:`jaxreco.serve.complete`).
- ``POST /ask``                         product questions: BM25 over item texts, re-ranked for the shopper (:mod:`jaxreco.serve.ask`).
- ``POST /offers``, ``POST /redeem``    coupons usable now, ranked by uplift x margin; budget use (:mod:`jaxreco.serve.offers`).
- ``POST /predict_ctr``                 click (per-head) probabilities of (user, item,
                                        context) rows; models exported from ctr runs.
- ``POST /events``                      shopper events (impression, click, cart, purchase),
                                        acknowledged once durably in the event log.
- ``GET  /v1/ab``                       the A/B arms, their versions, the split and salt.
- ``GET  /metrics``                     Prometheus metrics (not in the OpenAPI schema).
- ``GET  /openapi.json``                this API's schema.

Scoring runs on one worker thread; concurrent ``/recommend`` requests are merged into one
``user_scores`` call per arm (micro-batching without a wait window: whatever queued while
the previous call ran), then each request's rules and top-k run vectorised in numpy. Each
result carries a ``request_id``, its ``arm`` and ``model_version``; with an event log every
result is logged as a ``served`` record before the answer is sent (not waiting for fsync:
an event about it is acknowledged only after a later fsync of the same log, which covers the
served record too).
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import time
import uuid
from typing import Annotated, Any, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      model_validator)
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxreco.serve import ask, complete, layout, offers as offers_lib, reasons
from jaxreco.serve.ab import DEFAULT_ARM, ABConfig
from jaxreco.serve.events import EVENT_KINDS, EventLog, EventLogError, EventLogFull
from jaxreco.serve.guard import ConcurrencyLimitMiddleware
from jaxreco.serve.metrics import MetricsMiddleware, ServeMetrics, label
from jaxreco.serve.model import ModelManager, PredictError, ServedModel
from jaxreco.serve.rules import top_k

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model_name: str = "jaxreco"
    max_batch: int = 64              # ids per request
    max_k: int = 1000                # upper bound on k, besides the catalogue size
    max_exclude: int = 1000          # per-request exclude_items
    max_body_bytes: int = 64 * 1024  # request bodies above this get 413
    max_id_chars: int = 256
    max_events: int = 1000           # events per POST /events
    max_events_body_bytes: int = 2 * 2**20  # the body limit of POST /events
    limit_concurrency: int | None = None  # requests in flight (body read) before 503


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class ErrorBody(BaseModel):
    error: str


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, separators=(",", ":"), allow_nan=False).encode(), status,
                    media_type="application/json")


def _err(status: int, message: str) -> Response:
    return _json({"error": message}, status)


# ---------------------------------------------------------------------- body size limit
class RequestGuardMiddleware:
    """Answers 413 to bodies over ``limit`` bytes, declared or streamed (never holding more).

    It also reads every POST body as JSON whatever its Content-Type, as TF Serving does
    (``curl -d`` sends ``application/x-www-form-urlencoded``).
    """

    def __init__(self, app, limit: int, path_limits: dict[str, int] | None = None):
        self.app, self.default_limit, self.path_limits = app, limit, dict(path_limits or {})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.path_limits.get(scope.get("path", ""), self.default_limit)
        if scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
            scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    return await _asgi_error(send, 400, "invalid Content-Length header")
                if n > limit:
                    return await _asgi_error(
                        send, 413, f"request body of {n} bytes exceeds the limit of {limit} bytes")
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # Read the whole body here (at most ``limit`` bytes are ever held), then replay it.
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _asgi_error(
                    send, 413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _asgi_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:  # the connection stays usable: retry on it
        headers.append((b"retry-after", b"1"))
    else:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------- micro-batcher
class _Batcher:
    """Runs ``fn(resolve(), [payload...])`` on the worker thread for whatever has queued
    (``resolve()``: the models, read once per batch)."""

    def __init__(self, executor, fn, max_items: int, resolve):
        self._executor, self._fn, self._max, self._resolve = executor, fn, max_items, resolve
        self._queue: collections.deque[tuple[Any, int, asyncio.Future]] = collections.deque()
        self._running = False

    async def submit(self, payload, size: int):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append((payload, size, fut))
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        return await fut

    async def _drain(self):
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch, total = [], 0
                while self._queue and (not batch or total + self._queue[0][1] <= self._max):
                    p = self._queue.popleft()
                    batch.append(p)
                    total += p[1]
                models = self._resolve()  # one version per arm for the whole batch
                try:
                    results = await loop.run_in_executor(
                        self._executor, self._fn, models, [p[0] for p in batch])
                except Exception as e:  # noqa: BLE001 - handed to each waiting request
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (_, _, fut), r in zip(batch, results):
                    if not fut.done():
                        fut.set_result(r)
        finally:
            self._running = False


def _recommend_batch(arms, payloads: list[dict]) -> list[dict]:
    """Worker thread: one ``user_scores`` call per arm for all requests, then rules per request.

    ``arms``: ``[(arm name, ServedModel), ...]``, or one ``ServedModel`` (the default arm).
    A payload is ``{"users": [id or None], "arms": [arm index per user] (default: all 0),
    "k", "exclude_items"}``; a None user is an anonymous shopper (cold start). Each result
    gets a fresh ``request_id`` (uuid4 hex), its ``arm`` and ``model_version``; a payload's
    answer has a top-level ``model_version`` when all its results share one, and lists the
    ids the serving model does not know: ``unknown_users`` (they got the cold-start list;
    anonymous shoppers are not listed) and ``unknown_exclude_items``.
    """
    if isinstance(arms, ServedModel):
        arms = [(DEFAULT_ARM, arms)]
    rows: dict[int, list[tuple[int, int]]] = {}  # arm -> [(payload, row)], payload-major
    for i, p in enumerate(payloads):
        for r, a in enumerate(p.get("arms") or [0] * len(p["users"])):
            rows.setdefault(a, []).append((i, r))
    results: list[list[dict | None]] = [[None] * len(p["users"]) for p in payloads]
    unknown_ids: set[tuple[int, int]] = set()  # (payload, row) of users the model lacks
    for a, pos in rows.items():
        name, model = arms[a]
        scores, known, uses = _arm_scores(model, payloads, pos)
        promoted = model.rules.is_promoted
        j = 0
        while j < len(pos):  # the consecutive rows of one payload
            i, e = pos[j][0], j
            while e < len(pos) and pos[e][0] == i:
                e += 1
            p = payloads[i]
            extra = model.item_indices(p["exclude_items"]) if p["exclude_items"] else None
            if p.get("coupon_boost"):   # items covered by each user's usable coupons
                for n in range(e - j):
                    cov = [offers_lib.coverage(model, c) for c in p["coupons"][pos[j + n][1]]]
                    if cov:
                        at = np.unique(np.concatenate(cov))
                        row = scores[j + n, at]
                        scores[j + n, at] = np.where(row > layout.EXCLUDED_SCORE,
                                                     row + np.float32(p["coupon_boost"]), row)
            idx, vals = top_k(scores[j:e], p["k"], model.rules, extra)
            for n in range(e - j):
                r = pos[j + n][1]
                use = uses[j + n]
                # cold start: the popular list (an unknown user, and no session the model used)
                cold = not bool(known[j + n]) and (
                    use is None or use["used"] == 0 or use["mode"] == "exclude")
                unknown_ids.update({(i, r)} if p["users"][r] is not None and not known[j + n]
                                   else set())
                results[i][r] = {
                    "user": p["users"][r], "cold_start": cold,
                    "items": [{"item": model.item_ids[t], "score": float(v),
                               "promoted": bool(promoted[t])}
                              for t, v in zip(idx[n].tolist(), vals[n].tolist())],
                    "request_id": uuid.uuid4().hex, "arm": name, "model_version": model.version}
                if uses[j + n] is not None:
                    results[i][r]["session"] = uses[j + n]
            j = e
    out = []
    for i, (p, res) in enumerate(zip(payloads, results)):
        versions = {x["model_version"] for x in res}
        body: dict[str, Any] = {"model_version": versions.pop()} if len(versions) == 1 else {}
        body["results"] = res
        body["unknown_users"] = _distinct(x["user"] for r, x in enumerate(res)
                                          if (i, r) in unknown_ids)
        used = [arms[a][1] for a in sorted(set(p.get("arms") or [0]))]
        body["unknown_exclude_items"] = _distinct(
            x for x in p["exclude_items"] if any(x not in m.item_index for m in used))
        if p.get("session") is not None:
            body["unknown_session_items"] = _distinct(
                e[0] for e in p["session"] if any(e[0] not in m.item_index for m in used))
        out.append(body)
    return out


def _arm_scores(model: ServedModel, payloads: list[dict], pos: list[tuple[int, int]]):
    """``(scores [n, I], known [n], session use per row or None)`` of one arm's rows:
    ``user_scores`` for rows without a session of events, ``session_scores`` (one call) for
    the rest. A session keeps its known items, the latest ``model.session_cap`` of them."""
    users = [payloads[i]["users"][r] or "" for i, r in pos]
    with_s = [j for j, (i, _) in enumerate(pos) if payloads[i].get("session") is not None]
    uses: list[dict | None] = [None] * len(pos)
    if not with_s:
        scores, known = model.user_scores(users)
        return scores, known, uses
    if not model.has_session:
        raise SessionUnsupported(
            f"model version {model.version} was exported without the session_scores "
            "signature: export it again (jaxreco-export) to serve sessions")
    plain = [j for j in range(len(pos)) if j not in set(with_s)]
    scores = np.empty((len(pos), model.num_items), np.float32)
    known = np.zeros(len(pos), bool)
    if plain:
        scores[plain], known[plain] = model.user_scores([users[j] for j in plain])
    cut = []
    for j in with_s:
        sess = payloads[pos[j][0]]["session"]
        ok = [e for e in sess if e[0] in model.item_index]
        keep = ok[-model.session_cap:]
        cut.append(keep)
        uses[j] = {"mode": model.session_meta.get("mode", "exclude"), "events": len(sess),
                   "used": len(keep), "unknown_items": len(sess) - len(ok),
                   "truncated": len(ok) - len(keep), "limit": model.session_cap}
    s, k, _ = model.session_scores([users[j] for j in with_s], cut)
    scores[with_s], known[with_s] = s, k
    return scores, known, uses


class SessionUnsupported(ValueError):
    """The serving model has no session_scores signature (exported before sessions)."""


def _distinct(ids) -> list[str]:
    return list(dict.fromkeys(ids))


def _similar(model: ServedModel, items: list[str], k: int) -> dict:
    excl = model.rules.exclude_idx
    k_fetch = min(model.num_items - 1, k + int(excl.size))
    out = model.similar(items, k_fetch)
    drop = set(model.item_ids[excl].tolist()) if excl.size else set()
    results = []
    for r, item in enumerate(items):
        lst = []
        for it, sc, co in zip(out["items"][r], out["scores"][r].tolist(), out["co_counts"][r].tolist()):
            it = it.decode()
            if it in drop or sc <= layout.EXCLUDED_SCORE:
                continue
            lst.append({"item": it, "score": float(sc), "co_count": int(co)})
            if len(lst) == k:
                break
        results.append({"item": item, "cold_start": not bool(out["known"][r]), "items": lst})
    return {"model_version": model.version, "results": results,
            "unknown_items": _distinct(x["item"] for x in results if x["cold_start"])}


def _jsonable(a: np.ndarray) -> Any:
    if a.dtype == object:
        return np.vectorize(lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else b,
                            otypes=[object])(a).tolist() if a.size else a.tolist()
    if a.dtype.kind == "f":
        a = np.where(np.isfinite(a), a, 0.0)  # JSON has no inf/nan; excluded items are finite
    return a.tolist()


# ---------------------------------------------------------------------- the app
def create_app(manager: ModelManager, config: ServeConfig = ServeConfig(), *,
               start_polling: bool = True, ab: ABConfig | None = None,
               event_log: EventLog | None = None,
               offers: offers_lib.OffersService | None = None) -> FastAPI:
    """Builds the ASGI app around a :class:`ModelManager` (started on app start-up).

    ``ab``: the arms (default: one arm serving the newest version); pinned arms need a
    manager built with ``pinned=ab.pinned_versions``. ``event_log``: where served records
    and ``POST /events`` go (started on app start-up if not yet; None: not collected).
    ``offers``: the promotions catalogue, budget ledger and uplift model behind ``/offers``,
    ``/redeem`` and ``coupon_boost`` (started with the app; None: they answer 409 / 400).
    """
    ab = ab or ABConfig.default()
    if not ab.is_default and tuple(manager.pinned) != tuple(ab.pinned_versions):
        raise ValueError(f"the arms pin versions {ab.pinned_versions} but the ModelManager "
                         f"pins {list(manager.pinned)}: build it with pinned=ab.pinned_versions")
    metrics = ServeMetrics()
    replica = event_log.replica if event_log is not None else None
    split_map = ab.split_map()
    Id = Annotated[Union[StrictStr, StrictInt], Field(
        description="A raw id as in the training data (a JSON string, or an integer).")]

    class _Body(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def _ids_check(ids: list, what: str) -> list[str]:
        out = [str(x) for x in ids]
        for s in out:
            if len(s) > config.max_id_chars:
                raise ApiError(400, f"{what}: ids are at most {config.max_id_chars} characters; "
                                    f"got one of {len(s)}")
        return out

    class RecommendRequest(_Body):
        """Exactly one of ``user`` and ``users``; or only a ``session`` (one anonymous
        shopper). A ``session`` given as a list of events drives the answer (fold-in or the
        sequential encoder; an id only names the session)."""
        user: Id | None = None
        users: list[Id] | None = Field(None, max_length=config.max_batch)
        session: Id | list[Any] | None = Field(None, description=(
            "Either the shopper's session id (the A/B key of an anonymous shopper, recorded "
            "with the served list), or the session's events, oldest first: [{\"item\": id, "
            "\"event\": \"view\"|\"click\"|\"cart\"|\"purchase\"|..., \"ts\": unix s, "
            "\"platform\": \"app\"|\"web\"|...}, ...] (item required). The answer is computed "
            "from these items (and the user's history when 'user' is known, e.g. after a "
            "login); they and the user's training items are not recommended."),
            json_schema_extra={"example": [{"item": "2858", "event": "click",
                                            "ts": 1767225600, "platform": "app"}]})
        session_id: Id | None = Field(None, description=(
            "The session id when 'session' is a list of events (the A/B key of an anonymous "
            "shopper)."))
        coupon_boost: float | None = Field(None, ge=0, description=(
            "With a promotions catalogue: added to the score of every item covered by a "
            "coupon the user can use now (POST /offers); explain=true names the coupons."))
        k: StrictInt = Field(10, ge=1, le=config.max_k)
        exclude_items: list[Id] = Field(default_factory=list, max_length=config.max_exclude,
                                        description="Items not to recommend in this request.")
        explain: StrictBool = Field(False, description=(
            "Add per item the history items that contributed most to its score (exact for "
            "dot/iALS models; the encoder's attention for sequential models) and the "
            "business reasons."))

        @model_validator(mode="after")
        def _one(self):
            if self.session is not None and self.user is None and not self.users:
                return self  # one anonymous shopper
            if (self.user is None) == (self.users is None):
                raise ValueError("give exactly one of 'user' (one id) and 'users' (a list of "
                                 "ids), or only a 'session' for an anonymous shopper")
            if self.users is not None and not self.users:
                raise ValueError("users: List should have at least 1 item (or give only a "
                                 "'session' for an anonymous shopper)")
            return self

    class SimilarRequest(_Body):
        """Exactly one of ``item`` and ``items``."""
        item: Id | None = None
        items: list[Id] | None = Field(None, min_length=1, max_length=config.max_batch)
        k: StrictInt = Field(10, ge=1, le=config.max_k)

        @model_validator(mode="after")
        def _one(self):
            if (self.item is None) == (self.items is None):
                raise ValueError("give exactly one of 'item' (one id) and 'items' (a list of ids)")
            return self

    class ScoredItem(BaseModel):
        item: str
        score: float
        promoted: bool
        explain: reasons.ItemReasons | None = Field(None, description=(
            "With explain=true: the history items that contributed most and the business "
            "reasons (jaxreco.serve.reasons)."))

    class SessionUse(BaseModel):
        mode: str = Field(description="foldin (the user vector solved from the items), "
                                      "sequential (the encoder on the last items) or exclude "
                                      "(the user's own scores, session items excluded).")
        events: int = Field(description="Events in the request's session.")
        used: int = Field(description="Items the model was given (known, the latest ones).")
        unknown_items: int = Field(description="Events whose item the model does not know "
                                               "(skipped).")
        truncated: int = Field(description="Known events older than the latest 'limit' "
                                           "(dropped).")
        limit: int = Field(description="The most recent known items the model takes.")

    class UserResult(BaseModel):
        user: str | None = Field(description="null for an anonymous shopper (a session only).")
        cold_start: bool = Field(description=(
            "The items are the most popular ones: an unknown (or anonymous) shopper without "
            "a session the model could use."))
        items: list[ScoredItem]
        request_id: str = Field(description="Names this list in POST /events (uuid4 hex).")
        arm: str = Field(description="The A/B arm that served it ('default' without arms).")
        model_version: int
        session: SessionUse | None = Field(None, description=(
            "With a session of events: how the model used it."))

    class RecommendResponse(BaseModel):
        model_version: int | None = Field(None, description="When all results share one.")
        results: list[UserResult]
        unknown_users: list[str] = Field(description=(
            "Requested users the model does not know (each got the cold-start list): check "
            "the id format of the training data (docs/serving.md, 'Ids')."))
        unknown_exclude_items: list[str] = Field(description=(
            "exclude_items the model does not know (nothing to exclude for them)."))
        unknown_session_items: list[str] | None = Field(None, description=(
            "With a session of events: its items the model does not know (skipped)."))

    class SimilarItem(BaseModel):
        item: str
        score: float = Field(description="Cosine similarity (popularity for an unknown item).")
        co_count: int = Field(description="Times bought in the same basket (0 without baskets).")

    class ItemResult(BaseModel):
        item: str
        cold_start: bool
        items: list[SimilarItem]

    class SimilarResponse(BaseModel):
        model_version: int
        results: list[ItemResult]
        unknown_items: list[str] = Field(description=(
            "Requested items the model does not know (each got the popular items)."))

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        signature_name: StrictStr = layout.SIG_DEFAULT
        instances: list[Any] | None = Field(None, min_length=1, max_length=config.max_batch)
        inputs: dict[str, Any] | Any | None = None

    errors = {400: {"model": ErrorBody}, 404: {"model": ErrorBody}, 413: {"model": ErrorBody},
              503: {"model": ErrorBody}}

    def _arm_models() -> list[tuple[str, ServedModel | None]]:
        if ab.is_default:
            return [(DEFAULT_ARM, manager.current)]
        return [(a.name, manager.loaded.get(a.version)) for a in ab.arms]

    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="scorer")
    batcher = _Batcher(executor, _recommend_batch, max_items=config.max_batch,
                       resolve=_arm_models)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        log.info("%s; split %s", ab.describe(), split_map)
        if event_log is not None and not event_log.started:
            event_log.start()
        if start_polling:
            manager.start()
            if offers is not None:
                offers.start()
        yield
        if offers is not None:
            offers.stop()
        manager.stop()
        executor.shutdown(wait=True)
        if event_log is not None:
            event_log.close()

    app = FastAPI(title="jaxreco serving", version="1", lifespan=lifespan,
                  description="Recommendations from a jaxreco SavedModel; TF-Serving-compatible REST.")
    app.state.manager, app.state.config = manager, config
    app.state.ab, app.state.event_log, app.state.metrics = ab, event_log, metrics

    # ---------------------------------------------------------------- errors
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _err(e.status, e.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors()[:20]:
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            typ = err.get("type", "")
            msg = err.get("msg", "invalid")
            if typ == "json_invalid":
                msg = f"malformed JSON body: {err.get('ctx', {}).get('error', '')}".strip()
                loc = []
            elif loc and loc[-1] in ("str", "int") and typ in ("string_type", "int_type"):
                loc, msg = loc[:-1], "must be an id: a string or an integer"
            elif typ == "missing":
                msg = "field required" if loc else "missing JSON body: send a JSON object"
            elif typ == "extra_forbidden":
                msg = "unknown field"
            elif typ == "model_attributes_type" and not loc:
                msg = "the body must be a JSON object"
            msg = msg.removeprefix("Value error, ")
            part = f"{'.'.join(loc)}: {msg}" if loc else msg
            if part not in parts:
                parts.append(part)
        return _err(400, "; ".join(parts[:5]) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return _err(404, f"no such endpoint: {request.method} {request.url.path}")
        if e.status_code == 405:
            return _err(405, f"method {request.method} not allowed on {request.url.path}")
        return _err(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _err(500, f"internal error: {type(e).__name__}")

    def _model() -> ServedModel:
        m = manager.current
        if m is None:
            raise ApiError(503, f"no model loaded yet: {manager.readiness_problem()}")
        return m

    def _check_name(name: str) -> None:
        if name != config.model_name:
            raise ApiError(404, f"unknown model {name[:100]!r}; this server serves "
                                f"{config.model_name!r}")

    def _check_k(k: int, limit: int) -> None:
        if k > limit:
            raise ApiError(400, f"k={k} is larger than the catalogue ({limit} items)")

    # ---------------------------------------------------------------- probes
    @app.get("/healthz", responses=errors)
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses=errors)
    async def readyz():
        m = manager.current
        if not ab.is_default:
            problem = manager.pinned_problem()
            if problem:
                return _err(503, f"not ready: {problem}")
        if m is None:
            return _err(503, f"not ready: no model version loaded yet; "
                             f"{manager.readiness_problem()}")
        if ab.is_default:
            return {"status": "ready", "model_version": m.version}
        return {"status": "ready", "model_version": m.version,
                "arms": {a.name: a.version for a in ab.arms}}

    # ---------------------------------------------------------------- TF Serving REST
    @app.get("/v1/models/{name}", responses=errors)
    async def model_status(name: str):
        _check_name(name)
        sts = sorted(manager.statuses.values(), key=lambda s: -s.version)
        if not sts:
            raise ApiError(404, f"model {name!r} has no version yet: "
                                f"{manager.readiness_problem()}")
        return {"model_version_status": [
            {"version": str(s.version), "state": s.state,
             "status": {"error_code": s.code or ("OK" if not s.error else "UNKNOWN"),
                        "error_message": s.error}} for s in sts]}

    @app.get("/v1/models/{name}/metadata", responses=errors)
    async def model_metadata(name: str):
        _check_name(name)
        m = _model()
        return {"model_spec": {"name": name, "signature_name": "", "version": str(m.version)},
                "metadata": m.metadata()}

    async def _predict(name: str, version: int | None, req: PredictRequest):
        _check_name(name)
        m = _model()
        if version is not None and version != m.version:
            if version not in manager.loaded:
                serving = sorted(manager.loaded) or [m.version]
                raise ApiError(404, f"version {version} of model {name!r} is not loaded; "
                                    f"serving version {', '.join(map(str, serving))}")
            m = manager.loaded[version]
        sig = req.signature_name
        if sig not in m.signatures:
            raise ApiError(400, f"unknown signature_name {sig[:100]!r}; available: "
                                f"{sorted(m.signatures)}")
        if (req.instances is None) == (req.inputs is None):
            raise ApiError(400, "give exactly one of 'instances' (row format) and 'inputs' "
                                "(columnar format)")
        specs = m.signature_inputs(sig)
        names = list(specs)
        if req.instances is not None:
            scalars = [n for n in names if specs[n].shape.rank == 0]
            if scalars:
                raise ApiError(400, f"signature '{sig}' has scalar input(s) {scalars}, which the "
                                    "row format cannot carry; use the columnar 'inputs' format")
            if len(names) == 1 and not all(isinstance(x, dict) for x in req.instances):
                inputs = {names[0]: req.instances}
            else:
                if not all(isinstance(x, dict) for x in req.instances):
                    raise ApiError(400, f"each instance must be an object with keys {names}")
                inputs = {n: [x.get(n) for x in req.instances] for n in names}
                extra = sorted({k for x in req.instances for k in x} - set(names))
                if extra:
                    raise ApiError(400, f"unknown input(s) {extra[:5]} for signature '{sig}'; "
                                        f"inputs: {names}")
                if any(None in v for v in inputs.values()):
                    miss = [n for n, v in inputs.items() if None in v]
                    raise ApiError(400, f"instances lack input(s) {miss} of signature '{sig}'")
        else:
            inputs = req.inputs if isinstance(req.inputs, dict) else {names[0]: req.inputs}
            if not isinstance(req.inputs, dict) and len(names) != 1:
                raise ApiError(400, f"signature '{sig}' has inputs {names}; give 'inputs' as an "
                                    "object with those keys")
            missing = [n for n in names if n not in inputs]
            extra = [n for n in inputs if n not in specs]
            if missing or extra:
                raise ApiError(400, f"signature '{sig}' takes inputs {names}; missing {missing}, "
                                    f"unknown {[e[:50] for e in extra[:5]]}")
        for n in names:
            v = inputs[n]
            if isinstance(v, list) and not (1 <= len(v) <= config.max_batch):
                raise ApiError(400, f"input '{n}' has {len(v)} values; the batch size must be in "
                                    f"[1, {config.max_batch}]")
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(executor, m.predict, sig, inputs)
        except PredictError as e:
            raise ApiError(400, manager.public(str(e))) from None
        if req.instances is not None:
            cols = {k: _jsonable(v) for k, v in out.items()}
            n = len(req.instances)
            if len(cols) == 1:
                return {"predictions": next(iter(cols.values()))}
            return {"predictions": [{k: v[i] for k, v in cols.items()} for i in range(n)]}
        outs = {k: _jsonable(v) for k, v in out.items()}
        return {"outputs": next(iter(outs.values())) if len(outs) == 1 else outs}

    @app.post("/v1/models/{name}:predict", responses=errors)
    async def predict(name: str, req: PredictRequest):
        return await _predict(name, None, req)

    @app.post("/v1/models/{name}/versions/{version}:predict", responses=errors)
    async def predict_version(name: str, version: int, req: PredictRequest):
        return await _predict(name, version, req)

    # ---------------------------------------------------------------- recommendations
    def _log_served(out: dict, session: str | None, events: list[dict] | None = None,
                    platform: str | None = None) -> None:
        """One ``served`` record per result, queued before the answer leaves (with the
        session's events and the platform of its latest event, when given)."""
        ts = time.time()
        records = []
        for res in out["results"]:
            metrics.served.labels(res["arm"], str(res["model_version"])).inc()
            if event_log is None:
                continue
            event_log.recent.put(res["request_id"], res["arm"], res["model_version"])
            records.append({"kind": "served", "request_id": res["request_id"], "ts": ts,
                            "user": res["user"] or None, "session": session or None,
                            "arm": res["arm"],
                            "model_version": res["model_version"],
                            "items": [x["item"] for x in res["items"]], "replica": replica,
                            "split": split_map, "salt": ab.salt})
            if events is not None:
                records[-1]["session_events"] = events
            if platform is not None:
                records[-1]["platform"] = platform
        if records:
            try:
                event_log.submit(records)
            except EventLogFull as e:
                metrics.served_dropped.inc(len(records))
                log.warning("served records not logged: %s", e)

    @app.post("/recommend", response_model=RecommendResponse, responses=errors)
    async def recommend(req: RecommendRequest):
        arms = _arm_models()
        for name, m in arms:
            if m is None:
                if ab.is_default:
                    raise ApiError(503, f"no model loaded yet: {manager.readiness_problem()}")
                version = next(a.version for a in ab.arms if a.name == name)
                raise ApiError(503, f"arm {name!r} (model version {version}) is not serving: "
                                    f"{manager.pinned_problem()}")
        events = None
        if isinstance(req.session, list):
            if req.users is not None:
                raise ApiError(400, "session: a session of events belongs to one shopper: "
                                    "give 'user' (or no user), not 'users'")
            events = _session_events(req.session, config)
            sid = req.session_id
        else:
            if req.session_id is not None:
                raise ApiError(400, "session_id: goes with a session of events; give the id "
                                    "alone as 'session'")
            sid = req.session
        session = None if sid is None else _ids_check([sid], "session")[0]
        if req.user is None and not req.users:
            users: list[str | None] = [None]  # one anonymous shopper
        else:
            users = _ids_check([req.user] if req.users is None else req.users, "users")
        arm_of = [ab.assign(u if u else (session or "")) for u in users]
        for a in sorted(set(arm_of)):
            _check_k(req.k, arms[a][1].num_items)
        payload = {"users": users, "arms": arm_of, "k": req.k,
                   "exclude_items": _ids_check(req.exclude_items, "exclude_items"),
                   "session": None if events is None else [
                       (e["item"], e.get("event"), e.get("ts")) for e in events]}
        if offers is not None and (req.coupon_boost or req.explain):
            payload["coupons"] = [offers.user_coupons(u) for u in users]
            payload["coupon_boost"] = req.coupon_boost
        elif req.coupon_boost:
            raise ApiError(400, "coupon_boost: this server has no promotions catalogue "
                                "(start jaxreco-serve with --promotions FILE_OR_URL)")
        try:
            out = await batcher.submit(payload, len(users))
        except SessionUnsupported as e:
            raise ApiError(400, str(e)) from None
        platform = next((e["platform"] for e in reversed(events or []) if "platform" in e), None)
        _log_served(out, session, events, platform)
        if req.explain:
            await asyncio.get_running_loop().run_in_executor(
                executor, reasons.annotate, out, [(n, m) for n, m in arms], payload)
            offers_lib.coupon_reasons(out, [(n, m) for n, m in arms], payload)
        return _json(out)

    @app.post("/similar", response_model=SimilarResponse, responses=errors)
    async def similar(req: SimilarRequest):
        m = _model()
        _check_k(req.k, m.num_items - 1)
        items = _ids_check([req.item] if req.items is None else req.items, "items")
        loop = asyncio.get_running_loop()
        return _json(await loop.run_in_executor(executor, _similar, m, items, req.k))

    @app.post("/predict_ctr", responses={**errors, 422: {"model": ErrorBody}},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": PREDICT_CTR_SCHEMA}}}})
    async def predict_ctr(request: Request):
        """Per-head probabilities (``click``, …) of each (user, item, context) row.

        Body: one list per input, all of the same length (at most ``max_batch``):
        ``{"user": [...], "item": [...], "<context feature>": [int, ...]}`` -- the
        model's context features (``GET /v1/models/<name>/metadata``, ``jaxreco.
        context_features``, e.g. ``position``) take the integer values of the prepared
        data, ``0 <= value < vocab_size``. Answer: ``{"model_version", "predictions":
        {head: [p, ...]}, "known": [bool, ...]}``; ``known`` is false (and the
        probabilities 0.0) where the user or the item is unknown. A body that is not a
        JSON object gets 400; a missing, unknown or bad field 422, naming it.
        """
        m = _model()
        if not m.has_predict_ctr:
            raise ApiError(400, f"model version {m.version} has no predict_ctr signature: "
                                "export a task.kind=ctr run for it")
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise ApiError(400, f"malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object: {\"user\": [...], "
                                "\"item\": [...], ...}")
        users, items, context = _predict_ctr_inputs(body, m, config)
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(executor, m.predict_ctr, users, items, context)
        return _json({"model_version": m.version,
                      "predictions": {h: _jsonable(out[h]) for h in m.heads},
                      "known": _jsonable(out["known"])})

    # ---------------------------------------------------------------- events and A/B
    @app.post("/events", responses={**errors, 422: {"model": ErrorBody}},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": events_schema(config)}}}})
    async def events(request: Request):
        """Shopper events about served lists; answered ``{"accepted": n_new, "duplicates":
        n_dup}`` once they are durably in the event log (an ``event_id`` this replica wrote
        before is acknowledged as a duplicate and not written again). A bad event gets 422
        naming it: ``events[3].value=-2: must be >= 0``."""
        if event_log is None:
            raise ApiError(503, "this server does not collect events: start jaxreco-serve with "
                                "--events-dir DIR (or JAXRECO_EVENTS_DIR)")
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise ApiError(400, f"malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object: {\"events\": [...]}")
        try:
            records = _event_records(body, config)
        except ApiError:
            metrics.rejected.inc()
            raise
        received = time.time()
        for rec in records:
            known = event_log.recent.get(rec["request_id"])
            rec["replica"], rec["received_ts"] = replica, received
            rec["arm"], rec["model_version"] = known if known is not None else (None, None)
        t0 = time.perf_counter()
        try:
            written = await asyncio.wrap_future(event_log.submit(records, dedup=True))
        except EventLogFull as e:
            raise ApiError(503, str(e)) from None
        except EventLogError as e:
            raise ApiError(503, f"{e}; no event of this request was acknowledged: retry it") from None
        metrics.commit.observe(time.perf_counter() - t0)
        n_new = 0
        for rec, ok in zip(records, written):
            if ok:
                n_new += 1
                metrics.events.labels(rec["kind"], label(rec["arm"]),
                                      label(rec["model_version"])).inc()
        metrics.duplicates.inc(len(records) - n_new)
        return _json({"accepted": n_new, "duplicates": len(records) - n_new})

    @app.get("/v1/ab", responses=errors)
    async def ab_status():
        """The arms, the model version each serves, the split and the salt (the arm of a
        key is the first i with u < cumsum(split)[i] / sum(split), u = the first 8 bytes of
        sha256(salt + ":" + key) / 2**64; key = the user id, else the session id)."""
        versions = {name: (m.version if m is not None else None) for name, m in _arm_models()}
        if not ab.is_default:
            versions = {a.name: a.version for a in ab.arms}
        return {"arms": ab.names, "versions": versions, "split": split_map, "salt": ab.salt}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        body, ctype = metrics.render()
        return Response(body, 200, headers={"content-type": ctype})

    if config.limit_concurrency:  # innermost: counts requests whose body has arrived
        app.add_middleware(ConcurrencyLimitMiddleware, limit=config.limit_concurrency)
    app.add_middleware(RequestGuardMiddleware, limit=config.max_body_bytes,
                       path_limits={"/events": config.max_events_body_bytes})
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes_of=lambda: app.router.routes)
    app.include_router(complete.make_router(_model, executor, max_items=config.max_exclude,
                                            max_k=config.max_k))
    app.include_router(ask.make_router(_model, executor, max_k=config.max_k))
    app.include_router(offers_lib.make_router(_model, lambda: offers, executor,
                                              max_k=config.max_k, max_cart=config.max_exclude))
    return app


def events_schema(config: ServeConfig) -> dict:
    """The OpenAPI schema of a ``POST /events`` body (the handler checks the same rules)."""
    id_ = {"type": "string", "minLength": 1, "maxLength": config.max_id_chars}
    id_or_null = {"anyOf": [id_, {"type": "null"}]}
    event = {
        "type": "object", "additionalProperties": False,
        "required": ["event_id", "kind", "request_id"],
        "properties": {
            "event_id": {**id_, "description": "Client-chosen, unique; a repeat is a duplicate."},
            "kind": {"type": "string", "enum": list(EVENT_KINDS)},
            "request_id": {**id_, "description": "The request_id of a /recommend result."},
            "ts": {"type": ["number", "null"], "minimum": 0, "description": "Client clock, unix s."},
            "user": id_or_null, "session": id_or_null,
            "items": {"type": "array", "minItems": 1, "maxItems": config.max_k, "items": id_,
                      "description": "impression only: the items shown, position = index + 1."},
            "item": {**id_, "description": "click, cart, purchase: the item."},
            "position": {"type": ["integer", "null"], "minimum": 1},
            "value": {"type": ["number", "null"], "minimum": 0,
                      "description": "Order value; required for a purchase."},
            "quantity": {"type": ["integer", "null"], "minimum": 1},
            "platform": {"type": ["string", "null"], "minLength": 1, "maxLength": 64,
                         "description": "Where it happened: app, web, ... (per-platform "
                                        "figures in jaxreco-report)."},
        },
    }
    return {"type": "object", "required": ["events"], "additionalProperties": False,
            "properties": {"events": {"type": "array", "maxItems": config.max_events,
                                      "items": event}},
            "example": {"events": [
                {"event_id": "e1", "kind": "impression", "request_id": "9f0c...",
                 "user": "42", "items": ["260", "1210"], "ts": 1767225600.0},
                {"event_id": "e2", "kind": "purchase", "request_id": "9f0c...", "user": "42",
                 "item": "260", "position": 1, "value": 19.9, "quantity": 1}]}}


EVENT_FIELDS = ("event_id", "kind", "request_id", "ts", "user", "session", "items", "item",
                "position", "value", "quantity", "platform")
SESSION_EVENT_FIELDS = ("item", "event", "ts", "platform")


def _session_events(session: list, config: ServeConfig) -> list[dict]:
    """The events of a ``/recommend`` session (``[{"item", "event", "ts", "platform"}...]``,
    oldest first), or a 422 :class:`ApiError` naming the first bad one
    (``session[3].ts=-1: must be >= 0``)."""
    if len(session) > config.max_events:
        raise ApiError(422, f"session: {len(session)} events; at most {config.max_events} (the "
                            "server uses the latest ones anyway)")
    out, last_ts = [], None
    for i, ev in enumerate(session):
        where = f"session[{i}]"
        if not isinstance(ev, dict):
            raise ApiError(422, f"{where}={_show(ev)}: must be an object {{\"item\": id, "
                                "\"event\": type, \"ts\": unix s, \"platform\": name}")
        for k in ev:
            if k not in SESSION_EVENT_FIELDS:
                raise ApiError(422, f"{where}.{str(k)[:50]}: unknown field; a session event has "
                                    f"{list(SESSION_EVENT_FIELDS)}")
        if ev.get("item") is None:
            raise ApiError(422, f"{where}.item: field required (the item the shopper saw)")
        item = ev["item"]
        if (not isinstance(item, (str, int)) or isinstance(item, bool) or item == ""
                or len(str(item)) > config.max_id_chars):
            raise ApiError(422, f"{where}.item={_show(item)}: must be an id: a non-empty string "
                                f"or an integer of at most {config.max_id_chars} characters")
        rec: dict[str, Any] = {"item": str(item)}
        for field in ("event", "platform"):
            v = ev.get(field)
            if v is None:
                continue
            if not isinstance(v, str) or not v or len(v) > 64:
                raise ApiError(422, f"{where}.{field}={_show(v)}: must be a non-empty string of at "
                                    "most 64 characters")
            rec[field] = v
        t = ev.get("ts")
        if t is not None:
            ok = not isinstance(t, bool) and isinstance(t, (int, float))
            try:
                ok = ok and math.isfinite(float(t))
            except OverflowError:
                ok = False
            if not ok or t < 0:
                raise ApiError(422, f"{where}.ts={_show(t)}: must be a finite number >= 0 (unix "
                                    "seconds)")
            if last_ts is not None and t < last_ts:
                raise ApiError(422, f"{where}.ts={_show(t)}: earlier than the event before it "
                                    f"({_show(last_ts)}); send a session oldest first")
            last_ts = t
            rec["ts"] = float(t)
        out.append(rec)
    return out


def _show(v: Any) -> str:
    try:
        return json.dumps(v, allow_nan=False)[:80]
    except ValueError:
        return str(v)[:80]


def _event_records(body: dict, config: ServeConfig) -> list[dict]:
    """The records to write for a ``POST /events`` body, or a 422 :class:`ApiError` naming
    the first bad event, field and value (``events[3].value=-2: must be >= 0``)."""
    unknown = [str(k)[:50] for k in body if k != "events"]
    if unknown:
        raise ApiError(422, f"{unknown[0]}: unknown field; the body is {{\"events\": [...]}}")
    if "events" not in body:
        raise ApiError(422, "events: field required; the body is {\"events\": [...]}")
    evs = body["events"]
    if not isinstance(evs, list):
        raise ApiError(422, f"events={_show(evs)}: must be a list of events")
    if len(evs) > config.max_events:
        raise ApiError(422, f"events: {len(evs)} events in one request; at most "
                            f"{config.max_events} (send several requests)")
    return [_event_record(i, ev, config) for i, ev in enumerate(evs)]


def _event_record(i: int, ev: Any, config: ServeConfig) -> dict:
    where = f"events[{i}]"
    if not isinstance(ev, dict):
        raise ApiError(422, f"{where}={_show(ev)}: must be an object (an event)")
    for k in ev:
        if k not in EVENT_FIELDS:
            raise ApiError(422, f"{where}.{str(k)[:50]}: unknown field; an event has "
                                f"{list(EVENT_FIELDS)}")

    def bad(field: str, msg: str):
        value = ev.get(field)
        raise ApiError(422, f"{where}.{field}={_show(value)}: {msg}")

    def required(field: str, what: str):
        if ev.get(field) is None:
            raise ApiError(422, f"{where}.{field}: field required ({what})")
        return ev[field]

    def id_(field: str, v: Any, *, strict_str: bool = False) -> str:
        ok = isinstance(v, str) or (not strict_str and isinstance(v, int) and not isinstance(v, bool))
        if not ok or v == "" or len(str(v)) > config.max_id_chars:
            kind = "a non-empty string" if strict_str else "an id: a non-empty string or an integer"
            bad(field, f"must be {kind} of at most {config.max_id_chars} characters")
        return str(v)

    def number(field: str, lo: float, *, integer: bool):
        v = ev.get(field)
        if v is None:
            return None
        if integer:
            if isinstance(v, bool) or not isinstance(v, int):
                bad(field, "must be an integer")
            if v < lo:
                bad(field, f"must be >= {lo:g}")
            if v > 2**31 - 1:
                bad(field, f"must be <= {2**31 - 1}")
            return v
        try:
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(float(v))
        except OverflowError:
            ok = False
        if not ok:
            bad(field, "must be a finite number")
        if v < lo:
            bad(field, f"must be >= {lo:g}")
        return float(v)

    event_id = id_("event_id", required("event_id", "a unique id chosen by the client"),
                   strict_str=True)
    kind = required("kind", f"one of {list(EVENT_KINDS)}")
    if kind not in EVENT_KINDS:
        bad("kind", f"must be one of {list(EVENT_KINDS)}")
    request_id = id_("request_id", required("request_id", "the request_id of the /recommend "
                                            "result the event is about"), strict_str=True)
    rec: dict[str, Any] = {"kind": kind, "event_id": event_id, "request_id": request_id,
                           "ts": number("ts", 0, integer=False)}
    for field in ("user", "session"):
        rec[field] = None if ev.get(field) is None else id_(field, ev[field])
    if ev.get("platform") is not None:
        if not isinstance(ev["platform"], str) or not ev["platform"] or len(ev["platform"]) > 64:
            bad("platform", "must be a non-empty string of at most 64 characters (app, web, ...)")
        rec["platform"] = ev["platform"]
    if kind == "impression":
        if ev.get("item") is not None:
            bad("item", "an impression lists the items shown in 'items'; 'item' is for "
                        "click, cart and purchase events")
        items = required("items", "the items shown, in order: position = index + 1")
        if not isinstance(items, list) or not 1 <= len(items) <= config.max_k:
            bad("items", f"must be a list of 1 to {config.max_k} item ids")
        for j, x in enumerate(items):
            ok = (isinstance(x, str) or isinstance(x, int) and not isinstance(x, bool))
            if not ok or x == "" or len(str(x)) > config.max_id_chars:
                raise ApiError(422, f"{where}.items[{j}]={_show(x)}: must be an id: a non-empty "
                                    f"string or an integer of at most {config.max_id_chars} characters")
        rec["items"] = [str(x) for x in items]
    else:
        if ev.get("items") is not None:
            bad("items", f"only impression events list 'items'; a {kind} names one 'item'")
        rec["item"] = id_("item", required("item", f"the item of the {kind}"))
    position = number("position", 1, integer=True)
    value = number("value", 0, integer=False)
    quantity = number("quantity", 1, integer=True)
    if kind == "purchase" and value is None:
        raise ApiError(422, f"{where}.value: field required (the order value of a purchase, >= 0)")
    for field, v in (("position", position), ("value", value), ("quantity", quantity)):
        if v is not None:
            rec[field] = v
    return rec


PREDICT_CTR_SCHEMA = {
    "type": "object", "required": ["user", "item"],
    "properties": {
        "user": {"type": "array", "minItems": 1, "items": {"type": ["string", "integer"]},
                 "description": "Raw user ids."},
        "item": {"type": "array", "minItems": 1, "items": {"type": ["string", "integer"]},
                 "description": "Raw item ids, one per user."},
    },
    "additionalProperties": {"type": "array", "items": {"type": "integer"},
                             "description": "One list per context feature of the model "
                                            "(e.g. position), integer values."},
    "example": {"user": ["u1", "u2"], "item": ["17", "42"], "position": [1, 3]},
}


def _predict_ctr_inputs(body: dict, m: ServedModel, config: ServeConfig):
    """``(users, items, {feature: values})`` of a ``/predict_ctr`` body, or a 422 naming
    the field that is missing, unknown or bad."""
    ctx = m.context_features
    fields = ["user", "item", *ctx]
    takes = f"this model's predict_ctr takes {fields}, one list each of the same length"
    missing = [f for f in fields if f not in body]
    if missing:
        raise ApiError(422, f"missing field(s) {missing}: {takes}")
    unknown = [str(k)[:50] for k in body if k not in fields]
    if unknown:
        raise ApiError(422, f"unknown field(s) {unknown[:5]}: {takes}")
    n = len(body["user"]) if isinstance(body["user"], list) else None
    for f in fields:
        v = body[f]
        if not isinstance(v, list):
            raise ApiError(422, f"{f}: must be a list (one value per row); got "
                                f"{type(v).__name__}")
        if not 1 <= len(v) <= config.max_batch:
            raise ApiError(422, f"{f}: has {len(v)} values; must have 1 to "
                                f"{config.max_batch}")
        if len(v) != n:
            raise ApiError(422, f"{f}: has {len(v)} values but user has {n}; every field "
                                "needs one value per row")
    ids = {}
    for f in ("user", "item"):
        for j, x in enumerate(body[f]):
            if isinstance(x, bool) or not isinstance(x, (str, int)):
                raise ApiError(422, f"{f}[{j}]: must be an id (a string or an integer); got "
                                    f"{type(x).__name__}")
            if len(str(x)) > config.max_id_chars:
                raise ApiError(422, f"{f}[{j}]: ids are at most {config.max_id_chars} "
                                    "characters")
        ids[f] = [str(x) for x in body[f]]
    context = {}
    for f, spec in ctx.items():
        size = int(spec["vocab_size"])
        for j, x in enumerate(body[f]):
            if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < size:
                raise ApiError(422, f"{f}[{j}]={json.dumps(x)[:50]}: must be an integer in "
                                    f"[0, {size}) (the values of {f} in the training data)")
        context[f] = [int(x) for x in body[f]]
    return ids["user"], ids["item"], context
