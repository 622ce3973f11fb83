"""The promotions catalogue: coupons and discount campaigns, validated, hot-reloaded, and
the coupons a shopper can use now (pure Python + numpy: the server imports it).

A catalogue is a JSON file (or an ``http(s)://`` URL)::

    {"coupons": [
      {"id": "SPRING10",
       "discount": {"percent": 10},            # or {"amount": 5.0} (currency units)
       "min_spend": 20.0,                      # basket total before the discount; default 0
       "items": ["196", "14084"],              # eligible items; omitted or [] with no
       "categories": ["dairy"],                #   categories either: every item is eligible
       "valid_from": "2026-03-01T00:00:00Z",   # ISO 8601 with a zone, or unix seconds
       "valid_until": "2026-03-31T23:59:59Z",
       "users": ["1", "2"],                    # per-user eligibility; omitted: everyone
       "budget": 1000.0,                       # total discount money the coupon may give
       "margin": 0.3}                          # item margin the offer ranking uses (0..1)
    ]}

Every error names the entry and field (``coupons[3] (id 'X').valid_until: ...``). A coupon
is *offerable* to user ``u`` at time ``t`` iff ``valid_from <= t < valid_until``, its budget
is not spent (``spent < budget``, the spent amounts come from the caller, e.g. the event log)
and ``u`` is eligible; :meth:`Catalogue.offerable` never returns any other.

:class:`CatalogueWatcher` reloads the file when it changes (size, mtime): the new catalogue
replaces the old in one reference swap (a request holds the one it started with, so no
request is dropped or sees half a file); an invalid new file keeps the old catalogue and
:attr:`CatalogueWatcher.last_error` says why.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import os
import threading
import urllib.request
from typing import Any, Mapping

log = logging.getLogger(__name__)

_FIELDS = {"id", "discount", "min_spend", "items", "categories", "valid_from", "valid_until",
           "users", "budget", "margin"}


class CatalogueError(ValueError):
    """A bad catalogue; the message names the source, entry and field."""


@dataclasses.dataclass(frozen=True)
class Coupon:
    id: str
    percent: float | None            # exactly one of percent and amount
    amount: float | None
    min_spend: float
    items: frozenset[str]
    categories: frozenset[str]
    valid_from: float                # unix seconds
    valid_until: float
    users: frozenset[str] | None     # None: every user
    budget: float
    margin: float

    def discount_on(self, price: float) -> float:
        """The money this coupon takes off an eligible item of ``price``."""
        return price * self.percent / 100.0 if self.percent is not None else min(self.amount, price)

    def covers(self, item: str, category: str | None) -> bool:
        if not self.items and not self.categories:
            return True
        return item in self.items or (category is not None and category in self.categories)

    def active(self, now: float) -> bool:
        return self.valid_from <= now < self.valid_until


def parse_time(v: Any) -> float | None:
    """Unix seconds of ``v``: finite unix seconds, or an ISO 8601 string with a zone
    (``2026-03-01T00:00:00Z``); None for anything else (a bool, a time without a zone)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, str):
        try:
            t = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            return None
        return t.timestamp() if t.tzinfo is not None else None
    return None


def _time(v: Any, where: str) -> float:
    t = parse_time(v)
    if t is not None:
        return t
    if isinstance(v, str):
        raise CatalogueError(f"{where}={v!r}: not an ISO 8601 time with a zone "
                             "(e.g. 2026-03-01T00:00:00Z)")
    raise CatalogueError(f"{where}: expected an ISO 8601 time with a zone or unix seconds; "
                         f"got {v!r:.100}")


def _number(d: Mapping, key: str, where: str, *, lo: float, hi: float = math.inf,
            default: float | None = None, lo_open: bool = False) -> float:
    if key not in d:
        if default is None:
            raise CatalogueError(f"{where}.{key}: required")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise CatalogueError(f"{where}.{key}={v!r:.100}: must be a finite number")
    if v < lo or (lo_open and v == lo) or v > hi:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise CatalogueError(f"{where}.{key}={v!r}: must lie in {rng}")
    return float(v)


def _ids(d: Mapping, key: str, where: str) -> frozenset[str] | None:
    if key not in d or d[key] is None:
        return None
    v = d[key]
    if not isinstance(v, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool)
                                          for x in v):
        raise CatalogueError(f"{where}.{key}: must be a list of ids (strings or integers); "
                             f"got {v!r:.100}")
    return frozenset(str(x) for x in v)


