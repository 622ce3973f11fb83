"""Meshes and logical-axis rules: the only place mesh axis names meet model axis names.

Model parameters carry logical axes (``user``, ``item``, ``embed``, ``mlp``, ``batch``...).
A mesh preset (``conf/mesh/*.yaml``) gives mesh axis sizes and ``rules`` mapping each
logical axis to a mesh axis (or ``null`` = replicated). Switching between data- and
model-parallel training is a change of preset, never of model code.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves one ``-1`` axis size to "the rest of the devices"; checks the product."""
    sizes = {k: int(v) for k, v in axes.items()}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh.axes={dict(axes)}: at most one axis may be -1, got {free}")
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"mesh.axes={dict(axes)}: sizes must be positive or -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"mesh.axes={dict(axes)}: {num_devices} devices are not divisible "
                             f"by the fixed axes' product {known}")
        sizes[free[0]] = num_devices // known
    if math.prod(sizes.values()) > num_devices or (free and math.prod(sizes.values()) != num_devices):
        raise ValueError(f"mesh.axes={dict(axes)} needs {math.prod(sizes.values())} devices, "
                         f"but {num_devices} are available (use -1 for 'the rest')")
    return sizes


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all) with Auto axis types.

    Fixed sizes whose product is smaller than the device count use the first devices
    (``single`` = ``{data: 1, model: 1}`` is one device however many there are).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(axes, len(devices))
    arr = np.asarray(devices[:math.prod(sizes.values())]).reshape(tuple(sizes.values()))
    return Mesh(arr, tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))


def logical_to_spec(logical: Sequence[str | None] | None, rules: Mapping[str, Any]) -> P:
    """``('user', 'embed')`` + ``{user: model, embed: null}`` -> ``P('model', None)``;
    ``{user: [data, model]}`` shards ``user`` over both axes: ``P(('data', 'model'), None)``."""
    if not logical:
        return P()
    out = []
    for name in logical:
        if name is None:
            out.append(None)
        elif name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule in mesh.rules={dict(rules)}")
        else:
            rule = rules[name]       # a mesh axis, null, or a list of axes (one dimension)
            out.append(rule if rule is None or isinstance(rule, str) else tuple(rule))
    return P(*out)


def named(mesh: Mesh, spec: P) -> NamedSharding:
    return NamedSharding(mesh, spec)


def batch_sharding(mesh: Mesh, rules: Mapping[str, Any]) -> NamedSharding:
    """Sharding of ``[batch, ...]`` inputs: the batch axis over the ``batch`` rule's axes."""
    return NamedSharding(mesh, P(rules.get("batch")))
