"""The public API in ``jaxreco/__init__.py``: lazy, free of import side effects, complete."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

import jaxreco
from jaxreco import runtime
from tests.conftest import ROOT

_PROBE = """
import json, os, sys
before = os.environ.get("XLA_FLAGS")
import jaxreco
print(json.dumps({"jax": sorted(m for m in sys.modules if m == "jax" or m.startswith("jax.")),
                  "xla_flags_unchanged": os.environ.get("XLA_FLAGS") == before,
                  "version": jaxreco.__version__}))
"""


def test_import_jaxreco_imports_no_jax_and_leaves_xla_flags_alone():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    p = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert out == {"jax": [], "xla_flags_unchanged": True, "version": jaxreco.__version__}


def test_every_public_name_resolves_to_its_definition():
    assert set(dir(jaxreco)) == set(jaxreco.__all__)
    for name in jaxreco.__all__:
        value = getattr(jaxreco, name)
        if name == "__version__":
            assert isinstance(value, str) and value.count(".") >= 2
        else:
            assert callable(value) and value.__name__ == name, name
            assert value is getattr(importlib.import_module(jaxreco._EXPORTS[name]), name)


def test_unknown_name_raises_attribute_error_and_submodules_still_import():
    with pytest.raises(AttributeError, match="no_such_name"):
        jaxreco.no_such_name  # noqa: B018
    from jaxreco import config  # a submodule, not an export: the import system finds it

    assert config.__name__ == "jaxreco.config"


def test_configure_xla_adds_the_scheduler_flag_once_and_keeps_the_users(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    runtime.configure_xla()
    runtime.configure_xla()
    assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                       "--xla_cpu_enable_concurrency_optimized_scheduler=false")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=true")
    runtime.configure_xla()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true"
    monkeypatch.delenv("XLA_FLAGS")
    runtime.configure_xla()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def test_compose_config_gives_what_the_cli_would_run():
    cfg = jaxreco.compose_config(["debug=smoke", "model.dim=16"])
    assert cfg.trainer.epochs == 2 and cfg.trainer.batch_size == 256
    assert cfg.model.dim == 16
    assert cfg.name == "ml100k_mf_smoke"    # ${hydra:runtime.choices.experiment}_smoke resolves
    assert "hydra" not in cfg
    data = jaxreco.compose_config(["dataset=movielens-1m"], config_name="data")
    assert data.dataset.name == "movielens-1m" and "prepare" in data


def test_conf_dir_is_the_checkout_conf_here_and_env_overrides_it(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXRECO_CONF_DIR", raising=False)
    assert runtime.conf_dir() == ROOT / "conf"
    monkeypatch.setenv("JAXRECO_CONF_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        runtime.conf_dir()
    assert f"JAXRECO_CONF_DIR={str(tmp_path)!r}: no train.yaml there" in str(e.value)
    (tmp_path / "train.yaml").write_text("seed: 0\n")
    assert runtime.conf_dir() == tmp_path
