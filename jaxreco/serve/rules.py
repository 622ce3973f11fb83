"""Business rules applied after scoring: exclude items, boost promoted items, cap categories.

Everything here is numpy on a whole ``[b, num_items]`` score matrix, so a request costs a
few vectorised passes whatever its batch size. The rules file is JSON::

    {
      "exclude_items":   ["2858", "1196"],        # never recommended
      "promoted_items":  {"260": 0.5, "1210": 0.5},  # added to the model score
      "max_per_category": 3                        # at most 3 items of one category per list
    }

Boosts are additive, in the model's score units (for a rating model, 0.5 = half a star);
for a cold-start user the scores are popularity counts, so a boost there is negligible
unless it is of that order. Ids the model does not know are ignored with a warning (a new
model version may drop items). ``max_per_category`` needs the item categories exported with
the model (``export_saved_model(item_category=...)``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np

from jaxreco.serve.layout import EXCLUDED_SCORE

log = logging.getLogger(__name__)
_EXCLUDED = np.float32(EXCLUDED_SCORE)


class RulesError(ValueError):
    """A bad rules file; the message names the file, field and value."""


@dataclasses.dataclass(frozen=True)
class BusinessRules:
    exclude_items: tuple[str, ...] = ()
    promoted_items: dict[str, float] = dataclasses.field(default_factory=dict)
    max_per_category: int | None = None

    @property
    def empty(self) -> bool:
        return not self.exclude_items and not self.promoted_items and self.max_per_category is None

    @classmethod
    def from_dict(cls, d: dict, source: str = "<rules>") -> "BusinessRules":
        if not isinstance(d, dict):
            raise RulesError(f"{source}: expected a JSON object, got {type(d).__name__}")
        unknown = set(d) - {"exclude_items", "promoted_items", "max_per_category"}
        if unknown:
            raise RulesError(f"{source}: unknown field(s) {sorted(unknown)}; allowed: "
                             "exclude_items, promoted_items, max_per_category")
        excl = d.get("exclude_items", [])
        if not isinstance(excl, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool)
                                                 for x in excl):
            raise RulesError(f"{source}: exclude_items must be a list of item ids; got {excl!r:.200}")
        promo = d.get("promoted_items", {})
        if not isinstance(promo, dict):
            raise RulesError(f"{source}: promoted_items must map item id -> boost; got {promo!r:.200}")
        for k, v in promo.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RulesError(f"{source}: promoted_items[{k!r}] must be a finite number; got {v!r}")
        cap = d.get("max_per_category")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise RulesError(f"{source}: max_per_category must be a positive integer or null; got {cap!r}")
        return cls(tuple(str(x) for x in excl), {str(k): float(v) for k, v in promo.items()}, cap)

    @classmethod
    def load(cls, path: str | Path) -> "BusinessRules":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise RulesError(f"cannot read rules file {path}: {e}") from e
        except json.JSONDecodeError as e:
            raise RulesError(f"{path}: not valid JSON: {e}") from e
        return cls.from_dict(d, str(path))


@dataclasses.dataclass(frozen=True)
class CompiledRules:
    """Rules resolved against one model version's item vocabulary (indices, not ids)."""
    exclude_idx: np.ndarray          # int64 [n]
    promo_idx: np.ndarray            # int64 [m]
    promo_boost: np.ndarray          # float32 [m]
    is_promoted: np.ndarray          # bool [num_items]
    max_per_category: int | None
    item_category: np.ndarray | None  # int32 [num_items], category index per item

    @classmethod
    def compile(cls, rules: BusinessRules, item_index: dict[str, int], num_items: int,
                item_category: np.ndarray | None) -> "CompiledRules":
        def resolve(ids, what):
            idx = [item_index[i] for i in ids if i in item_index]
            missing = [i for i in ids if i not in item_index]
            if missing:
                log.warning("rules: %d %s item(s) not in the model's vocabulary, ignored: %s",
                            len(missing), what, missing[:5])
            return np.asarray(idx, dtype=np.int64)

        excl = resolve(rules.exclude_items, "excluded")
        promo_ids = [i for i in rules.promoted_items if i in item_index]
        promo = resolve(list(rules.promoted_items), "promoted")
        boost = np.asarray([rules.promoted_items[i] for i in promo_ids], dtype=np.float32)
        is_promoted = np.zeros(num_items, bool)
        is_promoted[promo] = True
        if rules.max_per_category is not None and item_category is None:
            raise RulesError("rules.max_per_category needs item categories, but this model was "
                             "exported without them (export_saved_model(item_category=...))")
        return cls(excl, promo, boost, is_promoted, rules.max_per_category, item_category)


def top_k(scores: np.ndarray, k: int, rules: CompiledRules | None,
          extra_exclude: np.ndarray | None = None):
    """Applies the rules to ``scores [b, num_items]`` (modified in place) and ranks.

    Returns ``(idx, vals)``: lists of ``b`` int arrays / float arrays of at most ``k`` items,
    best first, ties broken by lower item index (as ``tf.math.top_k``); items scored
    ``EXCLUDED_SCORE`` (seen, excluded) never appear, so a list may be shorter than ``k``.
    """
    b, n = scores.shape
    if rules is not None:
        if rules.exclude_idx.size:
            scores[:, rules.exclude_idx] = _EXCLUDED
        if rules.promo_idx.size:
            sub = scores[:, rules.promo_idx]
            scores[:, rules.promo_idx] = np.where(sub > _EXCLUDED, sub + rules.promo_boost, sub)
    if extra_exclude is not None and extra_exclude.size:
        scores[:, extra_exclude] = _EXCLUDED
    cap = rules.max_per_category if rules is not None else None
    k = min(k, n)
    m = n if cap is None else min(n, max(8 * k, 256))
    while True:
        order = _ranked(scores, m)  # [b, m] best first
        vals = np.take_along_axis(scores, order, axis=1)
        keep = vals > _EXCLUDED
        if cap is not None:
            keep &= _rank_within_group(rules.item_category[order]) < cap
        keep &= np.cumsum(keep, axis=1) <= k
        if m == n or cap is None or np.all(keep.sum(axis=1) >= k):
            break
        m = n  # the capped list did not fill from the first m candidates: rank everything
    return ([order[r][keep[r]] for r in range(b)], [vals[r][keep[r]] for r in range(b)])


def _ranked(scores: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` best scores per row, best first, ties by lower index."""
    n = scores.shape[1]
    if m < n:
        cand = np.argpartition(-scores, m - 1, axis=1)[:, :m]
        cand.sort(axis=1)  # so a stable sort below breaks ties by item index
        sub = np.take_along_axis(scores, cand, axis=1)
        return np.take_along_axis(cand, np.argsort(-sub, axis=1, kind="stable"), axis=1)
    return np.argsort(-scores, axis=1, kind="stable")


def _rank_within_group(groups: np.ndarray) -> np.ndarray:
    """For each row, how many earlier positions hold the same group (0 for the first)."""
    b, m = groups.shape
    o = np.argsort(groups, axis=1, kind="stable")
    g = np.take_along_axis(groups, o, axis=1)
    pos = np.broadcast_to(np.arange(m), (b, m))
    new = np.ones((b, m), bool)
    new[:, 1:] = g[:, 1:] != g[:, :-1]
    starts = np.maximum.accumulate(np.where(new, pos, 0), axis=1)
    rank = np.empty((b, m), np.int64)
    np.put_along_axis(rank, o, pos - starts, axis=1)
    return rank
