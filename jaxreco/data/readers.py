"""Validated, streaming readers for CSV and Parquet interaction logs.

Every raw row is checked before it becomes data: column count, valid UTF-8, non-empty ids,
numeric fields that parse, values inside their allowed range. A bad row either stops the run
with a :class:`~jaxreco.data.dataset.DataError` naming the file, line, field and value
(``on_bad_rows="error"``, the default), or is skipped and recorded in a :class:`BadRows`
ledger (``on_bad_rows="skip"``) whose rows ``prepare`` writes to a quarantine file and counts
in its summary. Nothing is dropped silently.

Parsing is pyarrow's multi-threaded C++ CSV reader on blocks of the file; validation is
vectorised (regular expressions and casts over whole columns). Only when a block holds a bad
value does Python look at single values, to name them. Line numbers are physical 1-based
lines of the file (the header is line 1), so ``sed -n <line>p file`` shows the culprit.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import re
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from jaxreco.data import storage
from jaxreco.data.dataset import DataError, Interactions

_INT_RE = r"^[+-]?[0-9]+$"
_FLOAT_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
KINDS = ("id", "int", "float", "timestamp", "datetime")


@dataclasses.dataclass(frozen=True)
class Field:
    """One column to read.

    Attributes:
      name: column name in the file header (or position label for headerless files).
      kind: ``id`` (non-empty UTF-8 string), ``int``, ``float``, ``timestamp`` (integer
        seconds since the epoch) or ``datetime`` (ISO-8601 text, converted to seconds).
      required: an empty value is a bad row; otherwise it becomes NaN (float) or -1 (int).
      lo, hi: inclusive allowed range for numeric kinds (None = unbounded).
      out: name of the output column (defaults to ``name``).
    """

    name: str
    kind: str
    required: bool = True
    lo: float | None = None
    hi: float | None = None
    out: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Field {self.name!r}: kind {self.kind!r} not in {KINDS}")

    @property
    def key(self) -> str:
        return self.out or self.name


@dataclasses.dataclass
class BadRow:
    file: str
    line: int
    field: str
    value: str
    reason: str

    def message(self) -> str:
        return (f"{self.file}:{self.line}: field {self.field!r} = {self.value!r}: {self.reason}. "
                "Fix the row, or pass on_bad_rows=skip to quarantine such rows.")


class BadRows:
    """The ledger of bad rows: raises on the first one, or records every one (skip mode)."""

    def __init__(self, policy: str = "error"):
        if policy not in ("error", "skip"):
            raise DataError(f"on_bad_rows={policy!r}: must be 'error' or 'skip'")
        self.policy = policy
        self.rows: list[BadRow] = []

    def add(self, row: BadRow) -> None:
        if self.policy == "error":
            raise DataError(row.message())
        self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def counts(self) -> dict[str, int]:
        """Skipped rows per reason (``<reason>``) for the summary."""
        c = collections.Counter(re.split(r"[:(\[]", r.reason)[0].strip() for r in self.rows)
        return dict(sorted(c.items()))

    def write_quarantine(self, path: str) -> None:
        """All skipped rows as CSV (file, line, field, value, reason)."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "line", "field", "value", "reason"])
        for r in self.rows:
            w.writerow([r.file, r.line, r.field, r.value, r.reason])
        storage.write_bytes(path, buf.getvalue().encode())


