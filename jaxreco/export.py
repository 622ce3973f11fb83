"""Export a trained recommender to a TensorFlow SavedModel through ``jax2tf``.

The JAX model functions are serialized natively (StableHLO inside an ``XlaCallModule`` op)
with a polymorphic batch dimension; everything around them -- raw-id lookup in the
vocabularies, excluding a user's already-seen items, cold start, top-k -- is ordinary
TensorFlow, so the SavedModel is served by TensorFlow alone (TF Serving, or
:mod:`jaxreco.serve`) and callers speak raw ids.

Signatures (``b`` is any batch size; ids are strings):

================  =======================  ==================================================
name              inputs                   outputs
================  =======================  ==================================================
score             user[b], item[b]         score[b] f32, known[b] bool (0.0 where unknown)
recommend         user[b], k[] int32       items[b,k] str, scores[b,k] f32, known[b] bool
similar_items     item[b], k[] int32       items[b,k], scores[b,k] (cosine), co_counts[b,k]
                                           int32, known[b]
user_scores       user[b]                  scores[b, num_items] f32 (vocab order), known[b]
serving_default   as recommend
predict_ctr       user[b], item[b], one    one f32[b] per head (``click``, ``purchase``:
(ctr runs only)   int32[b] per context     probability; ``rating``: value; 0.0 where
                  feature (``position``)   unknown), known[b] bool
================  =======================  ==================================================

``score`` is the model's raw output of its first head (a logit for ``click``); models with
context features score and recommend in a default context (metadata ``context_features``;
:mod:`jaxreco.export_models`). ``predict_ctr`` checks each context value lies in
``[0, vocab_size)``.

``recommend`` ranks by model score with the user's training items set to
:data:`~jaxreco.serve.layout.EXCLUDED_SCORE`; an unknown user (``known`` false) gets the
items by popularity. ``similar_items`` ranks by co-purchase count when the dataset had
baskets (``co_counts``), ties and the rest by cosine similarity of the item vectors; the
query item itself is excluded.

Versions: jax/jaxlib 0.10.2 with tensorflow(-cpu) 2.21 export and serve (checked by the
tests). A newer JAX writes a StableHLO version that TF 2.21 cannot deserialize; the export
reloads what it wrote and fails with :class:`ExportError` naming both versions if so.

Two layers: :func:`export_saved_model` takes parameters and pure JAX functions and knows
nothing about training; :func:`export_run` adapts any ``jaxreco-train`` run directory to it
(biased MF; every ``embed_mlp`` combiner through :mod:`jaxreco.export_models`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxreco import ask, export_models, foldin
from jaxreco.data.prepare import load_split, load_table
from jaxreco.models.embed_mlp import EmbedMLP
from jaxreco.models.mf import MF
from jaxreco.models.sequential import Sequential
from jaxreco.serve import layout

from jaxreco.run import restore_run
from jaxreco.scenarios import basket

# Versions the round trip was checked with (jax2tf native serialization -> TF deserializer).
TESTED_JAX = "0.10.2"
TESTED_TF = "2.21"

ScoreFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
UserItemScoresFn = Callable[[Any, jax.Array], jax.Array]
ItemVectorsFn = Callable[[Any], jax.Array]
PredictFn = Callable[[Any, jax.Array, jax.Array, Mapping[str, jax.Array]], Mapping[str, jax.Array]]


class ExportError(ValueError):
    """The export cannot proceed; the message names the argument or version at fault."""


EncodeFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class SessionModel:
    """How ``session_scores`` / ``recommend_session`` turn a shopper's recent items into
    scores (without one: ``"exclude"``, the user's own scores with the items excluded).

    ``mode="foldin"`` (dot / iALS models): ``foldin`` holds the item vectors, bias, ``α₀``,
    ``λ``, ``ν``; the user vector is solved per request (:mod:`jaxreco.foldin`) from the
    session's items (anonymous shopper) or the user's training items ∪ session items.

    ``mode="sequential"``: ``encode_fn(params, items int32[b, L], events int32[b, L],
    gaps float32[b, L]) -> [b, d]`` (items left-padded with -1, the latest at L-1) and
    ``item_vectors [num_items, d]``; the scores are ``encode(...) · item_vectorsᵀ``. The
    sequence is the user's last training items (``history``: CSR ``(indptr [U+1], item
    indices, event indices, timestamps, gaps)`` in (timestamp, row) order, the gaps as the
    trainer computed them; anonymous: none) followed by the session's known items (gap:
    seconds since the event before, 0 where a timestamp is unknown), cut to its last
    ``max_len``. ``event_vocab`` names event types 1.. (index 0 = unknown).

    With ``attention_fn`` (same inputs as ``encode_fn``, ``-> [b, L]``) and
    ``user_attention_fn(params, user int32[b]) -> (weights [b, L], items int32[b, L])`` a
    sequential export also gets the ``session_attention`` signature (``explain=true``): the
    encoder's attention of the last position over the sequence ``session_scores`` encodes.
    """

    mode: str
    foldin: Any = None
    encode_fn: EncodeFn | None = None
    item_vectors: np.ndarray | None = None
    max_len: int = 0
    event_vocab: Sequence[str] = ()
    history: tuple | None = None
    use_gaps: bool = False
    attention_fn: EncodeFn | None = None
    user_attention_fn: Callable | None = None


# --------------------------------------------------------------------------- helpers
def _import_tf():
    # TensorFlow's start-up notices on every export (CPU features; oneDNN's, which only
    # TF_ENABLE_ONEDNN_OPTS=0 silences in TF 2.21): as the server does (jaxreco.serve.tfenv),
    # so exported and served numbers come from the same kernels; values the user set are kept
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        import tensorflow as tf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ExportError(
            "exporting needs TensorFlow, which is an optional extra: "
            f"pip install 'jaxreco[export]' (tensorflow-cpu=={TESTED_TF}.*); import failed: {e}"
        ) from e
    return tf


def _as_csr(name: str, value: Any, n_rows: int, n_cols: int, with_data: bool):
    """(indptr int64 [n_rows+1], indices int32 [nnz], data int32 [nnz] | None), validated."""
    if hasattr(value, "indptr"):  # scipy.sparse
        parts = (value.indptr, value.indices) + ((value.data,) if with_data else ())
    else:
        parts = tuple(value)
    want = 3 if with_data else 2
    if len(parts) != want:
        fields = "(indptr, indices, data)" if with_data else "(indptr, indices)"
        raise ExportError(f"{name} must be a CSR tuple {fields}; got {len(parts)} arrays")
    indptr = np.asarray(parts[0])
    indices = np.asarray(parts[1])
    if indptr.ndim != 1 or indptr.shape[0] != n_rows + 1:
        raise ExportError(f"{name}.indptr must have shape [{n_rows + 1}]; got {indptr.shape}")
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != indices.shape[0]:
        raise ExportError(f"{name}.indptr must start at 0, never decrease, and end at "
                          f"len(indices)={indices.shape[0]}; got ends {indptr[0]}..{indptr[-1]}")
    if indices.size and (indices.min() < 0 or indices.max() >= n_cols):
        raise ExportError(f"{name}.indices must lie in [0, {n_cols}); got "
                          f"[{indices.min()}, {indices.max()}]")
    data = None
    if with_data:
        data = np.asarray(parts[2])
        if data.shape != indices.shape:
            raise ExportError(f"{name}.data must have the shape of indices {indices.shape}; "
                              f"got {data.shape}")
        data = data.astype(np.int32)
    return indptr.astype(np.int64), indices.astype(np.int32), data


def _check_vocab(name: str, vocab: Sequence[str]) -> np.ndarray:
    v = np.asarray([str(x) for x in vocab], dtype=object)
    if v.ndim != 1 or v.size == 0:
        raise ExportError(f"{name} must be a non-empty 1-D array of raw ids; got shape {v.shape}")
    for i, s in enumerate(v):
        if not s or "\n" in s or "\r" in s:
            raise ExportError(f"{name}[{i}]={s!r}: ids must be non-empty and contain no line "
                              "breaks (vocabularies are stored one id per line)")
    uniq, counts = np.unique(v.astype(str), return_counts=True)
    if uniq.size != v.size:
        raise ExportError(f"{name} has duplicate ids, e.g. {uniq[counts > 1][:3].tolist()}")
    return v


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for s in lines:
            f.write(f"{s}\n")


def co_purchase_counts(basket: np.ndarray, item: np.ndarray, num_items: int, *,
                       max_basket_size: int = 64, max_partners: int = 100,
                       chunk_pairs: int = 10_000_000):
    """CSR ``(indptr [I+1], indices, data)``: how many baskets hold both items ``i`` and ``j``.

    ``basket`` and ``item`` are parallel arrays (e.g. Instacart's ``order_id`` and the item
    index); an item counted once per basket. Baskets of one item say nothing and baskets
    of more than ``max_basket_size`` items (bulk orders) are skipped; each item keeps its
    ``max_partners`` most frequent partners (ties: lower index), so the result stays small.
    Work is vectorised per basket size, ``chunk_pairs`` pairs at a time.
    """
    pairs = np.unique(np.stack([np.asarray(basket, np.int64), np.asarray(item, np.int64)], 1), axis=0)
    if pairs.size and (pairs[:, 1].min() < 0 or pairs[:, 1].max() >= num_items):
        raise ExportError(f"co_purchase_counts: item indices must lie in [0, {num_items})")
    _, start, size = np.unique(pairs[:, 0], return_index=True, return_counts=True)
    keys, counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for s in np.unique(size[(size >= 2) & (size <= max_basket_size)]):
        starts = start[size == s]
        step = max(1, chunk_pairs // int(s * s))
        off = ~np.eye(s, dtype=bool)
        for c in range(0, len(starts), step):
            rows = pairs[starts[c:c + step, None] + np.arange(s)[None, :], 1]  # [n, s] items
            k = (rows[:, :, None] * num_items + rows[:, None, :])[:, off]
            k, n = np.unique(k, return_counts=True)
            keys, inv = np.unique(np.concatenate([keys, k]), return_inverse=True)
            counts = np.bincount(inv, weights=np.concatenate([counts, n]).astype(np.float64),
                                 minlength=len(keys)).astype(np.int64) if len(keys) else counts
    r, c = keys // num_items, keys % num_items
    order = np.lexsort((c, -counts, r))
    r, c, counts = r[order], c[order], counts[order]
    first = np.searchsorted(r, r, side="left")
    keep = (np.arange(len(r)) - first) < max_partners
    r, c, counts = r[keep], c[keep], counts[keep]
    c_order = np.lexsort((c, r))  # CSR rows with ascending column indices
    indptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=num_items))])
    return (indptr.astype(np.int64), c[c_order].astype(np.int32),
            counts[c_order].astype(np.int32))


def popularity_from_seen(seen_indices: np.ndarray, num_items: int) -> np.ndarray:
    """Number of training interactions per item (float32 [num_items])."""
    return np.bincount(np.asarray(seen_indices), minlength=num_items).astype(np.float32)


# --------------------------------------------------------------------------- TF module
def _build_module(tf, *, leaves, treedef, score_fn, user_item_scores_fn, unit_vectors,
                  user_vocab_path, item_vocab_path, num_users, num_items, seen, popularity,
                  co_counts, platforms, predict_fn=None, heads=(), context_features=None,
                  session: SessionModel | None = None):
    """A ``tf.Module`` holding the parameters, vocabularies and the five signatures (six
    with ``predict_fn``: ``predict_ctr``)."""
    from jax.experimental import jax2tf

    def with_params(fn):
        return lambda flat, *args: fn(jax.tree_util.tree_unflatten(treedef, flat), *args)

    poly_params = [None] * len(leaves)
    conv_score = jax2tf.convert(
        with_params(lambda p, u, i: score_fn(p, u, i).astype(jnp.float32)),
        polymorphic_shapes=[poly_params, "(b,)", "(b,)"], with_gradient=False,
        native_serialization_platforms=platforms)
    conv_all = jax2tf.convert(
        with_params(lambda p, u: user_item_scores_fn(p, u).astype(jnp.float32)),
        polymorphic_shapes=[poly_params, "(b,)"], with_gradient=False,
        native_serialization_platforms=platforms)
    ctx_names = list(context_features or {})
    conv_predict = None
    if predict_fn is not None:
        conv_predict = jax2tf.convert(
            with_params(lambda p, u, i, *c: tuple(
                _head_output(h, predict_fn(p, u, i, dict(zip(ctx_names, c)))[h])
                for h in heads)),
            polymorphic_shapes=[poly_params, "(b,)", "(b,)"] + ["(b,)"] * len(ctx_names),
            with_gradient=False, native_serialization_platforms=platforms)

    session = session or SessionModel("exclude")
    conv_encode = None
    if session.mode == "sequential":
        L = int(session.max_len)
        conv_encode = jax2tf.convert(
            with_params(lambda p, it, ev, gp: session.encode_fn(p, it, ev, gp).astype(jnp.float32)),
            polymorphic_shapes=[poly_params, f"(b, {L})", f"(b, {L})", f"(b, {L})"],
            with_gradient=False, native_serialization_platforms=platforms)
    has_attention = session.mode == "sequential" and session.attention_fn is not None
    if has_attention:
        conv_attention = jax2tf.convert(
            with_params(lambda p, it, ev, gp: session.attention_fn(p, it, ev, gp).astype(jnp.float32)),
            polymorphic_shapes=[poly_params, f"(b, {L})", f"(b, {L})", f"(b, {L})"],
            with_gradient=False, native_serialization_platforms=platforms)
        conv_user_attention = jax2tf.convert(
            with_params(lambda p, u: tuple(
                x.astype(t) for x, t in zip(session.user_attention_fn(p, u),
                                            (jnp.float32, jnp.int32)))),
            polymorphic_shapes=[poly_params, "(b,)"], with_gradient=False,
            native_serialization_platforms=platforms)

    excluded = np.float32(layout.EXCLUDED_SCORE)
    text_init = tf.lookup.TextFileInitializer
    line, whole = tf.lookup.TextFileIndex.LINE_NUMBER, tf.lookup.TextFileIndex.WHOLE_LINE

    class RecModule(tf.Module):
        def __init__(self):
            super().__init__(name="jaxreco")
            self.params = [tf.Variable(x, trainable=False, name=f"param_{i}")
                           for i, x in enumerate(leaves)]
            self.user_vocab = tf.saved_model.Asset(str(user_vocab_path))
            self.item_vocab = tf.saved_model.Asset(str(item_vocab_path))
            self.user_index = tf.lookup.StaticHashTable(
                text_init(self.user_vocab, tf.string, whole, tf.int64, line,
                          vocab_size=num_users), default_value=-1)
            self.item_index = tf.lookup.StaticHashTable(
                text_init(self.item_vocab, tf.string, whole, tf.int64, line,
                          vocab_size=num_items), default_value=-1)
            self.item_id = tf.lookup.StaticHashTable(
                text_init(self.item_vocab, tf.int64, line, tf.string, whole,
                          vocab_size=num_items), default_value="")
            self.seen_indptr = tf.Variable(seen[0], trainable=False, name="seen_indptr")
            self.seen_indices = tf.Variable(seen[1], trainable=False, name="seen_indices")
            self.popularity = tf.Variable(popularity, trainable=False, name="popularity")
            self.unit_vectors = tf.Variable(unit_vectors, trainable=False, name="item_unit_vectors")
            if session.mode == "foldin":
                f = session.foldin
                self.fold_q = tf.Variable(np.asarray(f.item_vectors, np.float32),
                                          trainable=False, name="foldin_item_vectors")
                bias = (np.zeros(num_items, np.float32) if f.item_bias is None
                        else np.asarray(f.item_bias, np.float32))
                self.fold_bias = tf.Variable(bias, trainable=False, name="foldin_item_bias")
                self.fold_gram = tf.Variable(f.gram(), trainable=False, name="foldin_gram")
                self.fold_rhs0 = tf.Variable(f.rhs0(), trainable=False, name="foldin_rhs0")
            elif session.mode == "sequential":
                self.seq_vectors = tf.Variable(np.asarray(session.item_vectors, np.float32),
                                               trainable=False, name="seq_item_vectors")
                h = session.history
                self.hist_indptr = tf.Variable(np.asarray(h[0], np.int64), trainable=False,
                                               name="hist_indptr")
                self.hist_items = tf.Variable(np.asarray(h[1], np.int32), trainable=False,
                                              name="hist_items")
                self.hist_events = tf.Variable(np.asarray(h[2], np.int32), trainable=False,
                                               name="hist_events")
                self.hist_ts = tf.Variable(np.asarray(h[3], np.float64), trainable=False,
                                           name="hist_ts")
                self.hist_gaps = tf.Variable(np.asarray(h[4], np.float32), trainable=False,
                                             name="hist_gaps")
            vocab = list(session.event_vocab)
            self.event_index = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(
                    tf.constant(vocab or ["\x00"], tf.string),
                    tf.constant(list(range(1, len(vocab) + 1)) or [0], tf.int32)),
                default_value=0)
            self.has_co = co_counts is not None
            if self.has_co:
                self.co_indptr = tf.Variable(co_counts[0], trainable=False, name="co_indptr")
                self.co_indices = tf.Variable(co_counts[1], trainable=False, name="co_indices")
                self.co_data = tf.Variable(co_counts[2], trainable=False, name="co_data")

        # The converted JAX functions get their own XLA-compiled tf.functions; the outer
        # signatures hold hash tables and ragged ops, which XLA does not compile.
        @tf.function(jit_compile=True, autograph=False)
        def _jax_score(self, u, i):
            return conv_score(self.params, u, i)

        @tf.function(jit_compile=True, autograph=False)
        def _jax_all(self, u):
            return conv_all(self.params, u)

        @tf.function(jit_compile=True, autograph=False)
        def _jax_predict(self, u, i, *ctx):
            return conv_predict(self.params, u, i, *ctx)

        def _predict_ctr(self, user, item, *ctx):
            u, ku = self._lookup(self.user_index, user)
            i, ki = self._lookup(self.item_index, item)
            known = tf.logical_and(ku, ki)
            checks = [tf.debugging.Assert(
                tf.reduce_all(tf.logical_and(c >= 0, c < n)),
                [f"context feature {name} must be in [0, {n}); got", c], summarize=8)
                for name, n, c in zip(ctx_names, context_features.values(), ctx)]
            with tf.control_dependencies(checks):
                outs = self._jax_predict(tf.cast(u, tf.int32), tf.cast(i, tf.int32), *ctx)
            res = {h: tf.where(known, o, tf.zeros_like(o)) for h, o in zip(heads, outs)}
            res["known"] = known
            return res

        def _lookup(self, table, ids):
            idx = table.lookup(ids)
            known = idx >= 0
            return tf.where(known, idx, tf.zeros_like(idx)), known

        def _scatter_csr(self, base, rows_idx, valid, indptr, indices, values):
            """base[r, indices[indptr[rows_idx[r]]:...]] = values (or the CSR data)."""
            starts = tf.gather(indptr, rows_idx)
            limits = tf.where(valid, tf.gather(indptr, rows_idx + 1), starts)
            ranges = tf.ragged.range(starts, limits)
            pos = ranges.flat_values
            cols = tf.cast(tf.gather(indices, pos), tf.int64)
            rows = ranges.value_rowids()
            upd = (tf.fill(tf.shape(cols), values) if not callable(values)
                   else values(pos))
            return tf.tensor_scatter_nd_update(base, tf.stack([rows, cols], axis=1), upd)

        def _check_k(self, k, limit):
            return tf.debugging.Assert(
                tf.logical_and(k >= 1, k <= limit),
                [f"k must be in [1, {limit}]; got k =", k])

        def _user_scores(self, user):
            u, known = self._lookup(self.user_index, user)
            scores = self._jax_all(tf.cast(u, tf.int32))
            scores = self._scatter_csr(scores, u, known, self.seen_indptr, self.seen_indices,
                                       excluded)
            scores = tf.where(known[:, None], scores, self.popularity[None, :])
            return scores, known

        @tf.function(jit_compile=True, autograph=False)
        def _jax_encode(self, items, events, gaps):
            return conv_encode(self.params, items, events, gaps)

        def _session_scores(self, user, items, events, ts):
            """``(scores [b, I], known [b], session_known [b])``; see :class:`SessionModel`."""
            base, known = self._user_scores(user)
            u, _ = self._lookup(self.user_index, user)
            idx = self.item_index.lookup(items)                      # [b, n], -1 unknown
            valid = idx >= 0
            n_known = tf.reduce_sum(tf.cast(valid, tf.int32), axis=1)
            b = tf.shape(idx, out_type=tf.int64)[0]
            coords = tf.where(valid)                                 # [m, 2] row-major
            sess = tf.tensor_scatter_nd_max(
                tf.zeros(tf.stack([b, num_items]), tf.float32),
                tf.stack([coords[:, 0], tf.gather_nd(idx, coords)], axis=1),
                tf.ones(tf.shape(coords)[:1], tf.float32))           # [b, I] session items
            if session.mode == "exclude":
                scores = tf.where(sess > 0, excluded, base)
                return scores, known, n_known
            seen = self._scatter_csr(tf.zeros_like(sess), u, known, self.seen_indptr,
                                     self.seen_indices, np.float32(1.0))
            drop = tf.maximum(sess, seen)                            # seen ∪ session
            if session.mode == "foldin":
                p = self._fold_in(drop)
                s = tf.matmul(p, self.fold_q, transpose_b=True) + self.fold_bias[None, :]
            else:
                p = self._encode(u, known, idx, valid, events, ts)
                s = tf.matmul(p, self.seq_vectors, transpose_b=True)
            s = tf.where(drop > 0, excluded, s)
            # no known session item: the user's own scores (popularity when unknown)
            scores = tf.where((n_known > 0)[:, None], s, base)
            return scores, known, n_known

        def _fold_in(self, mask):
            """Rows ``(Σ_H q qᵀ + α₀G + λ(|H| + α₀I)^ν 1)⁻¹ (Σ_H (1 − b) q − α₀Q_wᵀb)``
            of the items ``H`` where ``mask`` [b, I] is set (:mod:`jaxreco.foldin`)."""
            f = session.foldin
            d = int(f.item_vectors.shape[1])
            coords = tf.where(mask > 0)
            hist = tf.RaggedTensor.from_value_rowids(
                tf.cast(coords[:, 1], tf.int32), coords[:, 0], nrows=tf.shape(mask, tf.int64)[0])
            h = hist.to_tensor(default_value=num_items)              # [b, m], pad = zero row
            q_pad = tf.concat([self.fold_q, tf.zeros([1, d], tf.float32)], 0)
            b_pad = tf.concat([self.fold_bias, tf.zeros([1], tf.float32)], 0)
            qh = tf.gather(q_pad, h)                                 # [b, m, d]
            bh = tf.gather(b_pad, h)
            cnt = tf.cast(hist.row_lengths(), tf.float32)
            lam = np.float32(f.reg) * tf.pow(cnt + np.float32(f.alpha0 * num_items),
                                             np.float32(f.nu))
            a = (tf.einsum("bmd,bme->bde", qh, qh) + np.float32(f.alpha0) * self.fold_gram[None]
                 + lam[:, None, None] * tf.eye(d, dtype=tf.float32)[None])
            rhs = tf.reduce_sum(qh * (1.0 - bh)[..., None], axis=1) - self.fold_rhs0[None, :]
            # a row with no items (answered by the user's own scores) stays solvable
            a = tf.where((cnt > 0)[:, None, None], a, tf.eye(d, dtype=tf.float32)[None])
            chol = tf.linalg.cholesky(a)
            return tf.linalg.cholesky_solve(chol, rhs[..., None])[..., 0]

        def _encode(self, u, known, idx, valid, events, ts):
            """The encoder on the last ``max_len`` of (the user's history, the session's
            known items), left-padded with -1."""
            return self._jax_encode(*self._encode_inputs(u, known, idx, valid, events, ts))

        def _encode_inputs(self, u, known, idx, valid, events, ts):
            """``(items int32 [b, L], events int32 [b, L], gaps float32 [b, L])``: the last
            ``max_len`` of (the user's history, the session's known items), left-padded."""
            L = int(session.max_len)
            starts = tf.gather(self.hist_indptr, u)
            limits = tf.where(known, tf.gather(self.hist_indptr, u + 1), starts)
            pos = tf.ragged.range(starts, limits)
            h_items = tf.gather(self.hist_items, pos)
            h_events = tf.gather(self.hist_events, pos)
            h_gaps = tf.gather(self.hist_gaps, pos)
            last_ts = tf.where(limits > starts,
                               tf.gather(self.hist_ts, tf.maximum(limits - 1, 0)), 0.0)
            s_items = tf.ragged.boolean_mask(tf.cast(idx, tf.int32), valid)
            s_events = tf.ragged.boolean_mask(self.event_index.lookup(events), valid)
            s_ts = tf.ragged.boolean_mask(ts, valid)
            # a session item's gap: seconds since the event before it (the user's last
            # training item for the first one), 0 where either time is unknown
            flat = s_ts.flat_values
            rows = s_ts.value_rowids()
            first = tf.range(tf.size(flat, out_type=tf.int64)) == tf.gather(s_ts.row_starts(), rows)
            prev = tf.where(first, tf.gather(last_ts, rows),
                            tf.concat([tf.zeros([1], tf.float64), flat[:-1]], 0))
            gap = tf.where((prev > 0) & (flat > 0), tf.maximum(flat - prev, 0.0), 0.0)
            s_gaps = s_ts.with_flat_values(tf.cast(gap, tf.float32))
            seq = [tf.concat([h, x], axis=1)[:, -L:] for h, x in
                   ((h_items, s_items), (h_events, s_events), (h_gaps, s_gaps))]
            n = seq[0].row_lengths()
            j = tf.range(L, dtype=tf.int64)[None, :] - (L - n)[:, None]  # right -> left pad

            def left(x, fill):
                dense = x.to_tensor(default_value=fill, shape=tf.stack(
                    [tf.shape(n, tf.int64)[0], L]))
                return tf.where(j >= 0, tf.gather(dense, tf.maximum(j, 0), batch_dims=1),
                                tf.cast(fill, dense.dtype))
            return left(seq[0], -1), left(seq[1], 0), left(seq[2], 0.0)

        @tf.function(jit_compile=True, autograph=False)
        def _jax_attention(self, items, events, gaps):
            return conv_attention(self.params, items, events, gaps)

        @tf.function(jit_compile=True, autograph=False)
        def _jax_user_attention(self, u):
            return conv_user_attention(self.params, u)

        def _session_attention(self, user, items, events, ts):
            """The attention of the sequence ``_session_scores`` encodes for each row: (the
            user's history, the session's known items) when the session has a known item,
            else the user's own sequence (``user_scores``); all 0 for an unknown user
            without one. ``items`` names each position's item ("" = padding)."""
            with tf.control_dependencies([self._session_inputs(items, events, ts)]):
                u, known = self._lookup(self.user_index, user)
                idx = self.item_index.lookup(items)
                valid = idx >= 0
                n_known = tf.reduce_sum(tf.cast(valid, tf.int32), axis=1)
                s_items, s_events, s_gaps = self._encode_inputs(u, known, idx, valid, events, ts)
                w_s = self._jax_attention(s_items, s_events, s_gaps)
                w_u, u_items = self._jax_user_attention(tf.cast(u, tf.int32))
            use_s = (n_known > 0)[:, None]
            own = known[:, None]
            w = tf.where(use_s, w_s, tf.where(own, w_u, tf.zeros_like(w_u)))
            pos = tf.where(use_s, s_items, tf.where(own, u_items, -tf.ones_like(u_items)))
            ids = self.item_id.lookup(tf.cast(tf.maximum(pos, 0), tf.int64))
            return {"weights": w, "items": tf.where(pos >= 0, ids, tf.fill(tf.shape(ids), "")),
                    "known": known, "session_known": n_known}

        def _session_inputs(self, items, events, ts):
            same = tf.debugging.Assert(
                tf.logical_and(tf.reduce_all(tf.equal(tf.shape(items), tf.shape(events))),
                               tf.reduce_all(tf.equal(tf.shape(items), tf.shape(ts)))),
                ["items, events and ts must have the same shape [b, n]; got",
                 tf.shape(items), tf.shape(events), tf.shape(ts)])
            return same

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user"),
                                      tf.TensorSpec([None, None], tf.string, name="items"),
                                      tf.TensorSpec([None, None], tf.string, name="events"),
                                      tf.TensorSpec([None, None], tf.float64, name="ts")])
        def session_scores(self, user, items, events, ts):
            with tf.control_dependencies([self._session_inputs(items, events, ts)]):
                scores, known, n_known = self._session_scores(user, items, events, ts)
            return {"scores": scores, "known": known, "session_known": n_known}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user"),
                                      tf.TensorSpec([None, None], tf.string, name="items"),
                                      tf.TensorSpec([None, None], tf.string, name="events"),
                                      tf.TensorSpec([None, None], tf.float64, name="ts"),
                                      tf.TensorSpec([], tf.int32, name="k")])
        def recommend_session(self, user, items, events, ts, k):
            with tf.control_dependencies([self._check_k(k, num_items),
                                          self._session_inputs(items, events, ts)]):
                scores, known, n_known = self._session_scores(user, items, events, ts)
                top = tf.math.top_k(scores, k=k)
            return {"items": self.item_id.lookup(tf.cast(top.indices, tf.int64)),
                    "scores": top.values, "known": known, "session_known": n_known}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user"),
                                      tf.TensorSpec([None], tf.string, name="item")])
        def score(self, user, item):
            u, ku = self._lookup(self.user_index, user)
            i, ki = self._lookup(self.item_index, item)
            known = tf.logical_and(ku, ki)
            s = self._jax_score(tf.cast(u, tf.int32), tf.cast(i, tf.int32))
            return {"score": tf.where(known, s, tf.zeros_like(s)), "known": known}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user")])
        def user_scores(self, user):
            scores, known = self._user_scores(user)
            return {"scores": scores, "known": known}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user"),
                                      tf.TensorSpec([], tf.int32, name="k")])
        def recommend(self, user, k):
            with tf.control_dependencies([self._check_k(k, num_items)]):
                scores, known = self._user_scores(user)
                top = tf.math.top_k(scores, k=k)
            return {"items": self.item_id.lookup(tf.cast(top.indices, tf.int64)),
                    "scores": top.values, "known": known}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="item"),
                                      tf.TensorSpec([], tf.int32, name="k")])
        def similar_items(self, item, k):
            with tf.control_dependencies([self._check_k(k, num_items - 1)]):
                i, known = self._lookup(self.item_index, item)
            sims = tf.matmul(tf.gather(self.unit_vectors, i), self.unit_vectors,
                             transpose_b=True)
            sims = tf.where(known[:, None], sims, self.popularity[None, :])
            b = tf.shape(i, out_type=tf.int64)[0]
            self_pos = tf.stack([tf.range(b), i], axis=1)
            self_val = tf.where(known, tf.fill([b], excluded), tf.gather_nd(sims, self_pos))
            sims = tf.tensor_scatter_nd_update(sims, self_pos, self_val)  # unknown: no self
            if self.has_co:
                co = self._scatter_csr(tf.zeros_like(sims, dtype=tf.int32), i, known,
                                       self.co_indptr, self.co_indices,
                                       lambda pos: tf.gather(self.co_data, pos))
                co = tf.tensor_scatter_nd_update(co, self_pos, tf.zeros([b], tf.int32))
                # Lexicographic (co-count, cosine), both descending: sort by cosine, then
                # stable-sort that order by co-count.
                by_sim = tf.argsort(sims, axis=1, direction="DESCENDING", stable=True)
                co_by_sim = tf.gather(co, by_sim, batch_dims=1)
                order = tf.gather(by_sim, tf.argsort(co_by_sim, axis=1, direction="DESCENDING",
                                                     stable=True), batch_dims=1)[:, :k]
            else:
                order = tf.math.top_k(sims, k=k).indices
                co = tf.zeros_like(sims, dtype=tf.int32)
            return {"items": self.item_id.lookup(tf.cast(order, tf.int64)),
                    "scores": tf.gather(sims, order, batch_dims=1),
                    "co_counts": tf.gather(co, order, batch_dims=1),
                    "known": known}

    module = RecModule()
    if predict_fn is not None:
        spec = ([tf.TensorSpec([None], tf.string, name="user"),
                 tf.TensorSpec([None], tf.string, name="item")]
                + [tf.TensorSpec([None], tf.int32, name=c) for c in ctx_names])
        module.predict_ctr = tf.function(module._predict_ctr, input_signature=spec)
    if has_attention:
        module.session_attention = tf.function(module._session_attention, input_signature=[
            tf.TensorSpec([None], tf.string, name="user"),
            tf.TensorSpec([None, None], tf.string, name="items"),
            tf.TensorSpec([None, None], tf.string, name="events"),
            tf.TensorSpec([None, None], tf.float64, name="ts")])
    return module


