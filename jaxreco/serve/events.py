"""Durable event log: append-only JSON-lines segments, one writer per replica.

Layout of ``--events-dir`` (shared by all replicas; each writes only its own files)::

    events-<replica>-<seq:08d>.jsonl        closed segments: every line complete
    events-<replica>-<seq:08d>.jsonl.open   the segment being written (at most one per
                                            live replica); its last line may be partial
    .events-<replica>.lock                  held (flock) by the live writer of <replica>

One record per line, UTF-8 JSON, ``served`` records (one per ``/recommend`` result) and
shopper events (``impression``, ``click``, ``cart``, ``purchase``) in the same segments, in
the order they were written. docs/serving.md ("Events and A/B") lists the fields.

**Group commit.** Requests hand their records to one writer thread. It takes everything
queued, writes the lines in one ``write``, ``fsync``\\s the file, and only then resolves each
request's future: a ``POST /events`` answer means its records are on disk. A new segment is
created and the directory ``fsync``\\ed before the first acknowledgement in it.

**Rotation.** Once the open segment reaches ``segment_bytes`` (after the batch that crossed
it) or is ``segment_seconds`` old, it is (already) fsynced, closed, renamed to ``.jsonl``
and the directory fsynced; the next batch opens ``seq + 1``.

**Restart.** :meth:`EventLog.start` takes the replica's lock, then for each of its own
leftover ``.open`` segments keeps the lines up to the first partial or unparsable one
(only unacknowledged data can follow it), truncates, fsyncs and renames it to ``.jsonl``;
writing continues at the next sequence number. It reloads the event ids of its own most
recent segments so that a retried event is still recognised as a duplicate: at most
``dedup_ids`` ids, from segments modified in the last ``dedup_seconds`` (about 150 bytes of
memory per id). Duplicates across replicas, or older than that window, are written again;
readers de-duplicate by ``event_id``.

:func:`read_segments` reads the records back (all replicas, segment order), skipping the
partial last line of a segment still being written. Stdlib only.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)

SEGMENT_RE = re.compile(r"^events-(?P<replica>.+)-(?P<seq>[0-9]{8})\.jsonl(?P<open>\.open)?$")
REPLICA_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
EVENT_KINDS = ("impression", "click", "cart", "purchase")
MAX_SEQ = 10**8 - 1


class EventLogError(RuntimeError):
    """The event log cannot start or cannot write; the message names the path and cause."""


class EventLogFull(EventLogError):
    """More records are queued than ``max_queue``: the disk is not keeping up."""


def segment_name(replica: str, seq: int, *, open_: bool = False) -> str:
    return f"events-{replica}-{seq:08d}.jsonl" + (".open" if open_ else "")


@dataclasses.dataclass(frozen=True)
class Segment:
    path: Path
    replica: str
    seq: int
    open: bool


def list_segments(directory: str | os.PathLike) -> list[Segment]:
    """The segment files in ``directory``, in (replica, seq) order; where a segment is
    listed under both names (closed while listing), the closed one."""
    found: dict[tuple[str, int], Segment] = {}
    for name in os.listdir(directory):
        m = SEGMENT_RE.match(name)
        if not m:
            continue
        s = Segment(Path(directory) / name, m["replica"], int(m["seq"]), bool(m["open"]))
        key = (s.replica, s.seq)
        if key not in found or found[key].open:
            found[key] = s
    return [found[k] for k in sorted(found)]


# ----------------------------------------------------------------------------- reading
def _local_path(path_or_url: str | os.PathLike) -> Path:
    s = os.fspath(path_or_url)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", s):
        raise ValueError(f"{s}: read_segments reads local paths and file:// URLs; for another "
                         "filesystem pass it as fs=, e.g. fs, p = fsspec.core.url_to_fs(url); "
                         "read_segments(p, fs=fs)")
    return Path(s)


def _lines(f, name: str) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` of each complete line; a last line without ``\\n`` (a write
    cut short) is skipped."""
    for no, line in enumerate(f, 1):
        if not line.endswith(b"\n"):
            log.debug("%s: skipping a partial last line (%d bytes)", name, len(line))
            return
        yield no, line


