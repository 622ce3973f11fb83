"""Embedding + MLP models: GMF/MF, the NCF MLP tower, NeuMF, and logistic regression.

Features are categorical ids: the user, the item, item-side features (``category``,
``price_bucket``, …: functions of the item) and context features (``position``, …: of the
impression). Each has an embedding table (MLP tower, ``dim``) and optionally a bias table.
With ``e_f`` the embeddings, ``p_u``/``q_i`` the dot-product embeddings (``mf_dim``):

* ``dot``   (MF, Rendle et al. 2020):  z = b + b_u + b_i + Σ_f b_f + p_u · q_i
* ``gmf``   (He et al. 2017):          z = b + … + w · (p_u ⊙ q_i)          (learned weights)
* ``mlp``   (NCF MLP):                 z = b + … + w · MLP([e_u, e_ctx, e_i, e_side])
* ``both``  (NeuMF):                   z = b + … + w · [p_u ⊙ q_i, MLP(…)]  (separate tables)
* ``linear`` (logistic regression on one-hot features): z = b + b_u + b_i + Σ_f b_f

One output head per target (``heads``: ``click``/``purchase`` are logits for BCE, ``rating``
a value for MSE); heads share the tower and differ in their last layer and bias.

The first MLP layer is linear in the concatenation, so it splits into a user part
``a_u = [e_u, e_ctx] W_u`` and an item part ``a_i = [e_i, e_side] W_i``: ``h_1 = relu(a_u +
a_i + b_1)``. Ranking therefore computes ``a_i`` once per item and only the layers above
the first per (user, item) pair; and ``p_u · q_i`` over a catalogue is one matmul.
:meth:`EmbedMLP.interact` takes the user and item representations in three layouts
(``point``: ``[B]`` with ``[B]``; ``rows``: ``[R]`` with ``[R, N]`` candidates per row;
``all``: ``[C]`` with ``[N]`` shared candidates) and returns logits of shape ``[B]``,
``[R, N]`` or ``[C, N]``.

For sampled negatives the trainer adds features ``neg_item``, ``neg_<side>`` (``[B·k]``)
to the batch; :attr:`table_features` then lists them so the same tables serve both.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxreco.models.layers import LookupModel, table

COMBINERS = ("dot", "gmf", "mlp", "both", "linear")
NEG = "neg_"


def _param(key, shape, axes, scale):
    """Glorot-uniform-like init ``U(±scale·sqrt(6/(fan_in+fan_out)))``, zeros if scale=0."""
    if not scale:
        return nnx.Param(jnp.zeros(shape, jnp.float32), axes=axes)
    lim = scale * (6.0 / (shape[0] + (shape[-1] if len(shape) > 1 else 1))) ** 0.5
    return nnx.Param(jax.random.uniform(key, shape, jnp.float32, -lim, lim), axes=axes)


class EmbedMLP(LookupModel):
    def __init__(self, num_users: int, num_items: int, *, combiner: str = "mlp", dim: int = 32,
                 mf_dim: int = 32, mlp_dims: Sequence[int] = (64, 32, 16),
                 side_features: Mapping[str, int] | None = None,
                 context_features: Mapping[str, int] | None = None, bias: bool = True,
                 heads: Sequence[str] = ("click",), init_std: float = 0.01,
                 negatives: bool = False, global_bias: float = 0.0,
                 head_bias: Mapping[str, float] | None = None, rngs: nnx.Rngs):
        if combiner not in COMBINERS:
            raise ValueError(f"model.combiner={combiner!r}: must be one of {list(COMBINERS)}")
        if not heads:
            raise ValueError("model.heads is empty: name at least one of click, purchase, rating")
        self.combiner = combiner
        self.side = dict(side_features or {})
        self.context = dict(context_features or {})
        self.heads = tuple(heads)
        self.use_bias = bias
        self.use_mf = combiner in ("dot", "gmf", "both")
        self.use_mlp = combiner in ("mlp", "both") and len(mlp_dims) > 0
        if combiner in ("mlp", "both") and not mlp_dims:
            raise ValueError(f"model.mlp_dims is empty but combiner={combiner!r} needs a tower")
        key = rngs.params
        item_feats = ("item",) + tuple(self.side)
        neg = lambda fs: fs + tuple(NEG + f for f in fs) if negatives else fs  # noqa: E731
        tf: dict[str, tuple[str, ...]] = {}
        emb: list[str] = []
        if self.use_mf:
            self.user_mf = table(key(), num_users, mf_dim, ("user", "embed"), init_std=init_std)
            self.item_mf = table(key(), num_items, mf_dim, ("item", "embed"), init_std=init_std)
            tf["user_mf"], tf["item_mf"] = ("user",), neg(("item",))
            emb += ["user_mf", "item_mf"]
        if self.use_mlp:
            self.user_embed = table(key(), num_users, dim, ("user", "embed"), init_std=init_std)
            self.item_embed = table(key(), num_items, dim, ("item", "embed"), init_std=init_std)
            tf["user_embed"], tf["item_embed"] = ("user",), neg(("item",))
            emb += ["user_embed", "item_embed"]
            for f, v in {**self.side, **self.context}.items():
                setattr(self, f"{f}_embed", table(key(), v, dim, (None, "embed"),
                                                  init_std=init_std))
                tf[f"{f}_embed"] = neg((f,)) if f in self.side else (f,)
                emb.append(f"{f}_embed")
            h = list(mlp_dims)
            self.w_user = _param(key(), ((1 + len(self.context)) * dim, h[0]), (None, "mlp"), 1.0)
            self.w_item = _param(key(), ((1 + len(self.side)) * dim, h[0]), (None, "mlp"), 1.0)
            self.b_1 = nnx.Param(jnp.zeros((h[0],), jnp.float32), axes=("mlp",))
            self.tower = nnx.List([
                nnx.Dict(w=_param(key(), (a, b), ("mlp", None), 1.0),
                         b=nnx.Param(jnp.zeros((b,), jnp.float32), axes=(None,)))
                for a, b in zip(h[:-1], h[1:])])
        if bias:
            self.user_bias = table(key(), num_users, 1, ("user", None))
            self.item_bias = table(key(), num_items, 1, ("item", None))
            tf["user_bias"], tf["item_bias"] = ("user",), neg(("item",))
            for f, v in {**self.side, **self.context}.items():
                setattr(self, f"{f}_bias", table(key(), v, 1, (None, None)))
                tf[f"{f}_bias"] = neg((f,)) if f in self.side else (f,)
        self.table_features = tf
        self.embedding_tables = tuple(emb)
        self.item_features = item_feats
        out = {}
        for hd in self.heads:
            b0 = (head_bias or {}).get(hd, global_bias if hd == "rating" else 0.0)
            d = {"b": nnx.Param(jnp.asarray(b0, jnp.float32), axes=())}
            if combiner in ("gmf", "both"):
                d["w_mf"] = nnx.Param(jnp.ones((mf_dim,), jnp.float32), axes=(None,))
            if self.use_mlp:
                d["w_mlp"] = _param(key(), (mlp_dims[-1],), (None,), 1.0)
            out[hd] = nnx.Dict(d)
        self.head = nnx.Dict(out)

    # ------------------------------------------------------------------ representations
    def user_repr(self, rows, batch=None) -> dict[str, jax.Array]:
        """User-side terms from the looked-up rows of ``user`` and context features."""
        out = {}
        if self.use_mf:
            out["mf"] = rows["user_mf"]["user"]
        if self.use_mlp:
            e = [rows["user_embed"]["user"]] + [rows[f"{f}_embed"][f] for f in self.context]
            out["a"] = jnp.concatenate(e, axis=-1) @ self.w_user[...]
        if self.use_bias:
            b = rows["user_bias"]["user"][..., 0]
            for f in self.context:
                b = b + rows[f"{f}_bias"][f][..., 0]
            out["b"] = b
        return out

    def item_repr(self, rows, prefix: str = "") -> dict[str, jax.Array]:
        """Item-side terms from the rows of ``<prefix>item`` and ``<prefix><side feature>``."""
        out = {}
        it = prefix + "item"
        if self.use_mf:
            out["mf"] = rows["item_mf"][it]
        if self.use_mlp:
            e = [rows["item_embed"][it]] + [rows[f"{f}_embed"][prefix + f] for f in self.side]
            out["a"] = jnp.concatenate(e, axis=-1) @ self.w_item[...]
        if self.use_bias:
            b = rows["item_bias"][it][..., 0]
            for f in self.side:
                b = b + rows[f"{f}_bias"][prefix + f][..., 0]
            out["b"] = b
        return out

    # ------------------------------------------------------------------ interaction
    def interact(self, u: Mapping[str, jax.Array], i: Mapping[str, jax.Array],
                 mode: str = "point") -> dict[str, jax.Array]:
        """Logits per head for the layouts ``point`` / ``rows`` / ``all`` (module docstring)."""
        if mode == "point":
            ue = lambda x: x  # noqa: E731
            ie = lambda x: x  # noqa: E731
        elif mode == "rows":
            ue = lambda x: x[:, None]  # noqa: E731
            ie = lambda x: x  # noqa: E731
        elif mode == "all":
            ue = lambda x: x[:, None]  # noqa: E731
            ie = lambda x: x[None]  # noqa: E731
        else:
            raise ValueError(f"interact mode={mode!r}: point, rows or all")

        def mf_term(w):
            p, q = u["mf"] if w is None else u["mf"] * w, i["mf"]
            if mode == "point":
                return jnp.sum(p * q, -1)
            if mode == "rows":
                return jnp.einsum("rd,rnd->rn", p, q)
            return p @ q.T

        hid = None
        if self.use_mlp:
            hid = jax.nn.relu(ue(u["a"]) + ie(i["a"]) + self.b_1[...])
            for layer in self.tower:
                hid = jax.nn.relu(hid @ layer["w"][...] + layer["b"][...])
        base = 0.0
        if self.use_bias:
            base = ue(u["b"]) + ie(i["b"])
        out = {}
        for hd in self.heads:
            p = self.head[hd]
            z = base + p["b"][...]
            if self.combiner == "dot":
                z = z + mf_term(None)
            elif self.combiner in ("gmf", "both"):
                z = z + mf_term(p["w_mf"][...])
            if hid is not None:
                z = z + hid @ p["w_mlp"][...]
            out[hd] = z
        return out

    def score_heads(self, rows, batch, prefix: str = "") -> dict[str, jax.Array]:
        return self.interact(self.user_repr(rows, batch), self.item_repr(rows, prefix), "point")

    def score(self, rows, batch) -> jax.Array:
        """The first head's prediction for each (user, item) row of the batch."""
        return self.score_heads(rows, batch)[self.heads[0]]
