"""`jaxreco-compare SWEEP_DIR [...]`: rank the runs of sweeps, write a Markdown table and plots.

    jaxreco-compare multirun/ml100k_mf/2026-01-01_12-00-00
    jaxreco-compare multirun/a multirun/b --metric val/rmse --out /tmp/cmp

Prints the table (best first by ``--metric``), writes ``compare.md``, ``compare.json`` and
PNGs (``<metric>_vs_<hparam>.png`` per swept hyperparameter, ``learning_curves.png``) into
``--out`` (default ``<SWEEP_DIR>/compare``). Bad input: one line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from jaxreco.compare import DEFAULT_METRIC, CompareError, compare
from jaxreco.runtime import configure_xla


def main(argv: list[str] | None = None) -> int:
    configure_xla()
    p = argparse.ArgumentParser(prog="jaxreco-compare", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", metavar="SWEEP_DIR",
                   help="sweep directories (hydra.sweep.dir) or single run directories")
    p.add_argument("--metric", default=DEFAULT_METRIC, help="rank by this metrics.json key")
    p.add_argument("--mode", default="min", choices=["min", "max"])
    p.add_argument("--out", default=None, help="output directory (default SWEEP_DIR/compare)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    a = p.parse_args(argv)
    plots = not a.no_plots
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("note: plots skipped: matplotlib is not installed "
                  "(pip install 'jaxreco[sweep]')", file=sys.stderr)
            plots = False
    try:
        res = compare(a.dirs, metric=a.metric, mode=a.mode, out_dir=a.out, plots=plots)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res["text"])
    n_bad = sum(r.status != "ok" for r in res["runs"])
    print(f"\n{len(res['runs'])} runs ({n_bad} failed or unfinished); wrote "
          + ", ".join(str(f) for f in res["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
