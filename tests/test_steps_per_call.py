"""``trainer.steps_per_call``: K train steps per jitted call give the run of one call per
step (the same metrics, losses, checkpoints), on one device and on a 2x2 ``dp_mp`` mesh,
when a group is cut by epoch/log/checkpoint boundaries, and across a preemption inside a
group followed by a resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxreco import config as config_lib
from jaxreco.train import loop as loop_lib
from tests.conftest import run_cli, write_u_data
from tests.support import compose_train, train
from tests.test_experiments_serve import SMALL, _overrides
from tests.test_multiprocess import ARGS as MP_ARGS, _launch, _metrics

# 3000 ratings -> 2550 train rows at batch 64: 39 steps per epoch (not a multiple of 4);
# logs every 7 steps, checkpoints every 10: groups of 4 are cut at 7, 10, 14, 20, 21, 28, 30, 35, 39, ...
BASE = ["trainer.batch_size=64", "trainer.epochs=2", "trainer.patience=100",
        "trainer.log_every_steps=7", "trainer.checkpoint_every_steps=10",
        "trainer.keep_checkpoints=100", "trainer.progress_bar=false",
        "trainer.async_checkpoint=false", "model.dim=8", "optimizer.lr=0.01",
        "logger.tensorboard=false"]


@pytest.fixture(scope="module")
def ml_dir(tmp_path_factory):
    return write_u_data(tmp_path_factory.mktemp("data") / "ml-tiny")


@pytest.fixture(scope="module")
def one_per_call(tmp_path_factory, ml_dir):
    """The single-device run with one step per call (the reference), and its directory."""
    out = tmp_path_factory.mktemp("k1")
    return _run(ml_dir, out), out


def _run(ml_dir, out: Path, *extra) -> dict:
    m = train(out, [f"dataset.path={ml_dir}", *BASE, *extra])
    return {k: v for k, v in m.items() if not k.startswith("perf/")}


def _checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def _close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-6), k


@pytest.mark.parametrize("mesh", [
    [], pytest.param(["mesh=dp_mp", "mesh.axes.data=2", "mesh.axes.model=2"],
                     marks=pytest.mark.slow)], ids=["single", "dp_mp_2x2"])
def test_four_steps_per_call_give_the_run_of_one_step_per_call(tmp_path, ml_dir, mesh,
                                                                one_per_call):
    want, want_dir = one_per_call
    if mesh:
        want_dir = tmp_path / "k1"
        want = _run(ml_dir, want_dir, *mesh)
    got = _run(ml_dir, tmp_path / "k4", "trainer.steps_per_call=4", *mesh)
    assert want["train/steps"] == 78 and want["train/steps"] % 4 != 0
    _close(got, want)
    # checkpoints at the same steps: every 10, and each epoch end (39, 78)
    assert _checkpoints(tmp_path / "k4") == _checkpoints(want_dir)
    assert {10, 20, 39, 70, 78} <= set(_checkpoints(tmp_path / "k4"))


@pytest.mark.slow
@pytest.mark.parametrize("experiment, extra", [
    ("ml1m_ncf_gmf", []),                                   # implicit: sampled negatives
    ("ml1m_sasrec", ["trainer.batch_size=12"]),             # next_item: [batch, L] columns
    ("synthetic_ctr", []),                                  # ctr: side features, heads
    ("ml100k_mf", ["mesh=dp", "mesh.axes.data=2"]),
    ("ml100k_mf", ["mesh=mp", "mesh.axes.model=2"]),
])
def test_every_gradient_task_and_mesh_gives_the_same_run_with_groups(tmp_path, experiment,
                                                                     extra):
    over = [f"experiment={experiment}", *SMALL, "trainer.epochs=2",
            "trainer.log_every_steps=3", *_overrides(experiment, tmp_path)]
    over = [o for o in over if not (extra and o.startswith("mesh.axes"))] + extra
    runs = {k: train(tmp_path / f"k{k}", [*over, f"trainer.steps_per_call={k}"]) for k in (1, 4)}
    assert runs[1]["train/steps"] > 4 and runs[1]["train/steps"] % 4 != 0
    _close({k: v for k, v in runs[4].items() if not k.startswith("perf/")},
           {k: v for k, v in runs[1].items() if not k.startswith("perf/")})


@pytest.mark.slow
def test_two_processes_with_groups_match_one_process_one_step_per_call(tmp_path, ml_dir):
    """Stacked batches become global arrays from each process's rows."""
    single = tmp_path / "single"
    p = run_cli(["jaxreco.cli.train", f"dataset.path={ml_dir}", f"hydra.run.dir={single}",
                 "mesh=single", *MP_ARGS], tmp_path, {"JAXRECO_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "two"
    for pr in _launch(tmp_path, ml_dir, out, extra=["trainer.steps_per_call=4"]):
        _, err = pr.communicate(timeout=300)
        assert pr.returncode == 0, err[-3000:]
    want, got = _metrics(single), _metrics(out)
    assert got["train/steps"] % 4 != 0
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-5), k      # 1e-5: as two processes vs one


def test_preempted_inside_a_group_saves_and_resumes_to_the_same_run(tmp_path, ml_dir,
                                                                   monkeypatch, one_per_call):
    offered: list[int] = []

    class SigtermAt13(loop_lib.PreemptionWatcher):
        def reached(self, step):       # SIGTERM arrives while the group of steps 11..14 runs
            offered.append(step)
            return step == 13

    monkeypatch.setattr(loop_lib, "PreemptionWatcher", SigtermAt13)
    out = tmp_path / "preempted"
    with pytest.raises(SystemExit) as exit_:
        _run(ml_dir, out, "trainer.steps_per_call=4")
    assert exit_.value.code == 0
    assert offered == list(range(1, 14))           # every step number, in order
    assert _checkpoints(out)[-1] == 14             # saved where the group ended
    assert not (out / "metrics.json").exists()
    monkeypatch.undo()
    _close(_run(ml_dir, out, "trainer.steps_per_call=4"), one_per_call[0])


@pytest.mark.parametrize("extra, message", [
    (["trainer.steps_per_call=0"], "trainer.steps_per_call=0: must be an integer >= 1"),
    (["trainer.steps_per_call=2.5"], "trainer.steps_per_call"),
    (["trainer.steps_per_call=4", "optimizer=ials", "task.kind=implicit"],
     "trainer.steps_per_call=4 with optimizer=ials"),
    (["trainer.steps_per_call=4", "privacy=dp", "privacy.epsilon=8"],
     "trainer.steps_per_call=4 with privacy=dp"),
])
def test_bad_steps_per_call_is_refused_naming_the_field(extra, message):
    with pytest.raises(Exception, match=message.replace(".", r"\.").replace("+", r"\+")):
        config_lib.validate(compose_train(extra))
