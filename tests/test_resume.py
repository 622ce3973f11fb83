"""Checkpoint/resume: SIGKILL, SIGTERM, a corrupt latest step, and restore on other meshes.

Each test drives the real `jaxreco-train` entry point on a tiny generated dataset and
compares `metrics.json` (every key but the wall-clock `perf/*` ones) with an
uninterrupted run of the same config.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_u_data

BASE = ["trainer.batch_size=64", "trainer.epochs=12", "trainer.patience=100",
        "trainer.log_every_steps=7", "trainer.progress_bar=false", "trainer.async_checkpoint=true",
        "trainer.checkpoint_every_steps=10", "trainer.keep_checkpoints=3", "model.dim=8",
        "optimizer.lr=0.01"]


def _cmd(ml_dir, out, *extra):
    return ["jaxreco.cli.train", f"dataset.path={ml_dir}", f"hydra.run.dir={out}", *BASE, *extra]


def _env(tmp_path):
    return {"JAXRECO_CACHE": str(tmp_path / "cache")}


def _metrics(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    return {k: v for k, v in m.items() if not k.startswith("perf/")}


def _steps(out: Path) -> list[int]:
    d = out / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.fixture(scope="module")
def ml_dir(tmp_path_factory):
    return write_u_data(tmp_path_factory.mktemp("data") / "ml-tiny")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ml_dir):
    """The uninterrupted run every interrupted one must reproduce."""
    tmp = tmp_path_factory.mktemp("ref")
    p = run_cli(_cmd(ml_dir, tmp / "ref"), tmp, _env(tmp))
    assert p.returncode == 0, p.stderr[-3000:]
    return _metrics(tmp / "ref")


def _start(tmp_path, ml_dir, out, *extra):
    env = dict(os.environ, **_env(tmp_path))
    return subprocess.Popen([sys.executable, "-m", *_cmd(ml_dir, out, *extra)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, out, at_least, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        s = _steps(out)
        if s and s[-1] >= at_least:
            return s[-1]
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    raise AssertionError("no checkpoint in time")


def test_sigkill_then_restart_gives_identical_metrics(tmp_path, ml_dir, reference):
    out = tmp_path / "killed"
    kill_after = random.Random(os.getpid()).randrange(20, 400, 10)
    proc = _start(tmp_path, ml_dir, out)
    seen = _wait_for_step(proc, out, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    p = run_cli(_cmd(ml_dir, out), tmp_path, _env(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    log = (out / "train.log").read_text()
    resumed = [int(l.rsplit("step ", 1)[1]) for l in log.splitlines() if "resumed from" in l]
    assert resumed and resumed[-1] >= seen     # at most one checkpoint interval is redone
    assert _metrics(out) == reference


def test_sigterm_saves_exits_zero_and_resumes(tmp_path, ml_dir, reference):
    out = tmp_path / "term"
    proc = _start(tmp_path, ml_dir, out)
    _wait_for_step(proc, out, 30)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    log = (out / "train.log").read_text()
    stopped = [int(l.split("saved step ")[1].split(" ")[0]) for l in log.splitlines()
               if "preempted (SIGTERM)" in l]
    assert stopped and _steps(out)[-1] == stopped[0]
    assert not (out / "metrics.json").exists()
    p = run_cli(_cmd(ml_dir, out), tmp_path, _env(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    assert _metrics(out) == reference


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, ml_dir, reference):
    out = tmp_path / "corrupt"
    p = run_cli(_cmd(ml_dir, out, "trainer.epochs=6"), tmp_path, _env(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    latest = _steps(out)[-1]
    damaged = 0
    for f in (out / "checkpoints" / str(latest) / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0garbage" * 4)
            damaged += 1
    assert damaged
    p = run_cli(_cmd(ml_dir, out), tmp_path, _env(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert f"checkpoints/{latest}: unreadable" in log
    assert _metrics(out) == reference


@pytest.mark.parametrize("first, second", [
    (["mesh=dp_mp", "mesh.axes.data=4", "mesh.axes.model=2"],
     ["mesh=dp_mp", "mesh.axes.data=8", "mesh.axes.model=1"]),
    # the other directions run in the slow job (default-run time budget)
    pytest.param(["mesh=dp_mp", "mesh.axes.data=4", "mesh.axes.model=2"], ["mesh=single"],
                 marks=pytest.mark.slow),
    pytest.param(["mesh=dp_mp", "mesh.axes.data=8", "mesh.axes.model=1"],
                 ["mesh=dp_mp", "mesh.axes.data=4", "mesh.axes.model=2"],
                 marks=pytest.mark.slow),
    pytest.param(["mesh=single"], ["mesh=mp"], marks=pytest.mark.slow),
])
def test_restore_onto_a_different_mesh(tmp_path, ml_dir, reference, first, second):
    out = tmp_path / "reshard"
    p = run_cli(_cmd(ml_dir, out, "trainer.epochs=5", *first), tmp_path, _env(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_cli(_cmd(ml_dir, out, *second), tmp_path, _env(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in (out / "train.log").read_text()
    got = _metrics(out)
    assert got.keys() == reference.keys()
    for k, v in reference.items():
        assert got[k] == pytest.approx(v, abs=1e-5), k
