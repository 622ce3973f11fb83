"""Sharded embedding lookups and row-sparse table updates (explicit, with ``shard_map``).

Tables are laid out by the mesh rules: rows over the ``user``/``item`` rule's mesh axes
(``row_axes``; replicated over the rest), batches over the ``batch`` rule's axes. XLA's
automatic partitioning of a gather from a row-sharded table may all-gather the table; here
no device ever holds more than its own rows:

* **lookup**: each device gathers, for its shard of the batch, the ids that fall in its
  row range (others contribute zeros) and a ``psum`` over ``row_axes`` assembles the rows:
  ``O(batch/data · dim)`` memory and traffic per device.
* **update**: the batch's ids and row gradients are all-gathered over the batch axes (the
  table is replicated over them, so every replica applies the same update), mapped to the
  local row range (others become out-of-range and are dropped), deduplicated once per id
  feature group, and the row optimizer updates only those rows.

Replicated and single-device layouts are the special cases ``row_axes = ()`` and/or
``batch_axes = ()``; the numbers are the same on every layout (the tests check 1e-5).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxreco.optim import RowOptimizer
from jaxreco.sharding import logical_to_spec


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


class ShardedTables:
    """Lookup/update of a model's tables on ``mesh`` under ``rules``.

    Args:
      table_axes: ``{table: logical axes}``, e.g. ``{"user_embed": ("user", "embed")}``.
      table_features: ``{table: (batch features indexing it, ...)}``.
    """

    def __init__(self, mesh: Mesh, rules: Mapping[str, Any],
                 table_axes: Mapping[str, Sequence[str | None]],
                 table_features: Mapping[str, Sequence[str]], row_opt: RowOptimizer):
        self.mesh = mesh
        self.row_opt = row_opt
        self.table_features = {t: tuple(f) for t, f in table_features.items()}
        self.batch_axes = _axes(rules.get("batch"))
        self.row_axes = {t: _axes(logical_to_spec(ax, rules)[0]) for t, ax in table_axes.items()}
        for t, ra in self.row_axes.items():
            overlap = set(ra) & set(self.batch_axes)
            if overlap:
                raise ValueError(f"mesh.rules: table {t!r} rows and the batch are both sharded "
                                 f"over {sorted(overlap)}; map them to different mesh axes")
        # Tables indexed by the same features on the same layout share one dedup (one sort).
        groups: dict[tuple, list[str]] = {}
        for t in self.table_features:
            groups.setdefault((self.table_features[t], self.row_axes[t]), []).append(t)
        self.groups = list(groups.items())

    # ------------------------------------------------------------------ helpers
    def _size(self, axes: tuple[str, ...]) -> int:
        return math.prod(self.mesh.shape[a] for a in axes)

    @staticmethod
    def _index(axes: tuple[str, ...]) -> jax.Array:
        idx = jnp.int32(0)
        for a in axes:
            idx = idx * jax.lax.axis_size(a) + jax.lax.axis_index(a)
        return idx

    def _row_spec(self, t: str, ndim: int) -> P:
        ra = self.row_axes[t]
        return P(ra if ra else None, *([None] * (ndim - 1)))

    def _batch_spec(self, ndim: int = 1) -> P:
        return P(self.batch_axes if self.batch_axes else None, *([None] * (ndim - 1)))

    # ------------------------------------------------------------------ lookup
    def lookup(self, tables: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]):
        """``rows[t][f] = tables[t][batch[f]]``, sharded like the batch."""
        rows: dict[str, dict[str, jax.Array]] = {}
        for t, feats in self.table_features.items():
            ra = self.row_axes[t]
            table = tables[t]

            def body(table_local, ids, ra=ra):
                n = table_local.shape[0]
                if not ra:
                    return table_local.at[ids].get(mode="clip")
                local = ids - self._index(ra) * n
                ok = (local >= 0) & (local < n)
                r = table_local.at[jnp.clip(local, 0, n - 1)].get()
                return jax.lax.psum(jnp.where(ok[:, None], r, 0), ra)

            f = jax.shard_map(body, mesh=self.mesh,
                              in_specs=(self._row_spec(t, table.ndim), self._batch_spec()),
                              out_specs=self._batch_spec(2))
            rows[t] = {feat: f(table, batch[feat]) for feat in feats}
        return rows

    # ------------------------------------------------------------------ update
    def update(self, tables: Mapping[str, jax.Array], slots: Mapping[str, Any],
               batch: Mapping[str, jax.Array], grads: Mapping[str, Mapping[str, jax.Array]],
               step: jax.Array):
        """Row-sparse optimizer step on the rows the batch touched: ``(tables, slots)``."""
        new_tables, new_slots = dict(tables), dict(slots)
        ba = self.batch_axes
        for (feats, ra), names in self.groups:
            def body(ids, gs, tabs, sls, step, ra=ra, names=names):
                if ba:
                    ids = jax.lax.all_gather(ids, ba, tiled=True)
                    gs = [jax.lax.all_gather(x, ba, tiled=True) for x in gs]
                n = tabs[0].shape[0]
                local = ids - self._index(ra) * n if ra else ids
                local = jnp.where((local >= 0) & (local < n), local, n)
                uids, inv = jnp.unique(local, size=local.shape[0], fill_value=n,
                                       return_inverse=True)
                outs_t, outs_s = [], []
                for tab, sl, gx in zip(tabs, sls, gs):
                    ug = jax.ops.segment_sum(gx, inv.reshape(-1), num_segments=local.shape[0])
                    nt, ns = self.row_opt.apply(tab, sl, uids, ug, step)
                    outs_t.append(nt)
                    outs_s.append(ns)
                return outs_t, outs_s

            # The feature concatenation interleaves per-feature shards; gather per feature.
            tab_specs = [self._row_spec(t, tables[t].ndim) for t in names]
            slot_specs = [jax.tree.map(lambda x, t=t: self._row_spec(t, x.ndim), slots[t])
                          for t in names]
            ids_parts = [batch[f] for f in feats]
            g_parts = [[grads[t][f] for f in feats] for t in names]

            def body_parts(ids_parts, g_parts, tabs, sls, step):
                return body(jnp.concatenate(ids_parts), [jnp.concatenate(p) for p in g_parts],
                            tabs, sls, step)

            f = jax.shard_map(
                body_parts, mesh=self.mesh,
                in_specs=([self._batch_spec()] * len(feats),
                          [[self._batch_spec(2)] * len(feats) for _ in names],
                          tab_specs, slot_specs, P()),
                out_specs=(tab_specs, slot_specs), check_vma=False)
            tabs, sls = f(ids_parts, g_parts, [tables[t] for t in names],
                          [slots[t] for t in names], step)
            for t, nt, ns in zip(names, tabs, sls):
                new_tables[t], new_slots[t] = nt, ns
        return new_tables, new_slots
