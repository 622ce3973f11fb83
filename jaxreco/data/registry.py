"""Dataset names -> sources: the one registry of what ``dataset.name`` can be.

Each entry of :data:`SOURCES` makes a :class:`~jaxreco.data.readers.Source` (id-mapped
column blocks plus side tables) from a ``conf/dataset/<name>.yaml`` node.
``jaxreco.data.prepare`` streams a source into a prepared dataset; :func:`load` gives a small
source's rows in memory as :class:`~jaxreco.data.dataset.Interactions`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from jaxreco.data import events, from_files, instacart, movielens, synthetic, zozotown
from jaxreco.data.dataset import DataError, Interactions
from jaxreco.data.readers import Source

# source(cfg, *, on_bad_rows) -> Source; on_bad_rows: "error" | "skip"
SourceFn = Callable[..., Source]

SOURCES: dict[str, SourceFn] = {
    "movielens-100k": movielens.source,
    "movielens-1m": movielens.source,
    "from-files": from_files.source,
    "instacart-sample": instacart.source,
    "synthetic-ecommerce": synthetic.source,
    "synthetic-coupons": synthetic.coupon_source,
    "zozotown-obd": zozotown.source,
    "events": events.source,
}


def open_source(cfg: Mapping[str, Any], *, on_bad_rows: str = "error") -> Source:
    """The :class:`Source` for a dataset config node (its ``name`` picks the entry)."""
    name = cfg.get("name")
    if name not in SOURCES:
        raise DataError(f"dataset.name={name!r} is unknown; known datasets: {sorted(SOURCES)}")
    return SOURCES[name](cfg, on_bad_rows=str(on_bad_rows))


def load(cfg: Mapping[str, Any], *, on_bad_rows: str = "error") -> Interactions:
    """All rows of the dataset ``cfg`` in memory (extra columns such as ``label`` dropped).
    MovieLens parses are cached (:func:`jaxreco.data.movielens.source`)."""
    return open_source(cfg, on_bad_rows=on_bad_rows).to_interactions()
