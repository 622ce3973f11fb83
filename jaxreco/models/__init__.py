"""Model registry: ``build(cfg.model, info)`` -> a zero-argument constructor of the model."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flax import nnx

from jaxreco.models.mf import MF


def build(cfg: Mapping[str, Any], *, num_users: int, num_items: int, global_bias: float,
          seed: int) -> Callable[[], nnx.Module]:
    name = cfg["name"]
    if name == "mf":
        return lambda: MF(num_users, num_items, dim=int(cfg["dim"]),
                          init_std=float(cfg["init_std"]), global_bias=global_bias,
                          rngs=nnx.Rngs(seed))
    raise ValueError(f"model.name={name!r} is unknown; known models: ['mf']")
