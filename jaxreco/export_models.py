"""Pure JAX scoring functions of a trained model, as :func:`jaxreco.export.export_saved_model`
takes them.

:func:`embed_mlp_functions` covers every combiner of :class:`jaxreco.models.embed_mlp.EmbedMLP`
(``dot``, ``gmf``, ``mlp``, ``both``, ``linear``), with item-side and context features and
any heads; :func:`jaxreco.export.biased_mf_functions` covers :class:`jaxreco.models.mf.MF`.

The functions rebuild the model with ``nnx.merge`` from ``params`` and call its own
``user_repr`` / ``item_repr`` / ``interact``, so the export scores exactly what training and
:mod:`jaxreco.evaluate` score. ``params`` (stored as ``tf.Variable``\\ s) is::

    {"tables":    nnx.State of the embedding tables, user/item rows trimmed to the vocabularies,
     "dense":     nnx.State of every other parameter (tower, heads),
     "item_side": {feature: int32 [num_items]}}   # the item's side-feature index, 0 = unknown

Items' side features are constants of the export: ``score(user, item)`` looks them up by item
index. Context features (e.g. ``position``) are inputs of the impression, not of the pair:

* ``predict_fn(params, u, i, context)`` takes them (``{feature: int32 [b]}``) and returns every
  head's logit; the export's ``predict_ctr`` signature is built on it;
* ``score_fn`` / ``user_item_scores_fn`` (``score``, ``recommend``, ``user_scores``) use a
  fixed **default context** ``context_defaults`` (by default 0 for every feature; ``export_run``
  passes each feature's most frequent training value) -- the ranking a user would get in that
  context. For ``dot``/``gmf``/``linear`` the context only adds the same term to every item, so
  the ranking does not depend on the default; for ``mlp``/``both`` it can.

``user_item_scores_fn`` computes each item's representation once (``item_repr`` of all
items: ``q_i``, the tower's item part ``a_i``, the item biases) and per user only what
depends on the pair: one matmul (``dot``/``gmf``), or the tower layers above the first, run
on blocks of users whose ``[users, items, width]`` activations hold about ``tower_elements``
floats (a ``lax.map`` loop, as :class:`jaxreco.evaluate.RankingEvaluator` does), so a
request for 64 users over 10^5 items never materialises 64 x 10^5 x width floats at once.

``item_vectors_fn`` (what ``similar_items`` ranks by cosine) is the item as the scoring
head sees it:

=========  =================================================================================
combiner   item vector
=========  =================================================================================
dot        ``q_i``                             (the item's dot-product embedding)
gmf        ``w_mf ⊙ q_i``                      (``score`` = ``p_u · (w_mf ⊙ q_i)`` + biases)
mlp        ``a_i = [e_i, e_side] W_i``         (the tower's item part, side features included)
both       ``[w_mf ⊙ q_i, a_i]``                (both parts, concatenated)
linear     ``[one-hot side features, 1, b_i]``  (no item embedding: items of the same
                                                 category with similar bias are similar;
                                                 ``b_i`` = item + side-feature biases)
=========  =================================================================================
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreco.models.embed_mlp import EmbedMLP
from jaxreco.models.layers import Table, gather_rows, present_features
from jaxreco.models.sequential import Sequential


@dataclasses.dataclass(frozen=True)
class ModelFunctions:
    """What :func:`jaxreco.export.export_saved_model` needs from one model.

    ``predict_fn(params, user int32[b], item int32[b], context {feature: int32[b]}) ->
    {head: float32[b]}`` gives the logits of every head (``None`` where the model has no
    heads); ``context_features`` maps each context feature to its vocabulary size (valid
    values ``0 .. size-1``) and ``context_defaults`` to the value ``score``/``recommend`` use.
    """

    params: Any
    score_fn: Callable
    user_item_scores_fn: Callable
    item_vectors_fn: Callable
    predict_fn: Callable | None = None
    heads: tuple[str, ...] = ()
    context_features: Mapping[str, int] = dataclasses.field(default_factory=dict)
    context_defaults: Mapping[str, int] = dataclasses.field(default_factory=dict)
    item_vectors: str = ""


def _trim_tables(tables: nnx.State, num_users: int, num_items: int) -> nnx.State:
    """The tables with rows past the vocabulary dropped (``model.row_multiple`` padding):
    a table whose first logical axis is ``user`` keeps ``num_users`` rows, ``item`` tables
    ``num_items``; side/context tables are not padded."""
    def trim(v):
        axis = (v.get_metadata().get("axes") or (None,))[0]
        n = {"user": num_users, "item": num_items}.get(axis)
        value = np.asarray(v[...])
        if n is not None:
            if value.shape[0] < n:
                raise ValueError(f"table with axes {v.get_metadata().get('axes')} has "
                                 f"{value.shape[0]} rows, fewer than the {n} in the vocabulary")
            value = value[:n]
        return v.replace(value)
    return jax.tree.map(trim, tables, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def embed_mlp_functions(graphdef, tables: nnx.State, dense: nnx.State, *, num_users: int,
                        num_items: int, item_side: Mapping[str, np.ndarray] | None = None,
                        context_defaults: Mapping[str, int] | None = None,
                        head: str | None = None,
                        tower_elements: int = 1 << 19) -> ModelFunctions:
    """The export functions of an :class:`EmbedMLP` given as ``nnx.split(model, Table, ...)``.

    Args:
      graphdef, tables, dense: the model split into graph, :class:`Table` state and the rest
        (a restored run's ``graphdef``, ``state.tables``, ``state.dense``); tables may be
        row-padded, they are trimmed to ``num_users`` / ``num_items`` here.
      item_side: ``{feature: int [>= num_items]}`` each item's side-feature index (``+1``
        shifted, 0 = unknown, as the trainer feeds it); required for every side feature
        the model has.
      context_defaults: ``{feature: value}`` for ``score``/``recommend`` (default 0 each).
      head: the head ``score``/``recommend`` rank by (default: the model's first).
      tower_elements: activation floats per tower block in ``user_item_scores_fn``.
    """
    abstract = nnx.merge(graphdef, tables, dense)
    if not isinstance(abstract, EmbedMLP):
        raise TypeError(f"embed_mlp_functions needs an EmbedMLP; got {type(abstract).__name__}")
    side, context = dict(abstract.side), dict(abstract.context)
    heads = tuple(abstract.heads)
    head = head or heads[0]
    if head not in heads:
        raise ValueError(f"head={head!r} is not one of the model's heads {list(heads)}")
    item_side = dict(item_side or {})
    missing = [f for f in side if f not in item_side]
    if missing:
        raise ValueError(f"the model has item side feature(s) {missing}; pass item_side="
                         f"{{feature: index per item}} for them (got {sorted(item_side)})")
    side_arrays = {}
    for f in side:
        v = np.asarray(item_side[f])
        if v.ndim != 1 or v.shape[0] < num_items:
            raise ValueError(f"item_side[{f!r}] must have one entry per item ({num_items}); "
                             f"got shape {v.shape}")
        v = v[:num_items].astype(np.int32)
        if v.size and (v.min() < 0 or v.max() >= side[f]):
            raise ValueError(f"item_side[{f!r}] values must lie in [0, {side[f]}) (the "
                             f"model's {f} vocabulary); got [{v.min()}, {v.max()}]")
        side_arrays[f] = v
    defaults = {f: int((context_defaults or {}).get(f, 0)) for f in context}
    for f, d in defaults.items():
        if not 0 <= d < context[f]:
            raise ValueError(f"context_defaults[{f!r}]={d}: must lie in [0, {context[f]})")
    extra = sorted(set(context_defaults or {}) - set(context))
    if extra:
        raise ValueError(f"context_defaults names {extra}, which the model has no context "
                         f"feature for (it has {sorted(context)})")

    params = {"tables": _trim_tables(tables, num_users, num_items),
              "dense": jax.tree.map(np.asarray, dense),
              "item_side": side_arrays}
    combiner = abstract.combiner
    width = int(abstract.b_1.shape[0]) if abstract.use_mlp else 1
    block = _pow2_floor(max(1, int(tower_elements) // max(1, num_items * width)))

    def model_of(p) -> EmbedMLP:
        return nnx.merge(graphdef, p["tables"], p["dense"])

    def rows(m: EmbedMLP, batch):
        tabs = {t: getattr(m, t)[...] for t in m.table_features}
        return gather_rows(tabs, batch, present_features(m.table_features, batch))

    def default_context(u):
        return {f: jnp.full(u.shape, d, jnp.int32) for f, d in defaults.items()}

    def pair_batch(p, u, i, ctx):
        return {"user": u, "item": i, **{f: p["item_side"][f][i] for f in side}, **ctx}

    def all_items(m: EmbedMLP, p):
        batch = {"item": jnp.arange(num_items, dtype=jnp.int32), **p["item_side"]}
        return m.item_repr(rows(m, batch))

    def predict(p, u, i, ctx):
        m = model_of(p)
        batch = pair_batch(p, u, i, ctx)
        return m.score_heads(rows(m, batch), batch)

    def score(p, u, i):
        return predict(p, u, i, default_context(u))[head]

    def user_item_scores(p, u):
        m = model_of(p)
        items = all_items(m, p)
        batch = {"user": u, **default_context(u)}
        ur = m.user_repr(rows(m, batch), batch)
        if not m.use_mlp:  # no tower: one matmul
            return m.interact(ur, items, "all")[head]
        # the tower on blocks of `block` users; the batch is padded to a multiple of it
        # (written with symbolic sizes so the batch dimension stays polymorphic)
        n = u.shape[0]
        nb = (n + block - 1) // block

        def blocks(x):
            pad = jnp.zeros((nb * block - n,) + x.shape[1:], x.dtype)
            return jnp.concatenate([x, pad]).reshape((nb, block) + x.shape[1:])

        s = jax.lax.map(lambda blk: m.interact(blk, items, "all")[head],
                        jax.tree.map(blocks, ur))
        return s.reshape((nb * block, num_items))[:n]

    def item_vectors(p):
        m = model_of(p)
        items = all_items(m, p)
        parts = []
        if m.use_mf:
            q = items["mf"]
            parts.append(q * m.head[head]["w_mf"][...] if combiner in ("gmf", "both") else q)
        if m.use_mlp:
            parts.append(items["a"])
        if not parts:  # linear: one-hot side features, then [1, b_i]
            for f in side:
                parts.append(jax.nn.one_hot(p["item_side"][f], side[f], dtype=jnp.float32))
            b = items["b"] if m.use_bias else jnp.zeros((num_items,), jnp.float32)
            parts.append(jnp.stack([jnp.ones_like(b), b], axis=1))
        return jnp.concatenate(parts, axis=1)

    described = {"dot": "q_i", "gmf": "w_mf * q_i", "mlp": "a_i = [e_i, e_side] W_i",
                 "both": "[w_mf * q_i, a_i]", "linear": "[one-hot side features, 1, b_i]"}
    return ModelFunctions(params=params, score_fn=score, user_item_scores_fn=user_item_scores,
                          item_vectors_fn=item_vectors, predict_fn=predict, heads=heads,
                          context_features=context, context_defaults=defaults,
                          item_vectors=described[combiner])


def model_functions(model: nnx.Module, **kwargs) -> ModelFunctions:
    """:func:`embed_mlp_functions` of a live model (``num_users``, ``num_items`` and the rest
    as keyword arguments)."""
    graphdef, tables, dense = nnx.split(model, Table, ...)
    return embed_mlp_functions(graphdef, tables, dense, **kwargs)


@dataclasses.dataclass(frozen=True)
class SequentialFunctions:
    """:class:`ModelFunctions` of a :class:`~jaxreco.models.sequential.Sequential` model plus
    ``encode_fn(params, items int32[b, L], events int32[b, L], gaps float32[b, L]) -> [b, d]``
    and the item vectors ``[num_items, d]`` (what ``session_scores`` ranks against);
    ``attention_fn`` (same inputs ``-> [b, L]``) and ``user_attention_fn(params, user
    int32[b]) -> (weights [b, L], items int32[b, L])`` give the encoder's attention of the
    last position (:meth:`~jaxreco.models.sequential.Sequential.attention`, rollout) over a
    sequence and over a known user's own sequence (what ``user_scores`` encodes)."""

    functions: ModelFunctions
    encode_fn: Callable
    item_vectors: np.ndarray
    max_len: int
    use_events: bool
    use_gaps: bool
    attention_fn: Callable | None = None
    user_attention_fn: Callable | None = None


def sequential_functions(graphdef, tables: nnx.State, dense: nnx.State, *, num_users: int,
                         num_items: int, user_seq: Mapping[str, np.ndarray],
                         use_events: bool, use_gaps: bool) -> SequentialFunctions:
    """The export functions of a sequential model given as ``nnx.split(model, Table, ...)``.

    A known user is represented by the encoder over ``user_seq`` (``seq_item`` and, when the
    model uses them, ``seq_event`` / ``seq_gap``, each ``[num_users, L]``: the user's latest
    ``L`` train interactions, left-padded, as the trainer's evaluation encodes them), so
    ``score``/``recommend``/``user_scores`` rank exactly as :mod:`jaxreco.evaluate` does;
    ``encode_fn`` runs the same encoder on any sequence (``session_scores``). The model's
    pinned interface is all that is called: ``encode``, ``item_vectors``, ``max_len``,
    ``num_items``, and ``attention`` for the ``session_attention`` signature.
    """
    abstract = nnx.merge(graphdef, tables, dense)
    if not isinstance(abstract, Sequential):
        raise TypeError(f"sequential_functions needs a Sequential; got {type(abstract).__name__}")
    L = int(abstract.max_len)
    seq_item = np.asarray(user_seq["seq_item"], np.int32)
    if seq_item.shape != (num_users, L):
        raise ValueError(f"user_seq['seq_item'] must be [{num_users}, {L}]; got {seq_item.shape}")
    seq = {"seq_item": seq_item[:num_users]}
    if use_events:
        seq["seq_event"] = np.asarray(user_seq["seq_event"], np.int32)[:num_users]
    if use_gaps:
        seq["seq_gap"] = np.asarray(user_seq["seq_gap"], np.float32)[:num_users]
    params = {"tables": _trim_tables(tables, num_users, num_items),
              "dense": jax.tree.map(np.asarray, dense), "seq": seq}

    def model_of(p):
        return nnx.merge(graphdef, p["tables"], p["dense"])

    def encode(p, items, events, gaps):
        m = model_of(p)
        return m.encode(items, events if use_events else None, gaps if use_gaps else None)

    def vectors(p):
        return model_of(p).item_vectors()[:num_items]

    def attention(p, items, events, gaps):
        m = model_of(p)
        return m.attention(items, events if use_events else None, gaps if use_gaps else None)

    def user_inputs(p, u):
        s = p["seq"]
        items = s["seq_item"][u]
        ev = s["seq_event"][u] if use_events else jnp.zeros_like(items)
        gp = s["seq_gap"][u] if use_gaps else jnp.zeros(items.shape, jnp.float32)
        return items, ev, gp

    def user_h(p, u):
        return encode(p, *user_inputs(p, u))

    def user_attention(p, u):
        items, ev, gp = user_inputs(p, u)
        return attention(p, items, ev, gp), items

    def score(p, u, i):
        return jnp.sum(user_h(p, u) * vectors(p)[i], axis=-1)

    def user_item_scores(p, u):
        return user_h(p, u) @ vectors(p).T

    fns = ModelFunctions(params=params, score_fn=score, user_item_scores_fn=user_item_scores,
                         item_vectors_fn=vectors, heads=tuple(abstract.heads),
                         item_vectors="E_i (the shared item table)")
    return SequentialFunctions(fns, encode, np.asarray(jax.jit(vectors)(params), np.float32),
                               L, bool(use_events), bool(use_gaps), attention, user_attention)
