"""Accuracy against ε for DP iALS (privacy=dp): one training run per ε, the last one
(``inf``) without privacy, same config otherwise.

    python scripts/dp_ials_curve.py --eps 1 2 4 8 inf -- experiment=dp_ials

Prints ``<metric>_eps<ε>: value`` lines (and ``epsilon_eps<ε>``, the accountant's ε, and
``seconds_eps<ε>``) for the metrics named by ``--metrics``; ``--out DIR`` keeps the run
directories (default: a temporary one). Each run is a ``jaxreco-train`` process. experiments/dp_ials/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eps", nargs="+", default=["1", "2", "4", "8", "inf"])
    ap.add_argument("--metrics", nargs="+",
                    default=["test/hr@10", "test/ndcg@10", "val/hr@10", "val/ndcg@10"])
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="dp_ials_curve_"))
    for e in a.eps:
        eps = float(e)
        priv = (["privacy=none"] if math.isinf(eps)
                else ["privacy=dp", f"privacy.epsilon={eps}", "privacy.noise_multiplier=null"])
        run = out / f"eps{e}"
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "jaxreco.cli.train", *a.overrides, *priv,
                        "trainer.progress_bar=false", f"hydra.run.dir={run}"], check=True)
        res = json.loads((run / "metrics.json").read_text())
        for m in a.metrics:
            if res.get(m) is not None:
                print(f"{m}_eps{e}: {res[m]:.4f}", flush=True)
        if "privacy/epsilon" in res:
            print(f"epsilon_eps{e}: {res['privacy/epsilon']:.4f}", flush=True)
        print(f"seconds_eps{e}: {time.time() - t0:.1f}", flush=True)


if __name__ == "__main__":
    main()
