"""SASRec-style sequential recommender (Kang & McAuley 2018), pre-norm, Flax NNX.

A user's recent items ``i_1 … i_L`` (left-padded with ``-1``, the latest at position
``L-1``) are embedded with the shared item table ``E`` (a row-sharded :class:`Table`),
plus learned positions ``P`` and, when the data has them, an event-type embedding and a
time-gap embedding (``⌊log2(1 + gap seconds)⌋`` buckets):

    x_t = E[i_t] + P[t] (+ V[event_t]) (+ G[bucket(gap_t)]),   x_t = 0 at padding
    x   = x + Dropout(CausalMHA(LN(x)))          (per block; keys at padding are masked)
    x   = x + Dropout(FFN(LN(x)))                FFN(z) = W_2 relu(W_1 z + b_1) + b_2
    h_t = LN(x_t)

and the score of item ``j`` after position ``t`` is ``h_t · E[j]`` (the output layer is the
item table itself). :meth:`encode` returns ``h_{L-1}``, the representation after the latest
item; :meth:`item_vectors` the table, so all scores are ``encode(…) @ item_vectors()[:num_items].T``.

The trainer sees the same computation through looked-up rows (``table_features``: the
batch's ``seq_item`` inputs, ``item`` targets and ``cand_item`` softmax candidates all index
``item_embed``), so only the rows a batch touches are updated; the loss is the task's
(``jaxreco.train.tasks.next_item``). For :class:`jaxreco.evaluate.RankingEvaluator` the model
exposes ``user_repr`` (the encoder over ``batch["seq_item"]``), ``item_repr`` and
``interact`` like ``embed_mlp``'s dot product.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxreco.models.layers import LookupModel, table

GAP_BUCKETS = 32
_NEG = -1e9          # attention logit of a masked key (finite: an all-padding row stays finite)


def _dense(key, shape, axes):
    """Glorot-uniform weight ``U(±sqrt(6/(fan_in+fan_out)))``."""
    lim = math.sqrt(6.0 / (shape[0] + shape[1]))
    return nnx.Param(jax.random.uniform(key, shape, jnp.float32, -lim, lim), axes=axes)


def _vec(n, value, axes=(None,)):
    return nnx.Param(jnp.full((n,), value, jnp.float32), axes=axes)


def _layer_norm(x, scale, bias, eps=1e-6):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * scale + bias


def gap_bucket(gaps: jax.Array) -> jax.Array:
    """``⌊log2(1 + max(gap, 0))⌋`` clipped to ``[0, GAP_BUCKETS)``: seconds → bucket."""
    g = jnp.log2(1.0 + jnp.maximum(gaps.astype(jnp.float32), 0.0))
    return jnp.clip(jnp.floor(g), 0, GAP_BUCKETS - 1).astype(jnp.int32)


class Sequential(LookupModel):
    """Causal self-attention over the last ``max_len`` items (module docstring).

    Args:
      num_items: real items; ``rows >= num_items`` table rows (the rest is row padding).
      max_len: ``L``, the input length.
      num_events: event-type vocabulary including 0 = unknown (1: no event input).
      use_gaps: add the time-gap embedding.
    """

    heads = ("next",)
    use_mlp = False
    embedding_tables = ("item_embed",)
    item_features = ("item", "cand_item", "seq_item")
    table_features = {"item_embed": ("seq_item", "item", "cand_item")}

    def __init__(self, num_items: int, rows: int, *, max_len: int, dim: int = 64,
                 num_blocks: int = 2, num_heads: int = 1, ffn_dim: int | None = None,
                 dropout: float = 0.2, num_events: int = 1, use_gaps: bool = False,
                 init_std: float = 0.05, rngs: nnx.Rngs):
        if max_len < 1 or dim < 1 or num_blocks < 0 or num_heads < 1:
            raise ValueError(f"sequential model: max_len={max_len}, dim={dim}, num_blocks="
                             f"{num_blocks}, num_heads={num_heads} must be positive")
        if dim % num_heads:
            raise ValueError(f"model.dim={dim} is not divisible by model.num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout={dropout}: must be in [0, 1)")
        if rows < num_items:
            raise ValueError(f"table rows {rows} < num_items {num_items}")
        self.num_items, self.max_len, self.dim = int(num_items), int(max_len), int(dim)
        self.num_heads, self.dropout = int(num_heads), float(dropout)
        self.num_events, self.use_gaps = max(1, int(num_events)), bool(use_gaps)
        key = rngs.params
        self.item_embed = table(key(), rows, dim, ("item", "embed"), init_std=init_std)
        self.pos_embed = nnx.Param(jax.random.normal(key(), (max_len, dim)) * init_std,
                                   axes=(None, "embed"))
        if self.num_events > 1:
            self.event_embed = nnx.Param(
                jax.random.normal(key(), (self.num_events, dim)) * init_std, axes=(None, "embed"))
        if self.use_gaps:
            self.gap_embed = nnx.Param(
                jax.random.normal(key(), (GAP_BUCKETS, dim)) * init_std, axes=(None, "embed"))
        f = int(ffn_dim or dim)
        self.blocks = nnx.List([nnx.Dict(
            ln1_s=_vec(dim, 1.0), ln1_b=_vec(dim, 0.0),
            w_qkv=_dense(key(), (dim, 3 * dim), (None, "mlp")), b_qkv=_vec(3 * dim, 0.0),
            w_o=_dense(key(), (dim, dim), ("mlp", None)), b_o=_vec(dim, 0.0),
            ln2_s=_vec(dim, 1.0), ln2_b=_vec(dim, 0.0),
            w_1=_dense(key(), (dim, f), (None, "mlp")), b_1=_vec(f, 0.0),
            w_2=_dense(key(), (f, dim), ("mlp", None)), b_2=_vec(dim, 0.0))
            for _ in range(num_blocks)])
        self.lnf_s, self.lnf_b = _vec(dim, 1.0), _vec(dim, 0.0)

    # ------------------------------------------------------------------ encoder
    def _drop(self, x, keys, site: int, deterministic: bool):
        """Inverted dropout with per-example keys ``keys [B]`` folded with ``site``."""
        if deterministic or not self.dropout:
            return x
        if keys is None:
            raise ValueError("sequential model: training-mode dropout needs dropout_seeds")
        keep = jax.vmap(lambda k: jax.random.bernoulli(
            jax.random.fold_in(k, site), 1.0 - self.dropout, x.shape[1:]))(keys)
        return jnp.where(keep, x / (1.0 - self.dropout), 0.0)

    def encode_rows(self, item_rows: jax.Array, items: jax.Array, events=None, gaps=None, *,
                    deterministic: bool = True, dropout_seeds=None) -> jax.Array:
        """``h [B, L, d]`` at every position from the looked-up rows ``item_rows [B, L, d]``
        of ``items [B, L]`` (``-1`` = padding; those rows are ignored)."""
        return self._encoder(item_rows, items, events, gaps, deterministic=deterministic,
                             dropout_seeds=dropout_seeds)[0]

    def _encoder(self, item_rows, items, events, gaps, *, deterministic: bool, dropout_seeds):
        """``(h [B, L, d], [attention [B, heads, L, L] of each block])``."""
        b, L = items.shape
        if L != self.max_len:
            raise ValueError(f"sequential model: input length {L} != max_len {self.max_len}")
        valid = items >= 0
        x = jnp.where(valid[..., None], item_rows, 0.0) + self.pos_embed[...][None]
        if self.num_events > 1 and events is not None:
            ev = jnp.clip(events, 0, self.num_events - 1)
            x = x + jnp.take(self.event_embed[...], ev, axis=0)
        if self.use_gaps and gaps is not None:
            x = x + jnp.take(self.gap_embed[...], gap_bucket(gaps), axis=0)
        keys = None
        if not deterministic and self.dropout:
            keys = jax.vmap(jax.random.key)(dropout_seeds.astype(jnp.uint32))
        x = jnp.where(valid[..., None], self._drop(x, keys, 0, deterministic), 0.0)
        causal = jnp.tril(jnp.ones((L, L), bool))
        allowed = causal[None] & valid[:, None, :]                       # [B, Lq, Lk]
        nh, dh = self.num_heads, self.dim // self.num_heads
        atts = []
        for n, blk in enumerate(self.blocks):
            a = _layer_norm(x, blk["ln1_s"][...], blk["ln1_b"][...])
            qkv = a @ blk["w_qkv"][...] + blk["b_qkv"][...]
            q, k, v = (t.reshape(b, L, nh, dh) for t in jnp.split(qkv, 3, axis=-1))
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
            logits = jnp.where(allowed[:, None], logits, _NEG)
            att = jax.nn.softmax(logits, axis=-1)
            atts.append(att)
            o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, L, self.dim)
            o = o @ blk["w_o"][...] + blk["b_o"][...]
            x = x + self._drop(o, keys, 2 * n + 1, deterministic)
            f = _layer_norm(x, blk["ln2_s"][...], blk["ln2_b"][...])
            f = jax.nn.relu(f @ blk["w_1"][...] + blk["b_1"][...]) @ blk["w_2"][...] + blk["b_2"][...]
            x = x + self._drop(f, keys, 2 * n + 2, deterministic)
            x = jnp.where(valid[..., None], x, 0.0)
        return _layer_norm(x, self.lnf_s[...], self.lnf_b[...]), atts

    def encode(self, items: jax.Array, events=None, gaps=None, *, deterministic: bool = True,
               dropout_seeds=None) -> jax.Array:
        """``[B, d]``: the representation after the latest item of ``items [B, L]`` (int32,
        left-padded with -1); ``events [B, L]`` int32 (0 = unknown) and ``gaps [B, L]``
        float32 seconds since the previous event are used when the model has those inputs."""
        items = jnp.asarray(items, jnp.int32)
        rows = jnp.take(self.item_embed[...], jnp.maximum(items, 0), axis=0)
        return self.encode_rows(rows, items, events, gaps, deterministic=deterministic,
                                dropout_seeds=dropout_seeds)[:, -1]

    def attention(self, items: jax.Array, events=None, gaps=None, *,
                  method: str = "rollout") -> jax.Array:
        """``[B, L]``: how much each input position of ``items [B, L]`` (as :meth:`encode`
        takes them) feeds the representation after the latest item, ``h_{L-1}``.

        With ``Ā_n`` block ``n``'s attention averaged over heads (``[L, L]``, row ``t`` the
        weights of query position ``t``, causal and without padded keys):

        * ``"rollout"`` (attention rollout, Abnar & Zuidema 2020): row ``L-1`` of
          ``Ã_N ⋯ Ã_1`` with ``Ã_n = ½ Ā_n + ½ I`` (the residual connection carries half of
          each position's own input through a block). A block's keys are already mixtures
          of earlier positions, so the product traces the weights back to the input items.
        * ``"last"``: row ``L-1`` of ``Ā_N``, the last block's attention of the last
          position (over the block's inputs, which mix earlier items).

        Each row is a distribution over the non-padding positions (they sum to 1; padded
        positions get 0, and a row without any item is all 0). The weights do not depend
        on the candidate item: they say which of the shopper's items the next-item
        representation is built from. A model without blocks gives all weight to the
        latest item.
        """
        if method not in ("rollout", "last"):
            raise ValueError(f"attention method={method!r}: must be 'rollout' or 'last'")
        items = jnp.asarray(items, jnp.int32)
        rows = jnp.take(self.item_embed[...], jnp.maximum(items, 0), axis=0)
        _, atts = self._encoder(rows, items, events, gaps, deterministic=True,
                                dropout_seeds=None)
        b, L = items.shape
        eye = jnp.eye(L, dtype=jnp.float32)
        if not atts:
            w = jnp.broadcast_to(eye[-1], (b, L))
        elif method == "last":
            w = jnp.mean(atts[-1], axis=1)[:, -1]
        else:
            r = jnp.broadcast_to(eye, (b, L, L))
            for a in atts:
                r = jnp.einsum("bqk,bkt->bqt", 0.5 * jnp.mean(a, axis=1) + 0.5 * eye, r,
                               precision=jax.lax.Precision.HIGHEST)
            w = r[:, -1]
        return jnp.where(items >= 0, w, 0.0)

    def item_vectors(self) -> jax.Array:
        """``[rows, d]``: the output item vectors (the item table; rows >= num_items pad)."""
        return self.item_embed[...]

    # ------------------------------------------------------------------ trainer/evaluator
    def sequence_inputs(self, batch: Mapping[str, jax.Array]):
        """``(items [B, L], events | None, gaps | None)`` from a batch whose ``seq_*``
        features are ``[B, L]`` or flattened ``[B·L]``."""
        L = self.max_len
        items = batch["seq_item"].reshape(-1, L)
        events = batch["seq_event"].reshape(-1, L) if "seq_event" in batch else None
        gaps = batch["seq_gap"].reshape(-1, L) if "seq_gap" in batch else None
        return items, events, gaps

    def user_repr(self, rows, batch) -> dict[str, jax.Array]:
        """``{"h": [B, d]}``: the encoder after the latest item of ``batch["seq_item"]``."""
        items, events, gaps = self.sequence_inputs(batch)
        r = rows["item_embed"]["seq_item"].reshape(items.shape + (self.dim,))
        return {"h": self.encode_rows(r, items, events, gaps)[:, -1]}

    def item_repr(self, rows, prefix: str = "") -> dict[str, jax.Array]:
        return {"q": rows["item_embed"][prefix + "item"]}

    def interact(self, u, items, layout: str) -> dict[str, jax.Array]:
        """Scores ``h · q`` in the ``point`` ``[B]``, ``rows`` ``[B, N]`` or ``all``
        ``[C, N]`` layout of :meth:`jaxreco.models.embed_mlp.EmbedMLP.interact`."""
        h, q = u["h"], items["q"]
        if layout == "point":
            s = jnp.sum(h * q, axis=-1)
        elif layout == "rows":
            s = jnp.einsum("bd,bnd->bn", h, q)
        elif layout == "all":
            s = h @ q.T
        else:
            raise ValueError(f"layout={layout!r}: must be point, rows or all")
        return {self.heads[0]: s}

    def score(self, rows, batch) -> jax.Array:
        return self.interact(self.user_repr(rows, batch), self.item_repr(rows), "point")[self.heads[0]]
