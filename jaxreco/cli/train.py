"""`jaxreco-train`: the Hydra app. All logic lives in ``jaxreco.train.loop``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from jaxreco import config
from jaxreco.cli import CONF_DIR, quiet_libraries, user_errors

log = logging.getLogger("jaxreco")
config.register()


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base=None)
def _app(cfg: DictConfig) -> float:
    from jaxreco.train.loop import train_and_evaluate  # after Hydra parsed the command line

    quiet_libraries()

    with user_errors():
        results = train_and_evaluate(cfg, Path(HydraConfig.get().runtime.output_dir))
    return results["val/rmse"]


def main() -> None:
    _app()


if __name__ == "__main__":
    sys.exit(main())