# ----------------------------------------------------------------------------- line numbers
class _LineMap:
    """Maps the index of a parsed (valid) row to its physical line in the file.

    pyarrow skips blank lines and rows we rejected for their column count; both are
    "skipped lines". With ``s`` the sorted 0-based indices of skipped lines, valid row ``j``
    sits on 0-based line ``j + header + k`` with ``k = #{m : s[m] - m <= j + header}``.
    Blank lines are only looked for (one numpy pass over the file) when a line is needed.
    """

    def __init__(self, opener, header_lines: int):
        self._opener = opener
        self.header = header_lines
        self.invalid: list[int] = []
        self._skipped: np.ndarray | None = None

    def _blank_lines(self) -> np.ndarray:
        if getattr(self, "_blank", None) is not None:
            return self._blank
        with self._opener() as f:
            buf = np.frombuffer(f.read(), np.uint8)
        nl = np.flatnonzero(buf == 10)
        starts = np.concatenate([[0], nl + 1])
        ends = np.concatenate([nl, [len(buf)]])
        length = ends - starts
        cr = np.zeros(len(starts), bool)
        nz = length > 0
        cr[nz] = buf[np.minimum(starts[nz], len(buf) - 1)] == 13
        blank = (length == 0) | ((length == 1) & cr)
        blank[-1] = False  # the empty "line" after a trailing newline is no line
        self._blank = np.flatnonzero(blank)
        return self._blank

    def physical(self, nonblank_number: int) -> int:
        """1-based physical line of pyarrow's row number (1-based, blank lines not counted)."""
        b = self._blank_lines()
        k = nonblank_number - 1
        return int(k + np.searchsorted(b - np.arange(len(b)), k, side="right")) + 1

    def lines(self, valid_rows: np.ndarray) -> np.ndarray:
        """1-based physical line numbers of valid rows ``valid_rows`` (0-based indices)."""
        if self._skipped is None:
            inv = np.asarray(self.invalid, np.int64) - 1      # physical 0-based
            s = np.union1d(self._blank_lines(), inv)
            self._skipped = s[s >= self.header]
        s = self._skipped
        target = np.asarray(valid_rows, np.int64) + self.header
        k = np.searchsorted(s - np.arange(len(s)), target, side="right")
        return target + k + 1


# ----------------------------------------------------------------------------- validation
def _to_text(arr: pa.Array, field: Field, where, bad: np.ndarray, report) -> pa.Array:
    """binary -> utf8 string; invalid UTF-8 values are marked bad and blanked."""
    try:
        return arr.cast(pa.string())
    except pa.ArrowInvalid:
        vals = arr.to_pylist()
        fixed = []
        for i, v in enumerate(vals):
            try:
                fixed.append(None if v is None else v.decode("utf-8"))
            except UnicodeDecodeError as e:
                if not bad[i]:
                    report(i, field.name, repr(v)[2:-1][:80], f"invalid UTF-8 ({e.reason})")
                bad[i] = True
                fixed.append("")
        return pa.array(fixed, pa.string())


