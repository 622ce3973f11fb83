"""Train / validation / test splits of an :class:`Interactions` table.

Every split is a deterministic function of the data and a seed, and its sha256 is recorded
so two runs can prove they saw the same rows.
"""

from __future__ import annotations

import numpy as np

from jaxreco.data.dataset import DataError, Interactions, array_sha256


def random_split(x: Interactions, *, test_fraction: float, val_fraction: float,
                 seed: int) -> dict[str, Interactions]:
    """Uniformly random split: ``test_fraction`` of all rows go to test, then
    ``val_fraction`` of all rows are carved from the remainder for validation.

    Row order within each split is the original order, so the split depends only on
    ``(len(x), fractions, seed)``.
    """
    for name, v in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= v < 1.0:
            raise DataError(f"split.{name}={v!r}: must be in [0, 1)")
    if test_fraction + val_fraction >= 1.0:
        raise DataError(f"split.test_fraction + split.val_fraction = "
                        f"{test_fraction + val_fraction}: must be < 1")
    n = len(x)
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val],
             "train": perm[n_test + n_val:]}
    return {k: x.take(np.sort(v)) for k, v in parts.items()}


def split_sha256(splits: dict[str, Interactions]) -> dict[str, str]:
    """sha256 of each split's columns."""
    return {k: array_sha256(v.columns()) for k, v in splits.items()}
