"""Two `jax.distributed` processes on 127.0.0.1 train like one process, and a dead peer
makes the survivor fail within a bounded time instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_u_data

ARGS = ["trainer.batch_size=64", "trainer.epochs=3", "trainer.patience=100",
        "trainer.progress_bar=false", "trainer.log_every_steps=10", "model.dim=8",
        "optimizer.lr=0.01", "trainer.eval_batch_size=1024"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, ml_dir, out, extra=(), heartbeat=None):
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, JAXRECO_CACHE=str(tmp_path / "cache"),
                   JAXRECO_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAXRECO_NUM_PROCESSES="2",
                   JAXRECO_PROCESS_ID=str(i),
                   XLA_FLAGS="--xla_force_host_platform_device_count=2")
        if heartbeat:
            env["JAXRECO_HEARTBEAT_TIMEOUT_SECONDS"] = str(heartbeat)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jaxreco.cli.train", f"dataset.path={ml_dir}",
             f"hydra.run.dir={out}", "mesh=dp", *ARGS, *extra], cwd=tmp_path, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _metrics(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    return {k: v for k, v in m.items() if not k.startswith("perf/")}


@pytest.fixture(scope="module")
def ml_dir(tmp_path_factory):
    return write_u_data(tmp_path_factory.mktemp("data") / "ml-tiny")


def test_two_processes_match_one(tmp_path, ml_dir):
    # Populate the dataset cache once so the two processes only read it.
    single = tmp_path / "single"
    p = run_cli(["jaxreco.cli.train", f"dataset.path={ml_dir}", f"hydra.run.dir={single}",
                 "mesh=single", *ARGS], tmp_path, {"JAXRECO_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "two"
    procs = _launch(tmp_path, ml_dir, out)
    for pr in procs:
        _, err = pr.communicate(timeout=300)
        assert pr.returncode == 0, err[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["process_count"] == 2 and len(run["devices"]) == 4
    want, got = _metrics(single), _metrics(out)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-5), k


def test_dead_peer_fails_the_survivor_in_bounded_time(tmp_path, ml_dir):
    out = tmp_path / "dead"
    procs = _launch(tmp_path, ml_dir, out, extra=["trainer.epochs=1000"], heartbeat=10)
    deadline = time.time() + 120
    while not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir()):
        assert time.time() < deadline and all(p.poll() is None for p in procs), \
            procs[0].stderr.read()[-3000:] if procs[0].poll() is not None else "timeout"
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    t = time.time()
    try:
        _, err = procs[0].communicate(timeout=90)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("survivor still running 90 s after its peer died")
    elapsed = time.time() - t
    assert procs[0].returncode != 0
    assert elapsed < 90
    # e.g. "Gloo AllGather failed: ... Connection closed by peer" / "tasks are unhealthy
    # (stopped sending heartbeats)"
    assert "peer" in err or "unhealthy" in err, err[-3000:]
