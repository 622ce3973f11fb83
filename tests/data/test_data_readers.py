"""Bad-row handling of the validated readers, both ways."""

import numpy as np
import pytest

from jaxreco.data.dataset import DataError
from jaxreco.data.readers import BadRows, Field, IdMapper, concat_blocks, read_csv, read_parquet

FIELDS = [Field("user", "id"), Field("item", "id"), Field("rating", "float", lo=1, hi=5),
          Field("ts", "timestamp", lo=0, hi=2_000_000_000, out="timestamp")]


def _data(bad_line: str | bytes | None, at: int = 7, n: int = 20) -> bytes:
    lines = [b"user,item,rating,ts"] + [f"u{k},i{k % 5},{k % 5 + 1},{1000 + k}".encode()
                                         for k in range(n)]
    if bad_line is not None:
        lines[at - 1] = bad_line if isinstance(bad_line, bytes) else bad_line.encode()
    return b"\n".join(lines) + b"\n"


CASES = [
    ("u1,i1,3", "<row>", "wrong column count"),
    ("u1,i1,great,5", "rating", "not a number"),
    (",i1,3,5", "user", "empty id"),
    ("u1,i1,3,99999999999", "ts", "out of range"),
    (b"u\xff\xfe,i1,3,5", "user", "invalid UTF-8"),
    ("u1,i1,9,5", "rating", "out of range"),
]


@pytest.mark.parametrize("line,field,reason", CASES)
def test_bad_row_stops_with_file_line_field(line, field, reason):
    with pytest.raises(DataError) as e:
        concat_blocks(read_csv(_data(line, at=7), FIELDS, label="logs.csv", bad_rows=BadRows()))
    msg = str(e.value)
    assert msg.startswith("logs.csv:7:"), msg
    assert repr(field) in msg and reason in msg


@pytest.mark.parametrize("line,field,reason", CASES)
def test_bad_row_skipped_and_recorded(line, field, reason):
    bad = BadRows("skip")
    out = concat_blocks(read_csv(_data(line, at=7), FIELDS, label="logs.csv", bad_rows=bad))
    assert len(out["user"]) == 19                       # 20 data lines, one bad
    assert [(r.line, r.field) for r in bad.rows] == [(7, field)]
    assert reason in bad.rows[0].reason


def test_line_numbers_survive_blank_lines_and_blocks():
    lines = [b"user,item,rating,ts"] + [f"u{k},i{k},3,{k}".encode() for k in range(5000)]
    lines[10] = b""                   # a blank line (skipped, not data)
    lines[3000] = b"u1,i1,x,5"        # physical line 3001
    bad = BadRows("skip")
    out = concat_blocks(read_csv(b"\n".join(lines) + b"\n", FIELDS, label="f", bad_rows=bad,
                                 block_size=4096))
    assert [r.line for r in bad.rows] == [3001]
    assert len(out["user"]) == 5000 - 2
    # with a wrong-column-count row before it, still exact
    lines[2000] = b"1,2"
    bad = BadRows("skip")
    concat_blocks(read_csv(b"\n".join(lines) + b"\n", FIELDS, label="f", bad_rows=bad,
                           block_size=4096))
    assert sorted(r.line for r in bad.rows) == [2001, 3001]


def test_missing_column_is_an_error():
    with pytest.raises(DataError, match="lacks required column"):
        list(read_csv(b"user,item\n1,2\n", FIELDS, label="f", bad_rows=BadRows()))


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"user": ["a", "b", None], "item": ["x", "y", "z"],
                             "rating": [1.0, 7.0, 2.0], "ts": [1, 2, 3]}), p)
    bad = BadRows("skip")
    out = concat_blocks(read_parquet(str(p), FIELDS, bad_rows=bad))
    assert len(out["user"]) == 1
    assert sorted((r.line, r.field) for r in bad.rows) == [(2, "rating"), (3, "user")]


def test_id_mapper_consistent_first_appearance():
    m = IdMapper()
    assert m.encode(np.array(["b", "a", "b"])).tolist() == [0, 1, 0]
    assert m.encode(np.array(["c", "a"])).tolist() == [2, 1]
    assert m.encode(np.array(["zz"]), grow=False).tolist() == [-1]
    assert m.vocab.tolist() == ["b", "a", "c"]
