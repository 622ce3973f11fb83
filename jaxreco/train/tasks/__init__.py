"""Tasks: what is learnt from a prepared dataset and how it is evaluated.

``build(cfg, data)`` picks the class for ``cfg.task.kind`` (:data:`TASKS`). A new task kind
is a new module here with a :class:`~jaxreco.train.tasks.base.Task` subclass, added to
:data:`TASKS`; the training loop, the restore path and export need no change.
"""

from __future__ import annotations

from omegaconf import DictConfig

from jaxreco.train.tasks.base import PreparedData, Task
from jaxreco.train.tasks.ctr import CtrTask
from jaxreco.train.tasks.implicit import ImplicitTask, row_norms
from jaxreco.train.tasks.next_item import NextItemTask
from jaxreco.train.tasks.rating import RatingTask

TASKS: dict[str, type[Task]] = {"rating": RatingTask, "implicit": ImplicitTask, "ctr": CtrTask,
                                "next_item": NextItemTask}

__all__ = ["TASKS", "CtrTask", "ImplicitTask", "NextItemTask", "PreparedData", "RatingTask", "Task", "build",
           "row_norms"]


def build(cfg: DictConfig, data: PreparedData) -> Task:
    """The task ``cfg.task.kind`` names, on ``data``."""
    kind = getattr(cfg.task.kind, "value", cfg.task.kind)   # a str enum or a str
    if kind not in TASKS:
        raise ValueError(f"task.kind={kind!r}: must be one of {list(TASKS)}")
    return TASKS[kind](cfg, data)
