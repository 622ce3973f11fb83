"""Run provenance and experiment tracking: what produced a run directory, and its HParams.

``write_run_info`` records ``run.json`` (git commit and dirty flag, seed, dataset split
hashes, library versions, devices); ``write_hparams`` records the run's hyperparameters and
final metrics for TensorBoard's HParams dashboard.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf


def git_info(cwd: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the jaxreco checkout."""
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


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The config as ``{"model.dim": 64, ...}`` (scalars only), for tables and HParams."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (list, tuple)):
            out[prefix] = str(list(node))
        else:
            out[prefix] = node

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return out


def write_run_info(cfg: DictConfig, workdir: Path, split_sha256: Mapping[str, str]) -> dict:
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
    tmp = workdir / "run.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, workdir / "run.json")
    return info


def write_hparams(logdir: Path, cfg: DictConfig, results: Mapping[str, float]) -> None:
    """HParams summaries (tensorboardX; no TensorFlow) under ``logdir/hparams``."""
    from tensorboardX import SummaryWriter

    hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
          for k, v in flat_hparams(cfg).items() if not k.startswith(("logger.", "trainer.progress"))}
    metrics = {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}
    with SummaryWriter(str(logdir)) as w:
        w.add_hparams(hp, metrics, name="hparams")
