"""The training loop: one linear function, phases marked by banner comments.

``train_and_evaluate(cfg, workdir)`` runs config check → data → state → (resume) → train
with per-epoch validation, early stopping and checkpoints → test with the best checkpoint,
and writes the run directory (:mod:`jaxreco.run`: ``config.yaml``, ``splits.json``,
``run.json``, ``metrics.json``, ``checkpoints/``, ``tb/``).

What is learnt and how it is scored is the task's (:mod:`jaxreco.train.tasks`, picked by
``task.kind``); how a step updates the state is the optimizer's (a gradient step, or one
iALS epoch: :mod:`jaxreco.train.setup`). Every task and optimizer shares the loop below:
resume, SIGTERM, checkpoints, multi-process batches, TensorBoard.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path

import jax
import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from jaxreco import config as config_lib, run as run_lib, tracking
from jaxreco.checkpoint import Checkpointer, abstract_like
from jaxreco.distributed import PreemptionWatcher, process_batch_shard
from jaxreco.sharding import batch_sharding, make_mesh
from jaxreco.train import setup, tasks as tasks_lib
from jaxreco.train.pretrained import neumf_from_runs

log = logging.getLogger("jaxreco")


def train_and_evaluate(cfg: DictConfig, workdir: str | os.PathLike,
                       task: tasks_lib.Task | None = None) -> run_lib.Results:
    """Trains and tests ``cfg`` in ``workdir``. ``task``: an already built task of ``cfg``
    (benchmarks that change its rows or wrap its evaluation); default: built from the
    prepared data."""
    t_start = time.time()
    config_lib.validate(cfg)             # every option in range before any data is read
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    if not is_main:                       # one voice: other processes log warnings only
        log.setLevel(logging.WARNING)
    tc = cfg.trainer

    # ------------------------------------------------------------------ data
    if task is None:
        task = tasks_lib.build(cfg, tasks_lib.PreparedData.prepare(cfg))
    if is_main:
        run_lib.write_start(workdir, cfg, task)
    task.log_summary()

    # ------------------------------------------------------------------ mesh, model, state
    mesh = make_mesh(cfg.mesh.axes)
    ms = setup.model_state(cfg, task, mesh)
    state, total_steps, steps_per_epoch = ms.state, ms.total_steps, ms.steps_per_epoch

    # ------------------------------------------------------------------ step and batches
    in_sharding = batch_sharding(mesh, dict(cfg.mesh.rules))
    shard = process_batch_shard(in_sharding, tc.batch_size)
    train_step, data_iter, next_batch = setup.train_step(cfg, task, ms, mesh, in_sharding, shard)
    spc = int(tc.steps_per_call)        # > 1: groups of steps per call (config refuses iALS/DP)
    group_fn, next_group = (setup.group_step(cfg, task, ms, mesh, in_sharding, shard, data_iter)
                            if spc > 1 else (None, None))

    # ------------------------------------------------------------------ resume
    # Order: fresh state and iterator above; then the newest readable checkpoint step
    # replaces state, iterator position and loop bookkeeping together.
    select, mode = task.select, task.mode
    ckpt = Checkpointer(workdir / run_lib.CHECKPOINTS, keep=tc.keep_checkpoints,
                        best_metric=f"val/{select}" if task.has_val else None, best_mode=mode,
                        async_save=tc.async_checkpoint) if tc.checkpoint else None
    loop = {"step": 0, "best_val": math.inf if mode == "min" else -math.inf, "best_step": -1,
            "bad_epochs": 0, "loss_sum": 0.0, "loss_count": 0, "last_loss": float("nan"),
            "history": []}
    abstract_state = abstract_like(state, ms.shardings)
    if ckpt is not None:
        restored = ckpt.restore_latest(abstract_state, data_iter)
        if restored is not None:
            state, loop = restored
            log.info("resumed from %s step %d", ckpt.directory, loop["step"])
    if loop["step"] == 0 and (cfg.model.get("pretrained_gmf") or cfg.model.get("pretrained_mlp")):
        state = neumf_from_runs(state, cfg)
    task.setup(ms.graphdef, ms.tables, ms.abstract_model, in_sharding, mesh)
    # Fake CPU devices share cores; bounding in-flight steps keeps collectives from timing out.
    sync_each_step = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"

    # ------------------------------------------------------------------ train
    writer = tracking.Writer(workdir / run_lib.TENSORBOARD
                             if (is_main and cfg.logger.tensorboard) else None)
    profiler = tracking.Profiler(tc.profile_steps, workdir / run_lib.TENSORBOARD, total_steps)
    step = int(loop["step"])
    pending: list[jax.Array] = []
    train_seconds, train_examples = 0.0, 0
    show_bar = is_main and tc.progress_bar
    # the bar starts once the first step has compiled, so its rate and ETA are the steps'
    bar = tqdm(total=total_steps, initial=step, disable=True)
    console = contextlib.ExitStack()     # log lines go above the bar, not glued onto it
    if show_bar:
        console.enter_context(logging_redirect_tqdm())
    first_step = step
    t_mark, examples_since = time.time(), 0
    stopped_early = step < total_steps and loop["bad_epochs"] >= tc.patience
    preemption = PreemptionWatcher()

    def flush_losses() -> None:
        if pending:           # one float32 vector of every step's loss, summed as K=1 sums it
            losses = [np.ravel(v)[:n] for v, n in zip(jax.device_get([v for v, _ in pending]),
                                                       [n for _, n in pending])]
            loop["loss_sum"] += float(np.sum(np.concatenate(losses)))
            loop["loss_count"] += sum(n for _, n in pending)
            pending.clear()

    def group_end(step: int) -> int:
        """Where the group of steps starting at ``step`` ends: after ``steps_per_call``
        steps, or earlier at the next epoch end, log step, checkpoint step or profile-window
        edge, so that each of them happens at the step the user asked for."""
        nxt = lambda every: (step // every + 1) * every     # noqa: E731
        ends = [step + spc, total_steps, nxt(steps_per_epoch), nxt(tc.log_every_steps)]
        if ckpt is not None and tc.checkpoint_every_steps:
            ends.append(nxt(tc.checkpoint_every_steps))
        ends += [w for w in (profiler.window or ()) if w > step]
        return min(ends)

    while step < total_steps and not stopped_early:
        profiler.before(step, state)
        if group_fn is None:
            n = 1
            state, m = train_step(state, next_batch(step))
        else:
            n = group_end(step) - step
            state, m = group_fn(state, *next_group(step, n))
        if sync_each_step:
            jax.block_until_ready(state)
        step += n
        profiler.after(step, state)
        pending.append((m["loss"], n))
        examples_since += n * ms.examples_per_step
        if step == first_step + n and show_bar:
            bar = tqdm(total=total_steps, initial=step, desc="train", unit="step",
                       dynamic_ncols=True)
        bar.update(0 if step == first_step + n else n)
        end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
        if step % tc.log_every_steps == 0 or end_of_epoch:
            flush_losses()
            loop["last_loss"] = loop["loss_sum"] / loop["loss_count"]
            loop["loss_sum"], loop["loss_count"] = 0.0, 0
            dt = time.time() - t_mark
            train_seconds += dt
            train_examples += examples_since
            writer.scalars(step, {"train/loss": loop["last_loss"],
                                  "perf/examples_per_sec": examples_since / max(dt, 1e-9),
                                  **setup.learning_rate(ms, cfg, step)})
            bar.set_postfix(loss=f"{loop['last_loss']:.4f}")
            t_mark, examples_since = time.time(), 0
        loop["step"] = step
        if end_of_epoch:
            # ---------------------------------------------------------- validate
            val = task.evaluate(state, "val") if task.has_val else None
            if val is not None:
                writer.scalars(step, {f"eval/val/{k}": v for k, v in val.items() if k != "count"})
                v = val[select]
                improved = v < loop["best_val"] if mode == "min" else v > loop["best_val"]
                if improved:
                    loop.update(best_val=v, best_step=step, bad_epochs=0)
                elif step > setup.patience_starts(cfg):
                    loop["bad_epochs"] += 1
                loop["history"].append({"step": step, f"val/{select}": v,
                                        "train/loss": loop["last_loss"]})
                log.info("epoch %g step %d: train/loss %.4f  val/%s %.4f%s",
                         step / steps_per_epoch, step, loop["last_loss"], select, v,
                         "  (best)" if improved else "")
            else:                 # no validation split: the last step is the model tested
                loop.update(best_step=step)
                loop["history"].append({"step": step, "train/loss": loop["last_loss"]})
                log.info("epoch %g step %d: train/loss %.4f", step / steps_per_epoch, step,
                         loop["last_loss"])
            stopped_early = loop["bad_epochs"] >= tc.patience
            if ckpt is not None:
                ckpt.save(step, state, data_iter, loop,
                          metrics={f"val/{select}": val[select]} if val is not None else None)
            if stopped_early:
                log.info("early stop: no val improvement for %d epochs", tc.patience)
            t_mark = time.time()
        elif ckpt is not None and tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0:
            flush_losses()
            ckpt.save(step, state, data_iter, loop)
        # -------------------------------------------------------------- preemption
        # every step number is offered (several processes agree on one of them)
        if any(preemption.reached(s) for s in range(step - n + 1, step + 1)):
            flush_losses()
            if ckpt is not None:
                if ckpt.latest_step() != step:
                    ckpt.save(step, state, data_iter, loop)
                ckpt.close()
            bar.close()
            console.close()
            writer.close()
            log.warning("preempted (SIGTERM): saved step %d to %s; rerun the same command "
                        "to resume", step, ckpt.directory if ckpt else "(checkpointing off)")
            raise SystemExit(0)
    profiler.close(state)                  # stopped early inside the profiled window
    if stopped_early:                      # the bar ends where training did, not at "50%"
        bar.total = step
        bar.set_postfix_str(f"loss={loop['last_loss']:.4f}, early stop")
    bar.close()
    console.close()
    preemption.close()

    # ------------------------------------------------------------------ test the best model
    if ckpt is not None:
        ckpt.wait()
        if loop["best_step"] >= 0 and loop["best_step"] != step:
            state, _ = ckpt.restore(loop["best_step"], abstract_state)
        ckpt.close()
    results = run_lib.Results(task.final(state))
    results.objective = run_lib.objective(results, select, mode)
    results.update({
        "train/loss": loop["last_loss"], "train/steps": step, "train/best_step": loop["best_step"],
        "train/epochs": step / steps_per_epoch, "train/stopped_early": stopped_early,
        "perf/train_seconds": train_seconds,
        "perf/examples_per_sec": train_examples / max(train_seconds, 1e-9),
        "perf/total_seconds": time.time() - t_start,
    })
    privacy = setup.privacy_metrics(cfg, task, ms, step)
    results.update(privacy)
    writer.scalars(step, {f"eval/test/{k[5:]}": v for k, v in results.items()
                          if k.startswith("test/")})
    writer.scalars(step, privacy)
    writer.close()
    if is_main:
        if cfg.logger.tensorboard:
            tracking.write_hparams(workdir / run_lib.TENSORBOARD, cfg, results)
        run_lib.write_metrics(workdir, results)
    log.info("%s  (best step %d)  -> %s", "  ".join(
        f"{k} {results[k]:.4f}" for k in task.headline if k in results), loop["best_step"],
        workdir / run_lib.METRICS)
    return results
