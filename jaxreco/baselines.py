"""Baselines a trained model is compared against, exported as SavedModel versions like one.

:func:`export_popularity`: every user gets the items most popular in the training split of
a prepared dataset, minus the user's own training items (the same exclusion the trained
model's export applies, so an A/B test compares the rankings, not the filters). The score of
``(u, i)`` is ``popularity[i]`` = the number of training positives of item ``i`` (rows with
``label > 0`` where the data has labels, else every row) — the same count that ranks items
for cold-start users in :func:`jaxreco.export.export_saved_model`. ``similar_items`` of this
model carries no information (every item vector is its popularity, one dimension).

From the command line::

    python -m jaxreco.baselines --prepared <prepared dir> --out-dir models/ab --version 1

(a run's prepared directory is ``prepared`` in its ``splits.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxreco import export as export_lib
from jaxreco.data import storage
from jaxreco.data.prepare import load_split, load_table


def popularity(prepared_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(popularity float32 [num_items], user, item)`` of the training positives of a
    prepared dataset."""
    meta = storage.read_metadata(str(prepared_dir))
    schema = meta["schema"]["interactions"]
    cols = ["user", "item"] + (["label"] if "label" in schema else [])
    tr = load_split(str(prepared_dir), "train", cols)
    pos = np.asarray(tr["label"]) > 0 if "label" in tr else slice(None)
    user, item = np.asarray(tr["user"])[pos], np.asarray(tr["item"])[pos]
    pop = np.bincount(item, minlength=int(meta["num_items"])).astype(np.float32)
    return pop, user, item


def _item_category(prepared_dir: str, meta: dict[str, Any]) -> list[str] | None:
    item_f = load_table(str(prepared_dir), "item_features")
    if "category" not in item_f:
        return None
    names = meta.get("category_vocab")
    idx = np.asarray(item_f["category"]).astype(np.int64)
    return ["" if c < 0 else (str(names[c]) if names else str(c)) for c in idx.tolist()]


def export_popularity(prepared_dir: str, out_dir: str, version: int, **kwargs) -> Path:
    """Exports the popularity baseline of ``prepared_dir`` as ``<out_dir>/<version>/``.

    ``kwargs`` go to :func:`jaxreco.export.export_saved_model` (``overwrite``, ``verify``,
    ``platforms``)."""
    meta = storage.read_metadata(str(prepared_dir))
    pop, user, item = popularity(prepared_dir)
    num_users, num_items = int(meta["num_users"]), len(pop)

    def score(p, u, i):
        return p["popularity"][i] + jnp.zeros_like(u, jnp.float32)

    def user_item_scores(p, u):
        return p["popularity"][None, :] + jnp.zeros((u.shape[0], 1), jnp.float32)

    def item_vectors(p):
        return p["popularity"][:, None]

    info = {"baseline": "popularity", "prepared": str(prepared_dir),
            "dataset": str(meta.get("dataset")), "score": "training positives per item"}
    info.update(kwargs.pop("model_info", {}) or {})
    kwargs.setdefault("item_category", _item_category(prepared_dir, meta))
    return export_lib.export_saved_model(
        out_dir, version, params={"popularity": pop}, score_fn=score,
        user_item_scores_fn=user_item_scores, item_vectors_fn=item_vectors,
        user_vocab=load_table(str(prepared_dir), "user_vocab")["raw_id"].astype(str),
        item_vocab=load_table(str(prepared_dir), "item_vocab")["raw_id"].astype(str),
        seen=export_lib.seen_csr(user, item, num_users), popularity=pop, model_info=info,
        **kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxreco.baselines",
                                description="Export the popularity baseline of a prepared "
                                            "dataset as a SavedModel version.")
    p.add_argument("--prepared", help="prepared dataset directory")
    p.add_argument("--run-dir", help="or: a jaxreco-train run (its splits.json names the "
                                     "prepared directory)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    prepared = a.prepared
    if a.run_dir:
        prepared = json.loads((Path(a.run_dir) / "splits.json").read_text())["prepared"]
    if not prepared:
        p.error("give --prepared DIR or --run-dir DIR")
    try:
        path = export_popularity(prepared, a.out_dir, a.version, overwrite=a.overwrite)
    except (export_lib.ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported the popularity baseline of {prepared} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
