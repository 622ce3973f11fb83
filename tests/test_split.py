from __future__ import annotations

import numpy as np
import pytest

from jaxreco.data import movielens, split
from jaxreco.data.dataset import DataError
from tests.conftest import write_u_data


@pytest.fixture
def data(tmp_path):
    return movielens.load_official(write_u_data(tmp_path / "d", n=5000))


def test_random_split_sizes_disjoint_and_complete(data):
    s = split.random_split(data, test_fraction=0.1, val_fraction=0.05, seed=0)
    assert len(s["test"]) == 500 and len(s["val"]) == 250 and len(s["train"]) == 4250
    key = lambda x: set(zip(x.user.tolist(), x.item.tolist(), x.timestamp.tolist()))
    assert sum(len(v) for v in s.values()) == len(data)
    rows = [np.stack([v.user, v.item, v.timestamp], 1) for v in s.values()]
    allrows = np.concatenate(rows)
    assert len(np.unique(allrows, axis=0)) == len(np.unique(
        np.stack([data.user, data.item, data.timestamp], 1), axis=0))


def test_split_is_deterministic_in_seed(data):
    a = split.split_sha256(split.random_split(data, test_fraction=0.1, val_fraction=0.05, seed=0))
    b = split.split_sha256(split.random_split(data, test_fraction=0.1, val_fraction=0.05, seed=0))
    c = split.split_sha256(split.random_split(data, test_fraction=0.1, val_fraction=0.05, seed=1))
    assert a == b
    assert a["test"] != c["test"] and a["train"] != c["train"]


@pytest.mark.parametrize("t, v", [(1.0, 0.0), (-0.1, 0.0), (0.6, 0.5)])
def test_bad_fractions(data, t, v):
    with pytest.raises(DataError, match="split"):
        split.random_split(data, test_fraction=t, val_fraction=v, seed=0)
