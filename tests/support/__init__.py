"""Helpers shared by the tests: compose the training config as the CLI does, and train in
this process (no subprocess) on data the test writes."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from jaxreco import config as config_lib
from jaxreco.train.loop import train_and_evaluate

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"

config_lib.register()


def compose_train(overrides: list[str], name: str = "test") -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides`` (``name`` set: it is a Hydra
    interpolation that needs a running app)."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("train", overrides=[f"name={name}", *overrides])


def train(workdir: Path, overrides: list[str]) -> dict:
    """Trains in this process; returns ``metrics.json`` as written."""
    train_and_evaluate(compose_train(overrides), workdir)
    return json.loads((Path(workdir) / "metrics.json").read_text())


def write_rows(path: Path, header: str, rows) -> Path:
    path.write_text("\n".join([header, *(",".join(map(str, r)) for r in rows)]) + "\n")
    return path
