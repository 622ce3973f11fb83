"""`jaxreco-train`: the Hydra app. All logic lives in ``jaxreco.train.loop``.

One run (``jaxreco-train ...``): a bad config or dataset exits with status 2 and one line.
A sweep (``jaxreco-train -m ...``, or ``+hparams_search=...``): a run that raises is recorded
in its directory (``error.json``, ``FAILED``, a failed HParams session), logged as
``run N (overrides) failed: reason``, and returns NaN as its objective (Optuna marks the
trial failed); the other runs go on. When the sweep ends in this process (basic launcher),
the failed runs are listed again and the exit status is 1.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from jaxreco import config, tracking
from jaxreco.cli import CONF_DIR, precheck, quiet_libraries, user_errors
from jaxreco.distributed import detect, initialize_from_env
from jaxreco.runtime import configure_xla
from jaxreco.train.loop import train_and_evaluate

log = logging.getLogger("jaxreco")
config.register()

_runs: list[dict] = []          # this process's multirun jobs: {"num", "overrides", "dir", "error"}


def failure_reason(e: BaseException) -> str:
    """``Type: first line of the message[: first line of its cause]``."""
    msg = str(e).split("\nConfig search path")[0].strip().splitlines()
    text = f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__
    cause = e.__cause__
    if cause is not None and str(cause).strip() and str(cause).splitlines()[0] not in text:
        text += f": {str(cause).splitlines()[0]}"
    return text


def _train(cfg: DictConfig, workdir: Path) -> dict:
    initialize_from_env()
    return train_and_evaluate(cfg, workdir)


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base=None)
def _app(cfg: DictConfig) -> float:
    quiet_libraries()
    hc = HydraConfig.get()
    workdir = Path(hc.runtime.output_dir)
    if hc.mode != RunMode.MULTIRUN:
        with user_errors():
            return _train(cfg, workdir).objective

    overrides = list(hc.overrides.task)
    run = {"num": hc.job.num, "overrides": overrides, "dir": str(workdir), "error": None}
    _runs.append(run)
    try:
        return float(_train(cfg, workdir).objective)
    except Exception as e:  # noqa: BLE001 - one run's failure must not end the sweep
        run["error"] = failure_reason(e)
        pe = detect()
        tracking.write_failure(workdir, cfg, e, job={"num": hc.job.num, "overrides": overrides},
                               process_index=pe.process_id)
        where = f" on process {pe.process_id} of {pe.num_processes}" if pe.num_processes > 1 else ""
        record = "error.json" if pe.process_id == 0 else f"error.process{pe.process_id}.json"
        log.error("run %d (%s) failed%s: %s  [%s]", hc.job.num, " ".join(overrides), where,
                  run["error"], workdir / record)
        return float("nan")


def main() -> None:
    configure_xla()      # before any JAX backend starts; sweep jobs inherit the variable
    precheck("train", sys.argv[1:])
    _app()
    failed = [r for r in _runs if r["error"]]
    if failed:
        sweep_dir = Path(failed[0]["dir"]).parent
        print(f"error: {len(failed)} of {len(_runs)} runs failed; the others completed "
              f"(jaxreco-compare {sweep_dir}):", file=sys.stderr)
        for r in failed:
            print(f"  run {r['num']} ({' '.join(r['overrides'])}) failed: {r['error']}",
                  file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