def _validate(cols: dict[str, pa.Array], fields: list[Field], report) -> tuple[
        dict[str, Any], np.ndarray]:
    """Converts one block of raw columns; returns (converted columns, bad-row mask).

    ``report(row, field, value, reason)`` is called once for the first bad field of each
    bad row. Converted id columns stay pyarrow strings (for :class:`IdMapper`); numeric
    columns become numpy arrays.
    """
    n = len(next(iter(cols.values())))
    bad = np.zeros(n, bool)
    out: dict[str, Any] = {}

    def flag(mask: np.ndarray, f: Field, values: pa.Array, reason: str):
        new = mask & ~bad
        for i in np.flatnonzero(new):
            report(int(i), f.name, str(values[int(i)].as_py())[:200], reason)
        bad[:] |= mask

    for f in fields:
        raw = cols[f.name]
        if pa.types.is_binary(raw.type) or pa.types.is_large_binary(raw.type):
            raw = _to_text(raw, f, None, bad, lambda i, fl, v, r: report(i, fl, v, r))
        is_text = pa.types.is_string(raw.type) or pa.types.is_large_string(raw.type)
        null = raw.is_null().to_numpy(zero_copy_only=False)
        if is_text:
            empty = null | (pc.binary_length(raw).fill_null(0).to_numpy(zero_copy_only=False) == 0)
        else:
            empty = null
        if f.kind == "id":
            flag(empty, f, raw, "empty id")
            out[f.key] = raw.cast(pa.string()) if not is_text else raw
            continue
        if f.required:
            flag(empty, f, raw, "empty value")
        if is_text and f.kind in ("int", "timestamp", "float"):
            pattern = _FLOAT_RE if f.kind == "float" else _INT_RE
            ok = pc.match_substring_regex(raw, pattern).fill_null(False).to_numpy(
                zero_copy_only=False)
            kind = "a number" if f.kind == "float" else "an integer"
            flag(~ok & ~empty, f, raw, f"not {kind}")
            clean = pc.if_else(pa.array(ok & ~bad), raw, pa.scalar("0" if f.kind != "float" else "nan"))
            target = pa.float64() if f.kind == "float" else pa.int64()
            vals = clean.cast(target).to_numpy(zero_copy_only=False)
        elif f.kind == "datetime":
            vals = np.zeros(n, np.int64)
            src = raw
            try:
                ts = pc.cast(src, pa.timestamp("us", "UTC")) if is_text else src
                vals = (pc.cast(ts, pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
                        // 1_000_000)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                for i, v in enumerate(src.to_pylist()):
                    if bad[i] or not v:
                        continue
                    try:
                        one = pc.cast(pa.array([v]), pa.timestamp("us", "UTC"))
                        vals[i] = one.cast(pa.int64())[0].as_py() // 1_000_000
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                        flag(np.arange(n) == i, f, src, "not an ISO-8601 datetime")
        else:
            vals = raw.to_numpy(zero_copy_only=False)
            if f.kind == "float":
                vals = vals.astype(np.float64)
            else:
                if vals.dtype.kind == "f":
                    frac = ~np.isnan(vals) & (vals != np.round(vals))
                    flag(frac, f, raw, "not an integer")
                vals = np.nan_to_num(vals.astype(np.float64)).astype(np.int64)
        if f.kind in ("int", "float", "timestamp", "datetime"):
            if f.lo is not None or f.hi is not None:
                lo = -np.inf if f.lo is None else f.lo
                hi = np.inf if f.hi is None else f.hi
                with np.errstate(invalid="ignore"):
                    out_of = ~empty & ~((vals >= lo) & (vals <= hi))
                if f.kind == "float":
                    out_of &= ~np.isnan(vals)
                flag(out_of & ~bad, f, pa.array(vals), f"out of range [{f.lo}, {f.hi}]")
            if f.kind == "float":
                vals = np.where(empty, np.nan, vals)
            else:
                vals = np.where(empty, -1, vals)
        out[f.key] = vals
    return out, bad


def _filter(cols: dict[str, Any], keep: np.ndarray) -> dict[str, Any]:
    if keep.all():
        return cols
    res = {}
    for k, v in cols.items():
        res[k] = v.filter(pa.array(keep)) if isinstance(v, pa.Array) else v[keep]
    return res


# ----------------------------------------------------------------------------- CSV
def read_csv(source: str | bytes, fields: list[Field], *, label: str | None = None,
             bad_rows: BadRows, delimiter: str = ",", header: bool = True,
             column_names: list[str] | None = None, block_size: int = 16 << 20,
             line_numbers: bool = False) -> Iterator[dict[str, Any]]:
    """Yields validated blocks of ``fields`` from a CSV file (path, fsspec URL or bytes).

    Args:
      source: a local path, an fsspec URL (``gs://…``) or the file's bytes; content
        compressed with gzip, bzip2, xz or zstd is decompressed (told by its first bytes,
        whatever the name). A UTF-8 byte-order mark before the header is ignored.
      fields: the columns to keep, with their kinds and ranges; other columns are ignored
        (but every row must still have the header's column count).
      label: the file name used in messages (defaults to the path).
      bad_rows: the ledger; in error mode the first bad row raises.
      column_names: names for a headerless file (``header=False``).
      line_numbers: add a column ``_line`` (int64): the physical line of each kept row.
    """
    label = label or (source if isinstance(source, str) else "<bytes>")
    if len(delimiter) != 1:
        raise DataError(f"{label}: delimiter {delimiter!r} must be one character")

    def opener():
        return storage.open_input(source, label)

    lines = _LineMap(opener, 1 if header else 0)

    invalid_rows: list[BadRow] = []

    def on_invalid(row) -> str:
        # Must not raise (pyarrow would swallow it): record, then skip or fail the block.
        # row.number counts non-blank lines; it is turned into a physical line below.
        invalid_rows.append(BadRow(label, row.number, "<row>", (row.text or "")[:200],
                                   f"wrong column count: expected {row.expected_columns}, "
                                   f"got {row.actual_columns}"))
        return "skip" if bad_rows.policy == "skip" else "error"

    def flush_invalid(raise_first: bool = False):
        for r in invalid_rows:
            r.line = lines.physical(r.line)
            lines.invalid.append(r.line)
            lines._skipped = None
            if raise_first:
                raise DataError(r.message()) from None
            bad_rows.add(r)
        invalid_rows.clear()

    names = (_header(opener, label, fields, delimiter) if header
             else list(column_names or []))
    missing = [f.name for f in fields if f.name not in names]
    if missing:
        raise DataError(f"{label}:1: header {names[:20]} lacks required column(s) {missing}"
                        + _header_hint(names, missing, delimiter))
    with opener() as fh:
        try:
            reader = _open_csv(fh, fields, names, header, delimiter, block_size, on_invalid)
        except pa.ArrowInvalid as e:
            if invalid_rows:
                flush_invalid(raise_first=True)
            raise DataError(f"{label}: unreadable CSV: {e}") from e
        seen = 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as e:
                if invalid_rows:
                    flush_invalid(raise_first=True)
                raise DataError(f"{label}: unreadable CSV after row {seen}: {e}") from e
            flush_invalid()
            cols = {f.name: batch.column(f.name) for f in fields}
            pending: list[tuple[int, str, str, str]] = []

            def report(i, field, value, reason):
                pending.append((i, field, value, reason))
                if bad_rows.policy == "error":
                    raise _Stop()
            try:
                out, bad = _validate(cols, fields, report)
            except _Stop:
                out, bad = None, None
            if pending:
                rows = np.array([p[0] for p in pending], np.int64) + seen
                for p, line in zip(pending, lines.lines(rows)):
                    bad_rows.add(BadRow(label, int(line), p[1], p[2], p[3]))
            kept = _filter(out, ~bad)
            if line_numbers:
                kept = dict(kept, _line=lines.lines(np.arange(seen, seen + batch.num_rows)[~bad]))
            seen += batch.num_rows
            yield kept


_UTF8_BOM = b"\xef\xbb\xbf"
# What a file that does not decode as UTF-8 text may be, by its first bytes.
_NOT_TEXT = ((b"\xff\xfe", "UTF-16 text (Excel's \"Unicode text\"); save it as CSV UTF-8"),
             (b"\xfe\xff", "UTF-16 text; save it as CSV UTF-8"),
             (b"PK\x03\x04", "a zip archive; extract the CSV file from it (or gzip it)"),
             (b"PAR1", "a Parquet file; name it .parquet"),
             (b"\x04\x22\x4d\x18", "lz4-compressed; decompress it, or use gzip or zstd"),
             (b"7z\xbc\xaf\x27\x1c", "a 7-zip archive; extract the CSV file from it"))


def _header(opener, label: str, fields: list[Field], delimiter: str) -> list[str]:
    """The column names on the first line (quotes removed as a CSV reader does; a UTF-8
    byte-order mark dropped, as pyarrow drops it from the data)."""
    with opener() as fh:          # (pyarrow's decompressing streams have no readline)
        raw = b""
        while b"\n" not in raw and len(raw) < 1 << 20:
            chunk = fh.read(1 << 16)
            if not chunk:
                break
            raw += chunk
        raw = raw.split(b"\n", 1)[0] + (b"\n" if b"\n" in raw else b"")
    want = ", ".join(f.name for f in fields)
    if re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]", raw) or not _is_utf8(raw):
        for magic, what in _NOT_TEXT:
            if raw.startswith(magic):
                raise DataError(f"{label}: is {what}")
    if raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM):]
    if not raw.strip():
        raise DataError(f"{label}:1: " + ("empty file" if not raw else "empty header line")
                        + f"; the first line must name the columns ({want})")
    try:
        first = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{label}:1: header is not valid UTF-8 ({e}); is it a CSV file? "
                        "Save it as UTF-8") from e
    return next(csv.reader([first.rstrip("\r\n")], delimiter=delimiter))


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _header_hint(names: list[str], missing: list[str], delimiter: str) -> str:
    """A guess at why ``missing`` columns are not in header ``names``."""
    if len(names) == 1:
        seps = [s for s in (";", "\t", "|", ",") if s != delimiter and s in names[0]]
        if seps:
            return (f"; the header is one column: is the file separated by {seps[0]!r}? Set "
                    f"the delimiter (dataset.delimiter={seps[0]!r})")
    near = [n for m in missing for n in names if n != m and n.strip().lower() == m.lower()]
    if near:
        return f"; near misses (case or spaces differ): {near[:5]}"
    return ""


