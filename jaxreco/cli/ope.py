"""`jaxreco-ope RUN_DIR [--policy-run DIR] [--temperatures 0,0.1,1] [--n-bootstrap N]`:
off-policy evaluation of a ctr run on logged bandit data (the Open Bandit Dataset).

Prints one ``name: value`` line per figure and writes them all to ``RUN_DIR/ope.json``
(or ``--out``). The logic and the meaning of every figure: :func:`jaxreco.ope.evaluate_run`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from jaxreco.cli import quiet_libraries
from jaxreco.data.dataset import DataError
from jaxreco.ope import evaluate_run
from jaxreco.runtime import configure_xla


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, "
                                         "e.g. 0,0.1,1") from None


def _line(name: str, v) -> str:
    return f"{name}: {v:.6g}" if isinstance(v, float) else f"{name}: {v}"


def main(argv: list[str] | None = None) -> int:
    configure_xla()
    p = argparse.ArgumentParser(prog="jaxreco-ope", description=__doc__.splitlines()[1])
    p.add_argument("run_dir", help="a ctr run of jaxreco-train: reward model; its test "
                   "split is the evaluation rows")
    p.add_argument("--policy-run", default=None, help="run whose click model is the "
                   "evaluation policy (default: RUN_DIR); must read the same prepared data")
    p.add_argument("--temperatures", type=_floats, default=[0.0, 0.1, 1.0],
                   help="softmax temperatures of the model policy; 0 = argmax (default 0,0.1,1)")
    p.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level")
    p.add_argument("--n-bootstrap", type=int, default=0,
                   help="bootstrap resamples for obp's percentile interval (0: normal only)")
    p.add_argument("--seed", type=int, default=12345, help="bootstrap and BTS simulation seed")
    p.add_argument("--bts-n-sim", type=int, default=100_000,
                   help="Thompson-sampling draws for the BTS action distribution")
    p.add_argument("--out", default=None, help="JSON output (default RUN_DIR/ope.json)")
    a = p.parse_args(argv)
    quiet_libraries()
    start = time.perf_counter()
    try:
        figures = evaluate_run(a.run_dir, policy_run=a.policy_run, temperatures=a.temperatures,
                               alpha=a.alpha, n_bootstrap=a.n_bootstrap, seed=a.seed,
                               bts_n_sim=a.bts_n_sim)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"jaxreco-ope: {e}", file=sys.stderr)
        return 2
    figures["ope/seconds"] = time.perf_counter() - start
    for k, v in figures.items():
        print(_line(k, v))
    out = Path(a.out) if a.out else Path(a.run_dir) / "ope.json"
    out.write_text(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                               for k, v in figures.items()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
