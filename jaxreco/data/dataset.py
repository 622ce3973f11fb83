"""The in-memory interaction table every data source produces and every stage consumes.

A source (MovieLens, Instacart, synthetic, ...) reads raw logs and returns an
:class:`Interactions`: parallel numpy columns with user and item ids already mapped to
contiguous ``int32`` indices, plus the vocabularies that map them back to raw ids (needed
by serving, which receives raw ids). Optional columns are ``None`` when a source has none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

_REQUIRED = ("user", "item")
_OPTIONAL = ("rating", "timestamp")


class DataError(ValueError):
    """Bad input data. The message names the file, line, field and value at fault."""


@dataclasses.dataclass
class Interactions:
    """Columns of user-item interactions.

    Attributes:
      user: int32 [n], user index in ``[0, num_users)``.
      item: int32 [n], item index in ``[0, num_items)``.
      rating: float32 [n] explicit rating, or None for implicit data.
      timestamp: int64 [n] seconds since the epoch, or None.
      user_vocab: [num_users] raw user ids (str), ``user_vocab[index] == raw id``.
      item_vocab: [num_items] raw item ids (str).
      name: dataset name, for logs.
    """

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray | None
    timestamp: np.ndarray | None
    user_vocab: np.ndarray
    item_vocab: np.ndarray
    name: str = ""

    def __post_init__(self):
        n = len(self.user)
        for f in ("item",) + _OPTIONAL:
            col = getattr(self, f)
            if col is not None and len(col) != n:
                raise DataError(f"{self.name}: column {f!r} has {len(col)} rows, 'user' has {n}")

    def __len__(self) -> int:
        return len(self.user)

    @property
    def num_users(self) -> int:
        return len(self.user_vocab)

    @property
    def num_items(self) -> int:
        return len(self.item_vocab)

    def columns(self) -> dict[str, np.ndarray]:
        """The non-empty interaction columns by name."""
        return {f: getattr(self, f) for f in _REQUIRED + _OPTIONAL if getattr(self, f) is not None}

    def take(self, idx: np.ndarray) -> "Interactions":
        """Rows ``idx`` (same vocabularies)."""
        cols = {f: (None if getattr(self, f) is None else getattr(self, f)[idx])
                for f in _REQUIRED + _OPTIONAL}
        return dataclasses.replace(self, **cols)

    # ---------------------------------------------------------------- on-disk cache
    def save(self, path: str | os.PathLike) -> None:
        """Writes an uncompressed ``.npz`` atomically (write to a temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        arrays = dict(self.columns())
        arrays["user_vocab"] = self.user_vocab.astype(str)
        arrays["item_vocab"] = self.item_vocab.astype(str)
        arrays["name"] = np.asarray(self.name)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Interactions":
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except Exception as e:  # zipfile.BadZipFile, ValueError, EOFError, ...
            raise DataError(f"{path}: cached dataset is unreadable ({type(e).__name__}: {e}); "
                            "delete it and run again to rebuild") from e
        missing = [k for k in _REQUIRED + ("user_vocab", "item_vocab") if k not in d]
        if missing:
            raise DataError(f"{path}: cached dataset lacks arrays {missing}; delete it to rebuild")
        return cls(user=d["user"], item=d["item"], rating=d.get("rating"),
                   timestamp=d.get("timestamp"), user_vocab=d["user_vocab"],
                   item_vocab=d["item_vocab"], name=str(d.get("name", "")))


def array_sha256(cols: dict[str, np.ndarray]) -> str:
    """sha256 over named arrays (name, dtype, shape and bytes), order-independent in names."""
    h = hashlib.sha256()
    for k in sorted(cols):
        a = np.ascontiguousarray(cols[k])
        h.update(json.dumps([k, a.dtype.str, list(a.shape)]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def describe(x: Interactions) -> dict[str, Any]:
    """Counts for logs and metadata."""
    d: dict[str, Any] = {"interactions": len(x), "users": x.num_users, "items": x.num_items}
    if x.rating is not None and len(x):
        d["rating_min"] = float(x.rating.min())
        d["rating_max"] = float(x.rating.max())
    return d
