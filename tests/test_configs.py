"""Every config group option and every experiment composes and type-checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from jaxreco import config
from jaxreco.cli import CONF_DIR

config.register()
GROUPS = [p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"]


PRIMARY = {"prepare": "data"}     # groups of `jaxreco-data prepare`; the rest: `jaxreco-train`


def _compose(overrides, primary="train"):
    """Composes like the app does and resolves every interpolation (hydra's included)."""
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose(primary, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group, option",
                         [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes(group, option):
    cfg = _compose([f"{group}={option}"], PRIMARY.get(group, "train"))
    # Datasets read from user-supplied paths (from-files) leave those paths mandatory (???).
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=group != "dataset")
    if group == "experiment":
        assert cfg.name == option
    if group == "dataset":
        assert cfg.dataset.name == option


def test_required_groups_exist():
    for g in ("dataset", "model", "optimizer", "trainer", "mesh", "logger", "experiment"):
        assert _options(g), g


def test_wrong_type_is_rejected_with_key():
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["trainer.batch_size=abc"])
    assert "trainer.batch_size" in str(e.value)
    assert "could not be converted to Integer" in str(e.value.__cause__)


def test_unknown_key_and_option_are_rejected():
    with pytest.raises(ConfigCompositionException, match="trainer.bogus"):
        _compose(["trainer.bogus=1"])
    with pytest.raises(MissingConfigException, match="dataset/nope"):
        _compose(["dataset=nope"])


def test_experiment_readmes_match_configs():
    """experiments/<name>/README.md exists for every conf/experiment/<name>.yaml and back."""
    root = CONF_DIR.parent / "experiments"
    readmes = sorted(p.parent.name for p in root.glob("*/README.md"))
    assert readmes == _options("experiment")
    for name in readmes:
        text = (root / name / "README.md").read_text()
        assert f"experiment={name}" in text, f"{name}: README must give the command"
