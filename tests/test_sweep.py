"""Hydra multirun end to end: a 2x2 sweep, jaxreco-compare, TensorBoard's HTTP API, a failing
run, unknown keys, an Optuna search and the submitit launcher with two JAX processes.

Every sweep runs on a tiny MovieLens-format file (tests/conftest.py) for 2 epochs.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from jaxreco.compare import read_scalars
from tests.conftest import run_cli, write_u_data

TINY = ["trainer.epochs=2", "trainer.batch_size=256", "trainer.progress_bar=false",
        "trainer.async_checkpoint=false", "trainer.log_every_steps=2"]
DIMS, LRS = (4, 8), (0.001, 0.03)
DET = lambda m: {k: v for k, v in m.items() if not k.startswith("perf/")}  # noqa: E731


def _sweep(tmp: Path, data: Path, out: Path, *overrides: str, multirun=True):
    args = ["jaxreco.cli.train", *(["-m"] if multirun else []), f"dataset.path={data}",
            f"hydra.sweep.dir={out}", *TINY, *overrides]
    return run_cli(args, cwd=tmp, env_extra={"JAXRECO_CACHE": str(tmp / "cache")})


def _run_dirs(sweep: Path) -> list[Path]:
    return sorted((d for d in sweep.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_u_data(tmp_path_factory.mktemp("data") / "ml-tiny")


@pytest.fixture(scope="module")
def sweep2x2(tmp_path_factory, tiny):
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "multirun"
    p = _sweep(tmp, tiny, out, f"model.dim={DIMS[0]},{DIMS[1]}",
               f"optimizer.lr={LRS[0]},{LRS[1]}")
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_sweep_runs_every_combination_into_one_dir(sweep2x2):
    runs = _run_dirs(sweep2x2)
    assert [d.name for d in runs] == ["0", "1", "2", "3"]
    seen = set()
    for d in runs:
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        seen.add((cfg["model"]["dim"], cfg["optimizer"]["lr"]))
        assert f"model.dim={cfg['model']['dim']}" in yaml.safe_load((d / ".hydra/overrides.yaml").read_text())
        info = json.loads((d / "run.json").read_text())
        assert re.fullmatch(r"[0-9a-f]{40}", info["git"]["commit"])
        assert isinstance(info["git"]["dirty"], bool) and info["seed"] == 0
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in info["split_sha256"].values())
        m = json.loads((d / "metrics.json").read_text())
        assert 0.5 < m["val/rmse"] < 2.0 and m["train/steps"] > 0
        # TensorBoard: learning curves and one HParams session in tb/ (one run), nothing stray.
        names = sorted(p.name for p in (d / "tb").glob("events.out.tfevents.*"))
        assert len(names) == 2 and [n.endswith(".hparams") for n in names].count(True) == 1
        assert not (d / "tb" / "hparams").exists()
        assert not (d / "error.json").exists()
    assert seen == {(dm, lr) for dm in DIMS for lr in LRS}
    # The four runs share one split: same data, same sha256.
    shas = {json.dumps(json.loads((d / "run.json").read_text())["split_sha256"]) for d in runs}
    assert len(shas) == 1


def test_compare_ranks_the_sweep(sweep2x2, tmp_path):
    out = tmp_path / "cmp"
    p = run_cli(["jaxreco.cli.compare", str(sweep2x2), "--out", str(out)], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads((out / "compare.json").read_text())
    assert res["swept"] == ["model.dim", "optimizer.lr"]
    vals = {d.name: json.loads((d / "metrics.json").read_text())["val/rmse"]
            for d in _run_dirs(sweep2x2)}
    expected = sorted(vals, key=lambda k: (vals[k], int(k)))
    assert [r["run"] for r in res["runs"]] == expected
    assert [r["rank"] for r in res["runs"]] == [1, 2, 3, 4]
    # Terminal table: header, rule, then the best run first with its val/rmse to 4 decimals.
    lines = p.stdout.splitlines()
    assert lines[0].split()[:5] == ["rank", "run", "model.dim", "optimizer.lr", "val/rmse"]
    best = lines[2].split()
    assert best[:2] == ["1", expected[0]] and best[4] == f"{vals[expected[0]]:.4f}"
    md = (out / "compare.md").read_text().splitlines()
    assert md[2].startswith("| rank | run | model.dim | optimizer.lr | val/rmse |")
    assert md[4].startswith(f"| 1 | {expected[0]} |") and len(md) == 2 + 2 + 4
    for name in ("val_rmse_vs_model.dim.png", "val_rmse_vs_optimizer.lr.png", "learning_curves.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
    # Learning curves come from the event files: one val point per epoch.
    assert [s for s, _ in read_scalars(sweep2x2 / "0" / "tb")["eval/val/rmse"]] == [
        s for s in (json.loads((sweep2x2 / "0" / "metrics.json").read_text())["train/steps"] // 2,
                    json.loads((sweep2x2 / "0" / "metrics.json").read_text())["train/steps"])]


# ---------------------------------------------------------------------- TensorBoard HTTP API

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture
def tensorboard(sweep2x2):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep2x2),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if len(_get(base + "/data/runs")) == 4:      # one per run of the 2x2 sweep
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)            # so its stderr ends
                raise AssertionError(f"TensorBoard did not serve 4 runs: {proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)   # our TensorBoard and its data server only
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_tensorboard_http_api_lists_runs_scalars_and_hparams(sweep2x2, tensorboard):
    base = tensorboard
    runs = _get(base + "/data/runs")
    assert sorted(runs) == sorted(f"{i}/tb" for i in range(4))     # each run listed once

    # A scalar series: the validation curve of run 0, as the event file holds it.
    series = _get(base + "/data/plugin/scalars/scalars?run=0/tb&tag=eval/val/rmse")
    on_disk = read_scalars(sweep2x2 / "0" / "tb")["eval/val/rmse"]
    assert [(s, pytest.approx(v, rel=1e-6)) for _, s, v in series] == on_disk

    exp = _get(base + "/data/plugin/hparams/experiment", {"experimentName": ""})
    infos = {h["name"]: h for h in exp["hparamInfos"]}
    assert infos["model.dim"]["differs"] and infos["optimizer.lr"]["differs"]
    assert infos["model.dim"]["domainInterval"] == {"minValue": 4.0, "maxValue": 8.0}
    assert not infos["model.reg"]["differs"] and "logger.tensorboard" not in infos
    assert {"val/rmse", "test/rmse"} <= {m["name"]["tag"] for m in exp["metricInfos"]}

    groups = _get(base + "/data/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 100,
        "allowedStatuses": ["STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING", "STATUS_UNKNOWN"],
        "colParams": [{"metric": {"group": "", "tag": "val/rmse"}, "order": "ORDER_ASC"}]})
    assert groups["totalSize"] == 4
    seen = []
    for g in groups["sessionGroups"]:
        run = g["name"].split("/")[0]
        cfg = yaml.safe_load((sweep2x2 / run / "config.yaml").read_text())
        m = json.loads((sweep2x2 / run / "metrics.json").read_text())
        assert g["hparams"]["model.dim"] == cfg["model"]["dim"]
        assert g["hparams"]["optimizer.lr"] == pytest.approx(cfg["optimizer"]["lr"])
        got = {v["name"]["tag"]: v["value"] for v in g["metricValues"]}
        assert got["val/rmse"] == pytest.approx(m["val/rmse"], rel=1e-6)
        assert got["test/rmse"] == pytest.approx(m["test/rmse"], rel=1e-6)
        assert g["sessions"][0]["status"] == "STATUS_SUCCESS"
        seen.append((run, got["val/rmse"]))
    assert [v for _, v in seen] == sorted(v for _, v in seen)      # TensorBoard sorted them too


# ---------------------------------------------------------------------- bad input

def test_failing_run_is_reported_and_the_others_complete(tmp_path, tiny):
    out = tmp_path / "multirun"
    # a value of the right type that the run refuses (a misspelt enum value, by contrast, is
    # refused by the typed config when Hydra composes that job)
    p = _sweep(tmp_path, tiny, out, "model.dim=4", "optimizer.lr=0.01,-1,0.02")
    assert p.returncode == 1
    reason = "failed: ValueError: optimizer.lr=-1.0: must be >= 0"
    assert re.search(r"run 1 \([^)]*optimizer\.lr=-1\) " + re.escape(reason), p.stderr)
    assert "1 of 3 runs failed" in p.stderr and "Traceback" not in p.stderr
    err = json.loads((out / "1" / "error.json").read_text())
    assert err["type"] == "ValueError" and "optimizer.lr=-1.0: must be >= 0" in err["message"]
    assert err["job"]["num"] == 1 and "optimizer.lr=-1" in err["job"]["overrides"]
    assert "Traceback" in err["traceback"]
    assert (out / "1" / "FAILED").read_text().startswith("ValueError: ")
    assert not (out / "1" / "metrics.json").exists()
    for ok in ("0", "2"):
        assert json.loads((out / ok / "metrics.json").read_text())["train/steps"] > 0

    c = run_cli(["jaxreco.cli.compare", str(out), "--no-plots"], cwd=tmp_path)
    assert c.returncode == 0, c.stderr
    res = json.loads((out / "compare" / "compare.json").read_text())
    assert [(r["run"], r["status"]) for r in res["runs"]][-1] == ("1", "failed")
    assert sorted(r["run"] for r in res["runs"] if r["rank"]) == ["0", "2"]
    assert res["runs"][-1]["error"].startswith("ValueError: optimizer.lr=-1.0: must be >= 0")
    assert "FAILED: ValueError" in c.stdout.splitlines()[-3]


@pytest.mark.parametrize("override, message", [
    (["model.dimm=4,8"], "Key 'dimm' not in 'MFConfig'"),
    (["nope=1", "model.dim=4,8"], "Key 'nope' not in 'TrainConfig'"),
    (["model.dim=4,abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
])
def test_unknown_key_is_caught_before_any_run(tmp_path, tiny, override, message):
    out = tmp_path / "multirun"
    p = _sweep(tmp_path, tiny, out, *override)
    assert p.returncode != 0
    assert message in p.stderr and "Traceback" not in p.stderr
    assert not out.exists() or not any(d.name.isdigit() for d in out.iterdir())


# ---------------------------------------------------------------------- Optuna, submitit

def test_optuna_search_minimises_val_rmse(tmp_path, tiny):
    out = tmp_path / "optuna"
    p = _sweep(tmp_path, tiny, out, "hparams_search=mf_optuna", "hydra.sweeper.n_trials=3",
               multirun=False)       # the search config sets hydra.mode=MULTIRUN itself
    assert p.returncode == 0, p.stderr[-3000:]
    runs = _run_dirs(out)
    assert len(runs) == 3
    vals = {}
    for d in runs:
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        assert 3e-4 <= cfg["optimizer"]["lr"] <= 3e-2 and 0 <= cfg["model"]["reg"] <= 0.1
        assert cfg["model"]["dim"] in (16, 32, 64, 128)
        vals[d.name] = (json.loads((d / "metrics.json").read_text())["val/rmse"], cfg)
    best = yaml.safe_load((out / "optimization_results.yaml").read_text())
    name = min(vals, key=lambda k: vals[k][0])
    assert best["best_value"] == pytest.approx(vals[name][0])
    assert best["best_params"]["model.dim"] == vals[name][1]["model"]["dim"]


@pytest.fixture(scope="module")
def submitit_run(tmp_path_factory, tiny):
    """The slurm.yaml layout through submitit's local executor: 2 tasks -> 2 JAX processes."""
    tmp = tmp_path_factory.mktemp("submitit")
    out = tmp / "multirun"
    p = _sweep(tmp, tiny, out, "hydra/launcher=slurm_local", "hydra.launcher.tasks_per_node=2",
               "mesh=dp", f"model.dim={DIMS[0]}", f"optimizer.lr={LRS[1]}")
    return p, out / "0"


