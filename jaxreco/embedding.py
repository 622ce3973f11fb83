"""Sharded embedding lookups and row-sparse table updates (explicit, with ``shard_map``).

Tables are laid out by the mesh rules: rows over the ``user``/``item`` rule's mesh axes
(``row_axes``; replicated over the rest), batches over the ``batch`` rule's axes. XLA's
automatic partitioning of a gather from a row-sharded table may all-gather the table; here
no device ever holds more than its own rows. Two algorithms, chosen per table group:

**Routed** (rows sharded over every device, e.g. ``mp`` or ``dp_mp``: each row has exactly
one owner). The batch is split into ``N`` equal *slices*, one per device (a device's batch
shard, further split over the mesh axes the batch is replicated on), so no work is repeated:

* each device sorts its slice's ids (the sort groups them by owner, since owners hold
  contiguous row ranges), drops repeats, and packs at most ``capacity`` distinct ids per
  owner into an ``[N, capacity]`` buffer; one ``all_to_all`` delivers them;
* **lookup**: the owner gathers those rows and a second ``all_to_all`` returns them;
* **update**: the row gradients of the slice are summed per distinct id into the same
  buffer layout and sent to the owners, which deduplicate across senders (one sort of
  ``N · capacity`` ids, ``segment_sum``) and apply the row optimizer.

The lookup returns its routing (``lookup_and_plan``) and the update of the same step reuses
it: the ids are sorted and sent once per step, only the gradients travel back. All features
of all routed groups on the same row axes (MF: user ids and item ids; a user id and a history
of item ids) share one routing through one virtual row space (``_Packing``): a step has one
ids and one rows ``all_to_all`` in the lookup and one gradients ``all_to_all`` in the update.

Per device that is ``O(batch/N)`` work instead of ``O(batch/data)`` (lookup) and
``O(batch)`` (update). ``capacity = ceil(capacity_factor · slice / N)``. Skewed ids that
would overflow it are sent in further *rounds* (a ``while_loop`` every device runs the same
number of times): each round covers, per owner, a range of rows agreed by a ``pmin`` such
that no device exceeds the capacity, so every id travels in exactly one round with all its
gradients and the update stays exact; nothing is ever dropped. Evenly spread ids take one
round; ``rounds(tables, batch)`` reports how many a batch takes.

**Masked** (everything else: single device, replicated tables, rows over a subset of axes):

* **lookup**: each device gathers, for its shard of the batch, the ids that fall in its
  row range (others contribute zeros) and a ``psum`` over ``row_axes`` assembles the rows;
* **update**: the batch's ids and row gradients are all-gathered over the batch axes (the
  table is replicated over them, so every replica applies the same update), mapped to the
  local row range (others become out-of-range and are dropped), deduplicated once per id
  feature group, and the row optimizer updates only those rows.
* **update of replicated tables** (``dp``: rows on no axis, batch sharded, a row-local
  optimizer, ``ROW_LOCAL``): instead of every replica running the whole batch's update,
  each device owns a row range *for the update*: ids and gradients are routed to it as in
  the routed layout, it runs the row optimizer on its distinct rows only, and the new rows
  and slot values are all-gathered and written into every replica.

The numbers are the same on every layout (the tests check 1e-5): lookups are exact, and
updates differ only in the order in which repeated ids' gradients are summed. The table's
row order is the id order on every mesh, so checkpoints move between meshes unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxreco.optim import RowOptimizer, sort_positions, take_rows, unique_inverse
from jaxreco.sharding import logical_to_spec

# Row optimizers whose update of a row reads only that row and its slots (the replicated
# layout may then run them on a gathered subset of rows); dense ``adam`` moves every row.
ROW_LOCAL = frozenset({"sgd", "adagrad", "lazy_adam"})


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


class _Plan:
    """Routing of one device's slice of ids to the shards owning their rows.

    Shard ``d`` owns rows ``[d · n, (d + 1) · n)``. The slice is sorted once (which groups
    it by owner) and its distinct ids are sent in *rounds*: round ``r`` carries, for every
    owner ``d``, the ids with local row in ``[lo[d], hi[d])``, where ``hi`` is chosen (a
    ``pmin`` over devices of each device's proposal) so that no device has more than
    ``capacity`` distinct ids in range for any owner. Every id falls in exactly one round,
    so each owner sees all the gradients of a row at once: the update stays exact. With ids
    spread evenly there is one round; skewed ids take more rounds, never a dropped id.
    """

    def __init__(self, ids: jax.Array, num_rows: int, num_shards: int, capacity: int,
                 sort=None):
        k = ids.shape[0]
        self.k, self.num_shards, self.capacity = k, num_shards, capacity
        self.n = num_rows // num_shards
        self.size = num_shards * capacity                      # the send buffer; its "drop"
        key = jnp.where((ids >= 0) & (ids < num_rows), ids, num_rows)   # invalid ids last
        skey, self.pos = sort_positions(key, num_rows) if sort is None else sort(key)
        self.first = jnp.concatenate([jnp.ones((1,), bool), skey[1:] != skey[:-1]])
        self.dest = skey // self.n                             # num_shards if invalid
        self.local = skey - self.dest * self.n
        self.lo = lambda lo: lo[jnp.minimum(self.dest, num_shards - 1)]

    def _rank(self, mask: jax.Array) -> jax.Array:
        """Per sorted position, the rank among the distinct ``mask``-ed ids of its owner."""
        m = (self.first & mask).astype(jnp.int32)
        counts = jax.ops.segment_sum(m, self.dest, num_segments=self.num_shards + 1)
        return jnp.cumsum(m) - 1 - (jnp.cumsum(counts) - counts)[self.dest]

    def overflows(self) -> jax.Array:
        """Whether this slice has more than ``capacity`` distinct ids for some owner (then
        one round cannot carry them all)."""
        m = (self.first & (self.dest < self.num_shards)).astype(jnp.int32)
        counts = jax.ops.segment_sum(m, self.dest, num_segments=self.num_shards + 1)
        return jnp.any(counts[:self.num_shards] > self.capacity)

    def propose(self, lo: jax.Array) -> jax.Array:
        """``[num_shards]``: per owner, the local row of this slice's ``capacity + 1``-th
        distinct id at or after ``lo`` (``n`` if there are not that many)."""
        cand = (self.dest < self.num_shards) & (self.local >= self.lo(lo))
        at = cand & self.first & (self._rank(cand) == self.capacity)
        return jnp.full((self.num_shards + 1,), self.n, jnp.int32).at[
            jnp.where(at, self.dest, self.num_shards)].min(self.local)[:self.num_shards]

    def round(self, lo: jax.Array, hi: jax.Array):
        """``(send_ids [size], slot [k])`` for the ids with local row in ``[lo, hi)``:
        ``send_ids`` holds each owner's ids (``capacity`` per owner, padding ``n``);
        ``slot[i]`` is the buffer position of ``ids[i]`` (``size`` when not in this round)."""
        inr = (self.dest < self.num_shards) & (self.local >= self.lo(lo)) & (
            self.local < hi[jnp.minimum(self.dest, self.num_shards - 1)])
        sslot = jnp.where(inr, self.dest * self.capacity + self._rank(inr), self.size)
        send_ids = jnp.full((self.size,), self.n, jnp.int32).at[sslot].set(self.local,
                                                                         mode="drop")
        return send_ids, sslot[self.pos]


class _Packing:
    """Several table groups in one virtual row space, so that one routing serves them all.

    Shard ``d`` owns ``n_g`` rows of group ``g`` (``[d · n_g, (d + 1) · n_g)``); its
    *virtual* rows ``[d · v, (d + 1) · v)``, ``v = Σ n_g``, hold its rows of group 0, then
    of group 1, ... So group ``g``'s id ``i`` (owner ``d = i // n_g``) is the virtual id
    ``d · v + o_g + i − d · n_g`` (``o_g = Σ_{h<g} n_h``): sorting virtual ids groups every
    group's ids by owner at once, and an owner tells a received id's group by its offset.
    A row travels as its group's tables side by side, padded to the widest group
    (``width``). With MF's user and item groups this halves the step's collectives.

    Only routed (row-sharded) tables use it: an owner gathers and updates every group's
    tables for all its received ids (reads of non-members hit one clipped row), which the
    row-range update of replicated tables (``dp``) paid for more than the collectives it
    saved (measured 0.137-0.281x single fused vs 0.214-0.270x per group, 2026-11-28).
    """

    def __init__(self, feats, names, num_rows, widths, num_shards: int):
        self.feats, self.names, self.num_rows = feats, names, num_rows
        self.num_shards = num_shards
        self.n = [r // num_shards for r in num_rows]
        self.offsets = [sum(self.n[:g]) for g in range(len(num_rows))]
        self.v = sum(self.n)
        self.edges = [[sum(w[:i]) for i in range(len(w) + 1)] for w in widths]
        self.width = max(e[-1] for e in self.edges)

    def virtual_ids(self, ids_parts) -> jax.Array:
        """Every group's features (flattened in group order) as one array of virtual ids;
        ids outside a group's rows become ``num_shards · v`` (none)."""
        out, parts = [], iter(ids_parts)
        for g, feats in enumerate(self.feats):
            n = self.n[g]
            for _ in feats:
                ids = next(parts)
                dest = ids // n
                vid = dest * (self.v - n) + self.offsets[g] + ids
                out.append(jnp.where((ids >= 0) & (ids < self.num_rows[g]), vid,
                                     self.num_shards * self.v))
        return jnp.concatenate(out)

    def local(self, vl: jax.Array):
        """Per group, ``(member, row)`` of an owner's virtual local ids ``vl`` (``v`` =
        none): whether each is the group's, and its local row (``n_g`` if not)."""
        out = []
        for g in range(len(self.n)):
            row = vl - self.offsets[g]
            member = (row >= 0) & (row < self.n[g])
            out.append((member, jnp.where(member, row, self.n[g])))
        return out

    def gather(self, tabs_local, vl: jax.Array) -> jax.Array:
        """``[len(vl), width]``: each id's rows of its group's tables side by side (the
        non-members' reads are of one clipped row, which stays in cache)."""
        out, tabs = None, iter(tabs_local)
        for g, (member, row) in enumerate(self.local(vl)):
            r = jnp.concatenate([take_rows(next(tabs), row) for _ in self.names[g]], 1)
            r = jnp.pad(r, [(0, 0), (0, self.width - r.shape[1])])
            out = r if out is None else jnp.where(member[:, None], r, out)
        return out

    def pack_grads(self, g_flat) -> jax.Array:
        """``[ids, width]`` in :meth:`virtual_ids` order from the row gradients, flattened
        per group, per table, per feature."""
        parts, rows = iter(g_flat), []
        per = []
        for g, feats in enumerate(self.feats):
            per.append([[next(parts) for _ in feats] for _ in self.names[g]])
        for g, feats in enumerate(self.feats):
            for j in range(len(feats)):
                r = jnp.concatenate([per[g][i][j] for i in range(len(self.names[g]))], 1)
                rows.append(jnp.pad(r, [(0, 0), (0, self.width - r.shape[1])]))
        return jnp.concatenate(rows)

    def split_rows(self, out: jax.Array, ids_parts):
        """``out [ids, width]`` -> ``((rows of feature j for j) for table i) for group g``."""
        res, off, parts = [], 0, iter(ids_parts)
        for g, feats in enumerate(self.feats):
            spans = []
            for _ in feats:
                k = next(parts).shape[0]
                spans.append((off, off + k))
                off += k
            e = self.edges[g]
            res.append(tuple(tuple(out[a:b, e[i]:e[i + 1]] for a, b in spans)
                             for i in range(len(self.names[g]))))
        return tuple(res)

    def apply(self, row_opt: RowOptimizer, tabs, sls, vl: jax.Array, grads: jax.Array, step):
        """An owner's update: deduplicates its received virtual ids ``vl`` (``v`` = none)
        once, sums their gradients, and runs the row optimizer on each table (flattened in
        group order) for its group's ids (the others' rows are out of range: dropped)."""
        uids, inv = unique_inverse(vl, self.v)
        ug = jax.ops.segment_sum(grads, inv, num_segments=uids.shape[0])
        out_t, out_s, k = [], [], 0
        for g, (_, row) in enumerate(self.local(uids)):
            e = self.edges[g]
            for i in range(len(self.names[g])):
                nt, ns = row_opt.apply(tabs[k], sls[k], row, ug[:, e[i]:e[i + 1]], step)
                out_t.append(nt)
                out_s.append(ns)
                k += 1
        return out_t, out_s


class ShardedTables:
    """Lookup/update of a model's tables on ``mesh`` under ``rules``.

    Args:
      table_axes: ``{table: logical axes}``, e.g. ``{"user_embed": ("user", "embed")}``.
      table_features: ``{table: (batch features indexing it, ...)}``.
      capacity_factor: routed layouts send at most ``ceil(capacity_factor · slice / N)``
        distinct ids from each device to each owner per round (more → further rounds).
    """

    def __init__(self, mesh: Mesh, rules: Mapping[str, Any],
                 table_axes: Mapping[str, Sequence[str | None]],
                 table_features: Mapping[str, Sequence[str]], row_opt: RowOptimizer,
                 *, capacity_factor: float = 1.5):
        self.mesh = mesh
        self.row_opt = row_opt
        self.capacity_factor = float(capacity_factor)
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be positive")
        self.table_features = {t: tuple(f) for t, f in table_features.items()}
        # Mesh axes of size 1 shard nothing: dropping them lets a one-device or replicated
        # layout use plain gathers that XLA fuses with their consumers.
        def sharded(axes: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(a for a in axes if mesh.shape[a] > 1)

        self.batch_axes = sharded(_axes(rules.get("batch")))
        self.row_axes = {t: sharded(_axes(logical_to_spec(ax, rules)[0]))
                         for t, ax in table_axes.items()}
        self.num_devices = math.prod(mesh.shape.values())
        # The batch split into one slice per device: batch axes first, then the others.
        self.slice_axes = self.batch_axes + tuple(a for a in mesh.axis_names
                                                  if a not in self.batch_axes)
        self.routed = {t: self.num_devices > 1 and self._size(ra) == self.num_devices
                       for t, ra in self.row_axes.items()}
        for t, ra in self.row_axes.items():
            overlap = set(ra) & set(self.batch_axes)
            if overlap and not self.routed[t]:
                raise ValueError(f"mesh.rules: table {t!r} rows and the batch are both sharded "
                                 f"over {sorted(overlap)}; map them to different mesh axes, or "
                                 f"shard the rows over every mesh axis")
        # Tables indexed by the same features on the same layout share one dedup (one sort).
        groups: dict[tuple, list[str]] = {}
        for t in self.table_features:
            groups.setdefault((self.table_features[t], self.row_axes[t]), []).append(t)
        self.groups = list(groups.items())
        # Routed groups on the same row axes share one routing (one sort, one ids and one
        # rows all_to_all per lookup, one gradients all_to_all per update). Replicated tables'
        # row-range-split updates stay per group (fused, they measured slower: see _Packing).
        sets: dict[tuple, list[int]] = {}
        for g, ((_, ra), names) in enumerate(self.groups):
            if self.routed[names[0]]:
                sets.setdefault(ra, []).append(g)
        self.routed_sets = list(sets.items())
        self.replicated_set = [g for g, ((_, ra), names) in enumerate(self.groups)
                               if not self.routed[names[0]] and self._replicated_routed(ra)]

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

    def _slice_spec(self, ndim: int = 1) -> P:
        return P(self.slice_axes, *([None] * (ndim - 1)))

    def capacity(self, slice_len: int) -> int:
        """Distinct ids one device may send one owner per step, for a slice of ``slice_len``."""
        n = self.num_devices
        return max(1, min(slice_len, math.ceil(self.capacity_factor * slice_len / n)))

    def _pad(self, x: jax.Array, fill) -> jax.Array:
        """Pads the batch axis to a multiple of the device count (one equal slice each)."""
        extra = -x.shape[0] % self.num_devices
        if not extra:
            return x
        return jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)

    def _first_round(self, plan: _Plan, ra: tuple[str, ...]):
        """Inside ``shard_map``: ``(fits, send_ids, slot)`` of the round that sends every id
        at once, and whether it is valid (``fits``: no device has more than ``capacity``
        distinct ids for any owner; the same value on every device). ``fits`` is a Python
        ``True`` when a slice can never overflow."""
        n = jnp.full((self.num_devices,), plan.n, jnp.int32)
        lo = jnp.zeros_like(n)
        send_ids, slot = plan.round(lo, n)
        if plan.capacity >= plan.k:
            return True, send_ids, slot
        return jnp.all(jax.lax.pmin(plan.propose(lo), ra) >= plan.n), send_ids, slot

    def _rounds(self, plan: _Plan, ra: tuple[str, ...], body, carry, done=None):
        """Inside ``shard_map``: runs ``carry = body(send_ids, slot, carry)`` once per round
        (see ``_Plan``); every device runs the same number of rounds. ``done`` (a traced
        bool, the same on every device): run no round (the first round was sent already)."""
        n_dev = self.num_devices
        if plan.capacity >= plan.k:                           # a slice always fits: one round
            n = jnp.full((n_dev,), plan.n, jnp.int32)
            return body(*plan.round(jnp.zeros_like(n), n), carry)

        def step(c):
            lo, carry = c
            hi = jax.lax.pmin(plan.propose(lo), ra)
            return hi, body(*plan.round(lo, hi), carry)

        lo = jnp.zeros((n_dev,), jnp.int32)
        if done is not None:
            lo = jnp.where(done, plan.n, lo)
        _, carry = jax.lax.while_loop(lambda c: jnp.any(c[0] < plan.n), step, (lo, carry))
        return carry

    def _lazy_plan(self, ids: jax.Array, num_rows: int, need: jax.Array) -> _Plan:
        """The plan of ``ids``, whose sort only runs when ``need`` (a traced bool)."""
        def sort(key):
            return jax.lax.cond(need, lambda k: sort_positions(k, num_rows),
                                lambda k: (k, jnp.zeros_like(k)), key)
        return _Plan(ids, num_rows, self.num_devices, self.capacity(ids.shape[0]), sort=sort)

    def _a2a(self, x: jax.Array, ra: tuple[str, ...]) -> jax.Array:
        return jax.lax.all_to_all(x, ra, 0, 0, tiled=True)

    # ------------------------------------------------------------------ lookup
    def lookup(self, tables: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]):
        """``rows[t][f] = tables[t][batch[f]]``, sharded like the batch."""
        return self.lookup_and_plan(tables, batch)[0]

    def lookup_and_plan(self, tables: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]):
        """``(rows, plans)``: the lookup, and per routed set of groups the routing it computed
        (``(recv_ids, slot, fits)``), which :meth:`update` reuses for the same batch: the
        gradients travel back along the same buffer layout, so the step sorts and routes
        the ids once. All routed groups on the same row axes share one routing (one sort,
        one ids and one rows ``all_to_all`` per step, whatever the number of groups)."""
        rows: dict[str, dict[str, jax.Array]] = {}
        plans: dict[int, tuple] = {}
        for s, (ra, members) in enumerate(self.routed_sets):
            packing = self._packing(members, tables)
            out, plans[s] = self._lookup_routed(packing, ra, tables, batch)
            for g, per_t in zip(members, out):
                feats, names = self.groups[g][0][0], self.groups[g][1]
                for t, per_feat in zip(names, per_t):
                    rows[t] = dict(zip(feats, per_feat))
        for (feats, ra), names in self.groups:
            if not self.routed[names[0]]:
                for t in names:
                    rows[t] = {f: self._lookup_masked(tables[t], batch[f], ra) for f in feats}
        return {t: rows[t] for t in self.table_features}, plans

    def _lookup_masked(self, table, ids, ra):
        if not ra:
            return take_rows(table, ids)

        def body(table_local, ids):
            n = table_local.shape[0]
            local = ids - self._index(ra) * n
            ok = (local >= 0) & (local < n)
            r = take_rows(table_local, local)
            return jax.lax.psum(jnp.where(ok[:, None], r, 0), ra)

        return jax.shard_map(body, mesh=self.mesh,
                             in_specs=(P(ra, None), self._batch_spec()),
                             out_specs=self._batch_spec(2))(table, ids)

    def _packing(self, members, tables):
        groups = [self.groups[g] for g in members]
        return _Packing([feats for (feats, _), _ in groups], [names for _, names in groups],
                        [tables[names[0]].shape[0] for _, names in groups],
                        [[tables[t].shape[1] for t in names] for _, names in groups],
                        self.num_devices)

    def _lookup_routed(self, pk: _Packing, ra, tables, batch):
        """All features of all groups of ``pk`` in one routing:
        ``([[[rows of f] for t in group] for group], plan)``."""
        n_dev = self.num_devices

        def body(tabs_local, ids_parts):
            vids = pk.virtual_ids(ids_parts)
            plan = _Plan(vids, n_dev * pk.v, n_dev, self.capacity(vids.shape[0]))
            cap = plan.capacity
            full = jnp.full((n_dev,), plan.n, jnp.int32)
            send_ids, slot = plan.round(jnp.zeros_like(full), full)
            zeros = jnp.zeros((vids.shape[0], pk.width), tabs_local[0].dtype)

            def one_round(send_ids, slot, out, recv=None):
                if recv is None:
                    recv = self._a2a(send_ids, ra)
                back = self._a2a(pk.gather(tabs_local, recv), ra)
                return jnp.where((slot < back.shape[0])[:, None],
                                 back.at[slot].get(mode="fill", fill_value=0), out), recv

            if cap >= plan.k:            # a slice always fits: one round
                fits, recv = True, None
            else:
                # Each device's "I overflow" flag rides with its ids to every owner, so all
                # devices learn whether the first round held every id without a collective.
                flag = jnp.broadcast_to(plan.overflows().astype(jnp.int32), (n_dev, 1))
                got = self._a2a(jnp.concatenate([send_ids.reshape(n_dev, cap), flag], 1)
                                .reshape(-1), ra).reshape(n_dev, cap + 1)
                fits = ~jnp.any(got[:, cap] > 0)
                recv = got[:, :cap].reshape(-1)
            out, recv = one_round(send_ids, slot, zeros, recv)
            if fits is not True:         # skewed ids (rare): further rounds, from scratch
                out = self._rounds(plan, ra, lambda s, sl, o: one_round(s, sl, o)[0],
                                   jnp.where(fits, out, zeros), done=fits)
            return pk.split_rows(out, ids_parts), (recv, slot, jnp.asarray(fits))

        tabs = [tables[t] for names in pk.names for t in names]
        id_feats = [batch[f] for feats in pk.feats for f in feats]
        row_specs = tuple(tuple(tuple(self._slice_spec(2) for _ in feats) for _ in names)
                          for feats, names in zip(pk.feats, pk.names))
        f = jax.shard_map(body, mesh=self.mesh,
                          in_specs=([P(ra, None)] * len(tabs),
                                    [self._slice_spec()] * len(id_feats)),
                          out_specs=(row_specs, (self._slice_spec(), self._slice_spec(), P())),
                          check_vma=False)
        rows, plan = f(tabs, [self._pad(x, -1) for x in id_feats])
        return [[[r[:batch[fe].shape[0]] for r, fe in zip(per_f, feats)] for per_f in per_t]
                for per_t, feats in zip(rows, pk.feats)], plan

    # ------------------------------------------------------------------ update
    def update(self, tables: Mapping[str, jax.Array], slots: Mapping[str, Any],
               batch: Mapping[str, jax.Array], grads: Mapping[str, Mapping[str, jax.Array]],
               step: jax.Array, plans: Mapping[int, tuple] | None = None):
        """Row-sparse optimizer step on the rows the batch touched: ``(tables, slots)``.

        ``plans``: what :meth:`lookup_and_plan` returned for this batch (routed groups then
        skip their sort and the ids' trip to the owners); without it they route again."""
        new_tables, new_slots = dict(tables), dict(slots)

        def store(pk, tabs, sls):
            for t, nt, ns in zip([t for names in pk.names for t in names], tabs, sls):
                new_tables[t], new_slots[t] = nt, ns

        for s, (ra, members) in enumerate(self.routed_sets):
            pk = self._packing(members, tables)
            store(pk, *self._update_routed(pk, ra, tables, slots, batch, grads, step,
                                           (plans or {}).get(s)))
        for g in self.replicated_set:
            (feats, _), names = self.groups[g]
            tabs, sls = self._update_replicated(feats, names, tables, slots, batch, grads, step)
            for t, nt, ns in zip(names, tabs, sls):
                new_tables[t], new_slots[t] = nt, ns
        for (feats, ra), names in self.groups:
            if not self.routed[names[0]] and not self._replicated_routed(ra):
                tabs, sls = self._update_masked(feats, ra, names, tables, slots, batch, grads,
                                                step)
                for t, nt, ns in zip(names, tabs, sls):
                    new_tables[t], new_slots[t] = nt, ns
        return new_tables, new_slots

    def _replicated_routed(self, ra) -> bool:
        """Replicated tables with a sharded batch and a row-local optimizer: the update is
        split by row range over the devices (see :meth:`_update_replicated`)."""
        return (not ra and bool(self.batch_axes) and self.num_devices > 1
                and self.row_opt.name in ROW_LOCAL)

    def _apply(self, tabs, sls, local, gs, step):
        """Dedups ``local`` (row ids, ``n`` = none) and applies the row optimizer per table."""
        uids, inv = unique_inverse(local, tabs[0].shape[0])
        outs_t, outs_s = [], []
        for tab, sl, gx in zip(tabs, sls, gs):
            ug = jax.ops.segment_sum(gx, inv, num_segments=uids.shape[0])
            nt, ns = self.row_opt.apply(tab, sl, uids, ug, step)
            outs_t.append(nt)
            outs_s.append(ns)
        return outs_t, outs_s

    def _shard_update(self, body, spec, pad, feats, names, tables, slots, batch, grads, step,
                      extra=(), extra_specs=()):
        """Runs ``body(ids_parts, g_parts, tabs, sls, step, *extra) -> (tabs, sls)`` under
        shard_map: ids per feature (``feats``) and row gradients per table and feature
        (``[[grads[t][f] for f in feats_of_t] for t in names]``) laid out by ``spec`` (after
        ``pad``), tables and slots by their row layout. ``feats``: a list of features, or
        one list per table of ``names`` (the features of that table's group)."""
        per_table = feats if feats and isinstance(feats[0], (list, tuple)) else [feats] * len(names)
        id_feats = list(dict.fromkeys(f for fs in per_table for f in fs))
        tab_specs = [self._row_spec(t, tables[t].ndim) for t in names]
        slot_specs = [jax.tree.map(lambda x, t=t: self._row_spec(t, x.ndim), slots[t])
                      for t in names]
        f = jax.shard_map(
            body, mesh=self.mesh,
            in_specs=([spec()] * len(id_feats), [[spec(2)] * len(fs) for fs in per_table],
                      tab_specs, slot_specs, P(), *extra_specs),
            out_specs=(tab_specs, slot_specs), check_vma=False)
        return f([pad(batch[fe], -1) for fe in id_feats],
                 [[pad(grads[t][fe], 0) for fe in fs] for t, fs in zip(names, per_table)],
                 [tables[t] for t in names], [slots[t] for t in names], step, *extra)

    def _update_masked(self, feats, ra, names, tables, slots, batch, grads, step):
        ba = self.batch_axes

        def body(ids, gs, tabs, sls, step):
            if ba:
                ids = jax.lax.all_gather(ids, ba, tiled=True)
                gs = [jax.lax.all_gather(x, ba, tiled=True) for x in gs]
            n = tabs[0].shape[0]
            local = ids - self._index(ra) * n if ra else ids
            local = jnp.where((local >= 0) & (local < n), local, n)
            return self._apply(tabs, sls, local, gs, step)

        # The feature concatenation interleaves per-feature shards; gather per feature.
        def body_parts(ids_parts, g_parts, tabs, sls, step):
            return body(jnp.concatenate(ids_parts), [jnp.concatenate(p) for p in g_parts],
                        tabs, sls, step)

        return self._shard_update(body_parts, self._batch_spec, lambda x, fill: x, list(feats),
                                  names, tables, slots, batch, grads, step)

    def _packed_update(self, pk: _Packing, body, tables, slots, batch, grads, step,
                       extra=(), extra_specs=()):
        """``_shard_update`` over every group of ``pk``: ``body(vids, g, tabs, sls, step,
        *extra)`` gets the slice's virtual ids and packed row gradients."""
        names = [t for ns in pk.names for t in ns]
        per_table = [list(fs) for fs, ns in zip(pk.feats, pk.names) for _ in ns]
        order = list(dict.fromkeys(f for fs in per_table for f in fs))

        def wrapped(ids_parts, g_parts, tabs, sls, step, *extra):
            by_name = dict(zip(order, ids_parts))
            vids = pk.virtual_ids([by_name[f] for fs in pk.feats for f in fs])
            g = pk.pack_grads([x for parts in g_parts for x in parts])
            return body(vids, g, tabs, sls, step, *extra)

        return self._shard_update(wrapped, self._slice_spec, self._pad, per_table, names,
                                  tables, slots, batch, grads, step, extra, extra_specs)

    def _update_routed(self, pk: _Packing, ra, tables, slots, batch, grads, step, plan):
        n_dev = self.num_devices

        def one_round(g, step):
            def run(send_ids, slot, carry, recv_ids=None):
                tabs, sls = carry
                if recv_ids is None:
                    recv_ids = self._a2a(send_ids, ra)
                send = jnp.zeros((recv_ids.shape[0], g.shape[1]), g.dtype).at[slot].add(
                    g, mode="drop")
                return pk.apply(self.row_opt, tabs, sls, recv_ids, self._a2a(send, ra), step)
            return run

        def body(vids, g, tabs, sls, step, *planned):
            run = one_round(g, step)
            if planned:                  # the lookup's routing of these ids: no ids travel
                recv, slot, fits = planned
                if self.capacity(vids.shape[0]) >= vids.shape[0]:
                    return run(None, slot, (tabs, sls), recv_ids=recv)
                plan = self._lazy_plan(vids, n_dev * pk.v, ~fits)
            else:
                plan = _Plan(vids, n_dev * pk.v, n_dev, self.capacity(vids.shape[0]))
                fits, send_ids, slot = self._first_round(plan, ra)
                if fits is True:
                    return run(send_ids, slot, (tabs, sls))
                recv = self._a2a(send_ids, ra)
            # The first round is applied only if it held every id (else its owners see no id);
            # skewed ids (rare) then take the rounds, sorting again only in that case.
            carry = run(None, slot, (tabs, sls), recv_ids=jnp.where(fits, recv, pk.v))
            return self._rounds(plan, ra, run, carry, done=fits)

        extra, extra_specs = (), ()
        if plan is not None:
            extra, extra_specs = plan, (self._slice_spec(), self._slice_spec(), P())
        return self._packed_update(pk, body, tables, slots, batch, grads, step, extra,
                                   extra_specs)

    @staticmethod
    def _slice_grads(g_parts, nf):
        """``[slice · features, sum of widths]``: per feature, the group's tables side by side."""
        return jnp.concatenate([jnp.concatenate([gt[i] for gt in g_parts], axis=1)
                                for i in range(nf)])

    def _update_replicated(self, feats, names, tables, slots, batch, grads, step):
        """Replicated tables (``dp``): the batch's update is computed once, not on every
        replica. Each device routes its slice's ids and gradients to the device that owns
        their row range *for this update* (as in the routed layout), which deduplicates
        them and runs the row optimizer on those rows only; the new rows and slot values
        are then all-gathered and written into every replica."""
        num_rows = tables[names[0]].shape[0]
        n_dev = self.num_devices
        n = -(-num_rows // n_dev)                    # owner d: rows [d·n, (d+1)·n)
        axes = tuple(a for a in self.slice_axes if self.mesh.shape[a] > 1)
        widths = [tables[t].shape[1] for t in names]
        edges = [sum(widths[:i]) for i in range(len(widths) + 1)]

        def body(ids_parts, g_parts, tabs, sls, step):
            ids = jnp.concatenate(ids_parts)
            ids = jnp.where(ids < num_rows, ids, -1)
            g = self._slice_grads(g_parts, len(ids_parts))

            def one_round(send_ids, slot, carry):
                tabs, sls = carry
                send_g = jnp.zeros((send_ids.shape[0], g.shape[1]), g.dtype).at[slot].add(
                    g, mode="drop")
                recv = self._a2a(send_ids, axes)
                recv_g = self._a2a(send_g, axes)
                gid = jnp.where(recv < n, self._index(axes) * n + recv, num_rows)
                uids, inv = unique_inverse(gid, num_rows)
                all_uids = jax.lax.all_gather(uids, axes, tiled=True)
                at = jnp.arange(uids.shape[0], dtype=jnp.int32)
                out_t, out_s = [], []
                for i, (tab, sl) in enumerate(zip(tabs, sls)):
                    ug = jax.ops.segment_sum(recv_g[:, edges[i]:edges[i + 1]], inv,
                                             num_segments=uids.shape[0])
                    mini = jax.tree.map(lambda x: x.at[uids].get(mode="clip"), (tab, sl))
                    nt, ns = self.row_opt.apply(*mini, at, ug, step)
                    put = lambda full, new: full.at[all_uids].set(       # noqa: E731
                        jax.lax.all_gather(new, axes, tiled=True), mode="drop")
                    out_t.append(put(tab, nt))
                    out_s.append(jax.tree.map(put, sl, ns))
                return out_t, out_s

            return self._rounds(_Plan(ids, n * n_dev, n_dev, self.capacity(ids.shape[0])),
                                axes, one_round, (tabs, sls))

        return self._shard_update(body, self._slice_spec, self._pad, feats, names, tables, slots,
                                  batch, grads, step)

    # ------------------------------------------------------------------ diagnostics
    def rounds(self, tables: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]):
        """``{group's first table: int}``: how many routing rounds ``batch``'s update takes
        there (routed groups only; groups routed together report the same count; 1 unless
        some device exceeds its capacity for an owner)."""
        out = {}
        for ra, members in self.routed_sets:
            pk = self._packing(members, tables)
            feats = [f for fs in pk.feats for f in fs]
            n_dev = self.num_devices

            def body(ids_parts):
                vids = pk.virtual_ids(ids_parts)
                plan = _Plan(vids, n_dev * pk.v, n_dev, self.capacity(vids.shape[0]))
                return self._rounds(plan, ra, lambda send_ids, slot, c: c + 1, jnp.int32(0))

            f = jax.shard_map(body, mesh=self.mesh, in_specs=([self._slice_spec()] * len(feats),),
                              out_specs=P(), check_vma=False)
            count = int(jax.jit(f)([self._pad(batch[f], -1) for f in feats]))
            out.update({names[0]: count for names in pk.names})
        return out
