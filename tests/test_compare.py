"""jaxreco-compare on hand-made run directories: ranking, swept keys, failures, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jaxreco import compare as cmp
from tests.conftest import run_cli


def _run(root: Path, name: str, dim, lr, val=None, error=None, overrides=None):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    cfg = {"seed": 0, "model": {"dim": dim, "reg": 0.05}, "optimizer": {"lr": lr},
           "logger": {"tensorboard": True}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
        overrides or [f"model.dim={dim}", f"optimizer.lr={lr}"]))
    if val is not None:
        (d / "metrics.json").write_text(json.dumps({"val/rmse": val, "test/rmse": val + 0.01,
                                                    "train/loss": 0.5, "perf/train_seconds": 2.0}))
    if error:
        (d / "error.json").write_text(json.dumps({"type": "ValueError", "message": error}))
    return d


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    _run(root, "0", 8, 0.001, val=0.95)
    _run(root, "1", 8, 0.01, val=0.91)
    _run(root, "2", 16, 0.001, error="boom")
    _run(root, "10", 16, 0.01, val=float("nan"))      # diverged: ranked last of the finished
    _run(root, "3", 16, 0.01)                          # no metrics yet: incomplete
    return root


def test_rank_swept_keys_and_failures(sweep):
    res = cmp.compare([sweep], plots=False)
    assert [(r.name, r.rank, r.status) for r in res["runs"]] == [
        ("1", 1, "ok"), ("0", 2, "ok"), ("10", 3, "ok"), ("2", None, "failed"),
        ("3", None, "incomplete")]
    assert res["keys"] == ["model.dim", "optimizer.lr"]
    assert res["metrics"][:2] == ["val/rmse", "test/rmse"]
    rows = res["text"].splitlines()
    assert rows[2].split()[:5] == ["1", "1", "8", "0.01", "0.9100"]
    assert rows[5].split()[-3:] == ["FAILED:", "ValueError:", "boom"]
    md = (sweep / "compare" / "compare.md").read_text().splitlines()
    assert md[0] == f"# Runs of {sweep}, ranked by val/rmse (min)"
    assert md[4] == "| 1 | 1 | 8 | 0.01 | 0.9100 | 0.9200 | 0.5000 | 2 | ok |"
    best_max = cmp.compare([sweep], metric="test/rmse", mode="max", plots=False)["runs"]
    assert [r.name for r in best_max][:2] == ["0", "1"]


def test_two_sweeps_and_a_single_run(tmp_path, sweep):
    other = tmp_path / "other"
    _run(other, "0", 32, 0.001, val=0.90)
    runs = cmp.rank_runs(cmp.find_runs([sweep, other]))
    assert runs[0].name == "other/0" and runs[1].name == "sweep/1"
    single = cmp.find_runs([sweep / "1"])
    assert [r.name for r in single] == ["1"] and cmp.swept_keys(single) == ["model.dim",
                                                                            "optimizer.lr"]


def test_plots_are_written(sweep, tmp_path):
    res = cmp.compare([sweep], out_dir=tmp_path / "out")
    names = sorted(p.name for p in res["files"])
    assert names == ["compare.json", "compare.md", "val_rmse_vs_model.dim.png",
                     "val_rmse_vs_optimizer.lr.png"]     # no tb/: no learning curves
    assert (tmp_path / "out" / "val_rmse_vs_model.dim.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/sweep"], "error: /nonexistent/sweep: no such directory"),
    (["{empty}"], "no run directories in it"),
    (["{sweep}", "--metric", "val/rmsee"], "error: --metric 'val/rmsee': no run has it; metrics: "),
])
def test_cli_bad_input_is_one_line(tmp_path, sweep, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty", sweep=sweep) for a in args]
    p = run_cli(["jaxreco.cli.compare", *args, "--no-plots"], cwd=tmp_path)
    assert p.returncode == 2
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr
