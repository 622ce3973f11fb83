"""Guards against slow and greedy clients: the connection layer and the requests in flight.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but never a client that
sends its request slowly: a connection that trickles one header byte every few seconds
stays open forever ("slowloris"). :func:`guarded_protocol` returns a subclass of uvicorn's
``HttpToolsProtocol`` (pass it as ``uvicorn.run(..., http=cls)``) that adds:

- **header timeout**: a request's line and headers must arrive within ``header_timeout_s``,
  counted from the connection's opening for its first request and from the first byte for
  later ones. Late: ``408 {"error": ...}`` if part of a request arrived, then close.
- **body timeout**: the whole body must arrive within ``body_timeout_s`` of the end of the
  headers. Late: ``408 {"error": ...}``, close; the application sees a disconnect.
- **per-client bound**: at most ``max_connections_per_client`` open connections per source
  address, and ``max_connections`` in all. A connection over either bound is answered
  ``503 {"error": ...}`` (``Connection: close``) as soon as its request headers arrive, and
  closed after ``REJECT_WAIT_S`` if they do not.
- **JSON errors**: a request httptools cannot parse gets ``400 {"error": ...}`` instead of
  uvicorn's plain text.

So a slow client holds a connection for at most the header (or body) timeout, one address
holds at most ``max_connections_per_client`` of them, and none of that counts toward the
requests in flight: :class:`ConcurrencyLimitMiddleware` (``--limit-concurrency``) counts
requests whose whole body has arrived, and answers ``503 {"error": ...}`` beyond them.
``on_event(reason)`` is called for every connection closed or refused by the connection
guards (``header_timeout``, ``body_timeout``, ``client_connections``, ``max_connections``,
``malformed``), e.g. to count them in Prometheus.

A per-address bound cannot tell two clients behind one address (a NAT, a proxy, an
ingress) apart: behind a proxy, raise ``max_connections_per_client`` to ``max_connections``
and let the proxy bound its clients.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Callable

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger(__name__)

REJECT_WAIT_S = 1.0     # how long a refused connection may take to send its request headers
_LOG_EVERY_S = 10.0     # at most one warning per (reason, address) this often


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections_per_client: int = 64
    max_connections: int = 1024

    def check(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        for name in ("max_connections_per_client", "max_connections"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")


class _Shared:
    """Connection counts of one server (all its protocol instances share one)."""

    def __init__(self):
        self.per_client: dict[str, int] = {}
        self.total = 0
        self.refused_open = 0
        self.last_log: dict[tuple[str, str], float] = {}

    def warn(self, reason: str, addr: str, msg: str, *args) -> None:
        now = time.monotonic()
        key = (reason, addr)
        if now - self.last_log.get(key, -1e9) < _LOG_EVERY_S:
            return
        if len(self.last_log) > 10_000:
            self.last_log.clear()
        self.last_log[key] = now
        log.warning(msg, *args)


def json_error_bytes(status: int, message: str, default_headers=()) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response with body ``{"error": message}``."""
    body = json.dumps({"error": message}).encode()
    head = [STATUS_LINE[status]]
    for name, value in default_headers:
        head += [name, b": ", value, b"\r\n"]
    head += [b"content-type: application/json\r\n",
             b"content-length: " + str(len(body)).encode() + b"\r\n",
             b"connection: close\r\n"]
    if status == 503:
        head.append(b"retry-after: 1\r\n")
    return b"".join(head) + b"\r\n" + body


def _refusing_app(message: str):
    async def app(scope, receive, send):
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": body})
    return app


def guarded_protocol(config: GuardConfig = GuardConfig(),
                     on_event: Callable[[str], None] | None = None) -> type[HttpToolsProtocol]:
    """A ``HttpToolsProtocol`` subclass enforcing ``config`` (one class per server: the
    connection counts live in it)."""
    config.check()
    shared = _Shared()
    notify = on_event or (lambda reason: None)

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        guard = config

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = None
            self._body_timer = None
            self._partial = False       # some bytes of a request whose headers are not complete
            self._admitted = False
            self._refused = False
            self._addr = self.client[0] if self.client else ""
            reason = None
            if shared.total >= config.max_connections:
                reason = "max_connections"
                message = (f"server busy: {config.max_connections} connections open "
                           "(--max-connections); retry shortly")
            elif self._addr and shared.per_client.get(self._addr, 0) >= config.max_connections_per_client:
                reason = "client_connections"
                message = (f"too many connections from {self._addr}: at most "
                           f"{config.max_connections_per_client} at once "
                           "(--max-connections-per-client); reuse keep-alive connections")
            if reason is None:
                self._admitted = True
                shared.total += 1
                if self._addr:
                    shared.per_client[self._addr] = shared.per_client.get(self._addr, 0) + 1
                self._arm_header_timer(config.header_timeout_s)
                return
            notify(reason)
            shared.warn(reason, self._addr, "refusing a connection from %s: %s", self._addr or "?",
                        message)
            if shared.refused_open >= config.max_connections:  # a flood: do not wait
                transport.close()
                return
            self._refused = True
            shared.refused_open += 1
            self.app = _refusing_app(message)
            self._refusal = message
            self._arm_header_timer(min(REJECT_WAIT_S, config.header_timeout_s))

        def connection_lost(self, exc) -> None:
            self._cancel_timers()
            if self._admitted:
                self._admitted = False
                shared.total -= 1
                if self._addr:
                    n = shared.per_client.get(self._addr, 1) - 1
                    if n > 0:
                        shared.per_client[self._addr] = n
                    else:
                        shared.per_client.pop(self._addr, None)
            if self._refused:
                self._refused = False
                shared.refused_open -= 1
            super().connection_lost(exc)

        # ---------------------------------------------------------------- timers
        def _arm_header_timer(self, seconds: float) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._header_timeout, seconds)

        def _cancel_timers(self) -> None:
            for name in ("_header_timer", "_body_timer"):
                t = getattr(self, name, None)
                if t is not None:
                    t.cancel()
                    setattr(self, name, None)

        def _close_with(self, status: int, message: str) -> None:
            if not self.transport.is_closing():
                self.transport.write(json_error_bytes(status, message,
                                                      self.server_state.default_headers))
                self.transport.close()

        def _header_timeout(self, seconds: float) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            busy = self.cycle is not None and not self.cycle.response_complete
            if self._refused:
                if self._partial and not busy:
                    self._close_with(503, self._refusal)
                else:
                    self.transport.close()
                return
            notify("header_timeout")
            shared.warn("header_timeout", self._addr, "closing a connection from %s: request "
                        "headers not complete within %g s (--header-timeout)", self._addr, seconds)
            if self._partial and not busy:
                self._close_with(408, f"request headers not complete within {seconds:g} s "
                                      "(--header-timeout); send the whole request at once")
            else:  # idle since it opened, or a pipelined request behind a running one
                self.transport.close()

        def _body_timeout(self) -> None:
            self._body_timer = None
            cycle = self.cycle
            if self.transport.is_closing() or cycle is None or cycle.response_complete:
                return
            notify("body_timeout")
            secs = config.body_timeout_s
            shared.warn("body_timeout", self._addr, "closing a connection from %s: request "
                        "body not complete within %g s (--body-timeout)", self._addr, secs)
            if not cycle.response_started:
                self.transport.write(json_error_bytes(
                    408, f"request body not complete within {secs:g} s (--body-timeout)",
                    self.server_state.default_headers))
            cycle.disconnected = True  # the application's receive() now returns a disconnect
            cycle.message_event.set()
            self.transport.close()

        # ---------------------------------------------------------------- parser callbacks
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._partial = True
            self._arm_header_timer(config.header_timeout_s)

        def on_headers_complete(self) -> None:
            self._partial = False
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().on_headers_complete()
            if self._body_timer is None and not self.transport.is_closing():
                self._body_timer = self.loop.call_later(config.body_timeout_s, self._body_timeout)

        def on_message_complete(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            super().on_message_complete()

        def send_400_response(self, msg: str) -> None:
            notify("malformed")
            self._cancel_timers()
            self._close_with(400, "malformed HTTP request: the request line or a header could "
                                  "not be parsed as HTTP/1.1")

    return GuardedHttpToolsProtocol


# ---------------------------------------------------------------------- requests in flight
class ConcurrencyLimitMiddleware:
    """Answers ``503 {"error": ...}`` while ``limit`` requests are already in the application.

    It sits inside :class:`RequestGuardMiddleware`, so a request counts only once its whole
    body has arrived: slow clients, which the connection layer times out, never use up the
    budget of valid ones. The probes and ``/metrics`` are never refused (an orchestrator
    must not restart a busy server). Refusals are logged at most once a second, with their
    count; ``jaxreco_http_requests_total{status="503"}`` counts every one.
    """

    EXEMPT = frozenset({"/healthz", "/readyz", "/metrics"})

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit
        self.active = 0
        self._refused, self._last_log = 0, 0.0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in self.EXEMPT:
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            self._refused += 1
            now = time.monotonic()
            if now - self._last_log >= 1.0:
                log.warning("Exceeded concurrency limit: refused %d request(s) since the last "
                            "such line (--limit-concurrency %d requests in flight)",
                            self._refused, self.limit)
                self._refused, self._last_log = 0, now
            body = json.dumps({"error": f"server busy: {self.limit} requests in flight "
                                        "(--limit-concurrency); retry shortly"}).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()), (b"retry-after", b"1")]})
            return await send({"type": "http.response.body", "body": body})
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
