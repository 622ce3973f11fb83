"""Run provenance and experiment tracking: what produced a run directory, and its HParams.

``write_run_info`` records ``run.json`` (git commit and dirty flag, seed, dataset split
hashes, library versions, devices). ``write_hparams`` records the run's hyperparameters and
final metrics for TensorBoard's HParams dashboard; ``write_failure`` records why a run of a
sweep failed (``error.json``, ``FAILED``, and a failed HParams session).

HParams layout. Each run writes one HParams *session* into its own TensorBoard run ``<tb>``
(an event file of its own, ``events.out.tfevents.*.hparams``, beside the learning curves, so
TensorBoard lists each run once): a ``session_start_info`` (the flat config), the final
metrics as scalars (the keys of ``metrics.json``), and a ``session_end_info`` (success or
failure). No per-run
``experiment`` summary is written on purpose: without one, TensorBoard builds the experiment
from all sessions under its logdir, so pointing it at a sweep directory lists every run,
marks the hyperparameters whose values differ across runs (the swept ones), and takes each
hyperparameter's domain from all runs rather than from whichever run it read first.
Written with tensorboardX (no TensorFlow import).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

HPARAMS_SUFFIX = ".hparams"              # the HParams session's event file, in the run's tb/
SESSION_START_TAG = "_hparams_/session_start_info"   # tensorboard.plugins.hparams.metadata
SESSION_END_TAG = "_hparams_/session_end_info"
# Config keys that are bookkeeping, not hyperparameters: left out of the HParams table.
NOT_HPARAMS = ("logger.", "trainer.progress_bar", "trainer.async_checkpoint",
               "trainer.keep_checkpoints", "trainer.checkpoint", "dataset.data_dir")


def git_info(cwd: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the jaxreco checkout.

    ``dirty`` is true when tracked files differ from the commit (untracked files are ignored).
    """
    cwd = cwd or Path(__file__).resolve().parents[1]

    def git(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def flat_hparams(cfg: DictConfig | Mapping) -> dict[str, Any]:
    """The config as ``{"model.dim": 64, ...}`` (scalars only; lists as strings)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (list, tuple)):
            out[prefix] = str(list(node))
        else:
            out[prefix] = node

    walk("", OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg)
    return out


def hparams_of(cfg: DictConfig | Mapping) -> dict[str, Any]:
    """``flat_hparams`` without bookkeeping keys (``NOT_HPARAMS``): what a sweep varies."""
    return {k: v for k, v in flat_hparams(cfg).items() if not k.startswith(NOT_HPARAMS)}


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Atomic, strict JSON write (temp file + rename: a reader never sees half a file;
    NaN/inf are written as null)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(obj), indent=2, sort_keys=True, default=str,
                              allow_nan=False) + "\n")
    os.replace(tmp, path)



class Writer:
    """TensorBoard scalars from process 0 only (tensorboardX: no TensorFlow needed);
    ``logdir=None`` writes nothing."""

    def __init__(self, logdir: Path | None):
        self.w = None
        if logdir is not None:
            from tensorboardX import SummaryWriter
            self.w = SummaryWriter(str(logdir))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self.w is not None:
            for k, v in values.items():
                self.w.add_scalar(k.replace("@", "_"), v, step)   # TensorBoard tags: no '@'

    def close(self) -> None:
        if self.w is not None:
            self.w.close()


class Profiler:
    """``trainer.profile_steps=[first, last)``: a ``jax.profiler`` trace of those train steps
    into ``logdir`` (TensorBoard's profile tab). Call :meth:`before` and :meth:`after` around
    each step, :meth:`close` when the loop ends (it may stop inside the window)."""

    def __init__(self, steps, logdir: Path, total_steps: int):
        self.window, self.logdir, self.tracing = None, Path(logdir), False
        if steps is None:
            return
        steps = list(steps)
        if (len(steps) != 2 or not all(isinstance(s, int) for s in steps)
                or not 0 <= steps[0] < steps[1]):
            raise ValueError(f"trainer.profile_steps={steps}: must be [first, last) with "
                             "0 <= first < last (train step numbers)")
        if steps[1] > total_steps:
            raise ValueError(f"trainer.profile_steps={steps}: the run has only "
                             f"{total_steps} steps")
        self.window = (steps[0], steps[1])

    def before(self, step: int, state) -> None:
        if self.window and step == self.window[0]:
            import jax
            jax.block_until_ready(state)
            jax.profiler.start_trace(str(self.logdir))
            self.tracing = True

    def after(self, step: int, state) -> None:
        if self.tracing and step == self.window[1]:
            self.close(state)

    def close(self, state=None) -> None:
        if self.tracing:
            import jax
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.tracing = False


def write_run_info(cfg: DictConfig, workdir: Path, split_sha256: Mapping[str, str]) -> dict:
    """Writes ``run.json``: git commit + dirty flag, seed, split sha256s, versions, devices."""
    import jax

    info = {
        "git": git_info(),
        "seed": cfg.seed,
        "dataset": cfg.dataset.name,
        "split_sha256": dict(split_sha256),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
        "process_count": jax.process_count(),
        "host": platform.node(),
    }
    write_json(Path(workdir) / "run.json", info)
    return info


# ---------------------------------------------------------------------- HParams summaries

def _hparams_event(tag: str, plugin_data, wall_time: float):
    from tensorboardX.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2

    meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(
        plugin_name="hparams", content=plugin_data.SerializeToString()))
    null = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[0.0])
    value = summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=null)
    return event_pb2.Event(wall_time=wall_time, step=0, summary=summary_pb2.Summary(value=[value]))


def _write_session(logdir: Path, hparams: Mapping[str, Any], metrics: Mapping[str, float],
                   step: int, ok: bool, start_time: float | None = None) -> Path:
    """One HParams session in ``logdir`` (replacing any earlier one there).

    Written with tensorboardX's protos and writer: TensorBoard's own event writer imports
    TensorFlow when it is installed (~6 s).
    """
    from tensorboardX.event_file_writer import EventFileWriter
    from tensorboardX.proto import api_pb2, event_pb2, summary_pb2
    from tensorboardX.proto.plugin_hparams_pb2 import (HParamsPluginData, SessionEndInfo,
                                                       SessionStartInfo)

    session_dir = Path(logdir)
    for old in session_dir.glob(f"events.out.tfevents.*{HPARAMS_SUFFIX}"):
        old.unlink()                              # a resumed or re-run run: one session only
    session_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    start = SessionStartInfo(start_time_secs=start_time or now)
    for k, v in hparams.items():
        if isinstance(v, bool):
            start.hparams[k].bool_value = v
        elif isinstance(v, (int, float)):
            start.hparams[k].number_value = float(v)
        else:
            start.hparams[k].string_value = "null" if v is None else str(v)
    status = api_pb2.Status.Value("STATUS_SUCCESS" if ok else "STATUS_FAILURE")
    end = SessionEndInfo(status=status, end_time_secs=now)

    w = EventFileWriter(str(session_dir), filename_suffix=HPARAMS_SUFFIX)
    try:
        w.add_event(_hparams_event(SESSION_START_TAG, HParamsPluginData(session_start_info=start,
                                                                         version=0), now))
        for k, v in metrics.items():
            w.add_event(event_pb2.Event(wall_time=now, step=step, summary=summary_pb2.Summary(
                value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))])))
        w.add_event(_hparams_event(SESSION_END_TAG, HParamsPluginData(session_end_info=end,
                                                                       version=0), now))
    finally:
        w.close()
    return session_dir


def final_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a results dict (bools as 0/1), as HParams metrics."""
    return {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}


def write_hparams(logdir: Path, cfg: DictConfig, results: Mapping[str, float]) -> Path:
    """Writes this run's HParams session (hyperparameters + final metrics) to ``logdir``.

    ``results`` is the dict that also goes to ``metrics.json``; its numeric values become the
    session's metrics, logged at step ``results["train/steps"]``.
    """
    return _write_session(Path(logdir), hparams_of(cfg), final_metrics(results),
                          step=int(results.get("train/steps", 0)), ok=True)


def write_failure(workdir: Path, cfg: DictConfig | None, error: BaseException, *,
                  job: Mapping[str, Any] | None = None, process_index: int = 0) -> dict:
    """Records a failed run in its directory: ``error.json``, ``FAILED`` and a failed HParams session.

    ``job`` is what identifies the run in its sweep (``{"num": 3, "overrides": [...]}``).
    Process ``i > 0`` of a multi-process job writes ``error.process<i>.json`` only.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    info = {
        "type": type(error).__name__,
        "message": str(error).strip().splitlines()[0] if str(error).strip() else "",
        "traceback": "".join(traceback.format_exception(error)),
        "time": time.time(),
        "process_index": process_index,
        **({"job": dict(job)} if job else {}),
    }
    if process_index != 0:
        write_json(workdir / f"error.process{process_index}.json", info)
        return info
    write_json(workdir / "error.json", info)
    (workdir / "FAILED").write_text(f"{info['type']}: {info['message']}\n")
    if cfg is not None:
        try:
            _write_session(workdir / "tb", hparams_of(cfg), {}, step=0, ok=False)
        except Exception:  # noqa: BLE001 - the error record above matters more than TB
            pass
    return info
