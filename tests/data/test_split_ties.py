"""Leave-last-out with timestamp ties: resolved by source row order (``split.tie_break``)."""

import numpy as np
import pytest

from jaxreco.data import split as split_lib
from jaxreco.data.dataset import DataError
from jaxreco.data.prepare import load_split, load_table


def _reference(user, t, arrival, tie_break, num_val, num_test, min_train):
    """Per user: stable sort by timestamp, newest first (``first``), or by (timestamp,
    arrival) newest first (``last``); the first rows of that order are test, then val."""
    codes = np.zeros(len(user), np.int8)
    for u in np.unique(user):
        rows = np.flatnonzero(user == u)
        rows = rows[np.argsort(arrival[rows], kind="stable")]       # source order
        if tie_break == "first":
            rows = rows[np.argsort(-t[rows], kind="stable")]
        else:
            rows = rows[::-1][np.argsort(-t[rows[::-1]], kind="stable")]
        if len(rows) >= num_val + num_test + min_train:
            codes[rows[:num_test]] = split_lib.TEST
            codes[rows[num_test:num_test + num_val]] = split_lib.VAL
    return codes


@pytest.mark.parametrize("tie_break", ["first", "last"])
@pytest.mark.parametrize("num_val,num_test", [(0, 1), (1, 1), (2, 2)])
def test_codes_match_reference_grouped_and_shuffled(tie_break, num_val, num_test):
    rng = np.random.default_rng(0)
    n = 3000
    user = np.sort(rng.integers(0, 200, n))
    t = rng.integers(0, 4, n)                       # many ties
    arrival = rng.permutation(n)                    # source order != row order here
    want = _reference(user, t, arrival, tie_break, num_val, num_test, 1)
    kw = dict(num_val=num_val, num_test=num_test, min_train=1, tie_break=tie_break)
    got = split_lib.leave_last_out_codes(user, t, arrival=arrival, **kw)   # O(n) path
    np.testing.assert_array_equal(got, want)
    perm = rng.permutation(n)                       # ungrouped: the sort path
    got2 = split_lib.leave_last_out_codes(user[perm], t[perm], arrival=arrival[perm], **kw)
    np.testing.assert_array_equal(got2, want[perm])


def test_default_arrival_is_row_order_and_first_wins():
    user = np.array([0, 0, 0, 0])
    t = np.array([5, 9, 9, 1])
    c = split_lib.leave_last_out_codes(user, t, num_val=1, num_test=1)
    assert c.tolist() == [0, 2, 1, 0]
    c = split_lib.leave_last_out_codes(user, t, num_val=1, num_test=1, tie_break="last")
    assert c.tolist() == [0, 1, 2, 0]
    # without timestamps the last rows are the latest
    c = split_lib.leave_last_out_codes(user, None, num_val=1, num_test=1)
    assert c.tolist() == [0, 0, 1, 2]


def test_bad_tie_break():
    with pytest.raises(DataError, match="tie_break='newest'"):
        split_lib.leave_last_out_codes(np.zeros(3, int), np.zeros(3, int), tie_break="newest")


RATINGS = """\
1::30::4::978300100
1::10::5::978300200
1::20::3::978300200
1::5::2::978300150
1::40::4::978300200
2::40::3::978300300
2::30::4::978300300
2::10::1::978300050
"""


@pytest.mark.parametrize("tie_break,test_items,val_items", [
    ("first", {"1": "10", "2": "40"}, {"1": "20", "2": "30"}),
    ("last", {"1": "40", "2": "30"}, {"1": "20", "2": "40"}),
])
def test_prepare_ties_follow_ratings_dat_order(run_prepare, tmp_path, tie_break, test_items,
                                               val_items):
    """prepare sorts each bucket by (user, item) before splitting; the tie still goes by the
    line order of ratings.dat (item ids here are deliberately not in file order)."""
    src = tmp_path / "ml"
    src.mkdir()
    (src / "ratings.dat").write_text(RATINGS)
    ds = {"name": "movielens-1m", "path": str(src), "data_dir": str(tmp_path / "cache")}
    meta, out = run_prepare(ds, split={"kind": "leave_last_out", "num_val": 1, "num_test": 1,
                                       "tie_break": tie_break}, negatives={"num": 0})
    uv = load_table(out, "user_vocab")["raw_id"].astype(str)
    iv = load_table(out, "item_vocab")["raw_id"].astype(str)

    def items(s):
        d = load_split(out, s)
        return {uv[u]: iv[i] for u, i in zip(d["user"], d["item"])}
    assert items("test") == test_items
    assert items("val") == val_items
    assert "_arrival" not in meta["schema"]["interactions"]
    assert "_arrival" not in load_split(out, "train")
    assert meta["splits"]["train"]["rows"] == 4
