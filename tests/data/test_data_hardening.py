"""What a hostile new user ran into, each reproduced: a byte-order mark, compressed files, a
directory where a file belongs, a fixed negative that is a positive, temp directories a
killed ``prepare`` left, the test session's cache, the working files git should ignore."""

import bz2
import gzip
import json
import lzma
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import write_csv
from jaxreco.data import movielens, storage
from jaxreco.data.cache import cache_root
from jaxreco.data.dataset import DataError
from jaxreco.data.prepare import SCRATCH_PREFIX, load_table, prepare
from jaxreco.data.readers import BadRows, Field, concat_blocks, read_table

ROOT = Path(__file__).resolve().parents[2]
TRAIN = [f"u{k % 7},i{k % 11},{1000 + k}" for k in range(60)]
TEST = [f"u{k},i{(k + 3) % 11},{5000 + k}" for k in range(7)]


def _dataset(tmp_path, train: bytes | None = None, **files) -> dict:
    """A from-files dataset: train.csv (``train`` bytes if given) and test.csv."""
    ds = {"name": "from-files",
          "train": write_csv(tmp_path / "train.csv", "user,item,ts", TRAIN),
          "test": write_csv(tmp_path / "test.csv", "user,item,ts", TEST),
          "columns": {"user": "user", "item": "item", "timestamp": "ts"}}
    if train is not None:
        (tmp_path / "train.csv").write_bytes(train)
    ds.update(files)
    return ds


def _prep(ds: dict, out, **prep) -> dict:
    return prepare({"dataset": ds, "prepare": {"output_dir": str(out), "progress": False,
                                               "negatives": {"num": 2}, **prep}})


# ----------------------------------------------------------------- 1. byte-order mark
def test_utf8_bom_before_the_header_is_accepted(tmp_path):
    plain = ("user,item,ts\n" + "\n".join(TRAIN) + "\n").encode()
    meta = _prep(_dataset(tmp_path, train=b"\xef\xbb\xbf" + plain), tmp_path / "out")
    users = load_table(str(tmp_path / "out"), "user_vocab")["raw_id"].tolist()
    assert sorted(users) == [f"u{k}" for k in range(7)]      # no "\ufeffu0"
    assert meta["counts"]["raw_rows"] == 60 + 7


def test_utf8_bom_before_a_recbole_atomic_header_is_accepted():
    data = ("\ufeffuser_id:token\titem_id:token\trating:float\ttimestamp:float\n"
            "1m_1\tHeat (1995)\t3\t978302109\n").encode()
    x = movielens.parse_atomic(data, "ml.inter")
    assert list(x.user_vocab) == ["1m_1"] and x.rating.tolist() == [3.0]


# ----------------------------------------------------------------- 2. compressed input
FIELDS = [Field("user", "id"), Field("item", "id")]
CSV = b"user,item\n" + b"".join(f"u{k},i{k % 13}\n".encode() for k in range(500))
CODECS = {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress,
          "zstd": lambda b: pa.Codec("zstd").compress(b, asbytes=True)}


def _rows(source, **kw) -> list[tuple[str, str]]:
    out = concat_blocks(read_table(source, FIELDS, bad_rows=BadRows(), **kw))
    return list(zip(out["user"].to_pylist(), out["item"].to_pylist()))


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_compressed_csv_is_read_by_its_magic_bytes_locally_and_by_url(codec, tmp_path):
    import fsspec
    want = _rows(CSV)
    data = CODECS[codec](b"\xef\xbb\xbf" + CSV)
    (tmp_path / "plain-name.csv").write_bytes(data)           # no .gz suffix: content decides
    assert storage.compression(str(tmp_path / "plain-name.csv")) == codec
    assert _rows(str(tmp_path / "plain-name.csv")) == want
    fsspec.filesystem("memory").pipe(f"/hardening/{codec}.csv", data)
    assert _rows(f"memory://hardening/{codec}.csv") == want


def test_compressed_from_files_dataset_prepares_like_the_plain_one(tmp_path):
    plain = ("user,item,ts\n" + "\n".join(TRAIN) + "\n").encode()
    a = _prep(_dataset(tmp_path), tmp_path / "a")
    (tmp_path / "train.csv.gz").write_bytes(gzip.compress(plain))
    b = _prep(dict(_dataset(tmp_path), train=str(tmp_path / "train.csv.gz")), tmp_path / "b")
    assert a["splits"]["train"]["sha256"] == b["splits"]["train"]["sha256"]


