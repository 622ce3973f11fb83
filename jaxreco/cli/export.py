"""``jaxreco-export``: a trained run directory -> ``<out_dir>/<version>/`` SavedModel.

    jaxreco-export --run-dir outputs/ml1m_mf/2026-01-01_00-00-00 --out-dir models/ml1m \
        [--version N] [--step S] [--complement complement.npz]

``--version`` defaults to one more than the highest version already in ``--out-dir`` (TF
Serving serves the highest); ``--step`` to the run's best checkpoint step. Needs the ``[export]`` extra (TensorFlow); see
docs/serving.md for the JAX/TensorFlow versions that export and serve. Whenever the
dataset has item text (MovieLens titles and genres, category names, prices) it goes to
``assets.extra/item_text.json`` for ``POST /ask`` (:mod:`jaxreco.ask`).
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxreco.export import ExportError, export_run
from jaxreco.runtime import configure_xla


def next_version(out_dir: str) -> int:
    try:
        names = os.listdir(out_dir)
    except FileNotFoundError:
        return 1
    versions = [int(n) for n in names if n.isdigit() and int(n) > 0]
    return max(versions, default=0) + 1


def main(argv: list[str] | None = None) -> int:
    configure_xla()
    p = argparse.ArgumentParser(prog="jaxreco-export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="trained run directory (checkpoint + vocabularies)")
    p.add_argument("--out-dir", required=True, help="model directory; the version goes below it")
    p.add_argument("--version", type=int, default=None, help="default: highest existing + 1")
    p.add_argument("--step", type=int, default=None,
                   help="checkpoint step (default: the run's best step if kept, else the latest)")
    p.add_argument("--complement", default=None,
                   help="a complete-the-cart model (python -m jaxreco.complement) to serve at "
                        "/complete, matched to the run's items by raw id")
    args = p.parse_args(argv)
    version = args.version if args.version is not None else next_version(args.out_dir)

    try:
        path = export_run(args.run_dir, args.out_dir, version, step=args.step,
                          complement=args.complement)
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"jaxreco-export: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