def _read_one(opener, path: str, name: str, strict: bool) -> Iterator[dict]:
    with opener(path) as f:
        for no, line in _lines(f, name):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                if strict:
                    raise ValueError(f"{name}:{no}: not a JSON record ({e}); the segment is "
                                     "corrupt (pass strict=False to skip such lines)") from None
                log.warning("%s:%d: skipping a line that is not JSON (%s)", name, no, e)
                continue
            if not isinstance(rec, dict):
                if strict:
                    raise ValueError(f"{name}:{no}: not a JSON object: {line[:100]!r}")
                continue
            yield rec


def read_segments(path_or_url: str | os.PathLike, *, fs=None, strict: bool = True
                  ) -> Iterator[dict[str, Any]]:
    """Every record of the segments at ``path_or_url`` (an events directory, or one segment
    file), in (replica, seq, line) order.

    A partial last line (no final newline: a write still going on, or cut short by a crash)
    is skipped. A complete line that is not a JSON object raises ``ValueError`` naming
    ``file:line`` (``strict=False``: logged and skipped). Local paths and ``file://`` URLs
    are read directly; another filesystem is passed as ``fs`` (an fsspec filesystem, with
    ``isdir``, ``ls`` and ``open``) with the path on it. A segment renamed from ``.open`` to
    ``.jsonl`` while this runs is read under its new name.
    """
    if fs is not None:
        root = os.fspath(path_or_url)
        if fs.isdir(root):
            names = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
            segs = _pick([(n, f"{root.rstrip('/')}/{n}") for n in names])
        else:
            segs = [(os.path.basename(root), root)]
        opener = lambda p: fs.open(p, "rb")  # noqa: E731
    else:
        root_p = _local_path(path_or_url)
        if root_p.is_dir():
            segs = [(s.path.name, str(s.path)) for s in list_segments(root_p)]
        else:
            segs = [(root_p.name, str(root_p))]
        opener = lambda p: open(p, "rb")  # noqa: E731
    for name, path in segs:
        try:
            yield from _read_one(opener, path, name, strict)
        except FileNotFoundError:
            if not name.endswith(".open"):
                raise
            yield from _read_one(opener, path[:-len(".open")], name[:-len(".open")], strict)