def _head_output(head: str, z: jax.Array) -> jax.Array:
    """What ``predict_ctr`` returns for a head: the probability ``sigmoid(logit)`` of a
    click-like head, the value of a ``rating`` head."""
    z = z.astype(jnp.float32)
    return z if head == "rating" else jax.nn.sigmoid(z)


# --------------------------------------------------------------------------- public API
def export_saved_model(
    out_dir: str | os.PathLike,
    version: int,
    *,
    params: Any,
    score_fn: ScoreFn,
    user_item_scores_fn: UserItemScoresFn,
    item_vectors_fn: ItemVectorsFn,
    user_vocab: Sequence[str],
    item_vocab: Sequence[str],
    seen: Any,
    popularity: np.ndarray | None = None,
    item_category: Sequence[str] | None = None,
    co_counts: Any = None,
    model_info: dict | None = None,
    predict_fn: PredictFn | None = None,
    heads: Sequence[str] = (),
    context_features: Mapping[str, int] | None = None,
    context_defaults: Mapping[str, int] | None = None,
    platforms: Sequence[str] = ("cpu",),
    verify: bool = True,
    overwrite: bool = False,
    session: SessionModel | None = None,
    assets_extra: Mapping[str, bytes] | None = None,
) -> Path:
    """Writes ``<out_dir>/<version>/`` (a SavedModel) and returns that path.

    Args:
      out_dir: the model directory (TF Serving's ``model_base_path``).
      version: positive integer; the server picks up the highest version.
      params: pytree of arrays (numpy or jax); stored as TF variables.
      score_fn: ``score_fn(params, user_idx int32[b], item_idx int32[b]) -> float32[b]``.
      user_item_scores_fn: ``(params, user_idx int32[b]) -> float32[b, num_items]``, the
        score of every item for each user (what ``recommend`` ranks).
      item_vectors_fn: ``(params) -> float[num_items, d]``; ``similar_items`` ranks by the
        cosine of these vectors.
      user_vocab, item_vocab: raw id strings, ``vocab[index] == raw id``.
      seen: the users' training items as CSR ``(indptr [U+1], indices [nnz])`` (or a
        ``scipy.sparse.csr_matrix``); excluded from ``recommend``.
      popularity: float [num_items], ranks items for unknown users; default: number of
        training interactions per item (from ``seen``).
      item_category: optional category (string) per item, used by the server's
        per-category limit.
      co_counts: optional CSR ``(indptr [I+1], indices, data)`` of co-purchase counts
        (items bought in the same basket); ranks ``similar_items`` before cosine.
      model_info: extra JSON-serializable metadata stored in ``assets.extra/jaxreco.json``.
      assets_extra: ``{file name: bytes}`` written under ``assets.extra/`` before the
        version appears (e.g. the complete-the-cart files of :mod:`jaxreco.scenarios.basket`).
      predict_fn: optional ``(params, user_idx int32[b], item_idx int32[b], context
        {feature: int32[b]}) -> {head: float[b]}`` logits of every head in ``heads``; adds
        the ``predict_ctr`` signature (probabilities; a ``rating`` head's value as is).
      heads: the heads ``predict_fn`` returns, in output order.
      context_features: ``{feature: vocabulary size}``: ``predict_ctr`` takes one int32
        input per feature, valid values ``0 .. size-1`` (the prepared data's raw values).
      context_defaults: ``{feature: value}`` the ``score_fn``/``user_item_scores_fn`` used
        for context (recorded in the metadata; the server pads with them); default 0.
      platforms: ``jax2tf`` native serialization platforms (``("cpu", "cuda")`` for both).
      verify: reload the written SavedModel and compare a few scores with JAX; fails with
        :class:`ExportError` when this TensorFlow cannot run what this JAX wrote.
      overwrite: replace an existing ``<out_dir>/<version>``.
      session: how ``session_scores`` / ``recommend_session`` use a shopper's recent items
        (:class:`SessionModel`); default ``"exclude"`` (the user's scores, those items
        excluded).
    """
    tf = _import_tf()
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ExportError(f"version must be a positive integer (TF Serving layout); got {version!r}")
    out_dir = Path(out_dir)
    final = out_dir / str(int(version))
    if final.exists() and not overwrite:
        raise ExportError(f"{final} already exists; pick a new version or pass overwrite=True")

    user_vocab = _check_vocab("user_vocab", user_vocab)
    item_vocab = _check_vocab("item_vocab", item_vocab)
    num_users, num_items = len(user_vocab), len(item_vocab)
    if num_items < 2:
        raise ExportError(f"item_vocab needs at least 2 items; got {num_items}")
    seen = _as_csr("seen", seen, num_users, num_items, with_data=False)
    if co_counts is not None:
        co_counts = _as_csr("co_counts", co_counts, num_items, num_items, with_data=True)
    if popularity is None:
        popularity = popularity_from_seen(seen[1], num_items)
    popularity = np.asarray(popularity, dtype=np.float32)
    if popularity.shape != (num_items,) or not np.all(np.isfinite(popularity)):
        raise ExportError(f"popularity must be finite with shape [{num_items}]; "
                          f"got shape {popularity.shape}")
    if item_category is not None:
        item_category = _check_categories(item_category, num_items)

    context_features, context_defaults, heads = _check_predict(
        predict_fn, heads, context_features, context_defaults)

    session = _check_session(session, num_users, num_items)

    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [np.asarray(x) for x in leaves]
    if not leaves:
        raise ExportError("params is an empty pytree")

    # Shapes first: the functions must give what the signatures promise.
    p_shapes = jax.tree_util.tree_unflatten(
        treedef, [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves])
    b = jax.ShapeDtypeStruct((3,), jnp.int32)
    got = jax.eval_shape(score_fn, p_shapes, b, b)
    if got.shape != (3,):
        raise ExportError(f"score_fn(params, user[3], item[3]) must return shape (3,); got {got.shape}")
    got = jax.eval_shape(user_item_scores_fn, p_shapes, b)
    if got.shape != (3, num_items):
        raise ExportError("user_item_scores_fn(params, user[3]) must return shape "
                          f"(3, {num_items}) (num_items from item_vocab); got {got.shape}")
    if predict_fn is not None:
        ctx = {c: b for c in context_features}
        got = jax.eval_shape(predict_fn, p_shapes, b, b, ctx)
        bad = {h: getattr(got.get(h) if isinstance(got, Mapping) else None, "shape", None)
               for h in heads}
        if any(v != (3,) for v in bad.values()):
            raise ExportError(f"predict_fn(params, user[3], item[3], context) must return "
                              f"{{head: shape (3,)}} for heads {list(heads)}; got {bad}")
    vectors = np.asarray(jax.jit(item_vectors_fn)(params), dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != num_items:
        raise ExportError(f"item_vectors_fn(params) must return [{num_items}, d]; got {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit_vectors = vectors / np.maximum(norms, 1e-12)

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{int(version)}-", dir=out_dir))
    try:
        src_assets = tmp / "_assets_src"
        src_assets.mkdir()
        _write_lines(src_assets / layout.USER_VOCAB_FILE, user_vocab)
        _write_lines(src_assets / layout.ITEM_VOCAB_FILE, item_vocab)
        module = _build_module(
            tf, leaves=leaves, treedef=treedef, score_fn=score_fn,
            user_item_scores_fn=user_item_scores_fn, unit_vectors=unit_vectors,
            user_vocab_path=src_assets / layout.USER_VOCAB_FILE,
            item_vocab_path=src_assets / layout.ITEM_VOCAB_FILE,
            num_users=num_users, num_items=num_items, seen=seen, popularity=popularity,
            co_counts=co_counts, platforms=tuple(platforms), predict_fn=predict_fn,
            heads=heads, context_features=context_features, session=session)
        saved = tmp / "model"
        signatures = {
            layout.SIG_SCORE: module.score.get_concrete_function(),
            layout.SIG_RECOMMEND: module.recommend.get_concrete_function(),
            layout.SIG_SIMILAR: module.similar_items.get_concrete_function(),
            layout.SIG_USER_SCORES: module.user_scores.get_concrete_function(),
            layout.SIG_DEFAULT: module.recommend.get_concrete_function(),
            layout.SIG_SESSION_SCORES: module.session_scores.get_concrete_function(),
            layout.SIG_RECOMMEND_SESSION: module.recommend_session.get_concrete_function(),
        }
        if predict_fn is not None:
            signatures[layout.SIG_PREDICT_CTR] = module.predict_ctr.get_concrete_function()
        if hasattr(module, "session_attention"):
            signatures[layout.SIG_SESSION_ATTENTION] = (
                module.session_attention.get_concrete_function())
        try:
            tf.saved_model.save(module, str(saved), signatures=signatures)
        except Exception as e:
            raise ExportError(_version_hint(f"tf.saved_model.save failed: {e}")) from e
        if item_category is not None:
            _write_lines(saved / "assets" / layout.ITEM_CATEGORY_FILE, item_category)
        meta = {
            "format_version": layout.FORMAT_VERSION,
            "num_users": num_users,
            "num_items": num_items,
            "embedding_dim": int(vectors.shape[1]),
            "has_item_category": item_category is not None,
            "has_co_counts": co_counts is not None,
            "signatures": list(signatures),
            "heads": list(heads),
            "context_features": {c: {"vocab_size": n, "default": context_defaults[c]}
                                 for c, n in context_features.items()},
            "excluded_score": layout.EXCLUDED_SCORE,
            "session": _session_meta(session),
            "jax_version": jax.__version__,
            "tensorflow_version": tf.__version__,
            "platforms": list(platforms),
            "created_unix": int(time.time()),
            "model_info": model_info or {},
        }
        (saved / "assets.extra").mkdir(exist_ok=True)
        (saved / "assets.extra" / layout.METADATA_FILE).write_text(json.dumps(meta, indent=2))
        for name, data in (assets_extra or {}).items():
            if name == layout.METADATA_FILE or "/" in name or name.startswith("."):
                raise ExportError(f"assets_extra: bad file name {name!r}")
            (saved / "assets.extra" / name).write_bytes(data)
        del module
        if verify:
            _verify(tf, saved, params, score_fn, user_vocab, item_vocab, predict_fn, heads,
                    context_features)
        if final.exists():  # overwrite=True
            shutil.rmtree(final)
        os.rename(saved, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check_session(session: SessionModel | None, num_users: int,
                   num_items: int) -> SessionModel:
    """``session`` checked against the vocabularies (``"exclude"`` when None)."""
    if session is None:
        return SessionModel("exclude")
    if session.mode not in layout.SESSION_MODES:
        raise ExportError(f"session.mode={session.mode!r}: must be one of {layout.SESSION_MODES}")
    for e in session.event_vocab:
        if not isinstance(e, str) or not e:
            raise ExportError(f"session.event_vocab holds {e!r}: event types are non-empty strings")
    if session.mode == "foldin":
        if session.foldin is None or session.foldin.num_items != num_items:
            raise ExportError(f"session mode 'foldin' needs foldin= a jaxreco.foldin.FoldIn "
                              f"over the {num_items} items")
    elif session.mode == "sequential":
        if session.encode_fn is None or not int(session.max_len) >= 1:
            raise ExportError("session mode 'sequential' needs encode_fn and max_len >= 1; got "
                              f"max_len={session.max_len!r}")
        if (session.attention_fn is None) != (session.user_attention_fn is None):
            raise ExportError("session: give both attention_fn and user_attention_fn (the "
                              "session_attention signature needs both) or neither")
        v = np.asarray(session.item_vectors)
        if v.ndim != 2 or v.shape[0] != num_items:
            raise ExportError(f"session.item_vectors must be [{num_items}, d]; got {v.shape}")
        h = session.history
        if h is None or len(h) != 5:
            raise ExportError("session.history must be (indptr, items, events, ts, gaps)")
        indptr = np.asarray(h[0])
        if indptr.shape != (num_users + 1,) or indptr[0] != 0 or indptr[-1] != len(h[1]) \
                or np.any(np.diff(indptr) < 0):
            raise ExportError(f"session.history indptr must be [{num_users + 1}], from 0 to "
                              f"len(items)={len(h[1])}, never decreasing")
        if not len(h[1]) == len(h[2]) == len(h[3]) == len(h[4]):
            raise ExportError("session.history items, events, ts and gaps must have one "
                              "entry each")
    return session


def _session_meta(session: SessionModel) -> dict:
    meta = {"mode": session.mode, "event_vocab": list(session.event_vocab)}
    if session.mode == "sequential":
        meta.update(max_len=int(session.max_len), use_gaps=bool(session.use_gaps))
    if session.mode == "foldin":
        f = session.foldin
        meta.update(alpha0=float(f.alpha0), reg=float(f.reg), nu=float(f.nu),
                    item_bias=f.item_bias is not None,
                    unobserved_weights=f.col_weight is not None)
    return meta


def _check_categories(item_category, num_items):
    cats = [str(c) for c in item_category]
    if len(cats) != num_items:
        raise ExportError(f"item_category must have one entry per item ({num_items}); got {len(cats)}")
    for i, c in enumerate(cats):
        if "\n" in c or "\r" in c:
            raise ExportError(f"item_category[{i}]={c!r} contains a line break")
    return cats


def _check_predict(predict_fn, heads, context_features, context_defaults):
    """``(context_features, context_defaults, heads)`` checked and made plain."""
    heads = tuple(str(h) for h in heads)
    if predict_fn is not None and not heads:
        raise ExportError("predict_fn needs heads=[...]: the names of the heads it returns")
    if len(set(heads)) != len(heads) or "known" in heads:
        raise ExportError(f"heads={list(heads)} must be distinct and not 'known'")
    ctx = {str(c): n for c, n in (context_features or {}).items()}
    if ctx and predict_fn is None:
        raise ExportError(f"context_features {sorted(ctx)} are inputs of predict_ctr: pass "
                          "predict_fn too")
    for c, n in ctx.items():
        if c in ("user", "item", "k") or not c.isidentifier():
            raise ExportError(f"context feature name {c!r} must be an identifier other than "
                              "user, item and k (it names a signature input)")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ExportError(f"context_features[{c!r}]={n!r}: the vocabulary size must be a "
                              "positive integer")
    defaults = {c: int((context_defaults or {}).get(c, 0)) for c in ctx}
    extra = sorted(set(context_defaults or {}) - set(ctx))
    if extra:
        raise ExportError(f"context_defaults names {extra}, not in context_features "
                          f"{sorted(ctx)}")
    for c, d in defaults.items():
        if not 0 <= d < ctx[c]:
            raise ExportError(f"context_defaults[{c!r}]={d}: must lie in [0, {ctx[c]})")
    return {c: int(n) for c, n in ctx.items()}, defaults, heads


def _version_hint(msg: str) -> str:
    import tensorflow as tf
    return (f"{msg}\nThis jax {jax.__version__} / tensorflow {tf.__version__} pair may not "
            f"round-trip: exporting is tested with jax {TESTED_JAX} and tensorflow {TESTED_TF} "
            "(a newer JAX writes StableHLO that an older TensorFlow cannot deserialize). "
            "Install the tested versions: pip install 'jaxreco[export]'.")


def _verify(tf, saved: Path, params, score_fn, user_vocab, item_vocab, predict_fn=None,
            heads=(), context_features=None, n: int = 16) -> None:
    """Reload the SavedModel and compare ``score`` (and ``predict_ctr``) with JAX on ``n``
    random pairs (and context values)."""
    rng = np.random.default_rng(0)
    u = rng.integers(0, len(user_vocab), n).astype(np.int32)
    i = rng.integers(0, len(item_vocab), n).astype(np.int32)
    ids = {"user": tf.constant(user_vocab[u].astype(str)),
           "item": tf.constant(item_vocab[i].astype(str))}
    want = {"score": np.asarray(jax.jit(score_fn)(params, u, i), dtype=np.float32)}
    ctx = {c: rng.integers(0, v, n).astype(np.int32) for c, v in (context_features or {}).items()}
    if predict_fn is not None:
        z = jax.jit(predict_fn)(params, u, i, ctx)
        want.update({h: np.asarray(_head_output(h, z[h])) for h in heads})
    try:
        loaded = tf.saved_model.load(str(saved))
        got = {"score": loaded.signatures[layout.SIG_SCORE](**ids)["score"].numpy()}
        if predict_fn is not None:
            out = loaded.signatures[layout.SIG_PREDICT_CTR](
                **ids, **{c: tf.constant(v) for c, v in ctx.items()})
            got.update({h: out[h].numpy() for h in heads})
    except Exception as e:
        raise ExportError(_version_hint(f"reloading the exported SavedModel failed: {e}")) from e
    for k, w in want.items():
        err = float(np.max(np.abs(got[k] - w)))
        if not err <= 1e-4 * max(1.0, float(np.max(np.abs(w)))):
            raise ExportError(_version_hint(
                f"the reloaded SavedModel's {k!r} outputs differ from JAX by up to {err:g}"))


def biased_mf_functions():
    """``score_fn``, ``user_item_scores_fn``, ``item_vectors_fn`` for biased MF params.

    ``r(u, i) = global_bias + user_bias[u] + item_bias[i] + <user_embed[u], item_embed[i]>``,
    the scoring of :class:`jaxreco.models.mf.MF` on whole tables instead of gathered rows.
    """
    def score(p, u, i):
        return (p["global_bias"] + p["user_bias"][u, 0] + p["item_bias"][i, 0]
                + jnp.sum(p["user_embed"][u] * p["item_embed"][i], axis=-1))

    def user_item_scores(p, u):
        return (p["global_bias"] + p["user_bias"][u] + p["item_bias"][:, 0][None, :]
                + p["user_embed"][u] @ p["item_embed"].T)

    def item_vectors(p):
        return p["item_embed"]

    return score, user_item_scores, item_vectors


def seen_csr(user: np.ndarray, item: np.ndarray, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR ``(indptr [U+1], indices)`` of each user's distinct items, sorted."""
    pairs = np.unique(np.stack([np.asarray(user, np.int64), np.asarray(item, np.int64)], 1), axis=0)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(pairs[:, 0], minlength=num_users))])
    return indptr.astype(np.int64), pairs[:, 1].astype(np.int32)


@dataclasses.dataclass(frozen=True)
class _RunData:
    """What an export needs from a restored run's task, whatever its kind."""

    dataset: str
    user_vocab: np.ndarray
    item_vocab: np.ndarray
    seen: tuple[np.ndarray, np.ndarray]      # (user, item) of the training positives
    train: dict[str, np.ndarray]             # the prepared train split's columns
    item_side: dict[str, np.ndarray]         # {feature: index per item, 0 = unknown}
    item_category: list[str] | None


def _run_data(task) -> _RunData:
    """Vocabularies, training positives and item features of a restored run's task: the
    prepared directory the run trained on (``task.path``, whose train sha256
    :func:`restore_run` checked against ``splits.json``) and the splits the task loaded."""
    train = {k: np.asarray(v) for k, v in task.split["train"].items()}
    pos = train["label"] > 0 if task.has_label else slice(None)
    category = None
    item_f = load_table(task.path, "item_features")
    if "category" in item_f:
        names = task.meta.get("category_vocab")
        idx = np.asarray(item_f["category"]).astype(np.int64)
        if (idx >= 0).any():   # a dataset without categories has -1 everywhere: none exported
            category = ["" if c < 0 else (str(names[c]) if names else str(c))
                        for c in idx.tolist()]
    return _RunData(dataset=str(task.meta["dataset"]),
                    user_vocab=load_table(task.path, "user_vocab")["raw_id"].astype(str),
                    item_vocab=load_table(task.path, "item_vocab")["raw_id"].astype(str),
                    seen=(train["user"][pos], train["item"][pos]), train=train,
                    item_side=dict(task.item_side), item_category=category)


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, version: int,
               *, step: int | None = None, complement: str | os.PathLike | None = None,
               **kwargs) -> Path:
    """Exports a run directory written by ``jaxreco-train``: any model the trainer trains.

    The run is restored with :func:`jaxreco.run.restore_run` (its ``config.yaml``, the
    prepared directory ``splits.json`` names, train sha256 checked, and the checkpoint
    ``step``, default the best step in ``metrics.json`` when it is kept, else the latest);
    nothing is re-split: "seen" (excluded from ``recommend``) is the task's own training
    split, positives only (``label > 0``) when the data has labels. Tables are trimmed to
    the vocabularies, then:

    * ``model=mf`` (ratings): :func:`biased_mf_functions`;
    * ``model=embed_mlp`` (any combiner, heads, item-side and context features):
      :func:`jaxreco.export_models.embed_mlp_functions`. Item-side features are constants
      of the export. A ``ctr`` run also gets ``predict_ctr`` (per-head probabilities, one
      int32 input per context feature); ``score``/``recommend`` use each context feature's
      most frequent value in the training split (recorded in the metadata).

    Items' categories (``item_features.category``, named by ``metadata.category_vocab``)
    go to ``item_category.txt`` for the server's per-category cap and ``/complete`` (when
    the dataset has categories: some item's is known). When the training split has baskets
    (an ``order_id`` column, e.g. ``instacart-sample``; ``prepare.dedup=none`` keeps every
    order line), their co-purchase counts rank ``similar_items`` and go to
    ``assets.extra/co_purchase.npz`` for ``/complete``; ``complement``, a model written by
    ``python -m jaxreco.complement``, goes to
    ``assets.extra/complement.npz``, matched to the run's items by raw id. Item texts
    (MovieLens titles and genres, else category names; prices) go to
    ``assets.extra/item_text.json`` for ``/ask`` (:mod:`jaxreco.ask`). ``kwargs`` go to
    :func:`export_saved_model` (``model_info`` is merged into the run's own).
    """
    run_dir = Path(run_dir)
    for f in ("config.yaml", "splits.json", "checkpoints"):
        if not (run_dir / f).exists():
            raise ExportError(f"{run_dir} is not a jaxreco-train run directory: no {f}")
    r = restore_run(str(run_dir), step=step)
    if step is not None and int(r.step) != int(step):
        kept = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
        raise ExportError(f"{run_dir}/checkpoints has no step {step}; steps: {kept}")
    kind = r.task.kind
    d = _run_data(r.task)
    nu, ni = len(d.user_vocab), len(d.item_vocab)
    model = r.abstract_model
    info = {"run_dir": str(run_dir.resolve()), "dataset": d.dataset, "task": kind,
            "model": str(r.cfg.model.name), "checkpoint_step": int(r.step)}
    if "discount_levels" in r.cfg.dataset:   # an uplift model: /offers reads the levels
        info["discount_levels"] = [float(x) for x in r.cfg.dataset.discount_levels]
    extra: dict[str, Any] = {}
    if isinstance(model, MF):
        t = {k: np.asarray(v) for k, v in r.state.table_values().items()}
        params = {"user_embed": t["user_embed"][:nu], "item_embed": t["item_embed"][:ni],
                  "user_bias": t["user_bias"][:nu], "item_bias": t["item_bias"][:ni],
                  "global_bias": np.asarray(r.state.dense["global_bias"][...], np.float32)}
        score, all_scores, vectors = biased_mf_functions()
        info["item_vectors"] = "item_embed"
    elif isinstance(model, EmbedMLP):
        defaults = {f: int(np.bincount(np.asarray(d.train[f], np.int64)).argmax())
                    if len(d.train[f]) else 0 for f in model.context}
        fns = export_models.embed_mlp_functions(
            r.graphdef, r.state.tables, r.state.dense, num_users=nu, num_items=ni,
            item_side=d.item_side, context_defaults=defaults)
        params, score, all_scores, vectors = (fns.params, fns.score_fn,
                                              fns.user_item_scores_fn, fns.item_vectors_fn)
        info.update(combiner=model.combiner, head=fns.heads[0], item_vectors=fns.item_vectors,
                    side_features=sorted(model.side))
        if model.combiner == "dot" and not model.side and not model.context:
            kwargs.setdefault("session", SessionModel("foldin", foldin=_foldin_of(r, d, ni)))
        if kind == "ctr":
            extra = {"predict_fn": fns.predict_fn, "heads": fns.heads,
                     "context_features": fns.context_features,
                     "context_defaults": fns.context_defaults}
        elif model.context:
            info["context_defaults"] = fns.context_defaults
    elif isinstance(model, Sequential):
        seq = export_models.sequential_functions(
            r.graphdef, r.state.tables, r.state.dense, num_users=nu, num_items=ni,
            user_seq=r.task.user_features(), use_events=bool(r.cfg.model.events),
            use_gaps=bool(r.cfg.model.gaps))
        fns = seq.functions
        params, score, all_scores, vectors = (fns.params, fns.score_fn,
                                              fns.user_item_scores_fn, fns.item_vectors_fn)
        info.update(head=fns.heads[0], item_vectors=fns.item_vectors, max_len=seq.max_len)
        kwargs.setdefault("session", SessionModel(
            "sequential", encode_fn=seq.encode_fn, item_vectors=seq.item_vectors,
            max_len=seq.max_len, use_gaps=seq.use_gaps,
            event_vocab=_event_vocab(r.task) if seq.use_events else (),
            history=_history(r.task, seq.max_len), attention_fn=seq.attention_fn,
            user_attention_fn=seq.user_attention_fn))
    else:
        raise ExportError(f"{run_dir}: model.name={r.cfg.model.name!r} "
                          f"({type(model).__name__}); export_run exports mf, embed_mlp and "
                          "sequential")
    info.update(kwargs.pop("model_info", {}) or {})
    kwargs.setdefault("item_category", d.item_category)
    files = dict(kwargs.pop("assets_extra", None) or {})
    schema = (r.task.meta.get("schema") or {}).get("interactions") or {}
    if "order_id" in schema:
        tr = load_split(r.task.path, "train",
                        ["order_id", "item"] + (["label"] if "label" in schema else []))
        pos = np.asarray(tr["label"]) > 0 if "label" in tr else slice(None)
        order, item = np.asarray(tr["order_id"])[pos], np.asarray(tr["item"])[pos]
        co = co_purchase_counts(order, item, ni)
        kwargs.setdefault("co_counts", co)
        files[basket.CO_PURCHASE_FILE] = basket.CoPurchaseStats.from_lines(
            order, item, ni, co).to_bytes()
    item_f = load_table(r.task.path, "item_features")
    text = ask.item_text_of(dict(r.cfg.dataset), d.item_vocab, d.item_category,
                            np.asarray(item_f["price"]) if "price" in item_f else None)
    if text is not None:          # titles, genres, categories, prices: for /ask
        files.setdefault(ask.ITEM_TEXT_FILE, text.to_bytes())
    if complement is not None:
        try:
            files[basket.COMPLEMENT_FILE] = basket.BasketModel.load(complement).reindexed(
                d.item_vocab).to_bytes()
        except basket.ComplementError as e:
            raise ExportError(f"complement={complement}: {e}") from e
    return export_saved_model(
        out_dir, version, params=params, score_fn=score, user_item_scores_fn=all_scores,
        item_vectors_fn=vectors, user_vocab=d.user_vocab, item_vocab=d.item_vocab,
        seen=seen_csr(d.seen[0], d.seen[1], nu), model_info=info, assets_extra=files,
        **extra, **kwargs)


