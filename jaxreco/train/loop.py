"""The training loop: one linear function, phases marked by banner comments.

``train_and_evaluate(cfg, workdir)`` runs data → state → (resume) → compile → train with
per-epoch validation, early stopping and checkpoints → test with the best checkpoint, and
writes into ``workdir``:

* ``config.yaml``   the resolved config;
* ``splits.json``   sizes and sha256 of each split;
* ``metrics.json``  final figures (flat, namespaced keys; ``perf/*`` are wall-clock
                    measurements, every other key is a deterministic function of the config);
* ``checkpoints/``  Orbax steps (state + data iterator + loop bookkeeping);
* ``tb/``           TensorBoard events.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from jaxreco import losses, metrics as metrics_lib, models, optim, tracking
from jaxreco.checkpoint import Checkpointer, abstract_like
from jaxreco.data import pipeline, registry, split as split_lib
from jaxreco.data.dataset import Interactions
from jaxreco.embedding import ShardedTables
from jaxreco.sharding import batch_sharding, make_mesh
from jaxreco.train.state import create_state, table_axes
from jaxreco.train.step import make_eval_step, make_train_step

log = logging.getLogger("jaxreco")


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temp file + rename): a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _columns(x: Interactions) -> dict[str, np.ndarray]:
    return {"user": x.user, "item": x.item, "rating": x.rating}


def process_batch_shard(sharding, batch_size: int) -> tuple[int, int]:
    """``(shard_index, shard_count)``: the contiguous slice of every global batch whose rows
    this process's devices hold under ``sharding`` (the whole batch when it is replicated)."""
    idx = sharding.addressable_devices_indices_map((batch_size,)).values()
    if not idx:
        raise ValueError(f"mesh {dict(sharding.mesh.shape)} holds none of process "
                         f"{jax.process_index()}'s devices; with {jax.process_count()} processes "
                         "use a mesh over all devices (e.g. mesh=dp, mesh=dp_mp; -1 = the rest)")
    starts = sorted({(i[0].start or 0, i[0].stop or batch_size) for i in idx})
    lo, hi = starts[0][0], starts[-1][1]
    if hi - lo != sum(b - a for a, b in starts) or batch_size % (hi - lo):
        raise ValueError(f"this process's batch rows {starts} are not one contiguous equal slice")
    return lo // (hi - lo), batch_size // (hi - lo)


