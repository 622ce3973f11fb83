"""Shared fixtures: tiny MovieLens-format datasets written by the tests themselves."""

from __future__ import annotations

import os

from jaxreco.runtime import configure_xla

# In-process tests get the XLA workaround the entry points set (before the first backend).
configure_xla()
# Eight CPU devices for the sharding tests (must precede the first `import jax`). Tests that
# want one device use a one-device mesh; subprocesses inherit the flag.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def low_rank_ratings(num_users=60, num_items=40, n=3000, seed=0):
    """Ratings 1..5 from a rank-2 model plus noise: learnable, so a loss must fall."""
    rng = np.random.default_rng(seed)
    pu, qi = rng.normal(size=(num_users, 2)), rng.normal(size=(num_items, 2))
    u = rng.integers(0, num_users, n)
    i = rng.integers(0, num_items, n)
    r = np.clip(np.rint(3 + (pu[u] * qi[i]).sum(1) + 0.3 * rng.normal(size=n)), 1, 5)
    ts = 880000000 + rng.integers(0, 10**7, n)
    return u + 1, i + 1, r.astype(int), ts


def write_u_data(directory: Path, **kw) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    u, i, r, ts = low_rank_ratings(**kw)
    (directory / "u.data").write_text("".join(f"{a}\t{b}\t{c}\t{d}\n" for a, b, c, d in zip(u, i, r, ts)))
    return directory


def write_ratings_dat(directory: Path, **kw) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    u, i, r, ts = low_rank_ratings(**kw)
    (directory / "ratings.dat").write_text("".join(f"{a}::{b}::{c}::{d}\n" for a, b, c, d in zip(u, i, r, ts)))
    return directory


@pytest.fixture(autouse=True, scope="session")
def session_cache_root():
    """The session's cache root (``$JAXRECO_CACHE``), never the user's own cache: the
    directory ``$JAXRECO_TEST_CACHE`` names, else ``~/.cache/jaxreco-tests``. It persists, so
    wheels fetched once serve later runs; subprocesses inherit it through the environment.
    Tests that want a fresh cache still set their own (``cache_env``)."""
    root = Path(os.environ.get("JAXRECO_TEST_CACHE") or "~/.cache/jaxreco-tests")
    root = root.expanduser().resolve()
    before = os.environ.get("JAXRECO_CACHE")
    os.environ["JAXRECO_CACHE"] = str(root)
    yield root
    if before is None:
        os.environ.pop("JAXRECO_CACHE", None)
    else:
        os.environ["JAXRECO_CACHE"] = before


@pytest.fixture
def ml_dir(tmp_path) -> Path:
    return write_u_data(tmp_path / "ml-tiny")


@pytest.fixture
def cache_env(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("JAXRECO_CACHE", str(d))
    return d


def run_cli(args: list[str], cwd: Path, env_extra: dict | None = None, timeout=600):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli_train_export(tmp_path: Path, runs: dict[str, list[str]], env_extra: dict) -> None:
    """For each ``name: overrides`` of ``runs``: ``jaxreco-train debug=smoke`` (one epoch, no
    TensorBoard) into ``tmp_path/name``, then ``jaxreco-export`` into ``tmp_path/models-name``."""
    for name, args in runs.items():
        p = run_cli(["jaxreco.cli.train", "debug=smoke", "trainer.epochs=1",
                     "logger.tensorboard=false", f"hydra.run.dir={tmp_path / name}", *args],
                    cwd=tmp_path, env_extra=env_extra)
        assert p.returncode == 0, p.stderr[-3000:]
        p = run_cli(["jaxreco.cli.export", "--run-dir", str(tmp_path / name), "--out-dir",
                     str(tmp_path / f"models-{name}")], cwd=tmp_path, env_extra=env_extra)
        assert p.returncode == 0, p.stderr[-3000:]