@pytest.mark.slow  # two processes through submitit: ~20 s; tests/test_multiprocess.py covers two processes in the default run
def test_submitit_launcher_initializes_jax_distributed(submitit_run):
    p, run = submitit_run
    log = (run / "train.log").read_text()
    for i in (0, 1):
        assert f"jax.distributed: process {i} of 2, coordinator 127.0.0.1:" in log, p.stderr[-2000:]
    assert "(from submitit-local)" in log
    assert json.loads((run / "run.json").read_text())["process_count"] == 2


@pytest.mark.slow  # two processes through submitit: ~20 s; tests/test_multiprocess.py covers two processes in the default run
def test_two_process_run_matches_one_process(submitit_run, sweep2x2):
    p, run = submitit_run
    assert not (run / "error.json").exists(), (run / "error.json").read_text()[-1500:]
    # Same config and seed as sweep run 1 (dim 4, lr 0.03), on 2 processes x 1 CPU device.
    two = json.loads((run / "metrics.json").read_text())
    one = json.loads((sweep2x2 / "1" / "metrics.json").read_text())
    assert yaml.safe_load((sweep2x2 / "1" / "config.yaml").read_text())["optimizer"]["lr"] == LRS[1]
    assert two["train/steps"] == one["train/steps"]
    for k in ("val/rmse", "test/rmse", "train/loss"):
        assert math.isclose(two[k], one[k], rel_tol=1e-5), (k, two[k], one[k])
