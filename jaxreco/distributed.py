"""Multi-process JAX from the job environment: SLURM, submitit's local executor, or explicit.

``initialize_from_env()`` works out (coordinator address, process count, process id) and
calls ``jax.distributed.initialize`` when, and only when, there is more than one process.
Call it once per process before anything touches a JAX device (``jax.devices()``, the first
``jit``). Sources, first match wins:

1. explicit arguments, or the environment variables ``JAXRECO_COORDINATOR_ADDRESS``,
   ``JAXRECO_NUM_PROCESSES``, ``JAXRECO_PROCESS_ID`` (all three);
2. SLURM, inside an ``srun`` step (what ``hydra/launcher=slurm`` runs):
   ``SLURM_STEP_NUM_TASKS`` (or ``SLURM_NTASKS``), ``SLURM_PROCID``, the first host of
   ``SLURM_STEP_NODELIST`` (a batch script outside ``srun`` counts as one process);
3. submitit's local executor (``hydra/launcher=submitit_local`` with ``tasks_per_node>1``):
   ``SUBMITIT_LOCAL_NTASKS``, ``SUBMITIT_LOCAL_GLOBALID``, coordinator on 127.0.0.1;
4. otherwise one process: nothing is initialized.

The coordinator port is derived from the job id (``JAXRECO_COORDINATOR_PORT`` overrides it),
so every task of one job agrees on it without talking. One process per host sees all the
host's accelerators (the layout ``conf/hydra/launcher/slurm.yaml`` asks for:
``tasks_per_node: 1``); with several tasks per node give each its devices through SLURM
(``--gpus-per-task``/``CUDA_VISIBLE_DEVICES``) or ``JAX_LOCAL_DEVICE_IDS``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import threading
from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger("jaxreco")


@dataclasses.dataclass(frozen=True)
class ProcessEnv:
    """Where this process sits in a multi-process job, and where that was read from."""

    num_processes: int = 1
    process_id: int = 0
    coordinator_address: str | None = None
    source: str = "single"          # explicit | slurm | submitit-local | single


def _port(job_id: str | None, env: Mapping[str, str]) -> int:
    if env.get("JAXRECO_COORDINATOR_PORT"):
        return int(env["JAXRECO_COORDINATOR_PORT"])
    digits = re.sub(r"\D", "", job_id or "") or "0"
    return 20000 + int(digits) % 20000    # below Linux's ephemeral range (32768+)


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``gpu-[003-005,010],cpu1`` -> ``gpu-003``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"SLURM node list {nodelist!r}: cannot read a host name from it")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"{key}={env[key]!r}: expected an integer") from None


def detect(env: Mapping[str, str] | None = None, *, coordinator_address: str | None = None,
           num_processes: int | None = None, process_id: int | None = None) -> ProcessEnv:
    """Reads the process layout from arguments or ``env`` (default ``os.environ``); no JAX calls."""
    env = os.environ if env is None else env
    coordinator_address = coordinator_address or env.get("JAXRECO_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAXRECO_NUM_PROCESSES"):
        num_processes = _int(env, "JAXRECO_NUM_PROCESSES")
    if process_id is None and env.get("JAXRECO_PROCESS_ID"):
        process_id = _int(env, "JAXRECO_PROCESS_ID")
    given = (coordinator_address, num_processes, process_id)
    if all(v is not None for v in given):
        return ProcessEnv(num_processes, process_id, coordinator_address, "explicit")
    if any(v is not None for v in given):
        raise ValueError("jax.distributed: give all of coordinator_address, num_processes and "
                         f"process_id (got {coordinator_address=}, {num_processes=}, {process_id=})")
    if "SLURM_STEP_NODELIST" in env and "SLURM_PROCID" in env:   # inside an srun step
        host = first_host(env["SLURM_STEP_NODELIST"])
        ntasks = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        return ProcessEnv(_int(env, ntasks), _int(env, "SLURM_PROCID"),
                          f"{host}:{_port(env.get('SLURM_JOB_ID'), env)}", "slurm")
    if "SUBMITIT_LOCAL_NTASKS" in env and "SUBMITIT_LOCAL_GLOBALID" in env:
        return ProcessEnv(_int(env, "SUBMITIT_LOCAL_NTASKS"), _int(env, "SUBMITIT_LOCAL_GLOBALID"),
                          f"127.0.0.1:{_port(env.get('SUBMITIT_LOCAL_JOB_ID'), env)}",
                          "submitit-local")
    return ProcessEnv()


def is_initialized() -> bool:
    try:
        from jax._src import distributed
        return distributed.global_state.client is not None
    except (ImportError, AttributeError):
        return False


def initialize_from_env(coordinator_address: str | None = None, num_processes: int | None = None,
                        process_id: int | None = None, *,
                        env: Mapping[str, str] | None = None) -> ProcessEnv:
    """Calls ``jax.distributed.initialize`` for a multi-process job; a no-op for one process.

    Idempotent: a second call (or a call after someone else initialized) does nothing.
    Returns the layout it used.
    """
    pe = detect(env, coordinator_address=coordinator_address, num_processes=num_processes,
                process_id=process_id)
    if pe.num_processes <= 1 or is_initialized():
        return pe
    if not 0 <= pe.process_id < pe.num_processes:
        raise ValueError(f"jax.distributed: process_id={pe.process_id} is outside "
                         f"0..{pe.num_processes - 1} (from {pe.source})")
    import jax

    log.info("jax.distributed: process %d of %d, coordinator %s (from %s)", pe.process_id,
             pe.num_processes, pe.coordinator_address, pe.source)
    # A dead peer is detected by missed heartbeats; JAXRECO_HEARTBEAT_TIMEOUT_SECONDS bounds
    # how long the survivors wait before failing (JAX's default: 100 s).
    extra = {}
    env_ = os.environ if env is None else env
    if env_.get("JAXRECO_HEARTBEAT_TIMEOUT_SECONDS"):
        extra["heartbeat_timeout_seconds"] = _int(env_, "JAXRECO_HEARTBEAT_TIMEOUT_SECONDS")
    jax.distributed.initialize(coordinator_address=pe.coordinator_address,
                               num_processes=pe.num_processes, process_id=pe.process_id, **extra)
    return pe


# ----------------------------------------------------------------------------- batches
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


def process_rows(batch: dict[str, np.ndarray], sharding) -> dict[str, np.ndarray]:
    """The rows of a full (every-process) batch that belong to this process."""
    if jax.process_count() == 1:
        return batch
    n = len(next(iter(batch.values())))
    i, c = process_batch_shard(sharding, n)
    return {k: v[i * (n // c):(i + 1) * (n // c)] for k, v in batch.items()}


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array | np.ndarray]:
    """This process's rows -> global arrays. One process: jit transfers numpy itself (cheaper)."""
    if jax.process_count() == 1:
        return batch
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# ----------------------------------------------------------------------------- preemption
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
            return multihost_utils.reached_preemption_sync_point(step)
        return self.flag

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None
