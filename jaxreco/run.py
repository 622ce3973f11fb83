"""The run directory: what ``jaxreco-train`` writes, and the one way to restore a run.

A run directory ``<workdir>/`` holds

* ``config.yaml``   the resolved config;
* ``splits.json``   the prepared dataset directory the run read (``prepared``), and the size
                    and sha256 of each split and of the fixed evaluation candidates;
* ``run.json``      provenance: git commit, seed, split sha256s, versions, devices;
* ``metrics.json``  final figures (flat, namespaced keys; strict JSON: a figure that could
                    not be computed is ``null``); ``train/best_step`` is the step tested;
* ``checkpoints/``  Orbax steps (state + data iterator + loop bookkeeping);
* ``tb/``           TensorBoard events.

:func:`restore_run` rebuilds a run from these files alone — the config, the prepared
directory ``splits.json`` names (whose train sha256 must still match) and a checkpoint —
with the same model, optimizers and shardings as the training loop
(:func:`jaxreco.train.setup.model_state`). The loop's resume, ``jaxreco-eval``, NeuMF
pre-training and ``jaxreco-export`` all use it; nothing re-splits or re-prepares data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf, open_dict

from jaxreco import tracking
from jaxreco.checkpoint import Checkpointer, abstract_like
from jaxreco.sharding import batch_sharding, make_mesh
from jaxreco.train import tasks as tasks_lib
from jaxreco.train.setup import model_state
from jaxreco.train.tasks import PreparedData, Task

CONFIG, SPLITS, METRICS, CHECKPOINTS, TENSORBOARD = (
    "config.yaml", "splits.json", "metrics.json", "checkpoints", "tb")


class Results(dict):
    """The final metrics (what ``metrics.json`` holds), plus :attr:`objective`: the
    validation metric a sweeper minimises (``val/rmse``; ``−val/ndcg@10`` or ``−val/auc``
    for the implicit/ctr tasks; NaN without a validation split)."""

    objective: float = float("nan")


def write_start(workdir: Path, cfg: DictConfig, task: Task) -> None:
    """``config.yaml``, ``splits.json`` and ``run.json`` of a run about to train."""
    OmegaConf.save(cfg, workdir / CONFIG, resolve=True)
    tracking.write_json(workdir / SPLITS, task.data.split_info())
    tracking.write_run_info(cfg, workdir, task.data.sha256())


def write_metrics(workdir: Path, results: dict) -> None:
    tracking.write_json(workdir / METRICS, results)


def read_metrics(workdir: str | Path) -> dict[str, Any]:
    p = Path(workdir) / METRICS
    return json.loads(p.read_text()) if p.exists() else {}


def load_config(workdir: str | Path) -> DictConfig:
    wd = Path(workdir)
    if not (wd / CONFIG).exists():
        raise FileNotFoundError(f"{wd}: not a jaxreco-train run directory (no {CONFIG})")
    return OmegaConf.load(wd / CONFIG)


def open_data(workdir: str | Path) -> PreparedData:
    """The prepared dataset the run trained on, as ``splits.json`` recorded it; its train
    split must have the recorded sha256 (else the data changed since training)."""
    wd = Path(workdir)
    if not (wd / SPLITS).exists():
        raise FileNotFoundError(f"{wd}: not a jaxreco-train run directory (no {SPLITS})")
    rec = json.loads((wd / SPLITS).read_text())
    path = rec.get("prepared")
    if not path:
        raise ValueError(f"{wd}/{SPLITS} names no prepared dataset (a run written by an "
                         "older jaxreco, which split in memory): retrain it")
    try:
        data = PreparedData.open(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{wd}/{SPLITS}: the prepared dataset {path} it trained on is gone; recreate it "
            f"with `jaxreco-data prepare` and the run's dataset and task.prepare options "
            f"(in {wd}/{CONFIG}, prepare.output_dir={path})") from e
    got, want = data.sha256()["train"], rec.get("train/sha256")
    if got != want:
        raise ValueError(f"{path}: its train split has sha256 {got[:12]}…, the run {wd} "
                         f"trained on {str(want)[:12]}…; the prepared data changed since "
                         "training")
    return data


class RestoredRun(NamedTuple):
    cfg: DictConfig
    task: Task
    graphdef: Any
    state: Any
    step: int
    model_fn: Any
    mesh: Any
    abstract_model: Any
    tables: Any                 # ShardedTables: the lookups of the trained tables


def restore_run(workdir: str | Path, *, step: int | None = None,
                full: bool = True) -> RestoredRun:
    """A finished run restored from its directory: its config, prepared data and checkpoint
    (``step``, else the best step of ``metrics.json``, else the latest), on a mesh of its
    config's shape. ``full=False`` turns off full-ranking evaluation in the task."""
    wd = Path(workdir)
    cfg = load_config(wd)
    with open_dict(cfg):
        cfg.task.full_ranking = bool(full)
    task = tasks_lib.build(cfg, open_data(wd))
    mesh = make_mesh(cfg.mesh.axes)
    ms = model_state(cfg, task, mesh)
    ckpt = Checkpointer(wd / CHECKPOINTS, async_save=False)
    if step is None:
        best = read_metrics(wd).get("train/best_step")
        step = -1 if best is None else int(best)
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"{wd}/{CHECKPOINTS}: no checkpoint to restore")
    step = step if step in steps else max(steps)
    state, _ = ckpt.restore(step, abstract_like(ms.state, ms.shardings))
    ckpt.close()
    return RestoredRun(cfg, task, ms.graphdef, state, step, ms.model_fn, mesh,
                       ms.abstract_model, ms.tables)


def evaluate_run(workdir: str | Path, *, step: int | None = None,
                 full: bool = True) -> dict[str, float]:
    """Re-evaluates a finished run: the same figures its ``metrics.json`` holds for the same
    step (``full=False`` skips full ranking)."""
    r = restore_run(workdir, step=step, full=full)
    r.task.setup(r.graphdef, r.tables, r.abstract_model,
                 batch_sharding(r.mesh, dict(r.cfg.mesh.rules)), r.mesh)
    return {"step": r.step, **r.task.final(r.state)}


def objective(results: dict, select: str, mode: str) -> float:
    """The value a sweeper minimises: ``val/<select>`` (negated when larger is better)."""
    sel = results.get(f"val/{select}", float("nan"))
    sel = float("nan") if sel is None else float(sel)
    return sel if mode == "min" or math.isnan(sel) else -sel
