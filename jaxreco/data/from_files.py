"""``from-files``: your own train/validation/test interaction files (CSV or Parquet).

Config (``conf/dataset/from-files.yaml``)::

    train: path/or/url/train.csv       # required; CSV or Parquet (told by content or name)
    val:   ...                         # optional
    test:  ...                         # optional
    negatives: ...                     # optional fixed evaluation negatives: columns user, item
    columns: {user: user, item: item, rating: null, label: null, timestamp: null}
    delimiter: ","
    rating_range: [null, null]
    timestamp_range: [0, 4102444800]

Files may be gzip, bzip2, xz or zstd compressed (told by their first bytes, not their
name); a UTF-8 byte-order mark before a CSV header is ignored. Raw ids are mapped once,
consistently across all files (train first, so train ids get the lowest indices). Ids that
appear in val/test but never in train are counted and listed (up to 20) in
``metadata.source_report``: a model cannot have learned them. The split is the one given by
the files (``split.kind`` is ignored). The negatives file lists, per user, the
same number of negative items; they replace sampled negatives for that user's val/test rows
and must never be a positive of that user.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jaxreco.data import storage
from jaxreco.data.dataset import DataError
from jaxreco.data.readers import (BadRows, Field, IdMapper, Source, fingerprint_files,
                                  read_table)

SPLITS = ("train", "val", "test")


def _fields(cfg: Mapping[str, Any]) -> list[Field]:
    cols = dict(cfg.get("columns") or {})
    rr = list(cfg.get("rating_range") or [None, None])
    tr = list(cfg.get("timestamp_range") or [None, None])
    f = [Field(cols.get("user") or "user", "id", out="user"),
         Field(cols.get("item") or "item", "id", out="item")]
    if cols.get("rating"):
        f.append(Field(cols["rating"], "float", lo=rr[0], hi=rr[1], out="rating"))
    if cols.get("label"):
        f.append(Field(cols["label"], "float", out="label"))
    if cols.get("timestamp"):
        f.append(Field(cols["timestamp"], "timestamp", lo=tr[0], hi=tr[1], out="timestamp"))
    return f


def source(cfg: Mapping[str, Any], *, on_bad_rows: str = "error") -> Source:
    if not cfg.get("train"):
        raise DataError("dataset=from-files needs dataset.train=<path to the train file>")
    paths = {s: cfg.get(s) for s in SPLITS if cfg.get(s)}
    for key in (*paths, "negatives"):
        _check_file(key, cfg.get(key))
    delim = cfg.get("delimiter") or ","
    if len(delim) != 1:
        raise DataError(f"dataset.delimiter={delim!r}: must be one character")
    fields = _fields(cfg)
    bad = BadRows(on_bad_rows)
    users, items = IdMapper(), IdMapper()
    parts: dict[str, list[dict[str, np.ndarray]]] = {}
    known_u = known_i = 0
    report: dict[str, Any] = {}
    for code, s in enumerate(SPLITS):
        if s not in paths:
            continue
        blocks = []
        new_u: list[np.ndarray] = []
        new_i: list[np.ndarray] = []
        for b in read_table(paths[s], fields, bad_rows=bad, delimiter=delim):
            u = users.encode(b["user"])
            i = items.encode(b["item"])
            out = {"user": u, "item": i, "split": np.full(len(u), code, np.int8)}
            for k in ("rating", "label"):
                if k in b:
                    out[k] = b[k].astype(np.float32)
            if "timestamp" in b:
                out["timestamp"] = b["timestamp"].astype(np.int64)
            if s != "train":
                new_u.append(u[u >= known_u])
                new_i.append(i[i >= known_i])
            blocks.append(out)
        parts[s] = blocks
        if s == "train":
            known_u, known_i = len(users), len(items)
        else:
            nu_ = np.unique(np.concatenate(new_u)) if new_u else np.zeros(0, np.int32)
            ni_ = np.unique(np.concatenate(new_i)) if new_i else np.zeros(0, np.int32)
            report[f"{s}_only_users"] = int(len(nu_))
            report[f"{s}_only_items"] = int(len(ni_))
            report[f"{s}_only_user_examples"] = users.vocab[nu_[:20]].tolist() if len(nu_) else []
            report[f"{s}_only_item_examples"] = items.vocab[ni_[:20]].tolist() if len(ni_) else []
    extra = {k: "<f4" for k in ("label",) if any(k in b for bl in parts.values() for b in bl)}
    fixed = None
    if cfg.get("negatives"):
        fixed = _read_negatives(cfg["negatives"], fields, users, items, bad, delim)
    n = sum(len(b["user"]) for bl in parts.values() for b in bl)

    def blocks():
        for s in SPLITS:
            yield from parts.get(s, [])
    return Source(name=str(cfg.get("name", "from-files")), user_vocab=users.vocab,
                  item_vocab=items.vocab, blocks=blocks, num_rows_hint=n, given_split=True,
                  extra_columns=extra, bad_rows=bad, fixed_negatives=fixed, report=report,
                  fingerprint={"files": fingerprint_files(
                      list(paths.values()) + ([cfg["negatives"]] if cfg.get("negatives")
                                              else []))})


def _check_file(key: str, path: Any) -> None:
    """``dataset.<key>`` names an existing file (not a directory), or is unset."""
    if not path:
        return
    if not storage.exists(path):
        raise DataError(f"dataset.{key}={path}: no such file")
    if storage.isdir(path):
        raise DataError(f"dataset.{key}={path}: is a directory; give a CSV or Parquet file")


def _read_negatives(path, fields, users: IdMapper, items: IdMapper, bad, delim):
    """The fixed negatives as :attr:`Source.fixed_negatives`: per user (source index, sorted)
    its negative items in file order, with the file and each one's line (for messages)."""
    f = [Field(fields[0].name, "id", out="user"), Field(fields[1].name, "id", out="item")]
    us, its, lines = [], [], []
    for b in read_table(path, f, bad_rows=bad, delimiter=delim, line_numbers=True):
        u = users.encode(b["user"], grow=False)
        i = items.encode(b["item"], grow=False)
        if (u < 0).any() or (i < 0).any():
            k = int(np.flatnonzero((u < 0) | (i < 0))[0])
            which = "user" if u[k] < 0 else "item"
            raise DataError(f"{path}:{int(b['_line'][k])}: negatives row names {which} "
                            f"{str(b[which][k])!r}, which is in no interaction file")
        us.append(u)
        its.append(i)
        lines.append(b["_line"])
    u = np.concatenate(us) if us else np.zeros(0, np.int32)
    i = np.concatenate(its) if its else np.zeros(0, np.int32)
    line = np.concatenate(lines) if lines else np.zeros(0, np.int64)
    order = np.argsort(u, kind="stable")
    u, i, line = u[order], i[order], line[order]
    uniq, counts = np.unique(u, return_counts=True)
    if len(uniq) and (counts != counts[0]).any():
        k = int(np.flatnonzero(counts != counts[0])[0])
        raise DataError(f"{path}: user {users.vocab[uniq[k]]!r} has {counts[k]} negatives, "
                        f"user {users.vocab[uniq[0]]!r} has {counts[0]}: every user needs "
                        "the same number")
    width = int(counts[0]) if len(counts) else 0
    return {"user": uniq.astype(np.int32), "negatives": i.reshape(len(uniq), width),
            "line": line.reshape(len(uniq), width), "file": str(path)}
