"""Loading exported model versions with TensorFlow only, and swapping them while serving.

:class:`ServedModel` is one loaded version: the SavedModel's signatures plus the assets the
server reads directly (item vocabulary, categories, metadata). :class:`ModelManager` polls
``<model_dir>`` for version directories (TF Serving's layout), loads and warms the highest
one in a background thread, then swaps a single reference: requests already running keep
the version they started with, new ones get the new version, none is dropped.

A version directory may appear before its files do (``cp -r``, rsync, ``kubectl cp``): the
manager waits until every file a version needs is there (:func:`missing_files`) and its
files stop changing (:func:`fingerprint`), reporting it as ``LOADING`` meanwhile; a load that
fails is retried with backoff (sooner once its files change) until it loads or a newer
version does. Messages meant for HTTP answers never hold filesystem paths
(:func:`public_message`); the log has them.

Importing this module imports TensorFlow, with its start-up log quietened first
(:func:`jaxreco.serve.tfenv.quiet_tensorflow`: ``TF_CPP_MIN_LOG_LEVEL=2``,
``TF_ENABLE_ONEDNN_OPTS=0``, unless the environment already sets them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import numpy as np

from jaxreco.serve import layout
from jaxreco.serve.tfenv import quiet_tensorflow

quiet_tensorflow()
import tensorflow as tf  # noqa: E402  (after quiet_tensorflow)

from jaxreco.serve.rules import BusinessRules, CompiledRules  # noqa: E402

log = logging.getLogger(__name__)


# The most recent known session items a fold-in or exclude-only model is given (a sequential
# model takes its own max_len): fold-in costs O(n d² + d³) per request, and a shopper's last
# 100 items say what the session is about.
SESSION_CAP = 100


class PredictError(ValueError):
    """A request the model cannot run (bad input names, shapes, values)."""


def _buckets(max_batch: int) -> list[int]:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def _bucket(n: int, max_batch: int) -> int:
    """Smallest power of two >= n (capped at max_batch): XLA compiles once per bucket."""
    b = 1
    while b < n:
        b *= 2
    return min(b, max(max_batch, n))


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8", newline="\n") as f:
        return f.read().split("\n")[:-1]


# ---------------------------------------------------------------------- a version on disk
_DATA_SHARD = re.compile(r"^variables\.data-(\d+)-of-(\d+)$")
REQUIRED_FILES = ("saved_model.pb", "variables/variables.index",
                  f"assets/{layout.USER_VOCAB_FILE}", f"assets/{layout.ITEM_VOCAB_FILE}",
                  f"assets.extra/{layout.METADATA_FILE}")


def missing_files(path: Path) -> list[str]:
    """The files (relative to the version directory) a jaxreco version needs and that are
    not there yet: :data:`REQUIRED_FILES`, every ``variables.data-*-of-N`` shard, and
    ``assets/item_category.txt`` when the metadata says the export wrote one. An empty list
    means the version can be loaded (a truncated file still fails the load)."""
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    try:
        names = os.listdir(path / "variables")
    except OSError:
        names = []
    shards = [m for m in map(_DATA_SHARD.match, names) if m]
    if not shards:
        missing.append("variables/variables.data-*")
    else:
        n = int(shards[0].group(2))
        have = {int(m.group(1)) for m in shards}
        missing += [f"variables/variables.data-{i:05d}-of-{n:05d}" for i in range(n)
                    if i not in have]
    meta_path = path / "assets.extra" / layout.METADATA_FILE
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            missing.append(f"assets.extra/{layout.METADATA_FILE} (not complete JSON yet)")
        else:
            if meta.get("has_item_category") and not (
                    path / "assets" / layout.ITEM_CATEGORY_FILE).is_file():
                missing.append(f"assets/{layout.ITEM_CATEGORY_FILE}")
    return missing


def fingerprint(path: Path) -> tuple | None:
    """``(relative path, size, mtime_ns)`` of every file under ``path``, sorted: changes
    while a copy is still writing (None if the tree changed under the walk)."""
    out = []
    try:
        for root, _, files in os.walk(path):
            for f in files:
                st = os.stat(os.path.join(root, f))
                out.append((os.path.relpath(os.path.join(root, f), path), st.st_size,
                            st.st_mtime_ns))
    except OSError:
        return None
    return tuple(sorted(out))


_ABS_DIRS = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"():;,]+/)+")


def public_message(text: str, model_dir: str | os.PathLike | None = None) -> str:
    """``text`` without filesystem paths, for an HTTP answer: ``model_dir`` (as given and
    resolved) is cut off the front of paths under it (``.../models/5/saved_model.pb`` ->
    ``5/saved_model.pb``), and any other absolute path keeps only its last part."""
    if model_dir is not None:
        for root in sorted({str(model_dir), str(Path(model_dir).resolve())}, key=len, reverse=True):
            text = text.replace(root.rstrip(os.sep) + os.sep, "").replace(root, "<model dir>")
    return _ABS_DIRS.sub("", text)


def public_metadata(meta: dict) -> dict:
    """``jaxreco.json`` for ``/v1/models/<name>/metadata``: string values under
    ``model_info`` that are absolute paths (``run_dir``, ``prepared``) keep their last part."""
    info = meta.get("model_info")
    if not isinstance(info, dict):
        return meta
    clean = {k: (os.path.basename(v.rstrip("/")) if isinstance(v, str) and
                 (v.startswith("/") or v.startswith("file://") or re.match(r"^[A-Za-z]:\\", v))
                 else v) for k, v in info.items()}
    return {**meta, "model_info": clean}


class IncompleteVersion(Exception):
    """A version whose files are still arriving: wait for them (not a load failure)."""


class ServedModel:
    """One loaded SavedModel version."""

    def __init__(self, path: str | os.PathLike, rules: BusinessRules | None = None,
                 max_batch: int = 64):
        self.path = Path(path)
        self.version = int(self.path.name) if layout.is_version_dir_name(self.path.name) else 0
        meta_path = self.path / "assets.extra" / layout.METADATA_FILE
        self.meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        self._obj = tf.saved_model.load(str(self.path))  # keep: signatures need it alive
        self.signatures = dict(self._obj.signatures)
        missing = [s for s in (layout.SIG_USER_SCORES, layout.SIG_SIMILAR) if s not in self.signatures]
        if missing:
            raise ValueError(f"version {self.path.name} lacks signature(s) {missing}; was it "
                             "written by jaxreco.export? It has: " + ", ".join(sorted(self.signatures)))
        self.item_ids = np.asarray(_read_lines(self.path / "assets" / layout.ITEM_VOCAB_FILE), dtype=object)
        self.num_items = len(self.item_ids)
        self._check_sizes()
        self.item_index = {s: i for i, s in enumerate(self.item_ids)}
        cat_path = self.path / "assets" / layout.ITEM_CATEGORY_FILE
        self.item_category = None
        if cat_path.exists():
            cats = _read_lines(cat_path)
            if len(cats) != self.num_items:
                raise ValueError(f"assets/{layout.ITEM_CATEGORY_FILE} has {len(cats)} lines for "
                                 f"{self.num_items} items: an incomplete copy?")
            _, self.item_category = np.unique(np.asarray(cats), return_inverse=True)
        self.max_batch = max_batch
        # predict_ctr (ctr models): its heads and {context feature: {vocab_size, default}}
        self.has_predict_ctr = layout.SIG_PREDICT_CTR in self.signatures
        self.heads = list(self.meta.get("heads") or [])
        self.context_features = dict(self.meta.get("context_features") or {})
        # session_scores (exported since sessions came in): how it uses a session, and the
        # most recent known session items it is given (a longer session is cut to these)
        self.has_session = layout.SIG_SESSION_SCORES in self.signatures
        self.session_meta = dict(self.meta.get("session") or {"mode": "exclude"})
        self.session_cap = int(self.session_meta.get("max_len") or SESSION_CAP)
        # session_attention (sequential models exported since explain=true): the encoder's
        # attention over the sequence session_scores encodes
        self.has_attention = layout.SIG_SESSION_ATTENTION in self.signatures
        self.rules = CompiledRules.compile(rules or BusinessRules(), self.item_index,
                                           self.num_items, self.item_category)

    def _check_sizes(self) -> None:
        """The vocabularies have the sizes the metadata records (a copy cut short has not)."""
        checks = [("num_items", layout.ITEM_VOCAB_FILE, self.num_items)]
        if "num_users" in self.meta:
            with open(self.path / "assets" / layout.USER_VOCAB_FILE, "rb") as f:
                checks.append(("num_users", layout.USER_VOCAB_FILE,
                               sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))))
        for key, name, n in checks:
            if key in self.meta and int(self.meta[key]) != n:
                raise ValueError(f"assets/{name} has {n} ids but {layout.METADATA_FILE} says "
                                 f"{key}={self.meta[key]}: an incomplete copy?")

    # ------------------------------------------------------------------ warm-up
    def warm_up(self) -> None:
        """Runs every signature once per batch bucket, so no request pays an XLA compile."""
        for b in _buckets(self.max_batch):
            ids = tf.constant([""] * b)
            self.signatures[layout.SIG_USER_SCORES](user=ids)
            if layout.SIG_SCORE in self.signatures:
                self.signatures[layout.SIG_SCORE](user=ids, item=ids)
            self.signatures[layout.SIG_SIMILAR](item=ids, k=tf.constant(1))
            if self.has_predict_ctr:
                self.signatures[layout.SIG_PREDICT_CTR](user=ids, item=ids, **self._ctx_fill(b))
            if self.has_session:
                self.session_scores([""] * b, [[("", "", 0.0)]] * b)
            if self.has_attention:
                self.session_attention([""] * b, [[("", "", 0.0)]] * b)

    # ------------------------------------------------------------------ queries
    def user_scores(self, users: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(scores float32 [b, num_items], known bool [b])`` for raw user ids."""
        n = len(users)
        padded = users + [""] * (_bucket(n, self.max_batch) - n)
        out = self.signatures[layout.SIG_USER_SCORES](user=tf.constant(padded))
        return out["scores"].numpy()[:n], out["known"].numpy()[:n]

    def session_scores(self, users: list[str], sessions: list[list[tuple[str, str, float]]]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(scores float32 [b, num_items], known bool [b], session_known int32 [b])`` for
        raw user ids ("" = anonymous) and each one's session ``[(item, event, ts), ...]``,
        oldest first (the caller cuts it to :attr:`session_cap`). The batch and the session
        width are padded to powers of two."""
        n = len(users)
        out = self.signatures[layout.SIG_SESSION_SCORES](**self._session_inputs(users, sessions))
        return (out["scores"].numpy()[:n], out["known"].numpy()[:n],
                out["session_known"].numpy()[:n])

    def session_attention(self, users: list[str], sessions: list[list[tuple[str, str, float]]]
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(weights float32 [b, L], items str [b, L], known bool [b])``: the sequential
        encoder's attention of the last position over the sequence :meth:`session_scores`
        encodes for the same inputs (an empty session: the user's own sequence); ``items``
        names each position's item, "" at padding (weight 0)."""
        n = len(users)
        out = self.signatures[layout.SIG_SESSION_ATTENTION](**self._session_inputs(users, sessions))
        ids = np.asarray([[x.decode("utf-8") for x in row] for row in out["items"].numpy()[:n]],
                         dtype=object).reshape(n, -1)
        return out["weights"].numpy()[:n], ids, out["known"].numpy()[:n]

    def _session_inputs(self, users, sessions) -> dict[str, tf.Tensor]:
        """The session signatures' inputs, batch and session width padded to powers of 2."""
        n = len(users)
        b = _bucket(n, self.max_batch)
        width = _bucket(max([len(x) for x in sessions] + [1]), 1 << 30)
        items = np.full((b, width), "", dtype=object)
        events = np.full((b, width), "", dtype=object)
        ts = np.zeros((b, width), np.float64)
        for r, sess in enumerate(sessions):
            for j, (it, ev, t) in enumerate(sess):
                items[r, j], events[r, j], ts[r, j] = it, ev or "", t or 0.0
        return {"user": tf.constant(list(users) + [""] * (b - n)),
                "items": tf.constant(items.tolist()), "events": tf.constant(events.tolist()),
                "ts": tf.constant(ts)}

    def similar(self, items: list[str], k: int) -> dict[str, np.ndarray]:
        n = len(items)
        padded = items + [""] * (_bucket(n, self.max_batch) - n)
        out = self.signatures[layout.SIG_SIMILAR](item=tf.constant(padded), k=tf.constant(k, tf.int32))
        return {name: t.numpy()[:n] for name, t in out.items()}

    def _ctx_fill(self, n: int) -> dict[str, tf.Tensor]:
        """``n`` rows of each context feature's default value (padding, warm-up)."""
        return {c: tf.fill([n], tf.constant(int(v["default"]), tf.int32))
                for c, v in self.context_features.items()}

    def predict_ctr(self, users: list[str], items: list[str],
                    context: dict[str, list[int]]) -> dict[str, np.ndarray]:
        """``{head: float32 [b], "known": bool [b]}`` for raw ids and context values, which
        the caller has checked (``context`` has every feature, values in range)."""
        n = len(users)
        pad = _bucket(n, self.max_batch) - n
        fill = self._ctx_fill(pad)
        out = self.signatures[layout.SIG_PREDICT_CTR](
            user=tf.constant(users + [""] * pad), item=tf.constant(items + [""] * pad),
            **{c: tf.concat([tf.constant(context[c], tf.int32), fill[c]], 0)
               for c in self.context_features})
        return {name: t.numpy()[:n] for name, t in out.items()}

    def item_indices(self, ids: list[str]) -> np.ndarray:
        return np.asarray([self.item_index[i] for i in ids if i in self.item_index], np.int64)

    # ------------------------------------------------------------------ TF Serving API
    def signature_inputs(self, name: str) -> dict[str, tf.TensorSpec]:
        return self.signatures[name].structured_input_signature[1]

    def metadata(self) -> dict:
        """TF Serving's ``GET /v1/models/<name>/metadata`` body (signature_def part)."""
        def spec(s):
            dims = [{"size": str(-1 if d is None else d)} for d in s.shape.as_list()]
            return {"dtype": "DT_" + s.dtype.name.upper(), "tensor_shape": {"dim": dims},
                    "name": s.name}

        defs = {}
        for name, fn in self.signatures.items():
            outs = fn.structured_outputs
            defs[name] = {
                "inputs": {k: spec(v) for k, v in self.signature_inputs(name).items()},
                "outputs": {k: spec(tf.TensorSpec(v.shape, v.dtype, k)) for k, v in outs.items()},
                "method_name": "tensorflow/serving/predict",
            }
        return {"signature_def": {"signature_def": defs}, "jaxreco": public_metadata(self.meta)}

    def predict(self, signature: str, inputs: dict[str, object]) -> dict[str, np.ndarray]:
        """Runs ``signature`` on JSON-decoded ``inputs`` (already checked for names)."""
        specs = self.signature_inputs(signature)
        tensors, batch = {}, None
        for name, spec in specs.items():
            value = inputs[name]
            rank = spec.shape.rank
            if rank == 0:
                if isinstance(value, list):
                    raise PredictError(f"input '{name}' of signature '{signature}' is a scalar; "
                                       f"got a list")
            else:
                if not isinstance(value, list):
                    raise PredictError(f"input '{name}' of signature '{signature}' must be a "
                                       f"list (one value per example); got {type(value).__name__}")
                if batch is not None and len(value) != batch:
                    raise PredictError(f"inputs of signature '{signature}' must all have the "
                                       f"same batch size; '{name}' has {len(value)}, not {batch}")
                batch = len(value)
            tensors[name] = _to_tensor(value, spec, name)
        if batch is not None and batch > 0:
            pad = _bucket(batch, self.max_batch) - batch
            if pad:  # ids pad with "" (unknown), context features with their default
                def filler(n, t):
                    shape = tf.concat([[pad], tf.shape(t)[1:]], 0)
                    if t.dtype == tf.string:
                        return tf.fill(shape, "")
                    d = self.context_features.get(n, {}).get("default", 0)
                    return tf.fill(shape, tf.constant(d, t.dtype))
                tensors = {n: (tf.concat([t, filler(n, t)], 0) if specs[n].shape.rank >= 1 else t)
                           for n, t in tensors.items()}
        try:
            out = self.signatures[signature](**tensors)
        except tf.errors.InvalidArgumentError as e:
            msg = e.message.splitlines()
            detail = next((m for m in msg if "assertion failed" in m), msg[0] if msg else str(e))
            raise PredictError(f"signature '{signature}' rejected the input: {detail.strip()}") from None
        res = {}
        for name, t in out.items():
            a = t.numpy()
            res[name] = a[:batch] if batch is not None and a.ndim >= 1 else a
        return res


def _to_tensor(value, spec: tf.TensorSpec, name: str) -> tf.Tensor:
    if spec.shape.rank == 2:  # [b, n]: one list per example, all of one length
        rows = value if isinstance(value, list) else [value]
        if not all(isinstance(r, list) for r in rows) or len({len(r) for r in rows}) > 1:
            raise PredictError(f"input '{name}' takes one list per example, all of the same "
                               f"length (pad with \"\" or 0)")
        width = len(rows[0]) if rows else 0
        flat = _to_tensor([v for r in rows for v in r], tf.TensorSpec([None], spec.dtype), name)
        return tf.reshape(flat, [len(rows), width])
    vals = value if isinstance(value, list) else [value]
    if spec.dtype == tf.string:
        bad = next((v for v in vals if isinstance(v, bool) or not isinstance(v, (str, int))), None)
        if bad is not None or any(isinstance(v, str) and len(v) > 1024 for v in vals):
            raise PredictError(f"input '{name}' holds ids: strings or integers (at most 1024 "
                               f"characters); got {type(bad).__name__} {bad!r:.80}")
        vals = [str(v) for v in vals]
    elif spec.dtype.is_integer:
        bad = next((v for v in vals if isinstance(v, bool) or not isinstance(v, int)), None)
        if bad is not None:
            raise PredictError(f"input '{name}' must be an integer; got {type(bad).__name__} {bad!r:.80}")
        lo, hi = spec.dtype.min, spec.dtype.max
        if any(not lo <= v <= hi for v in vals):
            raise PredictError(f"input '{name}' is out of the {spec.dtype.name} range")
    elif spec.dtype.is_floating:
        bad = next((v for v in vals if isinstance(v, bool) or not isinstance(v, (int, float))), None)
        if bad is not None:
            raise PredictError(f"input '{name}' must be a number; got {type(bad).__name__} {bad!r:.80}")
    return tf.constant(vals if isinstance(value, list) else vals[0], dtype=spec.dtype)


@dataclasses.dataclass
class VersionStatus:
    version: int
    state: str       # TF Serving's: LOADING, AVAILABLE, END
    error: str = ""  # why it is not AVAILABLE; never a filesystem path
    code: str = ""   # TF Serving's error_code; "" = OK without error, UNKNOWN with one


RETRY_BASE_S, RETRY_MAX_S = 1.0, 60.0  # a failed load is retried after 1, 2, 4, ... 60 s


@dataclasses.dataclass
class _Watch:
    """A version directory not loaded yet, as the last poll saw it."""
    fp: tuple | None = None         # its files at the last poll
    warned: bool = False            # "incomplete" already logged
    attempts: int = 0               # failed loads
    failed_fp: tuple | None = None  # its files when the last load failed
    next_try: float = 0.0           # monotonic time of the next retry of unchanged files


class ModelManager:
    """Serves the highest version under ``model_dir`` and picks up new ones.

    ``current`` is replaced by one assignment after the new version is loaded and warmed;
    a request reads it once and uses that object to the end, so a swap never interrupts it.
    Every version directory above the current one is watched, highest first: one whose
    files are missing (:func:`missing_files`) or still changing between two polls is
    reported ``LOADING`` (``UNAVAILABLE``, with the reason) and waited for; a load that fails
    is reported ``END`` (``UNKNOWN``) and retried after 1, 2, 4, ... 60 s, or at the first
    poll after its files change and settle, until it loads or a newer version does.

    With ``pinned`` versions (an A/B test's arms) it loads exactly those, once each, into
    ``loaded`` and never swaps; ``current`` is then the first pinned version.
    """

    def __init__(self, model_dir: str | os.PathLike, *, rules: BusinessRules | None = None,
                 max_batch: int = 64, poll_interval_s: float = 5.0,
                 pinned: list[int] | tuple[int, ...] = ()):
        self.model_dir = Path(model_dir)
        self.rules = rules
        self.max_batch = max_batch
        self.poll_interval_s = poll_interval_s
        self.pinned = tuple(pinned)
        self.current: ServedModel | None = None
        self.loaded: dict[int, ServedModel] = {}  # pinned versions that are loaded
        self.statuses: dict[int, VersionStatus] = {}
        self._watch: dict[int, _Watch] = {}       # versions waited for or retried
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def version_dirs(self) -> list[int]:
        """Every version directory (a positive integer name), complete or not."""
        try:
            names = os.listdir(self.model_dir)
        except OSError:
            return []
        return sorted(int(n) for n in names
                      if layout.is_version_dir_name(n) and (self.model_dir / n).is_dir())

    def versions_on_disk(self) -> list[int]:
        """Version directories that hold a ``saved_model.pb``."""
        return [v for v in self.version_dirs()
                if (self.model_dir / str(v) / "saved_model.pb").exists()]

    def public(self, text: str) -> str:
        return public_message(text, self.model_dir)

    def pinned_problem(self) -> str | None:
        """Why not every pinned version serves yet (None once all are loaded)."""
        waiting = [v for v in self.pinned if v not in self.loaded]
        if not waiting:
            return None
        failed = [f"version {v}: {self.statuses[v].error}" for v in waiting
                  if v in self.statuses and self.statuses[v].error]
        if failed:
            return "; ".join(failed)
        return f"version(s) {waiting} not loaded yet"

    def readiness_problem(self) -> str:
        """Why no version serves yet (the default arm), without paths."""
        waiting = sorted((s for s in list(self.statuses.values()) if s.error),
                         key=lambda s: -s.version)
        if waiting:
            return "; ".join(f"version {s.version}: {s.error}" for s in waiting[:3])
        if not self.version_dirs():
            return "no version directory (a positive integer, e.g. 1/) in the model directory yet"
        return "the first version is loading"

    def poll_once(self) -> bool:
        """Loads the highest version above the served one that can be loaded; True if it
        swapped. (Pinned: loads the pinned versions not loaded yet; True if one was loaded.)"""
        if self.pinned:
            return self._load_pinned()
        with self._lock:
            cur = self.current
            newer = [v for v in self.version_dirs() if cur is None or v > cur.version]
            self._forget(keep=set(newer))
            for want in reversed(newer):
                model = self._try_load(want)
                if model is None:
                    continue
                self.current = model  # the swap
                self.statuses[want] = VersionStatus(want, "AVAILABLE")
                if cur is not None:
                    self.statuses[cur.version] = VersionStatus(cur.version, "END")
                self._forget(keep={v for v in newer if v > want})
                return True
            return False

    def _forget(self, keep: set[int]) -> None:
        """Stops watching versions not in ``keep`` (gone, or below the served one)."""
        for v in [v for v in self._watch if v not in keep]:
            del self._watch[v]
            self.statuses.pop(v, None)

    def _try_load(self, v: int) -> ServedModel | None:
        """Version ``v`` loaded and warmed, or None (waiting, backing off, or failed: its
        status says which and why)."""
        path = self.model_dir / str(v)
        w = self._watch.setdefault(v, _Watch())
        fp = fingerprint(path)
        changed = w.fp is not None and fp != w.fp
        w.fp = fp
        missing = missing_files(path)
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            self.statuses[v] = VersionStatus(
                v, "LOADING", f"waiting for files: {shown} not there yet (a copy in progress? "
                              "publish a version by renaming a finished directory into place)",
                "UNAVAILABLE")
            if not w.warned:
                w.warned = True
                log.warning("model version %d at %s is incomplete (missing %s); waiting for its "
                            "files", v, path, ", ".join(missing))
            return None
        if changed or fp is None:
            self.statuses[v] = VersionStatus(
                v, "LOADING", "files still changing (a copy in progress?); loading once they "
                              "stop", "UNAVAILABLE")
            return None
        if w.failed_fp == fp and time.monotonic() < w.next_try:
            return None  # failed with these very files: wait for the backoff
        if w.failed_fp is not None and w.failed_fp != fp:
            w.attempts = 0  # new files: the backoff starts again
        self.statuses[v] = VersionStatus(v, "LOADING")
        t0 = time.perf_counter()
        try:
            model = ServedModel(path, self.rules, self.max_batch)
            model.warm_up()
            after = fingerprint(path)
            if after != fp:
                w.fp = after
                raise IncompleteVersion("files changed while loading (a copy in progress?)")
        except IncompleteVersion as e:
            log.warning("model version %d at %s: %s; trying again once they stop", v, path, e)
            self.statuses[v] = VersionStatus(v, "LOADING", str(e), "UNAVAILABLE")
            return None
        except Exception as e:  # keep serving the old version
            w.attempts += 1
            delay = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (w.attempts - 1))
            w.failed_fp, w.next_try = fp, time.monotonic() + delay
            log.error("loading model version %s from %s failed (attempt %d; retrying in %.0f s, "
                      "sooner if its files change): %s", v, path, w.attempts, delay, e)
            self.statuses[v] = VersionStatus(
                v, "END", self.public(f"load failed (attempt {w.attempts}): {e}"[:2000])
                + f"; retrying in {delay:.0f} s, or as soon as its files change", "UNKNOWN")
            return None
        del self._watch[v]
        log.info("loaded model version %d from %s in %.1f s", v, path, time.perf_counter() - t0)
        return model

    def _load_pinned(self) -> bool:
        with self._lock:
            changed = False
            for v in self.pinned:
                if v in self.loaded:
                    continue
                if not (self.model_dir / str(v)).is_dir():
                    self.statuses[v] = VersionStatus(v, "END", f"version {v} is not in the model "
                                                     "directory", "NOT_FOUND")
                    continue
                model = self._try_load(v)
                if model is None:
                    continue
                self.loaded[v] = model
                self.statuses[v] = VersionStatus(v, "AVAILABLE")
                changed = True
            if self.current is None and self.pinned[0] in self.loaded:
                self.current = self.loaded[self.pinned[0]]
            return changed

    def start(self) -> None:
        """Polls in a daemon thread (the first load happens there too)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="model-poller", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # never let the poller die
                log.exception("model poll failed")
            self._stop.wait(self.poll_interval_s)
