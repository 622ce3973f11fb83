"""Model registry: ``build(cfg.model, info)`` -> a zero-argument constructor of the model."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flax import nnx

from jaxreco.models.embed_mlp import EmbedMLP
from jaxreco.models.mf import MF
from jaxreco.models.sequential import Sequential

MODELS = ("mf", "embed_mlp", "sequential")


def pad_rows(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def build(cfg: Mapping[str, Any], *, num_users: int, num_items: int, global_bias: float,
          seed: int, side_vocab: Mapping[str, int] | None = None,
          context_vocab: Mapping[str, int] | None = None,
          negatives: bool = False,
          head_bias: Mapping[str, float] | None = None,
          num_events: int = 1) -> Callable[[], nnx.Module]:
    """A constructor of the model ``cfg`` names.

    ``side_vocab`` / ``context_vocab``: ``{feature: vocabulary size}`` of the item-side and
    context features the data provides (``embed_mlp`` only); ``negatives``: the batches
    carry sampled ``neg_*`` item features; ``head_bias``: initial bias per head (e.g. the
    log-odds of the training CTR, so a rare-click head starts calibrated); ``num_events``:
    the event-type vocabulary (0 = unknown) the data gives ``sequential`` when
    ``model.events`` is on.
    """
    name = cfg["name"]
    mult = int(cfg.get("row_multiple", 1) or 1)
    real_items = int(num_items)
    num_users, num_items = pad_rows(num_users, mult), pad_rows(num_items, mult)
    if name == "mf":
        return lambda: MF(num_users, num_items, dim=int(cfg["dim"]),
                          init_std=float(cfg["init_std"]), global_bias=global_bias,
                          rngs=nnx.Rngs(seed))
    if name == "embed_mlp":
        side = {f: int(v) for f, v in (side_vocab or {}).items()}
        ctx = {f: int(v) for f, v in (context_vocab or {}).items()}
        return lambda: EmbedMLP(
            num_users, num_items, combiner=str(cfg["combiner"]), dim=int(cfg["dim"]),
            mf_dim=int(cfg["mf_dim"]), mlp_dims=tuple(int(d) for d in cfg["mlp_dims"]),
            side_features=side, context_features=ctx, bias=bool(cfg["bias"]),
            heads=tuple(cfg["heads"]), init_std=float(cfg["init_std"]), negatives=negatives,
            global_bias=global_bias, head_bias=head_bias, rngs=nnx.Rngs(seed))
    if name == "sequential":
        return lambda: Sequential(
            real_items, num_items,
            max_len=int(cfg["max_len"]), dim=int(cfg["dim"]),
            num_blocks=int(cfg["num_blocks"]), num_heads=int(cfg["num_heads"]),
            ffn_dim=int(cfg["ffn_dim"] or cfg["dim"]), dropout=float(cfg["dropout"]),
            num_events=int(num_events) if cfg["events"] else 1, use_gaps=bool(cfg["gaps"]),
            init_std=float(cfg["init_std"]), rngs=nnx.Rngs(seed))
    raise ValueError(f"model.name={name!r} is unknown; known models: {list(MODELS)}")