def _open_csv(fh, fields, names, header, delimiter, block_size, on_invalid):
    return pacsv.open_csv(
        fh,
        # use_threads=False: pyarrow only knows row numbers when parsing serially.
        read_options=pacsv.ReadOptions(use_threads=False, block_size=block_size,
                                       column_names=None if header else names),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=False,
                                         ignore_empty_lines=True,
                                         invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(
            include_columns=[f.name for f in fields],
            column_types={f.name: pa.binary() for f in fields},
            strings_can_be_null=False, quoted_strings_can_be_null=False))


class _Stop(Exception):
    pass


# ----------------------------------------------------------------------------- Parquet
def read_parquet(source: str | bytes, fields: list[Field], *, label: str | None = None,
                 bad_rows: BadRows, batch_size: int = 1 << 20,
                 line_numbers: bool = False) -> Iterator[dict[str, Any]]:
    """Like :func:`read_csv` for a Parquet file (compressed as a whole with gzip etc. read
    into memory); "line" in messages, and ``_line``, is the 1-based row."""
    label = label or (source if isinstance(source, str) else "<bytes>")
    compressed = storage.compression(source) is not None
    with storage.open_input(source, label) as fh:
        try:
            pf = pq.ParquetFile(pa.BufferReader(fh.read()) if compressed else fh)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{label}: not a readable Parquet file ({e})") from e
        names = pf.schema_arrow.names
        missing = [f.name for f in fields if f.name not in names]
        if missing:
            raise DataError(f"{label}: schema {names[:20]} lacks required column(s) {missing}")
        seen = 0
        for batch in pf.iter_batches(batch_size=batch_size, columns=[f.name for f in fields]):
            cols = {f.name: batch.column(f.name) for f in fields}
            for k, v in cols.items():
                if isinstance(v, pa.ChunkedArray):
                    cols[k] = v.combine_chunks()
            start = seen

            def report(i, field, value, reason, start=start):
                bad_rows.add(BadRow(label, start + i + 1, field, value, reason))
            out, bad = _validate(cols, fields, report)
            kept = _filter(out, ~bad)
            if line_numbers:
                kept = dict(kept, _line=np.arange(seen + 1, seen + batch.num_rows + 1)[~bad])
            seen += batch.num_rows
            yield kept


