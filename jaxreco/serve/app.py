"""The HTTP service: TF-Serving-compatible REST plus ``/recommend`` and ``/similar``.

Endpoints (all JSON; errors are ``{"error": "<what was wrong>"}`` with a 4xx status):

- ``GET  /healthz``                     liveness: the process answers.
- ``GET  /readyz``                      readiness: 200 once a model version is loaded, else 503.
- ``GET  /v1/models/{name}``            TF Serving model status.
- ``GET  /v1/models/{name}/metadata``   TF Serving signature metadata.
- ``POST /v1/models/{name}:predict``    TF Serving predict (``instances`` or ``inputs``).
- ``POST /recommend``                   top-k for users, business rules applied, cold start.
- ``POST /similar``                     items that go together with given items.
- ``POST /predict_ctr``                 click (per-head) probabilities of (user, item,
                                        context) rows; models exported from ctr runs.
- ``GET  /openapi.json``                this API's schema.

Scoring runs on one worker thread; concurrent ``/recommend`` requests are merged into one
``user_scores`` call (micro-batching without a wait window: whatever queued while the
previous call ran), then each request's rules and top-k run vectorised in numpy.
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
from typing import Annotated, Any, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxreco.serve import layout
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

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
            scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    return await _asgi_error(send, 400, "invalid Content-Length header")
                if n > self.limit:
                    return await _asgi_error(
                        send, 413, f"request body of {n} bytes exceeds the limit of {self.limit} bytes")
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
            if size > self.limit:
                return await _asgi_error(
                    send, 413, f"request body exceeds the limit of {self.limit} bytes")
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
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------- micro-batcher
class _Batcher:
    """Runs ``fn(model, [payload...])`` on the worker thread for whatever has queued."""

    def __init__(self, executor, fn, max_items: int):
        self._executor, self._fn, self._max = executor, fn, max_items
        self._queue: collections.deque[tuple[Any, int, asyncio.Future]] = collections.deque()
        self._running = False

    async def submit(self, manager: ModelManager, payload, size: int):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append((payload, size, fut))
        if not self._running:
            self._running = True
            loop.create_task(self._drain(manager))
        return await fut

    async def _drain(self, manager: ModelManager):
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch, total = [], 0
                while self._queue and (not batch or total + self._queue[0][1] <= self._max):
                    p = self._queue.popleft()
                    batch.append(p)
                    total += p[1]
                model = manager.current  # one version for the whole batch
                try:
                    results = await loop.run_in_executor(
                        self._executor, self._fn, model, [p[0] for p in batch])
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


def _recommend_batch(model: ServedModel, payloads: list[dict]) -> list[dict]:
    """Worker thread: one ``user_scores`` call for all requests, then rules per request."""
    users = [u for p in payloads for u in p["users"]]
    scores, known = model.user_scores(users)
    out, start = [], 0
    for p in payloads:
        n = len(p["users"])
        s, kn = scores[start:start + n], known[start:start + n]
        start += n
        extra = model.item_indices(p["exclude_items"]) if p["exclude_items"] else None
        idx, vals = top_k(s, p["k"], model.rules, extra)
        promoted = model.rules.is_promoted
        out.append({"model_version": model.version, "results": [
            {"user": u, "cold_start": not bool(kn[r]),
             "items": [{"item": model.item_ids[i], "score": float(v), "promoted": bool(promoted[i])}
                       for i, v in zip(idx[r].tolist(), vals[r].tolist())]}
            for r, u in enumerate(p["users"])]})
    return out


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
    return {"model_version": model.version, "results": results}


def _jsonable(a: np.ndarray) -> Any:
    if a.dtype == object:
        return np.vectorize(lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else b,
                            otypes=[object])(a).tolist() if a.size else a.tolist()
    if a.dtype.kind == "f":
        a = np.where(np.isfinite(a), a, 0.0)  # JSON has no inf/nan; excluded items are finite
    return a.tolist()


# ---------------------------------------------------------------------- the app
def create_app(manager: ModelManager, config: ServeConfig = ServeConfig(), *,
               start_polling: bool = True) -> FastAPI:
    """Builds the ASGI app around a :class:`ModelManager` (started on app start-up)."""
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
        """Exactly one of ``user`` and ``users``."""
        user: Id | None = None
        users: list[Id] | None = Field(None, min_length=1, max_length=config.max_batch)
        k: StrictInt = Field(10, ge=1, le=config.max_k)
        exclude_items: list[Id] = Field(default_factory=list, max_length=config.max_exclude,
                                        description="Items not to recommend in this request.")

        @model_validator(mode="after")
        def _one(self):
            if (self.user is None) == (self.users is None):
                raise ValueError("give exactly one of 'user' (one id) and 'users' (a list of ids)")
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

    class UserResult(BaseModel):
        user: str
        cold_start: bool = Field(description="Unknown user: the items are the most popular ones.")
        items: list[ScoredItem]

    class RecommendResponse(BaseModel):
        model_version: int
        results: list[UserResult]

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

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        signature_name: StrictStr = layout.SIG_DEFAULT
        instances: list[Any] | None = Field(None, min_length=1, max_length=config.max_batch)
        inputs: dict[str, Any] | Any | None = None

    errors = {400: {"model": ErrorBody}, 404: {"model": ErrorBody}, 413: {"model": ErrorBody},
              503: {"model": ErrorBody}}

    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="scorer")
    batcher = _Batcher(executor, _recommend_batch, max_items=config.max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_polling:
            manager.start()
        yield
        manager.stop()
        executor.shutdown(wait=True)

    app = FastAPI(title="jaxreco serving", version="1", lifespan=lifespan,
                  description="Recommendations from a jaxreco SavedModel; TF-Serving-compatible REST.")
    app.state.manager, app.state.config = manager, config

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
            raise ApiError(503, f"no model loaded yet from {manager.model_dir}")
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
        if m is None:
            return _err(503, f"not ready: no model version loaded from {manager.model_dir}")
        return {"status": "ready", "model_version": m.version}

    # ---------------------------------------------------------------- TF Serving REST
    @app.get("/v1/models/{name}", responses=errors)
    async def model_status(name: str):
        _check_name(name)
        sts = sorted(manager.statuses.values(), key=lambda s: -s.version)
        if not sts:
            raise ApiError(404, f"model {name!r} has no version yet under {manager.model_dir}")
        return {"model_version_status": [
            {"version": str(s.version), "state": s.state,
             "status": {"error_code": "OK" if not s.error else "UNKNOWN",
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
            raise ApiError(404, f"version {version} of model {name!r} is not loaded; "
                                f"serving version {m.version}")
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
            raise ApiError(400, str(e)) from None
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
    @app.post("/recommend", response_model=RecommendResponse, responses=errors)
    async def recommend(req: RecommendRequest):
        m = _model()
        _check_k(req.k, m.num_items)
        users = _ids_check([req.user] if req.users is None else req.users, "users")
        payload = {"users": users, "k": req.k,
                   "exclude_items": _ids_check(req.exclude_items, "exclude_items")}
        return _json(await batcher.submit(manager, payload, len(users)))

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

    app.add_middleware(RequestGuardMiddleware, limit=config.max_body_bytes)
    return app


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
