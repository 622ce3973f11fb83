"""Uplift from a ``task.kind=ctr`` run whose context feature is the discount level
(``experiment=synthetic_coupons``): ``P(buy | user, coupon category, level)`` for every
level, and the uplift ``P(buy | level) − P(buy | level 0)`` (level 0 = no coupon).

The model is the trainer's own (``jaxreco.run.restore_run``, the run's best step); the same
probabilities are what the exported ``predict_ctr`` signature answers, which ``/offers``
uses (:mod:`jaxreco.serve.offers`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxreco import evaluate as evaluate_lib
from jaxreco.run import RestoredRun, restore_run

DISCOUNT = "discount"


def check_run(r: RestoredRun) -> None:
    """A ctr run with the ``discount`` context feature and the dataset's levels."""
    kind = getattr(r.cfg.task.kind, "value", r.cfg.task.kind)
    if kind != "ctr" or DISCOUNT not in list(r.cfg.task.context_features):
        raise ValueError(f"an uplift run is task.kind=ctr with task.context_features "
                         f"containing {DISCOUNT!r}; got kind={kind!r}, context_features="
                         f"{list(r.cfg.task.context_features)}")
    if "discount_levels" not in r.cfg.dataset:
        raise ValueError(f"dataset {r.cfg.dataset.name!r} has no discount_levels (use "
                         "dataset=synthetic-coupons)")


def predict(r: RestoredRun, users: np.ndarray, items: np.ndarray, levels: np.ndarray,
            batch_size: int = 65536) -> np.ndarray:
    """``P(buy)`` (float64 ``[n]``) of the run's model for user / item indices of its
    prepared data and discount level indices."""
    model_fn = jax.jit(lambda state, batch: (lambda m: m.score_heads(
        evaluate_lib._rows(m, state, batch), batch))(evaluate_lib._model(r.graphdef, state)))
    head = list(r.cfg.model.heads)[0]
    cols = {"user": np.asarray(users, np.int32), "item": np.asarray(items, np.int32),
            DISCOUNT: np.asarray(levels, np.int32)}
    r.task.add_side(cols)
    n = len(cols["user"])
    out = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        idx[min(batch_size, n - start):] = start        # one compiled shape
        z = jax.device_get(model_fn(r.state, {f: v[idx] for f, v in cols.items()}))[head]
        out.append(np.asarray(z, np.float64)[:min(batch_size, n - start)])
    z = np.concatenate(out) if out else np.zeros(0)
    return 1.0 / (1.0 + np.exp(-z))


def probabilities(r: RestoredRun, users: np.ndarray) -> np.ndarray:
    """``P(buy | u, item, level)`` as float64 ``[len(users), num_items, L]`` for user
    indices ``users`` over every item (coupon category) and level of the dataset."""
    L = len(r.cfg.dataset.discount_levels)
    ni = r.task.num_items
    u = np.repeat(np.asarray(users, np.int64), ni * L)
    i = np.tile(np.repeat(np.arange(ni), L), len(users))
    lv = np.tile(np.arange(L), len(users) * ni)
    return predict(r, u, i, lv).reshape(len(users), ni, L)


def load(run_dir: str | Path) -> RestoredRun:
    r = restore_run(run_dir, full=False)
    check_run(r)
    return r