def read_table(source: str, fields: list[Field], *, bad_rows: BadRows, label: str | None = None,
               delimiter: str = ",", line_numbers: bool = False) -> Iterator[dict[str, Any]]:
    """CSV or Parquet: Parquet when the content (decompressed) starts with Parquet's magic
    bytes ``PAR1`` or the name ends in ``.parquet``/``.pq``, else CSV. A directory or a
    missing file is a :class:`DataError`."""
    with storage.open_input(source, label) as f:
        head = f.read(4)
    if head == b"PAR1" or str(source).endswith((".parquet", ".pq")):
        return read_parquet(source, fields, label=label, bad_rows=bad_rows,
                            line_numbers=line_numbers)
    return read_csv(source, fields, label=label, bad_rows=bad_rows, delimiter=delimiter,
                    line_numbers=line_numbers)


def concat_blocks(blocks: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """Concatenates blocks from a reader into one dict of columns."""
    parts: dict[str, list] = collections.defaultdict(list)
    for b in blocks:
        for k, v in b.items():
            parts[k].append(v)
    out = {}
    for k, v in parts.items():
        if isinstance(v[0], pa.Array):
            out[k] = pa.concat_arrays([x.cast(pa.string()) for x in v]) if v else pa.array([], pa.string())
        else:
            out[k] = np.concatenate(v)
    return out


# ----------------------------------------------------------------------------- id mapping
class IdMapper:
    """Incremental raw-id -> contiguous int32 index, in order of first appearance.

    Keeps one vocabulary across many blocks and files, so the same raw id gets the same
    index in train, validation and test files. Hashing is pyarrow's (C++), not Python's.
    """

    def __init__(self, vocab: list[str] | np.ndarray | None = None):
        self._vocab = pa.array([] if vocab is None else [str(v) for v in vocab], pa.string())

    def __len__(self) -> int:
        return len(self._vocab)

    def encode(self, raw: pa.Array | np.ndarray, *, grow: bool = True) -> np.ndarray:
        """int32 indices of ``raw``; unseen ids are added (``grow``) or mapped to -1."""
        if not isinstance(raw, pa.Array):
            raw = pa.array(np.asarray(raw).astype(str))
        raw = raw.cast(pa.string())
        if grow:
            uniq = pc.unique(raw)
            new = uniq.filter(pc.invert(pc.is_in(uniq, value_set=self._vocab)))
            if len(new):
                self._vocab = pa.concat_arrays([self._vocab, new])
        idx = pc.index_in(raw, value_set=self._vocab).fill_null(-1)
        return idx.to_numpy(zero_copy_only=False).astype(np.int32)

    @property
    def vocab(self) -> np.ndarray:
        return np.asarray(self._vocab.to_numpy(zero_copy_only=False), dtype=str)


def fingerprint_files(paths: list[str]) -> list[dict[str, Any]]:
    """Size and mtime of each input file (what makes a rerun a no-op, or not)."""
    return [dict(path=str(p), **storage.stat(p)) for p in paths]


def dumps(x: Any) -> str:
    return json.dumps(x, sort_keys=True, default=str)


# ----------------------------------------------------------------------------- sources
@dataclasses.dataclass
class Source:
    """What a dataset source hands to ``prepare``: id-mapped blocks plus side tables.

    Attributes:
      name: dataset name.
      user_vocab / item_vocab: raw ids by index (an array, or a function that makes it, for
        generated sources whose vocabulary is large and trivial).
      blocks: a function returning an iterator of column blocks. Every block has ``user`` and
        ``item`` (int32 indices), optionally ``rating`` (float32), ``timestamp`` (int64
        seconds), ``split`` (int8 0/1/2, only for sources with given splits) and the
        ``extra_columns``.
      extra_columns: name -> numpy dtype of further per-row columns (``label``, ``event``...).
      item_side: per item index: ``category`` (int32 index into ``category_vocab``, -1
        unknown), ``price`` (float32, NaN unknown).
      fingerprint: what identifies the raw input (config, file sizes and mtimes, wheel
        version); part of the key that makes a rerun with the same input a no-op.
      bad_rows: the ledger the source's readers used (skipped rows end in the quarantine).
      fixed_negatives: ``{"user": int32 [m], "negatives": int32 [m, N]}``, given evaluation
        negatives per user (from-files), used instead of sampling; optionally ``"file"``
        (str) and ``"line"`` (int64 [m, N], each negative's line there), for messages.
      report: extra facts for ``metadata.json`` (e.g. ids seen only in test).
      interactions: the in-memory :class:`~jaxreco.data.dataset.Interactions` the blocks
        come from (:meth:`from_interactions`), which :meth:`to_interactions` returns as is.
    """

    name: str
    user_vocab: Any
    item_vocab: Any
    blocks: Any
    num_rows_hint: int | None = None
    extra_columns: dict[str, str] = dataclasses.field(default_factory=dict)
    item_side: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    category_vocab: np.ndarray | None = None
    fingerprint: Any = None
    bad_rows: BadRows | None = None
    given_split: bool = False
    fixed_negatives: dict[str, Any] | None = None
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    interactions: Any = None

    def vocab(self, which: str) -> np.ndarray:
        v = self.user_vocab if which == "user" else self.item_vocab
        return np.asarray(v() if callable(v) else v)

    @property
    def num_users(self) -> int:
        v = self.user_vocab
        if callable(v):
            self.user_vocab = v = v()
        return len(v)

    @property
    def num_items(self) -> int:
        v = self.item_vocab
        if callable(v):
            self.item_vocab = v = v()
        return len(v)

    @classmethod
    def from_interactions(cls, x, *, fingerprint: Any = None, block_rows: int = 4 << 20,
                          **kw) -> "Source":
        """Wraps an in-memory :class:`~jaxreco.data.dataset.Interactions` (and optional extra
        per-row columns passed as ``extra={name: array}``)."""
        extra = kw.pop("extra", {}) or {}
        cols = dict(x.columns())
        cols.update(extra)

        def blocks():
            n = len(x)
            for lo in range(0, max(n, 1), block_rows):
                if n:
                    yield {k: v[lo:lo + block_rows] for k, v in cols.items()}
        return cls(name=x.name, user_vocab=x.user_vocab, item_vocab=x.item_vocab, blocks=blocks,
                   num_rows_hint=len(x), fingerprint=fingerprint,
                   extra_columns={k: np.asarray(v).dtype.str for k, v in extra.items()},
                   interactions=x, **kw)

    def to_interactions(self) -> Interactions:
        """All rows as an :class:`~jaxreco.data.dataset.Interactions` (extra columns such as
        ``label`` are dropped; use ``prepare`` to keep them). For small sources only."""
        if self.interactions is not None:
            return self.interactions
        parts = list(self.blocks())
        cat = lambda k: (np.concatenate([p[k] for p in parts]) if parts and k in parts[0]  # noqa
                         else None)
        empty = np.zeros(0, np.int32)
        return Interactions(user=np.ascontiguousarray(cat("user") if parts else empty),
                            item=np.ascontiguousarray(cat("item") if parts else empty),
                            rating=cat("rating"), timestamp=cat("timestamp"),
                            user_vocab=self.vocab("user").astype(str),
                            item_vocab=self.vocab("item").astype(str), name=self.name)

