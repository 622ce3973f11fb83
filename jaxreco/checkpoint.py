"""Orbax checkpoints: model state, grain iterator state and loop bookkeeping in one step.

Each saved step holds three items:

* ``state``: the sharded ``TrainState`` (``StandardSave``); restored against a target of
  ``jax.ShapeDtypeStruct``s carrying the *current* shardings, so a checkpoint written on
  one mesh restores onto another.
* ``data_iter``: the grain iterator's state (the index of the next global batch).
* ``loop``: JSON bookkeeping (epoch, best validation metric and its step, patience).

Resume order: build the state and iterator fresh, then if a step exists restore all three
and continue from there. The manager keeps the latest ``keep`` steps plus the best one.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 2, best_metric: str | None = None,
                 best_mode: str = "min", async_save: bool = True):
        if best_mode not in ("min", "max"):
            raise ValueError(f"checkpoint best_mode={best_mode!r}: must be 'min' or 'max'")
        policies: list[pp.PreservationPolicy] = [pp.LatestN(n=keep)]
        if best_metric:
            policies.append(pp.BestN(get_metric_fn=lambda m: m[best_metric],
                                     reverse=best_mode == "min", n=1,
                                     keep_checkpoints_without_metrics=False))
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=pp.AnyPreservationPolicy(policies),
                enable_async_checkpointing=async_save, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iter: grain.DatasetIterator | None, loop: dict[str, Any],
             metrics: dict[str, float] | None = None, force: bool = True) -> None:
        items = {"state": ocp.args.StandardSave(state), "loop": ocp.args.JsonSave(loop)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

    def restore(self, step: int, abstract_state, data_iter: grain.DatasetIterator | None = None):
        """Returns ``(state, loop)``; restores ``data_iter`` in place when given."""
        items = {"state": ocp.args.StandardRestore(abstract_state), "loop": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], out["loop"]

    def restore_latest(self, abstract_state, data_iter: grain.DatasetIterator | None = None):
        """``(state, loop)`` from the newest readable step, or None if there is none.

        A step that fails to restore (corrupt or truncated files) is reported and the
        previous one is tried; if steps exist but none is readable, raises.
        """
        steps = sorted(self.all_steps(), reverse=True)
        errors = []
        for step in steps:
            try:
                out = self.restore(step, abstract_state, data_iter)
            except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable"
                msg = f"{self.directory / str(step)}: unreadable ({type(e).__name__}: " \
                      f"{str(e).splitlines()[0][:200] if str(e) else ''})"
                errors.append(msg)
                log.error("checkpoint %s; trying the previous step", msg)
                continue
            if errors:
                self._quarantine([s for s in steps if s > step])
            return out
        if errors:
            raise RuntimeError("no readable checkpoint in " + str(self.directory) + ": "
                               + "; ".join(errors))
        return None

    def _quarantine(self, steps: list[int]) -> None:
        """Moves unreadable steps to ``<dir>/unreadable/<step>`` (kept for inspection) so the
        resumed run can write those steps again."""
        if jax.process_index() == 0:
            dest = self.directory / "unreadable"
            dest.mkdir(exist_ok=True)
            for s in steps:
                target = dest / f"{s}-{int(time.time())}"
                os.replace(self.directory / str(s), target)
                log.warning("moved unreadable checkpoint step %d to %s", s, target)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state, shardings):
    """``ShapeDtypeStruct`` tree of ``state`` with the given shardings (restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
