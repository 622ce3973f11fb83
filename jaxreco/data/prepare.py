"""``prepare``: raw source -> cleaned, split, featurised, sharded dataset on disk.

Entry point: :func:`prepare(cfg) <prepare>` with ``cfg.dataset`` (a ``conf/dataset`` node)
and ``cfg.prepare`` (options of :class:`jaxreco.config.PrepareConfig`, whose defaults fill in
what is not given); returns the metadata dict. It streams, so memory stays bounded however
large the input (100M synthetic interactions run in < 4 GiB). One function per stage, each
taking what the stages before it produced:

1. **ingest** (:func:`_ingest`) – the source yields blocks of id-mapped columns; range checks
   (bad rows go to the ledger); each block is partitioned by user *range* into ``B`` buckets
   appended to temp files (a user's rows all land in one bucket, so every per-user step is
   local).
2. **dedup** (:func:`_dedup_buckets`) – per bucket, sort by ``(user, item)`` and keep the last
   row by ``(timestamp, arrival)`` (``last``), or aggregate (``aggregate``: max label/event,
   mean rating, last timestamp, ``count``), or keep all (``none``). Counts per user/item.
3. **k-core** (:func:`_kcore`) – drop users and items with fewer than ``k`` interactions,
   repeatedly, until stable (one pass over the buckets' id columns per round); compact the
   id spaces.
4. **split + write** (:func:`_split_write`) – random / random_global / temporal (global
   cut-offs, exact order statistics from a streamed histogram) / leave-last-out per user
   (timestamp ties by source row order, see ``split.tie_break``) / given by the source;
   features are accumulated from train rows only; each split is written as Parquet shards,
   one per bucket.
5. **features** (:func:`_features`) – user and item features, vocabularies.
6. **negatives** (:func:`_negatives`) – per bucket, ``N`` fixed evaluation negatives per
   positive val/test row, never a positive of that user in any split (or the source's fixed
   negatives).
7. **leakage check, metadata** (:func:`_leakage`, :func:`_metadata`) – ``metadata.json`` last;
   the whole directory is staged and renamed into place, so an interrupted run leaves
   nothing that a later run or a reader would accept. With the same config and input, a
   rerun is a no-op.

Every run first removes the staging and scratch directories of runs that were killed
(SIGKILL, out of memory), each up to the input's size, and keeps those of runs still going.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import dataclasses
import enum
import fcntl
import hashlib
import json
import math
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Iterator, Mapping

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.auto import tqdm

from jaxreco import config as config_lib
from jaxreco.data import negatives as neg_lib
from jaxreco.data import split as split_lib
from jaxreco.data import storage
from jaxreco.data.cache import cache_root
from jaxreco.data.dataset import DataError
from jaxreco.data.features import FeatureAccumulator, check_leakage
from jaxreco.data.readers import BadRow, BadRows, Source
from jaxreco.data.registry import open_source

# 2: leave-last-out breaks timestamp ties by source row order (``split.tie_break``), where
#    version 1 broke them by item index; version-1 datasets are not reused.
PREPARE_VERSION = 2
# The options' defaults, from their one source (jaxreco.config.PrepareConfig), as plain data.
DEFAULTS: dict[str, Any] = config_lib.prepare_defaults()
# Options that change where and how visibly a dataset is written, not what is written.
_NOT_CONTENT = ("output_dir", "progress", "temp_dir")
# Name prefix of the scratch directory of bucket files (in temp_dir, or beside the output).
SCRATCH_PREFIX = ".prepare-scratch-"


def _plain(x: Any) -> Any:
    """Plain dicts, lists and scalars (enum members as their strings) from a config node or
    nested mappings."""
    if OmegaConf.is_config(x):
        return OmegaConf.to_container(x, resolve=True, enum_to_str=True)
    if isinstance(x, enum.Enum):
        return x.value
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def options(prepare: Mapping[str, Any] | None) -> dict[str, Any]:
    """The full prepare options: ``prepare`` (a config node or a partial nested dict) over
    :class:`~jaxreco.config.PrepareConfig`'s defaults, type- and range-checked; a plain
    dict. Raises ValueError naming the key (``prepare.<key>``) of an unknown option or a
    bad value."""
    try:
        node = OmegaConf.merge(OmegaConf.structured(config_lib.PrepareConfig),
                               _plain(prepare) or {})
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ValueError(f"prepare.{key}: {str(e).splitlines()[0]}" if key
                         else f"prepare: {str(e).splitlines()[0]}") from None
    prep = OmegaConf.to_container(node, enum_to_str=True)
    config_lib.validate_prepare(prep)
    return prep


# ----------------------------------------------------------------------------- helpers
class _Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, it=None, **kw):
        if not self.enabled:
            return _Null() if it is None else it
        return tqdm(it, file=sys.stderr, leave=False, dynamic_ncols=True, **kw)


class _Null:
    def update(self, n=1):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass


class _SplitHash:
    """Content sha256 of a split: per column, the bytes of its shards in order."""

    def __init__(self):
        self.h: dict[str, Any] = {}
        self.dtypes: dict[str, str] = {}

    def update(self, cols: dict[str, np.ndarray]):
        for k, v in cols.items():
            if k not in self.h:
                self.h[k] = hashlib.sha256()
                self.dtypes[k] = np.asarray(v).dtype.str
            self.h[k].update(np.ascontiguousarray(v).tobytes())

    def hexdigest(self) -> str:
        d = {k: [self.dtypes[k], self.h[k].hexdigest()] for k in sorted(self.h)}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass
class _Buckets:
    """Per-bucket column files in a scratch directory."""

    root: str
    n: int
    dtypes: dict[str, str]

    def path(self, b: int, col: str) -> str:
        return os.path.join(self.root, f"b{b:05d}.{col}")

    def read(self, b: int, cols=None) -> dict[str, np.ndarray]:
        cols = cols or list(self.dtypes)
        return {c: np.fromfile(self.path(b, c), dtype=self.dtypes[c]) for c in cols
                if os.path.exists(self.path(b, c))}

    def write(self, b: int, data: dict[str, np.ndarray]) -> None:
        for c, v in data.items():
            tmp = self.path(b, c) + ".new"
            np.ascontiguousarray(v, dtype=self.dtypes[c]).tofile(tmp)
            os.replace(tmp, self.path(b, c))


class _Writer:
    """Writes shards on two threads, keeping at most a few writes in flight. Content hashes
    are updated on one more thread, in submission order, so a split's hash sees its shards
    in order whichever write finishes first."""

    def __init__(self):
        self.pool = futures.ThreadPoolExecutor(max_workers=2)
        self.hash_pool = futures.ThreadPoolExecutor(max_workers=1)
        self.pending: list[list[futures.Future]] = []   # the tasks of one shard each

    def submit(self, fn, *args) -> None:
        self.pending.append([self.pool.submit(fn, *args)])

    def write_hashed(self, hasher: _SplitHash, stage: str, rel: str, cols: dict,
                     compression: str) -> None:
        """Writes ``cols`` as Parquet shard ``rel`` of ``stage`` and adds them to ``hasher``."""
        self.pending.append([self.hash_pool.submit(hasher.update, cols),
                             self.pool.submit(storage.write_parquet, storage.join(stage, rel),
                                              cols, compression=compression)])

    def drain(self, keep: int = 0) -> None:
        """Waits until at most ``keep`` shards are pending (re-raising their errors)."""
        while len(self.pending) > keep:
            for f in self.pending.pop(0):
                f.result()

    def close(self) -> None:
        """Waits for every pending task (also when a stage failed) and stops the threads."""
        try:
            self.drain()
        finally:
            self.pool.shutdown()
            self.hash_pool.shutdown()


def config_key(ds: Mapping, prep: Mapping, fingerprint: Any) -> str:
    """What a prepared dataset is a function of: the dataset config, the options that change
    the content, the input's fingerprint and the format/code versions."""
    keep = {k: v for k, v in prep.items() if k not in _NOT_CONTENT}
    blob = json.dumps({"dataset": dict(ds), "prepare": keep, "input": fingerprint,
                       "format": storage.FORMAT_VERSION, "prepare_version": PREPARE_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def default_output_dir(ds: Mapping) -> str:
    """``<cache root>/prepared-datasets/<dataset name>`` (one copy per dataset name)."""
    return os.path.join(cache_root(), "prepared-datasets", str(ds.get("name")))


def prepared_dir(dataset: Mapping[str, Any], prepare: Mapping[str, Any] | None) -> str:
    """Where the trainer keeps a prepared dataset: ``prepare["output_dir"]`` if set, else
    ``<cache root>/prepared-datasets/<name>-<hash>``, the hash over the dataset config, the
    full prepare options (defaults filled in; ``output_dir``, ``progress`` and ``temp_dir``
    left out, as they do not change the content) and :data:`PREPARE_VERSION`, so differently
    prepared copies, or copies made by code that splits differently, never overwrite each
    other. ``dataset`` / ``prepare``: config nodes or plain mappings."""
    ds, prep = _plain(dataset), options(prepare)
    if prep.get("output_dir"):
        return str(prep["output_dir"])
    keep = {k: v for k, v in prep.items() if k not in _NOT_CONTENT}
    key = hashlib.sha256(json.dumps([ds, keep, PREPARE_VERSION], sort_keys=True,
                                    default=str).encode()).hexdigest()
    return os.path.join(cache_root(), "prepared-datasets", f"{ds['name']}-{key[:12]}")


# ----------------------------------------------------------------------------- main
def prepare(cfg: Any) -> dict[str, Any]:
    """Prepares ``cfg.dataset`` with options ``cfg.prepare``; returns the metadata.

    A rerun whose config and input fingerprint match an existing dataset's metadata returns
    that metadata without doing anything (``metadata["noop"]`` is then True in the return
    value only).
    """
    cfg = _plain(cfg)
    ds = dict(cfg["dataset"])
    config_lib.validate_dataset(ds)
    prep = options(cfg.get("prepare"))
    out = prep["output_dir"] or default_output_dir(ds)
    progress = _Progress(bool(prep["progress"]))
    t_start = time.perf_counter()

    scratch_parent = prep["temp_dir"] or (os.path.dirname(os.path.abspath(out))
                                         if storage.is_local(out) else None)
    _remove_stale_temp_dirs(out, scratch_parent)
    src = open_source(ds, on_bad_rows=prep["on_bad_rows"])
    key = config_key(ds, prep, src.fingerprint)
    up_to_date = _up_to_date(out, key)
    if up_to_date is not None:
        return up_to_date
    # Two processes of one host (a multi-process run, two sweep jobs) may prepare the same
    # dataset at once: one prepares, the other waits and then finds it up to date; without
    # the lock the second would replace the directory while the first reads it.
    with _exclusive(out):
        up_to_date = _up_to_date(out, key)
        if up_to_date is not None:
            return up_to_date
        _remove_stale_temp_dirs(out, scratch_parent)   # again: a holder we waited for died
        return _prepare_locked(src, ds, prep, out, key, scratch_parent, progress, t_start)


def _up_to_date(out: str, key: str) -> dict[str, Any] | None:
    """The metadata of ``out`` (with ``noop=True``) when it was prepared with ``key``."""
    if not storage.exists(storage.join(out, storage.METADATA)):
        return None
    try:
        old = storage.read_metadata(out)
    except DataError:
        return None
    if old.get("config_sha256") != key:
        return None
    print(f"[prepare] {out} is up to date (config sha256 {key[:12]}); nothing to do",
          file=sys.stderr)
    return dict(old, noop=True)


@contextlib.contextmanager
def _exclusive(out: str) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``<out>.lock`` beside a local ``out`` (remote outputs:
    no lock). The lock file is left in place: deleting it would let a third process lock a
    new inode while a second still holds the old one."""
    if not storage.is_local(out):
        yield
        return
    final = os.path.abspath(storage._local(out))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    fd = os.open(f"{final}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[prepare] another process is preparing {out}; waiting for it",
                  file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _prepare_locked(src, ds: dict, prep: dict, out: str, key: str,
                    scratch_parent: str | None, progress: "_Progress",
                    t_start: float) -> dict[str, Any]:
    if scratch_parent:
        os.makedirs(scratch_parent, exist_ok=True)
    scratch = storage.make_owned_dir(prefix=SCRATCH_PREFIX, parent=scratch_parent)
    try:
        with storage.staged_dir(out) as stage:
            meta = _run(src, ds, prep, stage, scratch, progress, key)
            meta["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
            storage.write_metadata(stage, meta)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _print_summary(meta, out)
    return meta


def _remove_stale_temp_dirs(out: str, scratch_parent: str | None) -> None:
    """Removes the temp directories that killed runs left (``<out>.tmp-*``/``<out>.old-*``
    staging copies beside ``out``, ``.prepare-scratch-*`` bucket files in ``scratch_parent``,
    up to the size of the input each) once their process is gone; one a live run is writing
    is kept (:func:`storage.owner_gone`). Names the unmarked ones older code left."""
    places = [(scratch_parent or tempfile.gettempdir(), (SCRATCH_PREFIX,))]
    if storage.is_local(out):
        places.insert(0, storage.staging_location(out))
    for parent, prefixes in places:
        removed, unmarked = storage.remove_stale_dirs(parent, prefixes)
        for p in removed:
            print(f"[prepare] removed {p}, left by a prepare that was killed", file=sys.stderr)
        for p in unmarked:
            print(f"[prepare] {p} ({storage.dir_size(p) / 2**20:.1f} MiB) was left by an "
                  "interrupted prepare of an older jaxreco; delete it if no prepare is "
                  "running", file=sys.stderr)


def _run(src: Source, ds: dict, prep: dict, stage: str, scratch: str, progress: _Progress,
         key: str) -> dict[str, Any]:
    """The stages in order, timed; returns the metadata (without the total time)."""
    timings: dict[str, float] = {}
    bad = src.bad_rows or BadRows(prep["on_bad_rows"])
    if bad.policy != prep["on_bad_rows"]:
        bad.policy = prep["on_bad_rows"]
    writer = _Writer()

    def timed(name, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        timings[name] = time.perf_counter() - t
        return out
    try:
        ing = timed("ingest", _ingest, src, prep, bad, scratch, progress)
        dd = timed("dedup", _dedup_buckets, src, ing, prep["dedup"], progress)
        kc = timed("kcore", _kcore, src, ing.buckets, dd, prep)
        sw = timed("split_write", _split_write, src, ing, dd, kc, prep, stage, writer, progress)
        user_f, item_f = timed("features", _features, src, kc, sw, prep, stage, writer)
        cand_info, num_neg = timed("negatives", _negatives, src, ing.buckets, kc, sw, prep,
                                   stage, writer, progress)
    finally:
        writer.close()
    leak = timed("leakage_check", _leakage, prep, stage, ing, sw, user_f, item_f)
    if len(bad):
        bad.write_quarantine(storage.join(stage, "quarantine.csv"))
    return _metadata(src, ds, prep, key, ing, dd, kc, sw, user_f, item_f, cand_info, num_neg,
                     leak, timings)


# ---------------------------------------------------------------- 1. ingest
@dataclasses.dataclass
class _Ingested:
    buckets: _Buckets
    counts: dict[str, int]   # raw_rows, bad_rows_skipped
    bad: BadRows
    kept: int                # source rows that passed the range checks


def _ingest(src: Source, prep: dict, bad: BadRows, scratch: str,
            progress: _Progress) -> _Ingested:
    """Range-checks the source's blocks and appends each row to its user-range bucket's
    column files in ``scratch``."""
    nu, ni = src.num_users, src.num_items
    hint = src.num_rows_hint
    nb = prep["num_buckets"] or max(1, math.ceil((hint or 1) / (4 << 20)))
    users_per_bucket = max(1, math.ceil(nu / nb))
    dtypes = {"user": "<i4", "item": "<i4"}
    handles: dict[tuple[int, str], Any] = {}
    counts = {"raw_rows": 0, "bad_rows_skipped": 0}
    row0 = 0
    ts_lo = prep["timestamp_min"]
    ts_hi = prep["timestamp_max"]
    r_lo, r_hi = prep["rating_min"], prep["rating_max"]
    bar = progress(total=hint, desc="ingest", unit="rows", unit_scale=True)
    global_rows = not src.given_split and prep["split"]["kind"] == "random_global"
    kept = 0
    try:
        for block in _prefetch(src.blocks()):
            n = len(block["user"])
            counts["raw_rows"] += n
            keep = _range_check(block, src.name, row0, bad, ts_lo, ts_hi, r_lo, r_hi, nu, ni)
            row0 += n
            if keep is not None:
                block = {k: v[keep] for k, v in block.items()}
            if global_rows:   # each row's index among the kept source rows, in source order
                m = len(block["user"])
                block[_ROW] = np.arange(kept, kept + m, dtype=np.int64)
                kept += m
            for k, v in block.items():
                if k not in dtypes:
                    dtypes[k] = np.asarray(v).dtype.str
            u = block["user"]
            bucket_of = u // users_per_bucket
            if len(u) and np.all(u[1:] >= u[:-1]):
                bounds = np.searchsorted(bucket_of, np.arange(nb + 1))
                parts = [(b, slice(bounds[b], bounds[b + 1])) for b in range(nb)
                         if bounds[b + 1] > bounds[b]]
            else:
                order = np.argsort(bucket_of.astype(np.int16 if nb < 32000 else np.int32),
                                   kind="stable")
                bounds = np.searchsorted(bucket_of[order], np.arange(nb + 1))
                parts = [(b, order[bounds[b]:bounds[b + 1]]) for b in range(nb)
                         if bounds[b + 1] > bounds[b]]
            for b, sl in parts:
                for c, v in block.items():
                    h = handles.get((b, c))
                    if h is None:
                        h = handles[(b, c)] = open(os.path.join(scratch, f"b{b:05d}.{c}"), "ab")
                    np.ascontiguousarray(v[sl], dtype=dtypes[c]).tofile(h)
            bar.update(n)
    finally:
        bar.close()
        for h in handles.values():
            h.close()
    counts["bad_rows_skipped"] = len(bad)
    if counts["raw_rows"] == 0:
        raise DataError(f"{src.name}: the source produced no rows")
    return _Ingested(_Buckets(scratch, nb, dtypes), counts, bad, kept)


# ---------------------------------------------------------------- 2. dedup
@dataclasses.dataclass
class _Deduped:
    policy: str
    ucount: np.ndarray       # int64 [num_users]: rows per user after dedup
    icount: np.ndarray       # int64 [num_items]
    ts_min: int              # timestamp range of the kept rows (for temporal cut-offs)
    ts_max: int
    duplicates_removed: int


def _dedup_buckets(src: Source, ing: _Ingested, policy: str,
                   progress: _Progress) -> _Deduped:
    """Resolves duplicate (user, item) pairs per bucket (:func:`_dedup`), in place."""
    if policy not in ("last", "aggregate", "none"):
        raise DataError(f"prepare.dedup={policy!r}: must be last, aggregate or none")
    buckets = ing.buckets
    nu, ni = src.num_users, src.num_items
    has_ts = "timestamp" in buckets.dtypes
    ucount = np.zeros(nu, np.int64)
    icount = np.zeros(ni, np.int64)
    rows_after_dedup = 0
    ts_min, ts_max = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    if policy == "aggregate":
        buckets.dtypes["count"] = "<i4"
    # each row's position in its bucket file, which is its order in the source (a user's
    # rows all land in one bucket, in arrival order); leave-last-out breaks ties with it
    buckets.dtypes[_ARRIVAL] = "<i8"
    for b in progress(range(buckets.n), desc="dedup", unit="bucket"):
        d = buckets.read(b)
        if not d:
            continue
        d = _dedup(d, policy, ni, src.given_split)
        buckets.write(b, d)
        rows_after_dedup += len(d["user"])
        ucount += np.bincount(d["user"], minlength=nu)
        icount += np.bincount(d["item"], minlength=ni)
        if has_ts and len(d["user"]):
            ts_min = min(ts_min, int(d["timestamp"].min()))
            ts_max = max(ts_max, int(d["timestamp"].max()))
    removed = ing.counts["raw_rows"] - ing.counts["bad_rows_skipped"] - rows_after_dedup
    return _Deduped(policy, ucount, icount, ts_min, ts_max, removed)


# ---------------------------------------------------------------- 3. k-core
@dataclasses.dataclass
class _Kept:
    """The users and items that survive cleaning, and their compacted indices."""
    ualive: np.ndarray       # bool [num_users of the source]
    ialive: np.ndarray
    umap: np.ndarray         # int32 source index -> compacted index (-1: removed)
    imap: np.ndarray
    num_users: int
    num_items: int
    rounds: int


def _kcore(src: Source, buckets: _Buckets, dd: _Deduped, prep: dict) -> _Kept:
    """Drops users/items below ``min_*_interactions``, repeatedly, until stable."""
    nu, ni = src.num_users, src.num_items
    ucount, icount = dd.ucount, dd.icount
    ku = max(1, int(prep["min_user_interactions"] or 0))
    ki = max(1, int(prep["min_item_interactions"] or 0))
    ualive, ialive = ucount >= ku, icount >= ki
    rounds = 0
    while (ku > 1 or ki > 1):
        if ualive[ucount > 0].all() and ialive[icount > 0].all() and rounds > 0:
            break
        rounds += 1
        uc = np.zeros(nu, np.int64)
        ic = np.zeros(ni, np.int64)
        for b in range(buckets.n):
            d = buckets.read(b, ["user", "item"])
            if not d:
                continue
            m = ualive[d["user"]] & ialive[d["item"]]
            uc += np.bincount(d["user"][m], minlength=nu)
            ic += np.bincount(d["item"][m], minlength=ni)
        new_u, new_i = ualive & (uc >= ku), ialive & (ic >= ki)
        ucount, icount = uc, ic
        if (new_u == ualive).all() and (new_i == ialive).all():
            break
        ualive, ialive = new_u, new_i
        if rounds > 100:
            raise DataError("k-core filtering did not converge in 100 rounds")
    ualive &= ucount >= 1
    ialive &= icount >= 1
    umap = np.where(ualive, np.cumsum(ualive) - 1, -1).astype(np.int32)
    imap = np.where(ialive, np.cumsum(ialive) - 1, -1).astype(np.int32)
    nu2, ni2 = int(ualive.sum()), int(ialive.sum())
    if nu2 == 0 or ni2 == 0:
        raise DataError(f"{src.name}: no users/items left after k-core "
                        f"(min_user_interactions={ku}, min_item_interactions={ki})")
    return _Kept(ualive, ialive, umap, imap, nu2, ni2, rounds)


# ---------------------------------------------------------------- 4. split + write
@dataclasses.dataclass
class _Written:
    kind: str                                   # the split kind used ("given" for a source's)
    cutoffs: tuple[int, int] | None             # temporal: (val, test) cut-off timestamps
    acc: FeatureAccumulator                     # train-row statistics
    hashes: dict[str, _SplitHash]
    nrows: dict[str, int]
    npos: dict[str, int]
    shards: dict[str, list[str]]                # split -> shard paths relative to the output
    eval_pos: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]]  # bucket -> val/test positives


def _split_write(src: Source, ing: _Ingested, dd: _Deduped, kc: _Kept, prep: dict, stage: str,
                 writer: _Writer, progress: _Progress) -> _Written:
    """Assigns every kept row to train/val/test and writes each split's shard of each bucket;
    leaves each bucket's positives (compacted ids) in its scratch files for the negatives."""
    buckets = ing.buckets
    has_ts = "timestamp" in buckets.dtypes
    has_label = "label" in buckets.dtypes
    ualive, ialive, umap, imap = kc.ualive, kc.ialive, kc.umap, kc.imap
    sp = prep["split"]
    kind = "given" if src.given_split else sp["kind"]
    if src.given_split and sp["kind"] not in ("given", None):
        print(f"[prepare] {src.name} has given splits; ignoring split.kind={sp['kind']}",
              file=sys.stderr)
    if kind not in ("random", "random_global", "temporal", "leave_last_out", "given"):
        raise DataError(f"prepare.split.kind={kind!r}: must be random, random_global, "
                        "temporal, leave_last_out (or a source with given splits)")
    global_codes = None
    if kind == "random_global":
        # one permutation of all kept source rows (jaxreco.data.split.random_split), so each
        # split keeps the source's row order
        global_codes = split_lib.random_codes(
            ing.kept, test_fraction=float(sp["test_fraction"]),
            val_fraction=float(sp["val_fraction"]), rng=np.random.default_rng(int(sp["seed"])))
    if kind == "temporal" and not has_ts:
        raise DataError(f"{src.name}: split.kind=temporal needs timestamps; the source has none")
    cutoffs = None
    if kind == "temporal":
        cutoffs = _streamed_cutoffs(buckets, ualive, ialive, dd.ts_min, dd.ts_max,
                                    float(sp["test_fraction"]), float(sp["val_fraction"]))
    acc = FeatureAccumulator(kc.num_users, kc.num_items)
    hashes = {s: _SplitHash() for s in split_lib.SPLIT_NAMES}
    nrows = {s: 0 for s in split_lib.SPLIT_NAMES}
    npos = {s: 0 for s in split_lib.SPLIT_NAMES}
    shards: dict[str, list[str]] = {s: [] for s in split_lib.SPLIT_NAMES}
    eval_pos: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for b in progress(range(buckets.n), desc="split+write", unit="bucket"):
        d = buckets.read(b)
        if not d:
            continue
        m = ualive[d["user"]] & ialive[d["item"]]
        if not m.all():
            d = {k: v[m] for k, v in d.items()}
        d["user"] = umap[d["user"]]
        d["item"] = imap[d["item"]]
        # the positives, with compacted ids, for the negatives pass ("never a positive":
        # with a label, label > 0; an impression that was not clicked may be a negative)
        is_pos = d["label"] > 0 if has_label else slice(None)
        buckets.write(b, {"user": d["user"][is_pos], "item": d["item"][is_pos]})
        for c in list(d):
            if c not in ("user", "item"):
                os.remove(buckets.path(b, c))
        n = len(d["user"])
        if kind == "random":
            codes = split_lib.random_codes(n, test_fraction=float(sp["test_fraction"]),
                                           val_fraction=float(sp["val_fraction"]),
                                           rng=np.random.default_rng([int(sp["seed"]), b]))
        elif kind == "random_global":
            order = np.argsort(d[_ROW], kind="stable")
            d = {k: v[order] for k, v in d.items()}
            codes = global_codes[d[_ROW]]
        elif kind == "temporal":
            codes = split_lib.temporal_codes(d["timestamp"], *cutoffs)
        elif kind == "leave_last_out":
            codes = split_lib.leave_last_out_codes(
                d["user"], d.get("timestamp"), num_val=int(sp["num_val"]),
                num_test=int(sp["num_test"]), min_train=int(sp["min_train"]),
                arrival=d[_ARRIVAL], tie_break=str(sp.get("tie_break", "first")))
        else:
            codes = d.pop("split").astype(np.int8)
        d.pop("split", None)
        d.pop(_ARRIVAL, None)
        d.pop(_ROW, None)
        for code, name in enumerate(split_lib.SPLIT_NAMES):
            sel = np.flatnonzero(codes == code)
            if len(sel) == 0:
                continue
            part = {k: v[sel] for k, v in d.items()}
            if code == split_lib.TRAIN:
                acc.add(part["user"], part["item"], part.get("timestamp"))
            pos = part["label"] > 0 if has_label else np.ones(len(sel), bool)
            npos[name] += int(pos.sum())
            if code != split_lib.TRAIN:
                eval_pos.setdefault(b, {})[name] = (part["user"][pos], part["item"][pos])
            nrows[name] += len(sel)
            rel = f"{name}/part-{b:05d}.parquet"
            shards[name].append(rel)
            writer.write_hashed(hashes[name], stage, rel, part, prep["compression"])
        writer.drain(keep=4)
    writer.drain()
    if nrows["train"] == 0:
        raise DataError(f"{src.name}: the train split is empty")
    return _Written(kind, cutoffs, acc, hashes, nrows, npos, shards, eval_pos)


# ---------------------------------------------------------------- 5. features
def _features(src: Source, kc: _Kept, sw: _Written, prep: dict, stage: str,
              writer: _Writer) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """User/item features from the train rows, and the id vocabularies; written as tables."""
    item_price = src.item_side.get("price")
    item_cat = src.item_side.get("category")
    cat = None if item_cat is None else np.asarray(item_cat)[kc.ialive]
    price = None if item_price is None else np.asarray(item_price)[kc.ialive]
    user_f, item_f = sw.acc.finish(item_category=cat, item_price=price,
                                   price_buckets=int(prep["features"]["price_buckets"]))
    writer.submit(storage.write_parquet, storage.join(stage, "user_features.parquet"), user_f)
    writer.submit(storage.write_parquet, storage.join(stage, "item_features.parquet"), item_f)
    uvocab = src.vocab("user")[kc.ualive]
    ivocab = src.vocab("item")[kc.ialive]
    writer.submit(storage.write_parquet, storage.join(stage, "user_vocab.parquet"),
                  {"raw_id": uvocab.astype(str)})
    writer.submit(storage.write_parquet, storage.join(stage, "item_vocab.parquet"),
                  {"raw_id": ivocab.astype(str)})
    return user_f, item_f


# ---------------------------------------------------------------- 6. negatives
def _negatives(src: Source, buckets: _Buckets, kc: _Kept, sw: _Written, prep: dict, stage: str,
               writer: _Writer, progress: _Progress) -> tuple[dict[str, Any], int]:
    """Fixed evaluation negatives per val/test positive (sampled, or the source's own);
    returns the candidates' metadata and the number per positive."""
    nu2, ni2 = kc.num_users, kc.num_items
    ng = prep["negatives"]
    num_neg = int(ng["num"] or 0)
    cand_info: dict[str, Any] = {}
    fixed = src.fixed_negatives
    if fixed is not None:
        fixed = _remap_fixed(fixed, kc, src)
        num_neg = fixed["negatives"].shape[1]

    def user_name(u: int) -> str:                      # compacted index -> raw id, quoted
        return repr(str(src.vocab("user")[np.flatnonzero(kc.ualive)[u]]))

    if num_neg > 0:
        sampler = neg_lib.Sampler(ni2, ng["sampler"], sw.acc.item_count)
        cand_hash = {s: _SplitHash() for s in ("val", "test")}
        cand_shards: dict[str, list[str]] = {"val": [], "test": []}
        for b in progress(sorted(sw.eval_pos), desc="negatives", unit="bucket"):
            d = buckets.read(b, ["user", "item"])
            keys = _sorted_unique(d["user"].astype(np.int64) * ni2 + d["item"])
            per_user = np.bincount(keys // ni2, minlength=nu2)   # distinct items per user
            for code, name in ((1, "val"), (2, "test")):
                if name not in sw.eval_pos[b]:
                    continue
                u, i = sw.eval_pos[b][name]
                if fixed is not None:
                    negs = _fixed_for(fixed, u, keys, ni2, name)
                else:
                    rng = np.random.default_rng([int(ng["seed"]), code, b])
                    negs = neg_lib.sample_negatives(u, keys, num_items=ni2, n=num_neg,
                                                    sampler=sampler, rng=rng,
                                                    positives_per_user=per_user,
                                                    user_name=user_name)
                rel = f"{name}_candidates/part-{b:05d}.parquet"
                cand_shards[name].append(rel)
                writer.write_hashed(cand_hash[name], stage, rel,
                                    {"user": u, "item": i, "negatives": negs}, prep["compression"])
                writer.drain(keep=4)
        writer.drain()
        for name in ("val", "test"):
            if cand_shards[name]:
                cand_info[name] = {"rows": sw.npos[name], "num_negatives": num_neg,
                                   "shards": cand_shards[name],
                                   "sha256": cand_hash[name].hexdigest(),
                                   "sampler": "fixed" if fixed is not None else ng["sampler"]}
    writer.drain()
    return cand_info, num_neg


# ---------------------------------------------------------------- 7. leakage check, metadata
def _leakage(prep: dict, stage: str, ing: _Ingested, sw: _Written, user_f, item_f):
    """:func:`~jaxreco.data.features.check_leakage` on the written splits (None when off)."""
    if not prep["leakage_check"]:
        return None
    cols = ["user", "item"] + (["timestamp"] if "timestamp" in ing.buckets.dtypes else [])
    return check_leakage(
        _leak_groups(stage, sw.shards, cols), user_features=user_f, item_features=item_f,
        split_kind=sw.kind, cutoffs=sw.cutoffs,
        pairs_unique=prep["dedup"] != "none" and sw.kind != "given")


def _metadata(src: Source, ds: dict, prep: dict, key: str, ing: _Ingested, dd: _Deduped,
              kc: _Kept, sw: _Written, user_f, item_f, cand_info, num_neg: int, leak,
              timings: dict[str, float]) -> dict[str, Any]:
    """The ``metadata.json`` document (see :mod:`jaxreco.data.storage`)."""
    bad = ing.bad
    counts = {**ing.counts, "duplicates_removed": dd.duplicates_removed,
              "kcore_rounds": kc.rounds, "users": kc.num_users, "items": kc.num_items,
              "users_removed": int(src.num_users - kc.num_users),
              "items_removed": int(src.num_items - kc.num_items)}
    schema = {c: dt for c, dt in ing.buckets.dtypes.items() if c not in ("split", _ARRIVAL, _ROW)}
    return {
        "format_version": storage.FORMAT_VERSION,
        "dataset": src.name,
        "config_sha256": key,
        "config": {"dataset": ds, "prepare": prep},
        "input_fingerprint": src.fingerprint,
        "schema": {"interactions": schema,
                   "candidates": {"user": "<i4", "item": "<i4",
                                  "negatives": f"<i4[{num_neg}]"},
                   "user_features": {k: v.dtype.str for k, v in user_f.items()},
                   "item_features": {k: v.dtype.str for k, v in item_f.items()}},
        "num_users": kc.num_users, "num_items": kc.num_items,
        "vocab_sizes": {"user": kc.num_users, "item": kc.num_items,
                        "category": None if src.category_vocab is None
                        else len(src.category_vocab)},
        "category_vocab": None if src.category_vocab is None
        else [str(c) for c in src.category_vocab],
        "split": {"kind": sw.kind, **({"cutoffs": list(sw.cutoffs)} if sw.cutoffs else {})},
        "splits": {s: {"rows": sw.nrows[s], "positives": sw.npos[s], "shards": sw.shards[s],
                       "sha256": sw.hashes[s].hexdigest()} for s in split_lib.SPLIT_NAMES},
        "candidates": cand_info,
        "counts": counts,
        "bad_rows": {"policy": bad.policy, "skipped": len(bad), "by_reason": bad.counts(),
                     "quarantine": "quarantine.csv" if len(bad) else None},
        "leakage_check": leak,
        "source_report": src.report,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


def _prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Runs a block iterator in a thread, ``depth`` blocks ahead (numpy releases the GIL,
    so generation or parsing overlaps with partitioning and writing)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work():
        try:
            for x in it:
                q.put(x)
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)
    th = threading.Thread(target=work, daemon=True)
    th.start()
    while True:
        x = q.get()
        if x is done:
            break
        if isinstance(x, BaseException):
            raise x
        yield x
    th.join()


def _sorted_unique(k: np.ndarray) -> np.ndarray:
    """Sorted unique values; O(n) when already sorted (buckets are sorted by key).
    (``np.unique`` hashes in numpy 2.x, ~10x slower than this on sorted input.)"""
    if len(k) > 1 and not np.all(k[1:] >= k[:-1]):
        k = np.sort(k)
    if len(k) > 1:
        k = k[np.concatenate([[True], k[1:] != k[:-1]])]
    return k


def _leak_groups(stage: str, shards: dict[str, list[str]], cols: list[str]) -> Iterator:
    """(train shard, [(split, eval shard)]) per bucket, read back from the staged output."""
    by_part: dict[str, dict[str, str]] = {}
    for split, rels in shards.items():
        for rel in rels:
            by_part.setdefault(rel.rsplit("/", 1)[1], {})[split] = rel
    empty = {c: np.zeros(0, np.int64 if c == "timestamp" else np.int32) for c in cols}
    for part in sorted(by_part):
        rels = by_part[part]
        read = lambda r: storage.read_parquet_columns(storage.join(stage, r), cols)  # noqa
        train = read(rels["train"]) if "train" in rels else empty
        yield train, [(s, read(r)) for s, r in rels.items() if s != "train"]


def _range_check(block, name, row0, bad: BadRows, ts_lo, ts_hi, r_lo, r_hi, nu, ni):
    """Mask of rows to keep (None = all); bad rows go to the ledger as ``<name>:row``."""
    n = len(block["user"])
    badmask = np.zeros(n, bool)
    checks = [("user", block["user"], 0, nu - 1), ("item", block["item"], 0, ni - 1)]
    if "timestamp" in block and (ts_lo is not None or ts_hi is not None):
        checks.append(("timestamp", block["timestamp"], ts_lo, ts_hi))
    if "rating" in block and (r_lo is not None or r_hi is not None):
        checks.append(("rating", block["rating"], r_lo, r_hi))
    for field, v, lo, hi in checks:
        m = np.zeros(n, bool)
        if lo is not None:
            m |= v < lo
        if hi is not None:
            m |= v > hi
        if field == "rating":
            m |= np.isnan(v)
        for i in np.flatnonzero(m & ~badmask)[:10_000_000]:
            bad.add(BadRow(f"{name} (source rows)", row0 + int(i) + 1, field, str(v[i]),
                           f"out of range [{lo}, {hi}]"))
        badmask |= m
    return ~badmask if badmask.any() else None


_ARRIVAL = "_arrival"  # scratch column: a row's index in its bucket file (source order)
_ROW = "_row"          # scratch column (split.kind=random_global): a row's index in the source


def _dedup(d: dict[str, np.ndarray], policy: str, ni: int, given: bool) -> dict[str, np.ndarray]:
    """Sorts a bucket by (user, item) and resolves duplicate pairs per ``policy``.

    ``last`` keeps, per pair, the row with the largest timestamp, ties going to the later
    arrival (the larger row index in the bucket file, which is arrival order). Every kept
    row gets its index in the bucket file as column ``_ARRIVAL`` (for ``aggregate``, the
    index of the row whose timestamp it keeps).
    """
    n = len(d["user"])
    d = dict(d)
    d[_ARRIVAL] = np.arange(n, dtype=np.int64)
    key = d["user"].astype(np.int64) * ni + d["item"]
    if given:  # duplicates are resolved within each given split; keep users grouped
        key = key * 3 + d["split"]
    order = np.argsort(key)  # unstable is fine: ties are resolved by original index below
    key = key[order]
    if policy == "none" or n == 0:
        return {k: v[order] for k, v in d.items()}
    starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    if len(starts) == n:
        out = {k: v[order] for k, v in d.items()}
        if policy == "aggregate":
            out["count"] = np.ones(n, np.int32)
        return out
    size = np.diff(np.concatenate([starts, [n]]))
    if "timestamp" in d:
        ts = d["timestamp"][order]
        gmax = np.maximum.reduceat(ts, starts)
        at = ts == np.repeat(gmax, size)
        pick = np.maximum.reduceat(np.where(at, order, -1), starts)
    else:
        pick = np.maximum.reduceat(order, starts)
    out = {k: v[pick] for k, v in d.items()}
    if policy == "aggregate":
        out["count"] = size.astype(np.int32)
        for c in ("label", "event"):
            if c in d:
                out[c] = np.maximum.reduceat(d[c][order], starts)
        if "rating" in d:
            out["rating"] = (np.add.reduceat(d["rating"][order].astype(np.float64), starts)
                             / size).astype(np.float32)
    return out


def _streamed_cutoffs(buckets: _Buckets, ualive, ialive, lo: int, hi: int,
                      test_fraction: float, val_fraction: float) -> tuple[int, int]:
    """Exact temporal cut-offs (same as :func:`split.temporal_cutoffs` on all rows) from
    a 2^20-bin histogram pass and a pass collecting the two bins that hold them."""
    split_lib._check_fractions(test_fraction, val_fraction)
    nbins = 1 << 20
    width = max(1, -(-(hi - lo + 1) // nbins))
    hist = np.zeros(nbins, np.int64)
    n = 0

    def alive_ts(b):
        d = buckets.read(b, ["user", "item", "timestamp"])
        if not d:
            return np.zeros(0, np.int64)
        return d["timestamp"][ualive[d["user"]] & ialive[d["item"]]]
    for b in range(buckets.n):
        ts = alive_ts(b)
        hist += np.bincount((ts - lo) // width, minlength=nbins)
        n += len(ts)
    ks = [min(n - 1, max(0, n - int(round(n * (test_fraction + val_fraction))) - 1)),
          min(n - 1, max(0, n - int(round(n * test_fraction)) - 1))]
    cum = np.cumsum(hist)
    want_bins = [int(np.searchsorted(cum, k, side="right")) for k in ks]
    vals = {wb: [] for wb in want_bins}
    for b in range(buckets.n):
        ts = alive_ts(b)
        bins = (ts - lo) // width
        for wb in vals:
            vals[wb].append(ts[bins == wb])
    out = []
    for k, wb in zip(ks, want_bins):
        below = int(cum[wb - 1]) if wb > 0 else 0
        v = np.sort(np.concatenate(vals[wb]))
        out.append(int(v[k - below]))
    return out[0], out[1]


def _fixed_where(fixed: Mapping[str, Any], r: int, c: int) -> str:
    """``<file>:<line>`` of fixed negative ``[r, c]`` (as far as the source recorded it)."""
    f = fixed.get("file", "the negatives file")
    return f"{f}:{int(fixed['line'][r, c])}" if "line" in fixed else str(f)


def _remap_fixed(fixed: Mapping[str, Any], kc: _Kept, src: Source) -> dict[str, Any]:
    """The source's fixed negatives in compacted indices, sorted by user, with the raw ids
    (``user_raw``/``item_raw``, by compacted index) and lines kept for messages. Users that
    cleaning removed are dropped; an item it removed is an error."""
    u = kc.umap[fixed["user"]]
    negs = kc.imap[fixed["negatives"]]
    keep = u >= 0
    if (negs[keep] < 0).any():
        r, c = np.argwhere(negs[keep] < 0)[0]
        r0 = int(np.flatnonzero(keep)[r])
        raise DataError(
            f"{_fixed_where(fixed, r0, c)}: fixed negative item "
            f"{str(src.vocab('item')[fixed['negatives'][r0, c]])!r} of user "
            f"{str(src.vocab('user')[fixed['user'][r0]])!r} was removed by cleaning (k-core); "
            "lower prepare.min_item_interactions or drop it from the negatives file")
    order = np.argsort(u[keep])
    out = {"user": u[keep][order], "negatives": negs[keep][order],
           "user_raw": src.vocab("user")[kc.ualive], "item_raw": src.vocab("item")[kc.ialive]}
    for k in ("file", "line"):
        if k in fixed:
            out[k] = fixed[k][keep][order] if k == "line" else fixed[k]
    return out


def _fixed_for(fixed, users, pos_keys, ni, split):
    """The fixed negatives of evaluation rows of ``users`` (compacted indices); none may be
    a positive of its user (``pos_keys``: sorted ``user * ni + item`` of every split)."""
    at = np.searchsorted(fixed["user"], users)
    ok = (at < len(fixed["user"])) & (fixed["user"][np.minimum(at, len(fixed["user"]) - 1)]
                                       == users)
    if not ok.all():
        u = int(users[np.flatnonzero(~ok)[0]])
        raise DataError(f"{fixed.get('file', 'fixed negatives')}: {split} user "
                        f"{str(fixed['user_raw'][u])!r} has no negatives there; every user "
                        f"with {split} rows needs rows (user, item) in the negatives file")
    negs = fixed["negatives"][at]
    keys = users[:, None].astype(np.int64) * ni + negs
    hit = np.isin(keys, pos_keys)
    if hit.any():
        r, c = np.argwhere(hit)[0]
        raise DataError(
            f"{_fixed_where(fixed, int(at[r]), int(c))}: negative item "
            f"{str(fixed['item_raw'][negs[r, c]])!r} of user "
            f"{str(fixed['user_raw'][users[r]])!r} is one of that user's positives (in the "
            "train, val or test file); a negative must be an item the user never interacted "
            "with: drop that line")
    return negs


def _print_summary(meta: dict, out: str) -> None:
    c = meta["counts"]
    rows = [("raw rows", c["raw_rows"]), ("bad rows skipped", c["bad_rows_skipped"]),
            ("duplicates removed", c["duplicates_removed"]),
            ("users / items", f"{meta['num_users']} / {meta['num_items']}"),
            ("users / items removed (k-core)", f"{c['users_removed']} / {c['items_removed']}")]
    for s, v in meta["splits"].items():
        rows.append((f"{s} rows (positives)", f"{v['rows']} ({v['positives']})"))
    for s, v in meta["candidates"].items():
        rows.append((f"{s} candidates", f"{v['rows']} x {v['num_negatives']} {v['sampler']}"))
    for k, v in meta["bad_rows"]["by_reason"].items():
        rows.append((f"  skipped: {k}", v))
    for k, v in meta["timings_s"].items():
        rows.append((f"time {k} (s)", v))
    w = max(len(r[0]) for r in rows)
    lines = [f"prepared {meta['dataset']} -> {out}"] + [f"  {k:<{w}}  {v}" for k, v in rows]
    print("\n".join(lines), file=sys.stderr)


# ----------------------------------------------------------------------------- reading back
def load_split(path: str, split: str, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """Columns of a prepared split (``train``/``val``/``test``), or of its candidates
    (``test_candidates``), concatenated over shards in order."""
    meta = storage.read_metadata(path)
    if split.endswith("_candidates"):
        rels = meta["candidates"].get(split[:-len("_candidates")], {}).get("shards", [])
    else:
        rels = meta["splits"][split]["shards"]
    parts = [storage.read_parquet_columns(storage.join(path, r), columns) for r in rels]
    if not parts:  # an empty split: zero-length columns of the recorded schema
        schema = meta["schema"]["candidates" if split.endswith("_candidates")
                                else "interactions"]
        out = {}
        for c, dt in schema.items():
            if columns is None or c in columns:
                shape = (0, int(dt.split("[")[1][:-1])) if "[" in dt else (0,)
                out[c] = np.zeros(shape, np.dtype(dt.split("[")[0]))
        return out
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def load_table(path: str, name: str) -> dict[str, np.ndarray]:
    """``user_features`` / ``item_features`` / ``user_vocab`` / ``item_vocab``."""
    storage.read_metadata(path)
    return storage.read_parquet_columns(storage.join(path, f"{name}.parquet"))
