"""The built wheel is complete: installed alone (not editable), ``jaxreco-train`` finds its
packaged configs and trains.

The wheel is built offline (``--no-build-isolation``, the setuptools of this environment)
from a copy of what the Docker build stage copies (pyproject.toml, README.md, jaxreco/,
conf/), so a stale ``build/`` in the checkout cannot leak into it. The fresh virtual
environment gets jaxreco from that wheel only; its dependencies (jax, hydra, ...) come from
this environment's site-packages through a ``.pth`` line, so nothing is downloaded or
reinstalled. Python does not run the ``.pth`` files of a directory added that way, so the
editable install's import hook in this environment stays inactive there.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from omegaconf import OmegaConf

from tests.conftest import ROOT

_SOURCES = ("pyproject.toml", "README.md", "jaxreco", "conf")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def _build_wheel(tmp: Path) -> Path:
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    assert major >= 77, (f"setuptools {setuptools.__version__} cannot build jaxreco (needs >= 77, "
                         "the [build-system] minimum); pip install -e '.[test]' installs it")
    src = tmp / "src"
    src.mkdir()
    for name in _SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", "-q", "-w", tmp / "dist", src], timeout=300)
    (wheel,) = (tmp / "dist").glob("jaxreco-*.whl")
    return wheel


def _fresh_venv(path: Path) -> Path:
    """A venv whose only jaxreco is what gets installed into it; dependencies from here."""
    _run([sys.executable, "-m", "venv", "--without-pip", path], timeout=120)
    python = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout
    outer = [p for p in dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib"),
                                       *site.getsitepackages()]) if Path(p).is_dir()]
    (Path(purelib.strip()) / "_jaxreco_test_deps.pth").write_text("\n".join(outer) + "\n")
    return python


def test_wheel_installs_alone_and_jaxreco_train_finds_its_packaged_configs(tmp_path, ml_dir):
    wheel = _build_wheel(tmp_path)

    # ---- the wheel holds every module and every config (pyproject lists packages by hand)
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "jaxreco").rglob("*.py")
               if "__pycache__" not in p.parts}
    configs = {"jaxreco/conf/" + p.relative_to(ROOT / "conf").as_posix()
               for p in (ROOT / "conf").rglob("*.yaml")}
    assert "jaxreco/conf/train.yaml" in configs
    assert not modules - names, ("modules missing from the wheel; list their packages under "
                                 f"[tool.setuptools] packages in pyproject.toml: {sorted(modules - names)}")
    assert not configs - names, f"configs missing from the wheel: {sorted(configs - names)}"

    # ---- installed alone into a fresh venv
    venv = tmp_path / "venv"
    python = _fresh_venv(venv)
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
          "--disable-pip-version-check", "-q", wheel], timeout=300)
    work = tmp_path / "work"                  # cwd outside the checkout: nothing from it on sys.path
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "JAXRECO_CONF_DIR", "PYTHONHOME")}
    env["JAXRECO_CACHE"] = str(tmp_path / "cache")
    where = json.loads(_run([python, "-c", "import json, jaxreco, jaxreco.cli; print(json.dumps("
                             "[jaxreco.__file__, str(jaxreco.cli.CONF_DIR)]))"],
                            cwd=work, env=env, timeout=120).stdout)
    site_dir = (venv / "lib").resolve()
    assert Path(where[0]).resolve().is_relative_to(site_dir), where
    assert Path(where[1]).resolve() == Path(where[0]).resolve().parent / "conf", where

    # ---- the console script trains from the packaged configs
    run = tmp_path / "run"
    script = python.parent / ("jaxreco-train.exe" if os.name == "nt" else "jaxreco-train")
    _run([script, "debug=smoke", f"dataset.path={ml_dir}", f"hydra.run.dir={run}"],
         cwd=work, env=env, timeout=300)
    metrics = json.loads((run / "metrics.json").read_text())
    assert math.isfinite(metrics["test/rmse"]) and 0.0 < metrics["test/rmse"] < 3.0, metrics
    assert "epochs: 2" in (run / "config.yaml").read_text()     # debug=smoke was applied
    hydra_cfg = OmegaConf.load(run / ".hydra" / "hydra.yaml")
    (main,) = [s for s in hydra_cfg.hydra.runtime.config_sources if s.provider == "main"]
    assert main.schema == "file" and Path(main.path) == Path(where[1]), main
