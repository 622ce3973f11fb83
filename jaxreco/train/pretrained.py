"""Initialising a model from finished runs: NeuMF pre-training (He et al. 2017, §3.4.1).

NeuMF joins a GMF and an MLP tower under one output layer. Trained from scratch it lands
in worse optima than when each part starts from a separately trained GMF and MLP model;
the joint output weights then start as ``[α · h_GMF, (1 − α) · h_MLP]`` (α = 0.5).

``model.pretrained_gmf=<run dir> model.pretrained_mlp=<run dir>`` (and
``model.pretrained_alpha``, default 0.5) read the best
checkpoint of each run (``jaxreco-train`` run directories on the same prepared data) and
copies every parameter of the new model that the source model has under the same name:
the GMF run gives ``user_mf``/``item_mf`` and the MF half of each head, the MLP run the
tower embeddings, the tower and the MLP half of each head; the head biases are mixed with
the same α. Shapes must agree; a mismatch names the parameter and both shapes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxreco.run import restore_run

log = logging.getLogger(__name__)


def _key(path) -> str:
    parts = []
    for p in path:
        name = getattr(p, "key", getattr(p, "name", getattr(p, "idx", None)))
        if name == "value":          # nnx.Variable's payload
            continue
        parts.append(str(name))
    return "/".join(parts)


def flat_params(state) -> dict[str, Any]:
    """``{"user_mf": …, "head/click/w_mf": …, "tower/0/w": …}`` of a ``TrainState``'s
    tables and dense parameters."""
    out = {}
    for tree in (state.tables, state.dense):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out[_key(path)] = leaf
    return out


def load_run_params(run_dir: str | Path) -> tuple[dict[str, np.ndarray], Any]:
    """``(params, config)`` of a finished run's best (else latest) checkpoint."""
    r = restore_run(str(run_dir), full=False)
    return {k: np.asarray(jax.device_get(v)) for k, v in flat_params(r.state).items()}, r.cfg


def _mix(name: str, new_shape, values: list[tuple[str, np.ndarray, float]]) -> np.ndarray:
    for src, v, _ in values:
        if tuple(v.shape) != tuple(new_shape):
            raise ValueError(f"model.pretrained_{src}: parameter {name!r} has shape "
                             f"{tuple(v.shape)} in that run, {tuple(new_shape)} in this model; "
                             "the runs must use the same data and sizes (mf_dim, dim, mlp_dims)")
    return sum(w * v for _, v, w in values)


def neumf_from_runs(state, cfg) -> Any:
    """``state`` with its parameters replaced from the runs ``model.pretrained_gmf`` and
    ``model.pretrained_mlp`` name."""
    mc = cfg.model
    if mc.name != "embed_mlp" or mc.combiner != "both":
        raise ValueError("model.pretrained_gmf/_mlp initialise NeuMF: they need "
                         f"model.name=embed_mlp and model.combiner=both, not "
                         f"{mc.name}/{mc.combiner}")
    if not (mc.get("pretrained_gmf") and mc.get("pretrained_mlp")):
        raise ValueError("NeuMF pre-training needs both model.pretrained_gmf and "
                         f"model.pretrained_mlp (got {mc.get('pretrained_gmf')!r}, "
                         f"{mc.get('pretrained_mlp')!r})")
    alpha = float(mc.get("pretrained_alpha", 0.5))
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"model.pretrained_alpha={alpha}: must be in [0, 1]")
    src = {}
    for part, combiners in (("gmf", ("gmf", "dot")), ("mlp", ("mlp",))):
        field = f"model.pretrained_{part}"
        d = Path(str(mc[f"pretrained_{part}"]))
        if not (d / "config.yaml").exists():
            raise FileNotFoundError(f"{field}={str(d)!r}: not a jaxreco-train run directory "
                                    "(no config.yaml)")
        params, scfg = load_run_params(d)
        if scfg.model.combiner not in combiners:
            raise ValueError(f"{field}={str(d)!r}: that run trained "
                             f"combiner={scfg.model.combiner!r}, expected one of {combiners}")
        if scfg.dataset.name != cfg.dataset.name:
            raise ValueError(f"{field}={str(d)!r}: trained on {scfg.dataset.name!r}, this "
                             f"run uses {cfg.dataset.name!r}")
        src[part] = params
    weight = {"gmf": alpha, "mlp": 1.0 - alpha}
    copied, new_leaves = [], []
    flat = flat_params(state)
    for name, leaf in flat.items():
        parts = name.split("/")
        if parts[0] == "head" and parts[-1] in ("w_mf", "w_mlp", "b"):
            part = {"w_mf": ["gmf"], "w_mlp": ["mlp"], "b": ["gmf", "mlp"]}[parts[-1]]
            vals = []
            for p in part:
                v = src[p].get(name)
                if v is None and parts[-1] == "w_mf":    # a dot-product run: w = 1
                    v = np.ones(leaf.shape, np.float32)
                if v is None:
                    raise ValueError(f"model.pretrained_{p}: its run has no parameter {name!r}")
                vals.append((p, v, weight[p]))
        else:
            vals = [(p, src[p][name], 1.0) for p in ("gmf", "mlp") if name in src[p]]
            if not vals:
                new_leaves.append(leaf)
                continue
            vals = vals[:1]
        new_leaves.append(jax.device_put(_mix(name, leaf.shape, vals).astype(leaf.dtype),
                                          leaf.sharding))
        copied.append(name)
    missing = [n for n in flat if n not in copied]
    if missing:
        raise ValueError(f"model.pretrained_gmf/_mlp: neither run has {missing}")
    leaves = iter(new_leaves)
    tables = jax.tree.map(lambda _: next(leaves), state.tables)
    dense = jax.tree.map(lambda _: next(leaves), state.dense)
    log.info("NeuMF initialised from GMF %s and MLP %s (alpha %.2f): %d parameters",
             mc.pretrained_gmf, mc.pretrained_mlp, alpha, len(copied))
    return state.replace(tables=tables, dense=dense)
