"""Model registry: ``build(cfg.model, info)`` -> a zero-argument constructor of the model."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flax import nnx

from jaxreco.models.mf import MF


def pad_rows(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def build(cfg: Mapping[str, Any], *, num_users: int, num_items: int, global_bias: float,
          seed: int) -> Callable[[], nnx.Module]:
    name = cfg["name"]
    mult = int(cfg.get("row_multiple", 1) or 1)
    num_users, num_items = pad_rows(num_users, mult), pad_rows(num_items, mult)
    if name == "mf":
        return lambda: MF(num_users, num_items, dim=int(cfg["dim"]),
                          init_std=float(cfg["init_std"]), global_bias=global_bias,
                          rngs=nnx.Rngs(seed))
    raise ValueError(f"model.name={name!r} is unknown; known models: ['mf']")
