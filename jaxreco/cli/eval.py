"""`jaxreco-eval RUN_DIR [--step N] [--no-full]`: re-evaluate a trained run.

Prints the metrics as JSON and writes them to ``RUN_DIR/eval.json``. The logic lives in
:func:`jaxreco.run.evaluate_run`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxreco.run import evaluate_run
from jaxreco.runtime import configure_xla


def main(argv: list[str] | None = None) -> int:
    configure_xla()
    p = argparse.ArgumentParser(prog="jaxreco-eval", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: best)")
    p.add_argument("--no-full", action="store_true", help="skip full-ranking evaluation")
    a = p.parse_args(argv)
    try:
        out = evaluate_run(a.run_dir, step=a.step, full=not a.no_full)
    except (FileNotFoundError, ValueError) as e:
        print(f"jaxreco-eval: {e}", file=sys.stderr)
        return 2
    text = json.dumps(out, indent=2, sort_keys=True)
    (Path(a.run_dir) / "eval.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