def _pick(named: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    found: dict[tuple[str, int], tuple[str, str, bool]] = {}
    for name, path in named:
        m = SEGMENT_RE.match(name)
        if m:
            key = (m["replica"], int(m["seq"]))
            if key not in found or found[key][2]:
                found[key] = (name, path, bool(m["open"]))
    return [found[k][:2] for k in sorted(found)]


# ----------------------------------------------------------------------------- writing
def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _recover_open_segment(path: Path) -> tuple[Path | None, int, int]:
    """Keeps ``path``'s lines up to the first partial or unparsable one, fsyncs it and
    renames it to ``.jsonl`` (removes it if nothing is left). Returns (closed path or None,
    lines kept, bytes dropped)."""
    good, kept = 0, 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            if line.strip():
                try:
                    if not isinstance(json.loads(line), dict):
                        break
                except ValueError:
                    break
                kept += 1
            good += len(line)
    size = path.stat().st_size
    fd = os.open(path, os.O_WRONLY)
    try:
        if good < size:
            os.ftruncate(fd, good)
        os.fsync(fd)
    finally:
        os.close(fd)
    if good == 0:
        path.unlink()
        return None, 0, size
    closed = path.with_name(path.name[:-len(".open")])
    os.rename(path, closed)
    return closed, kept, size - good


@dataclasses.dataclass
class _Item:
    records: list[dict]
    dedup: bool
    future: concurrent.futures.Future


class EventLog:
    """The replica's writer (see the module docstring). Thread-safe :meth:`submit`."""

    def __init__(self, directory: str | os.PathLike, replica: str, *,
                 segment_bytes: int = 64 * 2**20, segment_seconds: float = 300.0,
                 dedup_ids: int = 1_000_000, dedup_seconds: float = 86400.0,
                 recent_requests: int = 100_000, max_queue: int = 200_000):
        if not REPLICA_RE.match(replica):
            raise EventLogError(
                f"replica id {replica!r} cannot name a segment file: use letters, digits, "
                "'.', '_' and '-' (at most 128 characters), e.g. the pod name")
        for name, v in (("segment_bytes", segment_bytes), ("segment_seconds", segment_seconds),
                        ("dedup_ids", dedup_ids), ("dedup_seconds", dedup_seconds),
                        ("recent_requests", recent_requests), ("max_queue", max_queue)):
            if not v > 0:
                raise EventLogError(f"{name} must be positive; got {v}")
        self.directory = Path(directory)
        self.replica = replica
        self.segment_bytes, self.segment_seconds = int(segment_bytes), float(segment_seconds)
        self.dedup_ids, self.dedup_seconds = int(dedup_ids), float(dedup_seconds)
        self.max_queue = int(max_queue)
        # event ids written by this replica (oldest first), for de-duplication
        self._known: set[str] = set()
        self._order: collections.deque[tuple[float, str]] = collections.deque()
        # request_id -> (arm, model_version) of recent /recommend answers
        self.recent = RecentRequests(recent_requests)
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._seq = 0
        self._size = 0
        self._opened_at = 0.0
        self.started = False

    # ------------------------------------------------------------------ start / stop
    def start(self) -> dict:
        """Locks the replica, recovers its leftover open segments, reloads recent ids and
        starts the writer thread. Returns what it found (logged)."""
        if self.started:
            return {}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock_path = self.directory / f".events-{self.replica}.lock"
            self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise EventLogError(f"cannot use the events directory {self.directory}: {e}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lock_fd)
            self._lock_fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise EventLogError(
                    f"replica {self.replica!r} is already writing to {self.directory} (lock "
                    f"{lock_path} is held): give each server its own --replica-id") from None
            raise EventLogError(f"cannot lock {lock_path}: {e}") from None
        try:
            report = self._recover()
        except OSError as e:
            self._release_lock()
            raise EventLogError(f"recovering the segments of replica {self.replica!r} in "
                                f"{self.directory} failed: {e}") from None
        self._thread = threading.Thread(target=self._run, name="event-log", daemon=True)
        self._thread.start()
        self.started = True
        log.info("event log %s, replica %s: next segment %s; %s", self.directory, self.replica,
                 segment_name(self.replica, self._seq + 1, open_=True), report)
        return report

    def close(self, timeout: float = 30.0) -> None:
        """Writes what is queued, closes the open segment (renamed to ``.jsonl``)."""
        if not self.started:
            return
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None
        self.started = False
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _recover(self) -> dict:
        mine = [s for s in list_segments(self.directory) if s.replica == self.replica]
        recovered, dropped = [], 0
        for s in mine:
            if s.open:
                closed, kept, lost = _recover_open_segment(s.path)
                dropped += lost
                recovered.append(f"{s.path.name}: {kept} lines kept, {lost} bytes of an "
                                 "unfinished write dropped" if lost else f"{s.path.name}: {kept} lines")
        if recovered:
            _fsync_dir(self.directory)
        self._seq = max((s.seq for s in mine), default=0)
        # reload ids: newest segments first, within the window and the id budget
        mine = [s for s in list_segments(self.directory) if s.replica == self.replica]
        cutoff = time.time() - self.dedup_seconds
        chosen, n_ids = [], 0
        for s in reversed(mine):
            if s.path.stat().st_mtime < cutoff or n_ids >= self.dedup_ids:
                break
            ids, reqs = [], []
            for rec in read_segments(s.path, strict=False):
                if rec.get("kind") == "served":
                    if isinstance(rec.get("request_id"), str):
                        reqs.append((rec["request_id"], rec.get("arm"), rec.get("model_version")))
                elif isinstance(rec.get("event_id"), str):
                    ts = rec.get("received_ts")
                    ids.append((ts if isinstance(ts, (int, float)) else s.path.stat().st_mtime,
                                rec["event_id"]))
            chosen.append((ids, reqs))
            n_ids += len(ids)
        for ids, reqs in reversed(chosen):
            for ts, eid in ids:
                self._remember(eid, ts)
            for rid, arm, ver in reqs:
                self.recent.put(rid, arm, ver)
        self._evict(time.time())
        return {"recovered_open_segments": recovered, "dropped_bytes": dropped,
                "event_ids_reloaded": len(self._known), "segments_read": len(chosen)}

    # ------------------------------------------------------------------ dedup memory
    def _remember(self, eid: str, ts: float) -> None:
        if eid not in self._known:
            self._known.add(eid)
            self._order.append((ts, eid))

    def _evict(self, now: float) -> None:
        cutoff = now - self.dedup_seconds
        while self._order and (len(self._order) > self.dedup_ids or self._order[0][0] < cutoff):
            self._known.discard(self._order.popleft()[1])

    @property
    def remembered_ids(self) -> int:
        return len(self._known)

    # ------------------------------------------------------------------ submit
    def submit(self, records: list[dict], *, dedup: bool = False) -> concurrent.futures.Future:
        """Queues ``records`` for the next group commit. The future resolves, once they are
        on disk, to one bool per record: written (True) or a duplicate ``event_id`` already
        written by this replica (False; only with ``dedup``). Raises :class:`EventLogFull`
        when ``max_queue`` records are already waiting."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self.started:
            raise EventLogError("the event log is not started")
        with self._cond:
            if self._queued + len(records) > self.max_queue and self._queued:
                raise EventLogFull(f"{self._queued} records are waiting to be written to "
                                   f"{self.directory}; the disk is not keeping up, retry later")
            self._queue.append(_Item(records, dedup, fut))
            self._queued += len(records)
            self._cond.notify()
        return fut

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    timeout = None
                    if self._fd is not None and self._size:
                        timeout = max(0.0, self._opened_at + self.segment_seconds - time.monotonic())
                        if timeout == 0.0:
                            break
                    self._cond.wait(timeout)
                batch = list(self._queue)
                self._queue.clear()
                self._queued = 0
                stop = self._stop and not batch
            if batch:
                self._commit(batch)
            if self._fd is not None and (
                    self._size >= self.segment_bytes or stop
                    or (self._size and time.monotonic() - self._opened_at >= self.segment_seconds)):
                self._rotate()
            if stop:
                return

    def _commit(self, batch: list[_Item]) -> None:
        lines, flags_per_item, new_ids = [], [], []
        fresh: set[str] = set()
        for item in batch:
            flags = []
            for rec in item.records:
                eid = rec.get("event_id") if item.dedup else None
                if eid is not None and (eid in self._known or eid in fresh):
                    flags.append(False)
                    continue
                if eid is not None:
                    fresh.add(eid)
                    new_ids.append(eid)
                lines.append(json.dumps(rec, ensure_ascii=False, separators=(",", ":"),
                                        allow_nan=False))
                flags.append(True)
            flags_per_item.append(flags)
        try:
            if lines:
                self._write(("\n".join(lines) + "\n").encode("utf-8"))
        except (OSError, ValueError) as e:
            log.error("writing %d records to %s failed: %s", len(lines), self.directory, e)
            self._abandon_segment()
            err = EventLogError(f"could not write events to {self.directory}: {e}")
            for item in batch:
                item.future.set_exception(err)
            return
        now = time.time()
        for eid in new_ids:
            self._remember(eid, now)
        self._evict(now)
        for item, flags in zip(batch, flags_per_item):
            item.future.set_result(flags)

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            self._open_segment()
        view, done = memoryview(data), 0
        while done < len(data):
            done += os.write(self._fd, view[done:])
        os.fsync(self._fd)
        self._size += len(data)

    def _open_segment(self) -> None:
        if self._seq >= MAX_SEQ:
            raise EventLogError(f"replica {self.replica!r} has used all {MAX_SEQ} segment "
                                "numbers; use a new --replica-id")
        self._seq += 1
        path = self.directory / segment_name(self.replica, self._seq, open_=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        _fsync_dir(self.directory)  # the new name is durable before any ack in it
        self._size = 0
        self._opened_at = time.monotonic()

    def _rotate(self) -> None:
        fd, self._fd = self._fd, None
        path = self.directory / segment_name(self.replica, self._seq, open_=True)
        try:
            os.fsync(fd)
            os.close(fd)
            os.rename(path, path.with_name(path.name[:-len(".open")]))
            _fsync_dir(self.directory)
        except OSError as e:  # left .open: the next start recovers it
            log.error("closing segment %s failed: %s", path, e)

    def _abandon_segment(self) -> None:
        """After a failed write: cut the segment back to what was acknowledged and leave it
        (``.open``, recovered at the next start); the next batch opens a new segment."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, self._size)
            os.fsync(fd)
        except OSError:
            pass
        try:
            os.close(fd)
        except OSError:
            pass


class RecentRequests:
    """``request_id -> (arm, model_version)`` of the last ``capacity`` answers (FIFO)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._map: collections.OrderedDict[str, tuple[Any, Any]] = collections.OrderedDict()

    def put(self, request_id: str, arm, version) -> None:
        self._map[request_id] = (arm, version)
        if len(self._map) > self.capacity:
            self._map.popitem(last=False)

    def get(self, request_id: str) -> tuple[Any, Any] | None:
        return self._map.get(request_id)

    def __len__(self) -> int:
        return len(self._map)