def test_truncated_gzip_is_one_line_naming_the_file(tmp_path):
    p = tmp_path / "logs.csv.gz"
    p.write_bytes(gzip.compress(CSV * 20)[:-200])
    with pytest.raises(DataError, match=r"logs.csv.gz: gzip-compressed, and decompressing it "
                                         r"failed .*truncated or corrupt"):
        _rows(str(p))


@pytest.mark.parametrize("content,message", [
    (CSV.decode().encode("utf-16"), "is UTF-16 text"),
    (b"PK\x03\x04\x14\x00\x00\x00\x08\x00rest", "is a zip archive; extract the CSV"),
    (b"", ":1: empty file; the first line must name the columns (user, item)"),
    (CSV.replace(b",", b";"), "is the file separated by ';'"),
])
def test_what_a_file_is_not_is_said(content, message, tmp_path):
    (tmp_path / "f.csv").write_bytes(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _rows(str(tmp_path / "f.csv"))


# ----------------------------------------------------------------- 3. a directory, a missing file
@pytest.mark.parametrize("key", ["train", "test", "val", "negatives"])
def test_directory_or_missing_file_is_one_line_naming_the_field(key, tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    ds = _dataset(tmp_path)
    with pytest.raises(DataError) as e:
        _prep(dict(ds, **{key: str(d)}), tmp_path / "out")
    assert str(e.value) == f"dataset.{key}={d}: is a directory; give a CSV or Parquet file"
    with pytest.raises(DataError) as e:
        _prep(dict(ds, **{key: str(tmp_path / "absent.csv")}), tmp_path / "out")
    assert str(e.value) == f"dataset.{key}={tmp_path / 'absent.csv'}: no such file"


# ----------------------------------------------------------------- 4. a negative that is a positive
def test_fixed_negative_that_is_a_positive_names_file_line_and_raw_ids(tmp_path):
    seen = {(f"u{k % 7}", f"i{k % 11}") for k in range(60)} | {
        (f"u{k}", f"i{(k + 3) % 11}") for k in range(7)}
    rows = []
    for k in range(7):
        free = [f"i{j}" for j in range(11) if (f"u{k}", f"i{j}") not in seen]
        rows += [f"u{k},{free[0]}", f"u{k},{free[1]}"]
    rows[7] = "u3,i3"                     # a train positive (k=3), on line 9 of the file
    assert ("u3", "i3") in seen
    ds = _dataset(tmp_path, negatives=write_csv(tmp_path / "negs.csv", "user,item", rows))
    with pytest.raises(DataError) as e:
        _prep(ds, tmp_path / "out")
    assert str(e.value).startswith(f"{tmp_path / 'negs.csv'}:9: negative item 'i3' of user "
                                   "'u3' is one of that user's positives"), e.value
    rows[7] = "u3," + [f"i{j}" for j in range(11) if ("u3", f"i{j}") not in seen][1]
    write_csv(tmp_path / "negs.csv", "user,item", rows)
    meta = _prep(ds, tmp_path / "out")                # fixed, it prepares
    assert meta["candidates"]["test"]["sampler"] == "fixed"


def test_too_few_items_for_sampled_negatives_names_the_raw_user_and_the_limit(tmp_path):
    with pytest.raises(DataError, match=r"^negatives.num=99: user 'u\d' has only (\d+) items "
                                        r"it never interacted with \(of 11\), too few .*\(this "
                                        r"user allows at most \1;"):
        _prep(_dataset(tmp_path), tmp_path / "out", negatives={"num": 99})


# ----------------------------------------------------------------- 5. what a killed prepare left
HOLD = """
import json, pathlib, sys, time
from jaxreco.data import prepare as P
def hold(*a, **k):                     # stop inside the run: staging and scratch dirs exist
    pathlib.Path(sys.argv[2]).write_text("holding")
    time.sleep(300)
P._leakage = hold
P.prepare(json.loads(sys.argv[1]))
"""


def _held_prepare(cfg: dict, tmp_path) -> subprocess.Popen:
    """A prepare subprocess that stops mid-run (its temp dirs made), started and waited for."""
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    p = subprocess.Popen([sys.executable, "-c", HOLD, json.dumps(cfg), str(ready)],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"held prepare did not start: {p.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    return p


def _leftovers(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if ".tmp-" in n or n.startswith(SCRATCH_PREFIX))


def test_sigkilled_prepare_leaves_temp_dirs_that_the_next_run_removes(tmp_path):
    cfg = {"dataset": _dataset(tmp_path),
           "prepare": {"output_dir": str(tmp_path / "out"), "progress": False,
                       "negatives": {"num": 2}}}
    p = _held_prepare(cfg, tmp_path)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    left = _leftovers(tmp_path)
    assert [n for n in left if n.startswith("out.tmp-")] and \
        [n for n in left if n.startswith(SCRATCH_PREFIX)], left
    prepare(cfg)
    assert _leftovers(tmp_path) == []
    assert storage.read_metadata(str(tmp_path / "out"))["num_users"] == 7


def test_temp_dirs_of_a_live_concurrent_prepare_survive_another_run(tmp_path):
    """Another output beside a live prepare runs to the end and leaves the live one's
    staging and scratch dirs alone; a prepare of the SAME output waits for the live one's
    lock instead, and once the live one dies it cleans up after it and prepares."""
    import threading
    cfg = {"dataset": _dataset(tmp_path),
           "prepare": {"output_dir": str(tmp_path / "out"), "progress": False,
                       "negatives": {"num": 2}}}
    p = _held_prepare(cfg, tmp_path)
    try:
        theirs = _leftovers(tmp_path)
        assert len(theirs) == 2, theirs
        other = {**cfg, "prepare": {**cfg["prepare"], "output_dir": str(tmp_path / "out2")}}
        prepare(other)                             # runs to the end beside the live one
        assert _leftovers(tmp_path) == theirs
        assert all(os.listdir(tmp_path / n) for n in theirs)
        done = []
        same = threading.Thread(target=lambda: done.append(prepare(cfg)), daemon=True)
        same.start()
        same.join(timeout=2.0)
        assert same.is_alive() and not done        # waiting for the live one's lock
        assert _leftovers(tmp_path) == theirs
    finally:
        p.kill()
        p.wait(timeout=30)
    same.join(timeout=60)                          # the lock died with its holder
    assert done and not done[0].get("noop")
    # the waiting run removes the dead holder's dirs once the holder is reaped (it may have
    # taken the lock while the killed process was still a zombie); any later run does too
    assert prepare(cfg).get("noop")
    assert _leftovers(tmp_path) == []
    assert storage.read_metadata(str(tmp_path / "out"))["num_users"] == 7


def _marked(path: Path, **owner) -> Path:
    path.mkdir()
    (path / "data").write_bytes(b"x")
    (path / storage.OWNER).write_text(json.dumps({**storage._owner(), **owner}))
    return path


def test_owner_marker_tells_a_reused_pid_and_another_host(tmp_path):
    live = _marked(tmp_path / "out.tmp-live")
    reused = _marked(tmp_path / "out.tmp-reused", start="1")       # our pid, another start
    other_host = _marked(tmp_path / "out.tmp-host", host=socket.gethostname() + "-x", pid=1 << 30)
    unmarked = tmp_path / "out.tmp-old"
    unmarked.mkdir()
    (unmarked / "b00000.user").write_bytes(b"x")
    removed, kept_unmarked = storage.remove_stale_dirs(str(tmp_path), ("out.tmp-",))
    assert removed == [str(reused)]
    assert kept_unmarked == [str(unmarked)]
    assert live.exists() and other_host.exists() and unmarked.exists()
    shutil.rmtree(live)


# ----------------------------------------------------------------- 6. the test session's cache
def test_test_session_uses_its_own_cache_root_and_subprocesses_inherit_it():
    users = Path("~/.cache/jaxreco").expanduser().resolve()
    want = Path(os.environ.get("JAXRECO_TEST_CACHE") or "~/.cache/jaxreco-tests")
    assert cache_root().resolve() == want.expanduser().resolve() != users
    out = subprocess.run([sys.executable, "-c", "from jaxreco.data.cache import cache_root; "
                          "print(cache_root())"], capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve() == cache_root().resolve()


# ----------------------------------------------------------------- 7. git ignores the working files
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="not a git checkout")
def test_git_ignores_what_the_readme_commands_write_but_not_the_package():
    paths = ["models/ml1m/1/saved_model.pb", "events/seg-0.jsonl", "report/report.json",
             "ab/run/config.yaml", "jaxreco/models/mf.py"]
    out = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.stdout.split() == paths[:4]