def _process_rows(batch: dict[str, np.ndarray], sharding) -> dict[str, np.ndarray]:
    """The rows of a full (every-process) batch that belong to this process."""
    if jax.process_count() == 1:
        return batch
    n = len(next(iter(batch.values())))
    i, c = process_batch_shard(sharding, n)
    return {k: v[i * (n // c):(i + 1) * (n // c)] for k, v in batch.items()}


def _to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array | np.ndarray]:
    """This process's rows -> global arrays. One process: jit transfers numpy itself (cheaper)."""
    if jax.process_count() == 1:
        return batch
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


class PreemptionWatcher:
    """SIGTERM → stop at a step boundary that every process agrees on.

    One process: a signal handler sets a flag, checked after each step. Several: JAX's
    preemption sync point (the coordination service relays the notice so all processes stop
    at the same step, keeping their collectives matched).
    """

    def __init__(self):
        self.flag = False
        self.previous = None
        self.multi = jax.process_count() > 1
        if not self.multi and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def reached(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.flag

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


class _Writer:
    """TensorBoard scalars from process 0 only (tensorboardX: no TensorFlow needed)."""

    def __init__(self, logdir: Path | None):
        self.w = None
        if logdir is not None:
            from tensorboardX import SummaryWriter
            self.w = SummaryWriter(str(logdir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.w is not None:
            for k, v in values.items():
                self.w.add_scalar(k, v, step)

    def close(self) -> None:
        if self.w is not None:
            self.w.close()


def train_and_evaluate(cfg: DictConfig, workdir: str | os.PathLike) -> dict[str, float]:
    t_start = time.time()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    if not is_main:                       # one voice: other processes log warnings only
        log.setLevel(logging.WARNING)
    tc = cfg.trainer

    # ------------------------------------------------------------------ data
    data = registry.load(OmegaConf.to_container(cfg.dataset, resolve=True))
    sc = cfg.dataset.split
    if sc.kind != "random":
        raise ValueError(f"dataset.split.kind={sc.kind!r}: this loader supports 'random'")
    splits = split_lib.random_split(data, test_fraction=sc.test_fraction,
                                    val_fraction=sc.val_fraction, seed=sc.seed)
    sha = split_lib.split_sha256(splits)
    train = splits["train"]
    if is_main:
        OmegaConf.save(cfg, workdir / "config.yaml", resolve=True)
        write_json(workdir / "splits.json", {
            "dataset": data.name, "users": data.num_users, "items": data.num_items,
            **{f"{k}/size": len(v) for k, v in splits.items()},
            **{f"{k}/sha256": h for k, h in sha.items()}})
        tracking.write_run_info(cfg, workdir, sha)
    log.info("data %s: %d users, %d items; train %d / val %d / test %d", data.name,
             data.num_users, data.num_items, len(train), len(splits["val"]), len(splits["test"]))

    # ------------------------------------------------------------------ mesh, model, state
    mesh = make_mesh(cfg.mesh.axes)
    rules = dict(cfg.mesh.rules)
    model_fn = models.build(cfg.model, num_users=data.num_users, num_items=data.num_items,
                            global_bias=float(train.rating.mean()), seed=cfg.seed)
    row_opt = optim.row_optimizer(cfg.optimizer.name, lr=cfg.optimizer.lr)
    dense_tx = optim.dense_optimizer(cfg.optimizer.dense_name, cfg.optimizer.dense_lr)
    graphdef, state, shardings = create_state(model_fn, row_opt, dense_tx, mesh, rules)
    abstract_model = nnx.eval_shape(model_fn)
    table_features = dict(abstract_model.table_features)
    embedding_tables = tuple(abstract_model.embedding_tables)
    bias_tables = tuple(t for t in table_features if t not in embedding_tables)
    tables = ShardedTables(mesh, rules, table_axes(state.tables), table_features, row_opt)

    def loss_fn(model, rows, batch):
        pred = model.score(rows, batch)
        loss = losses.mse_frobenius(pred, batch["rating"], rows,
                                    embedding_tables=embedding_tables, bias_tables=bias_tables,
                                    reg=cfg.model.reg, bias_reg=cfg.model.bias_reg)
        return loss, {}

    # ------------------------------------------------------------------ input pipeline
    steps_per_epoch = pipeline.batches_per_epoch(len(train), tc.batch_size)
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    in_sharding = batch_sharding(mesh, rules)
    shard_index, shard_count = process_batch_shard(in_sharding, tc.batch_size)
    ds = pipeline.train_dataset(_columns(train), batch_size=tc.batch_size, num_epochs=tc.epochs,
                                seed=cfg.seed, shard_index=shard_index, shard_count=shard_count)
    data_iter = iter(ds)

    # ------------------------------------------------------------------ resume
    # Order: fresh state and iterator above; then the newest readable checkpoint step
    # replaces state, iterator position and loop bookkeeping together.
    ckpt = Checkpointer(workdir / "checkpoints", keep=tc.keep_checkpoints,
                        best_metric="val/rmse", best_mode="min",
                        async_save=tc.async_checkpoint) if tc.checkpoint else None
    loop = {"step": 0, "best_val": math.inf, "best_step": -1, "bad_epochs": 0,
            "loss_sum": 0.0, "loss_count": 0, "last_loss": float("nan"), "history": []}
    abstract_state = abstract_like(state, shardings)
    if ckpt is not None:
        restored = ckpt.restore_latest(abstract_state, data_iter)
        if restored is not None:
            state, loop = restored
            log.info("resumed from %s step %d", ckpt.directory, loop["step"])

    # ------------------------------------------------------------------ compile
    train_step = jax.jit(make_train_step(graphdef, tables, loss_fn, dense_tx),
                         in_shardings=(shardings, in_sharding),
                         out_shardings=(shardings, None), donate_argnums=0)
    lo, hi = cfg.dataset.get("rating_range", None) or (None, None)
    eval_step = jax.jit(make_eval_step(graphdef, tables, (lo, hi) if lo is not None else None))
    # Fake CPU devices share cores; bounding in-flight steps keeps collectives from timing out.
    sync_each_step = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"

    def evaluate(part: Interactions) -> dict[str, float]:
        sums = None
        for batch, n in pipeline.eval_batches(_columns(part), tc.eval_batch_size):
            batch = _to_global(_process_rows(batch, in_sharding), in_sharding)
            sums = metrics_lib.merge(sums, jax.device_get(eval_step(state, batch, n)))
        return metrics_lib.regression_metrics(sums)

    # ------------------------------------------------------------------ train
    writer = _Writer(workdir / "tb" if (is_main and cfg.logger.tensorboard) else None)
    step = int(loop["step"])
    pending: list[jax.Array] = []
    train_seconds, train_examples = 0.0, 0
    bar = tqdm(total=total_steps, initial=step, disable=not (is_main and tc.progress_bar),
               desc="train", unit="step", dynamic_ncols=True)
    t_mark, examples_since = time.time(), 0
    stopped_early = step < total_steps and loop["bad_epochs"] >= tc.patience
    preemption = PreemptionWatcher()

    def flush_losses() -> None:
        if pending:
            loop["loss_sum"] += float(np.sum(jax.device_get(pending)))
            loop["loss_count"] += len(pending)
            pending.clear()

    while step < total_steps and not stopped_early:
        batch = _to_global(next(data_iter), in_sharding)
        state, m = train_step(state, batch)
        if sync_each_step:
            jax.block_until_ready(state)
        step += 1
        pending.append(m["loss"])
        examples_since += tc.batch_size
        bar.update(1)
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
                                  "learning/lr": cfg.optimizer.lr})
            bar.set_postfix(loss=f"{loop['last_loss']:.4f}")
            t_mark, examples_since = time.time(), 0
        loop["step"] = step
        if end_of_epoch:
            # ---------------------------------------------------------- validate
            val = evaluate(splits["val"])
            writer.scalars(step, {f"eval/val/{k}": v for k, v in val.items() if k != "count"})
            improved = val["rmse"] < loop["best_val"]
            if improved:
                loop.update(best_val=val["rmse"], best_step=step, bad_epochs=0)
            else:
                loop["bad_epochs"] += 1
            loop["history"].append({"step": step, "val/rmse": val["rmse"],
                                    "train/loss": loop["last_loss"]})
            log.info("epoch %g step %d: train/loss %.4f  val/rmse %.4f%s",
                     step / steps_per_epoch, step, loop["last_loss"], val["rmse"],
                     "  (best)" if improved else "")
            stopped_early = loop["bad_epochs"] >= tc.patience
            if ckpt is not None:
                ckpt.save(step, state, data_iter, loop, metrics={"val/rmse": val["rmse"]})
            if stopped_early:
                log.info("early stop: no val improvement for %d epochs", tc.patience)
            t_mark = time.time()
        elif ckpt is not None and tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0:
            flush_losses()
            ckpt.save(step, state, data_iter, loop)
        # -------------------------------------------------------------- preemption
        if preemption.reached(step):
            flush_losses()
            if ckpt is not None:
                if ckpt.latest_step() != step:
                    ckpt.save(step, state, data_iter, loop)
                ckpt.close()
            bar.close()
            writer.close()
            log.warning("preempted (SIGTERM): saved step %d to %s; rerun the same command "
                        "to resume", step, ckpt.directory if ckpt else "(checkpointing off)")
            raise SystemExit(0)
    bar.close()
    preemption.close()

    # ------------------------------------------------------------------ test the best model
    if ckpt is not None:
        ckpt.wait()
        if loop["best_step"] >= 0 and loop["best_step"] != step:
            state, _ = ckpt.restore(loop["best_step"], abstract_state)
        ckpt.close()
    results = {"val/" + k: v for k, v in evaluate(splits["val"]).items() if k != "count"}
    results.update({"test/" + k: v for k, v in evaluate(splits["test"]).items() if k != "count"})
    results.update({
        "train/loss": loop["last_loss"], "train/steps": step, "train/best_step": loop["best_step"],
        "train/epochs": step / steps_per_epoch, "train/stopped_early": stopped_early,
        "perf/train_seconds": train_seconds,
        "perf/examples_per_sec": train_examples / max(train_seconds, 1e-9),
        "perf/total_seconds": time.time() - t_start,
    })
    writer.scalars(step, {f"eval/test/{k[5:]}": v for k, v in results.items()
                          if k.startswith("test/")})
    writer.close()
    if is_main:
        if cfg.logger.tensorboard:
            tracking.write_hparams(workdir / "tb", cfg, results)
        write_json(workdir / "metrics.json", results)
    log.info("test/rmse %.4f  test/mae %.4f  (best step %d)  -> %s", results["test/rmse"],
             results["test/mae"], loop["best_step"], workdir / "metrics.json")
    return results