# Names of the prepared data's event codes 0, 1, 2, 3 (the funnel stages of the synthetic
# e-commerce generator and the event logs: shown, clicked, carted, bought), unless the
# prepared metadata names them (``event_vocab``).
EVENT_NAMES = ("view", "click", "cart", "purchase")


def _event_vocab(task) -> list[str]:
    """The names of the sequential model's event types 1.. (data event code + 1)."""
    n = int(task.num_events) - 1
    names = list(task.meta.get("event_vocab") or EVENT_NAMES)
    if n > len(names):
        names += [f"event_{c}" for c in range(len(names), n)]
    return [str(x) for x in names[:n]]


def _history(task, max_len: int) -> tuple:
    """Each user's latest ``max_len`` train interactions as the sequential task orders
    them: CSR ``(indptr, items, events, timestamps, gaps)``."""
    ts = task.train_timestamps()
    user = np.asarray(task.split["train"]["user"])[task._train_rows]
    return history_csr(task.seq, user, ts, max_len)


def history_csr(seq, user: np.ndarray, timestamp: np.ndarray | None, max_len: int) -> tuple:
    """``(indptr, items, events, timestamps, gaps)`` of each user's latest ``max_len``
    entries of ``seq`` (a :class:`jaxreco.train.tasks.next_item.Sequences` built from
    ``user`` and ``timestamp``, whose (timestamp, row) order is repeated here)."""
    user = np.asarray(user, np.int64)
    ts = np.zeros(len(user), np.int64) if timestamp is None else np.asarray(timestamp, np.int64)
    order = np.lexsort((np.arange(len(user)), ts, user))
    ts = ts[order].astype(np.float64)
    pos = np.arange(len(seq.item))
    end = seq.start[1:][seq.user] if len(seq.item) else pos
    keep = pos >= end - max_len
    lengths = np.minimum(seq.length, max_len)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return (indptr, seq.item[keep], seq.event[keep], ts[keep], seq.gap[keep])


