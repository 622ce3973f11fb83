"""Process setup for the entry points and notebooks: XLA flags, the config directory, configs.

Nothing here runs on import. Every command-line ``main()`` calls :func:`configure_xla`
first; a notebook that trains in-process should do the same before its first JAX
computation::

    import jaxreco
    jaxreco.configure_xla()
    cfg = jaxreco.compose_config(["experiment=ml1m_mf", "debug=smoke"])
    metrics = jaxreco.train_and_evaluate(cfg, "outputs/nb")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from jaxreco import config

_XLA_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def configure_xla() -> None:
    """Turns off XLA:CPU's concurrency-optimised scheduler unless ``XLA_FLAGS`` names it.

    That scheduler can wedge a program that runs several batched LAPACK calls (the iALS
    row solves, jaxreco/train/ials.py): every runtime thread parks and
    ``block_until_ready`` never returns (seen with jax 0.10 on a 2-core machine, for some
    bucket shapes on every run). The default scheduler does not. XLA reads ``XLA_FLAGS``
    once, when the first backend starts, so call this before any JAX computation; a value
    the user set explicitly is left alone. Idempotent.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if _XLA_SCHEDULER_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_XLA_SCHEDULER_FLAG}=false".strip()


def conf_dir() -> Path:
    """The Hydra config directory: ``$JAXRECO_CONF_DIR``, else the configs that ship with
    the package.

    A wheel (``pip install .``, the Docker image) holds them in ``jaxreco/conf/``
    (pyproject.toml maps the package ``jaxreco.conf`` onto the top-level ``conf/``); a
    source checkout or an editable install (``pip install -e .``) reads the top-level
    ``conf/`` next to ``jaxreco/`` itself, so edits to it take effect without reinstalling.
    """
    env = os.environ.get("JAXRECO_CONF_DIR")
    if env:
        path = Path(env)
        if not (path / "train.yaml").is_file():
            raise FileNotFoundError(f"JAXRECO_CONF_DIR={env!r}: no train.yaml there; point it "
                                    "at a Hydra config directory like the repository's conf/")
        return path
    package = Path(__file__).resolve().parent
    candidates = (package / "conf", package.parent / "conf")
    for path in candidates:
        if (path / "train.yaml").is_file():
            return path
    raise FileNotFoundError(
        "jaxreco's Hydra configs are missing: looked for train.yaml in "
        + " and ".join(str(p) for p in candidates)
        + "; reinstall jaxreco (a wheel ships them as jaxreco/conf/) or set JAXRECO_CONF_DIR")


def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The config ``jaxreco-train OVERRIDES...`` would run, composed in-process.

    ``config_name="data"`` gives ``jaxreco-data prepare``'s instead. The schemas are
    registered first (unknown keys and bad types fail here, as on the command line), and
    Hydra's own config is set as the current one, so ``${hydra:...}`` interpolations such as
    ``name`` resolve; the ``hydra`` node itself is removed from the result.

    Example::

        cfg = compose_config(["debug=smoke", "model.dim=16"])
        cfg.trainer.epochs   # 2
    """
    config.register()
    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
