"""MovieLens parsers: the three file layouts, and bad rows named by file/line/field."""

from __future__ import annotations

import numpy as np
import pytest

from jaxreco.data import movielens, registry
from jaxreco.data.dataset import DataError, Interactions
from tests.conftest import low_rank_ratings, write_ratings_dat, write_u_data


def test_u_data_and_ratings_dat_parse_identically(tmp_path):
    a = movielens.load_official(write_u_data(tmp_path / "a"))
    b = movielens.load_official(write_ratings_dat(tmp_path / "b"))
    u, i, r, ts = low_rank_ratings()
    for x in (a, b):
        assert len(x) == len(u)
        np.testing.assert_array_equal(x.user_vocab[x.user].astype(int), u)
        np.testing.assert_array_equal(x.item_vocab[x.item].astype(int), i)
        np.testing.assert_array_equal(x.rating, r.astype(np.float32))
        np.testing.assert_array_equal(x.timestamp, ts)
        assert x.user.dtype == np.int32 and x.user.max() == x.num_users - 1


def test_recbole_atomic_file():
    data = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
            "1m_1\tToy Story (1995)\t5\t978300760\n"
            "1m_2\tHeat (1995)\t3\t978302109\n"
            "1m_1\tHeat (1995)\t4\t978301968\n").encode()
    x = movielens.parse_atomic(data, "ml.inter")
    assert list(x.user_vocab) == ["1m_1", "1m_2"]
    assert list(x.item_vocab) == ["Toy Story (1995)", "Heat (1995)"]
    np.testing.assert_array_equal(x.user, [0, 1, 0])
    np.testing.assert_array_equal(x.item, [0, 1, 1])
    np.testing.assert_array_equal(x.rating, [5, 3, 4])


@pytest.mark.parametrize("line, message", [
    ("1::2::3\n", "ratings.dat:3: field '<row>' = '1::2::3': wrong column count: expected 4, got 3"),
    ("1::2::five::978300760\n", "ratings.dat:3: field 'rating' = 'five': not a number"),
    ("::2::3::978300760\n", "ratings.dat:3: field 'user' = '': empty id"),
    ("1::2::9::978300760\n", "ratings.dat:3: field 'rating' = '9.0': out of range [1.0, 5.0]"),
    ("1::2::3::12\n", "ratings.dat:3: field 'timestamp' = '12': out of range"),
])
def test_bad_rows_name_file_line_field(tmp_path, line, message):
    good = "1::1::5::978300760\n2::1::3::978300761\n"
    (tmp_path / "ratings.dat").write_text(good + line)
    with pytest.raises(DataError) as e:
        movielens.load_official(tmp_path)
    assert message in str(e.value)


def test_invalid_utf8_names_line(tmp_path):
    (tmp_path / "ratings.dat").write_bytes(b"1::1::5::978300760\n2::\xff::3::978300761\n")
    with pytest.raises(DataError) as e:
        movielens.load_official(tmp_path)
    assert "ratings.dat:2: field 'item'" in str(e.value) and "invalid UTF-8" in str(e.value)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        movielens.load_official(tmp_path / "nope")
    with pytest.raises(DataError, match=r"found neither of \['ratings.dat', 'u.data'\]"):
        movielens.load_official(tmp_path)


def test_registry_caches_and_rejects_corrupt_cache(ml_dir, cache_env):
    cfg = {"name": "movielens-100k", "path": str(ml_dir)}
    a = registry.load(cfg)
    cached = list((cache_env / "prepared").glob("*.npz"))
    assert len(cached) == 1
    b = registry.load(cfg)
    np.testing.assert_array_equal(a.user, b.user)
    np.testing.assert_array_equal(a.item_vocab, b.item_vocab)
    cached[0].write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cached dataset is unreadable"):
        registry.load(cfg)


def test_unknown_dataset_lists_known():
    with pytest.raises(DataError, match=r"dataset.name='nope' is unknown; known datasets: \["):
        registry.load({"name": "nope"})


def test_interactions_roundtrip(tmp_path):
    x = movielens.load_official(write_u_data(tmp_path / "d"))
    x.save(tmp_path / "x.npz")
    y = Interactions.load(tmp_path / "x.npz")
    for f in ("user", "item", "rating", "timestamp", "user_vocab", "item_vocab"):
        np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
