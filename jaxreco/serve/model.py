"""Loading exported model versions with TensorFlow only, and swapping them while serving.

:class:`ServedModel` is one loaded version: the SavedModel's signatures plus the assets the
server reads directly (item vocabulary, categories, metadata). :class:`ModelManager` polls
``<model_dir>`` for version directories (TF Serving's layout), loads and warms the highest
one in a background thread, then swaps a single reference: requests already running keep
the version they started with, new ones get the new version, none is dropped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from jaxreco.serve import layout
from jaxreco.serve.rules import BusinessRules, CompiledRules

log = logging.getLogger(__name__)


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
            raise ValueError(f"{self.path} lacks signature(s) {missing}; was it written by "
                             "jaxreco.export? It has: " + ", ".join(sorted(self.signatures)))
        self.item_ids = np.asarray(_read_lines(self.path / "assets" / layout.ITEM_VOCAB_FILE), dtype=object)
        self.num_items = len(self.item_ids)
        self.item_index = {s: i for i, s in enumerate(self.item_ids)}
        cat_path = self.path / "assets" / layout.ITEM_CATEGORY_FILE
        self.item_category = None
        if cat_path.exists():
            cats = _read_lines(cat_path)
            _, self.item_category = np.unique(np.asarray(cats), return_inverse=True)
        self.max_batch = max_batch
        # predict_ctr (ctr models): its heads and {context feature: {vocab_size, default}}
        self.has_predict_ctr = layout.SIG_PREDICT_CTR in self.signatures
        self.heads = list(self.meta.get("heads") or [])
        self.context_features = dict(self.meta.get("context_features") or {})
        self.rules = CompiledRules.compile(rules or BusinessRules(), self.item_index,
                                           self.num_items, self.item_category)

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

    # ------------------------------------------------------------------ queries
    def user_scores(self, users: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(scores float32 [b, num_items], known bool [b])`` for raw user ids."""
        n = len(users)
        padded = users + [""] * (_bucket(n, self.max_batch) - n)
        out = self.signatures[layout.SIG_USER_SCORES](user=tf.constant(padded))
        return out["scores"].numpy()[:n], out["known"].numpy()[:n]

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
        return {"signature_def": {"signature_def": defs}, "jaxreco": self.meta}

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
                    if t.dtype == tf.string:
                        return tf.fill([pad], "")
                    d = self.context_features.get(n, {}).get("default", 0)
                    return tf.fill([pad], tf.constant(d, t.dtype))
                tensors = {n: (tf.concat([t, filler(n, t)], 0) if specs[n].shape.rank == 1 else t)
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
    state: str  # TF Serving's: LOADING, AVAILABLE, END
    error: str = ""


class ModelManager:
    """Serves the highest version under ``model_dir`` and picks up new ones.

    ``current`` is replaced by one assignment after the new version is loaded and warmed;
    a request reads it once and uses that object to the end, so a swap never interrupts it.

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
        self._failed: dict[int, float] = {}  # version -> mtime when it failed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def versions_on_disk(self) -> list[int]:
        try:
            names = os.listdir(self.model_dir)
        except OSError:
            return []
        return sorted(int(n) for n in names
                      if layout.is_version_dir_name(n) and (self.model_dir / n / "saved_model.pb").exists())

    def pinned_problem(self) -> str | None:
        """Why not every pinned version serves yet (None once all are loaded)."""
        waiting = [v for v in self.pinned if v not in self.loaded]
        if not waiting:
            return None
        failed = [f"version {v}: {self.statuses[v].error}" for v in waiting
                  if v in self.statuses and self.statuses[v].error]
        if failed:
            return "; ".join(failed)
        return f"version(s) {waiting} not loaded yet from {self.model_dir}"

    def poll_once(self) -> bool:
        """Loads the highest version if it is not the one served; True if it swapped.
        (Pinned: loads the pinned versions not loaded yet; True if one was loaded.)"""
        if self.pinned:
            return self._load_pinned()
        with self._lock:
            versions = self.versions_on_disk()
            if not versions:
                return False
            want = versions[-1]
            cur = self.current
            if cur is not None and cur.version == want:
                return False
            path = self.model_dir / str(want)
            mtime = path.stat().st_mtime
            if self._failed.get(want) == mtime:
                return False  # failed before and unchanged since
            self.statuses[want] = VersionStatus(want, "LOADING")
            t0 = time.perf_counter()
            try:
                model = ServedModel(path, self.rules, self.max_batch)
                model.warm_up()
            except Exception as e:  # keep serving the old version
                log.error("loading model version %s from %s failed: %s", want, path, e)
                self._failed[want] = mtime
                self.statuses[want] = VersionStatus(want, "END", f"load failed: {e}"[:2000])
                return False
            self.current = model  # the swap
            self.statuses[want] = VersionStatus(want, "AVAILABLE")
            if cur is not None:
                self.statuses[cur.version] = VersionStatus(cur.version, "END")
            log.info("serving model version %d from %s (loaded in %.1f s)", want, path,
                     time.perf_counter() - t0)
            return True

    def _load_pinned(self) -> bool:
        with self._lock:
            changed = False
            for v in self.pinned:
                if v in self.loaded:
                    continue
                path = self.model_dir / str(v)
                if not (path / "saved_model.pb").exists():
                    self.statuses[v] = VersionStatus(v, "END", f"version {v} is not under "
                                                     f"{self.model_dir} (no {path}/saved_model.pb)")
                    continue
                mtime = path.stat().st_mtime
                if self._failed.get(v) == mtime:
                    continue
                self.statuses[v] = VersionStatus(v, "LOADING")
                t0 = time.perf_counter()
                try:
                    model = ServedModel(path, self.rules, self.max_batch)
                    model.warm_up()
                except Exception as e:
                    log.error("loading pinned model version %s from %s failed: %s", v, path, e)
                    self._failed[v] = mtime
                    self.statuses[v] = VersionStatus(v, "END", f"load failed: {e}"[:2000])
                    continue
                self.loaded[v] = model
                self.statuses[v] = VersionStatus(v, "AVAILABLE")
                changed = True
                log.info("loaded pinned model version %d from %s in %.1f s", v, path,
                         time.perf_counter() - t0)
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