def _foldin_of(r, d: _RunData, num_items: int) -> foldin.FoldIn:
    """The fold-in of a restored dot model: its item table (and bias) and the run's iALS
    settings (``model.reg``, ``optimizer.unobserved_weight``/``reg_exponent``/
    ``unobserved_exponent``: the trainer's values for an iALS run, the config's defaults
    otherwise)."""
    t = {k: np.asarray(v) for k, v in r.state.table_values().items()}
    oc = r.cfg.optimizer
    beta = float(oc.unobserved_exponent)
    w = None
    if beta:  # as ials.make_epoch: w_i ∝ (positives of i)^β, mean 1 over the items
        f = np.bincount(np.asarray(d.seen[1], np.int64), minlength=num_items).astype(
            np.float32) ** beta
        w = (f * (num_items / f.sum())).astype(np.float32)
    bias = t["item_bias"][:num_items, 0] if "item_bias" in t else None
    return foldin.FoldIn(t["item_mf"][:num_items].astype(np.float32), bias, w,
                         alpha0=float(oc.unobserved_weight), reg=float(r.cfg.model.reg),
                         nu=float(oc.reg_exponent))


def restore_params(checkpoint: str | os.PathLike, *, step: int | None = None,
                   item: str | None = None) -> Any:
    """Restores a pytree of numpy arrays from an Orbax checkpoint, without a target.

    ``checkpoint`` is a ``CheckpointManager`` directory (its latest step, or ``step``) or one
    step directory. ``item`` selects one item of a composite checkpoint (e.g. ``"state"``);
    ``None`` returns the single item if there is just one.
    """
    import orbax.checkpoint as ocp

    path = Path(checkpoint).resolve()
    if not path.is_dir():
        raise ExportError(f"checkpoint {path} is not a directory")
    steps = sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())
    if steps:  # a manager directory
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ExportError(f"checkpoint {path} has no step {step}; steps: {steps}")
        path = path / str(step)
    elif step is not None:
        raise ExportError(f"{path} is a single checkpoint step, so step={step} makes no sense")
    items = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not items:
        raise ExportError(f"{path} holds no checkpoint items")
    if item is None:
        if len(items) != 1:
            raise ExportError(f"{path} holds items {items}; pass item=<one of them>")
        item = items[0]
    if item not in items:
        raise ExportError(f"{path} has no item {item!r}; items: {items}")
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(path / item)
    return jax.tree_util.tree_map(np.asarray, tree)
