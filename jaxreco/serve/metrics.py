"""Prometheus metrics of one server process (``GET /metrics``), in its own registry.

- ``jaxreco_http_requests_total{endpoint, status}`` and
  ``jaxreco_http_request_duration_seconds{endpoint, status}`` (histogram): every HTTP
  request, ``endpoint`` being the route template (``/v1/models/{name}:predict``), or
  ``unmatched`` for paths that no route serves (404s).
- ``jaxreco_served_total{arm, model_version}``: ``/recommend`` result entries (one per user).
- ``jaxreco_events_total{kind, arm, model_version}``: events written (duplicates not
  counted); ``arm``/``model_version`` are ``unknown`` where the request_id was not recent.
- ``jaxreco_event_duplicates_total``, ``jaxreco_events_rejected_total`` (422 bodies),
  ``jaxreco_served_records_dropped_total`` (queue full), ``jaxreco_event_commit_seconds``
  (a ``POST /events`` batch from hand-off to fsync).
- ``jaxreco_http_guard_total{reason}``: connections the HTTP layer closed or refused
  (``header_timeout``, ``body_timeout``, ``client_connections``, ``max_connections``,
  ``malformed``; :mod:`jaxreco.serve.guard`).

A request the application finished without answering -- the client went away, or the
body timeout cut it off -- is counted with ``status="499"`` (nginx's "client closed
request"), not as a 500.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest
from starlette.routing import Match

UNKNOWN = "unknown"
CLIENT_GONE = 499  # the application returned without answering: the client went away
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("jaxreco_http_requests_total", "HTTP requests answered.",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("jaxreco_http_request_duration_seconds",
                                 "Time from the request to the end of the answer.",
                                 ["endpoint", "status"], buckets=_LATENCY_BUCKETS, registry=r)
        self.served = Counter("jaxreco_served_total", "Recommendation lists served (one per user).",
                              ["arm", "model_version"], registry=r)
        self.events = Counter("jaxreco_events_total", "Shopper events written to the event log.",
                              ["kind", "arm", "model_version"], registry=r)
        self.duplicates = Counter("jaxreco_event_duplicates_total",
                                  "Events acknowledged but not written again (event_id seen).",
                                  registry=r)
        self.rejected = Counter("jaxreco_events_rejected_total",
                                "POST /events bodies refused by validation (422).", registry=r)
        self.served_dropped = Counter("jaxreco_served_records_dropped_total",
                                      "Served records not logged because the writer queue was full.",
                                      registry=r)
        self.guard = Counter("jaxreco_http_guard_total",
                             "Connections the HTTP layer closed or refused, by reason.",
                             ["reason"], registry=r)
        self.commit = Histogram("jaxreco_event_commit_seconds",
                                "A POST /events batch: from hand-off to the writer until fsynced.",
                                buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def label(v) -> str:
    """A Prometheus label value: ``unknown`` for None."""
    return UNKNOWN if v is None else str(v)


class MetricsMiddleware:
    """Counts and times every HTTP request by route template and status (outermost, so
    413s and other answers of the inner middleware count too)."""

    def __init__(self, app, metrics: ServeMetrics, routes_of):
        self.app, self.metrics, self._routes_of = app, metrics, routes_of
        self._static: dict[tuple[str, str], str] = {}

    def _endpoint(self, scope) -> str:
        key = (scope.get("method", ""), scope.get("path", ""))
        hit = self._static.get(key)
        if hit is not None:
            return hit
        partial = None
        for route in self._routes_of():
            try:
                match, _ = route.matches(scope)
            except Exception:  # noqa: BLE001 - a route that cannot match this scope
                continue
            if match == Match.FULL:
                path = getattr(route, "path", "unmatched")
                if path == key[1] and len(self._static) < 256:
                    self._static[key] = path
                return path
            if match == Match.PARTIAL and partial is None:
                partial = getattr(route, "path", None)
        return partial or "unmatched"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status, started = 500, False

        async def send_wrapper(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
            if not started:
                status = CLIENT_GONE
        finally:
            endpoint = self._endpoint(scope)
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint, str(status)).observe(time.perf_counter() - t0)
