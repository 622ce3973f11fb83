"""Smoke tests of the real `jaxreco-train` entry point with tiny overrides."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, run_cli

KEYS = {"test/rmse", "test/mae", "val/rmse", "val/mae", "train/loss", "train/steps",
        "train/best_step", "perf/train_seconds", "perf/examples_per_sec"}


def _train(tmp_path, ml_dir, *extra, run="run"):
    out = tmp_path / run
    p = run_cli(["jaxreco.cli.train", f"dataset.path={ml_dir}", f"hydra.run.dir={out}",
                 "trainer.batch_size=128", "trainer.epochs=6", "trainer.patience=10",
                 "trainer.log_every_steps=5", "trainer.progress_bar=false",
                 "trainer.async_checkpoint=false", "model.dim=8", "optimizer.lr=0.02", *extra],
                cwd=tmp_path, env_extra={"JAXRECO_CACHE": str(tmp_path / "cache")})
    return p, out


def _scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def test_train_smoke_loss_falls_and_writes_run_dir(tmp_path, ml_dir):
    p, out = _train(tmp_path, ml_dir, "trainer.profile_steps=[2,4]")
    assert p.returncode == 0, p.stderr[-3000:]
    # the profiled steps land where TensorBoard's profile tab looks for them
    assert list((out / "tb" / "plugins" / "profile").glob("*/*.xplane.pb"))
    m = json.loads((out / "metrics.json").read_text())
    assert KEYS <= set(m)
    assert m["train/steps"] > 0 and 0.0 < m["test/rmse"] < 1.5
    losses = _scalars(out / "tb", "train/loss")
    assert len(losses) >= 5 and losses[-1] < 0.7 * losses[0]
    assert len(_scalars(out / "tb", "eval/val/rmse")) == 6
    splits = json.loads((out / "splits.json").read_text())
    assert len(splits["test/sha256"]) == 64 and splits["train/size"] > 0
    assert (out / "config.yaml").read_text().count("batch_size: 128") == 1
    assert any((out / "checkpoints").iterdir())


@pytest.mark.slow  # ~16 s; resume is exact in tests/test_resume.py (default run)
def test_rerun_is_deterministic_and_resume_continues(tmp_path, ml_dir):
    p1, a = _train(tmp_path, ml_dir, run="a")
    p2, b = _train(tmp_path, ml_dir, run="b")
    assert p1.returncode == 0 and p2.returncode == 0, p2.stderr[-2000:]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    det = {k: v for k, v in ma.items() if not k.startswith("perf/")}
    assert det == {k: v for k, v in mb.items() if not k.startswith("perf/")}
    # Interrupted run: stop after 3 epochs' worth of steps, then rerun in the same dir.
    p3, c = _train(tmp_path, ml_dir, "trainer.epochs=3", run="c")
    assert p3.returncode == 0
    p4, c = _train(tmp_path, ml_dir, run="c")
    assert p4.returncode == 0, p4.stderr[-2000:]
    mc = json.loads((c / "metrics.json").read_text())
    assert {k: v for k, v in mc.items() if not k.startswith("perf/")} == det


@pytest.mark.parametrize("override, message", [
    (["dataset=nope"], "Could not find 'dataset/nope'"),
    (["trainer.batch_size=abc"], "could not be converted to Integer"),
    (["dataset.path=/nonexistent/dir"], "dataset.path='/nonexistent/dir': no such directory"),
    (["trainer.profile_steps=[5,2]"], "trainer.profile_steps=[5, 2]: must be [first, last)"),
    (["model.init_std=???"], "missing mandatory config values (???): model.init_std"),
    (["+modle.dim=8"], "+modle.dim=8: 'modle.dim' is not a config key (did you mean model.dim?)"),
    (["model.dimm=3"], "Could not override 'model.dimm': Key 'dimm' not in 'MFConfig'"),
    (["trainer.batch_size=-1"], "trainer.batch_size=-1: must be an integer >= 1"),
    (["trainer.epochs=0"], "trainer.epochs=0: must be an integer >= 1"),
    (["model.dim=0"], "model.dim=0: must be an integer >= 1"),
])
def test_bad_input_is_one_clear_line(tmp_path, ml_dir, override, message):
    out = tmp_path / "bad"
    p = run_cli(["jaxreco.cli.train", f"hydra.run.dir={out}", *override], cwd=tmp_path,
                env_extra={"JAXRECO_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 2, p.stderr[-2000:]
    assert message in p.stderr
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: {message}"] or len(lines) == 1, p.stderr
    assert not (out / "metrics.json").exists()


def test_a_run_dir_that_is_a_file_is_one_clear_line(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    p = run_cli(["jaxreco.cli.train", f"hydra.run.dir={f}"], cwd=tmp_path,
                env_extra={"JAXRECO_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 2
    assert p.stderr.strip() == f"error: hydra.run.dir={f}: {f} exists and is not a directory"
    assert f.read_text() == "x"


def test_jaxreco_eval_rescores_a_rating_run(tmp_path, ml_dir):
    p, run = _train(tmp_path, ml_dir, run="r")
    assert p.returncode == 0, p.stderr[-2000:]
    e = run_cli(["jaxreco.cli.eval", str(run)], cwd=tmp_path,
                env_extra={"JAXRECO_CACHE": str(tmp_path / "cache")})
    assert e.returncode == 0, e.stderr[-2000:]
    m = json.loads((run / "metrics.json").read_text())
    out = json.loads((run / "eval.json").read_text())
    assert out["step"] == m["train/best_step"]
    assert out["test/rmse"] == pytest.approx(m["test/rmse"], abs=1e-6)


def test_smoke_runs_have_their_own_name_and_the_bar_starts_after_compiling(tmp_path, ml_dir):
    """debug=smoke lands in outputs/<experiment>_smoke/, not beside the real runs; the bar
    appears once the first (compiling) step is done, so its first ETA is the steps', and it
    ends at 100% when training stops early."""
    p = run_cli(["jaxreco.cli.train", "debug=smoke", f"dataset.path={ml_dir}",
                 "trainer.progress_bar=true", "trainer.epochs=40", "trainer.patience=1",
                 "trainer.batch_size=64", "optimizer.lr=0.05"], cwd=tmp_path,
                env_extra={"JAXRECO_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-2000:]
    runs = list((tmp_path / "outputs" / "ml100k_mf_smoke").glob("*/metrics.json"))
    assert len(runs) == 1 and not (tmp_path / "outputs" / "ml100k_mf").exists()
    m = json.loads(runs[0].read_text())
    assert m["train/stopped_early"] is True
    bars = [ln for ln in p.stderr.replace("\r", "\n").splitlines() if ln.startswith("train:")]
    assert bars, p.stderr[-2000:]
    assert "| 0/" not in bars[0] and "?step/s" in bars[0]          # starts after step 1
    last = bars[-1]
    assert "100%" in last and "early stop" in last, last
    assert not any("epoch" in ln for ln in bars)                    # log lines are not glued on