def parse_coupon(d: Any, where: str) -> Coupon:
    if not isinstance(d, dict):
        raise CatalogueError(f"{where}: must be an object; got {type(d).__name__}")
    cid = d.get("id")
    if not isinstance(cid, str) or not cid:
        raise CatalogueError(f"{where}.id: must be a non-empty string; got {cid!r:.100}")
    where = f"{where} (id {cid!r})"
    unknown = sorted(set(d) - _FIELDS)
    if unknown:
        raise CatalogueError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
    disc = d.get("discount")
    if not isinstance(disc, dict) or len(disc) != 1 or next(iter(disc)) not in ("percent", "amount"):
        raise CatalogueError(f"{where}.discount: must be {{\"percent\": p}} or "
                             f"{{\"amount\": a}}; got {disc!r:.100}")
    percent = amount = None
    if "percent" in disc:
        percent = _number(disc, "percent", f"{where}.discount", lo=0, hi=100, lo_open=True)
    else:
        amount = _number(disc, "amount", f"{where}.discount", lo=0, lo_open=True)
    valid_from = _time(d["valid_from"], f"{where}.valid_from") if "valid_from" in d else None
    valid_until = _time(d["valid_until"], f"{where}.valid_until") if "valid_until" in d else None
    if valid_from is None or valid_until is None:
        raise CatalogueError(f"{where}.{'valid_from' if valid_from is None else 'valid_until'}: "
                             "required (a coupon without a window would never end)")
    if valid_until <= valid_from:
        raise CatalogueError(f"{where}.valid_until: must be after valid_from")
    return Coupon(cid, percent, amount, _number(d, "min_spend", where, lo=0, default=0.0),
                  _ids(d, "items", where) or frozenset(), _ids(d, "categories", where) or frozenset(),
                  valid_from, valid_until, _ids(d, "users", where),
                  _number(d, "budget", where, lo=0), _number(d, "margin", where, lo=0, hi=1))


@dataclasses.dataclass(frozen=True)
class Catalogue:
    coupons: tuple[Coupon, ...] = ()
    source: str = "<empty>"

    @classmethod
    def from_dict(cls, d: Any, source: str) -> "Catalogue":
        if not isinstance(d, dict) or set(d) != {"coupons"} or not isinstance(d["coupons"], list):
            raise CatalogueError(f"{source}: expected {{\"coupons\": [...]}}; got "
                                 f"{(sorted(d) if isinstance(d, dict) else type(d).__name__)!r}")
        coupons, seen = [], {}
        for n, e in enumerate(d["coupons"]):
            c = parse_coupon(e, f"{source}: coupons[{n}]")
            if c.id in seen:
                raise CatalogueError(f"{source}: coupons[{n}].id={c.id!r} repeats "
                                     f"coupons[{seen[c.id]}]")
            seen[c.id] = n
            coupons.append(c)
        return cls(tuple(coupons), source)

    @classmethod
    def load(cls, source: str | os.PathLike) -> "Catalogue":
        source = str(source)
        try:
            if source.startswith(("http://", "https://")):
                with urllib.request.urlopen(source, timeout=10) as r:
                    text = r.read().decode("utf-8")
            else:
                with open(source, encoding="utf-8") as f:
                    text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise CatalogueError(f"cannot read promotions catalogue {source}: {e}") from e
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise CatalogueError(f"{source}: not valid JSON: {e}") from e
        return cls.from_dict(d, source)

    def offerable(self, user: str | None, now: float,
                  spent: Mapping[str, float] | None = None) -> list[Coupon]:
        """The coupons ``user`` may use at ``now``: in their window, budget not spent
        (``spent[id]`` money already given), the user eligible."""
        spent = spent or {}
        return [c for c in self.coupons
                if c.active(now) and spent.get(c.id, 0.0) < c.budget
                and (c.users is None or (user is not None and user in c.users))]


class CatalogueWatcher:
    """Holds the current :class:`Catalogue` of ``source`` and reloads it when the file
    changes (:meth:`poll`, called by the server's poller); an invalid new file keeps the
    old catalogue and sets :attr:`last_error`."""

    def __init__(self, source: str | os.PathLike):
        self.source = str(source)
        self.current = Catalogue.load(self.source)      # the first load must succeed
        self.last_error: str | None = None
        self._stamp = self._stat()
        self._lock = threading.Lock()

    def _stat(self):
        if self.source.startswith(("http://", "https://")):
            return None                                  # a URL is re-read on every poll
        try:
            st = os.stat(self.source)
        except OSError:
            return "missing"
        return (st.st_size, st.st_mtime_ns)

    def poll(self) -> bool:
        """Reloads if the source changed; True when a new catalogue was installed."""
        with self._lock:
            stamp = self._stat()
            if stamp is not None and stamp == self._stamp:
                return False
            self._stamp = stamp
            try:
                new = Catalogue.load(self.source)
            except CatalogueError as e:
                self.last_error = f"kept the previous catalogue ({len(self.current.coupons)} " \
                                  f"coupons): {e}"
                log.warning("promotions: %s", self.last_error)
                return False
            if new == self.current:
                return False
            self.current, self.last_error = new, None
            log.info("promotions: loaded %d coupons from %s", len(new.coupons), self.source)
            return True
