"""Federated iALS on Flower next to the central trainer, for a ``jaxreco-train`` config.

    python scripts/federated_ials.py --clients 10 --rounds 4 experiment=federated_ials
    python scripts/federated_ials.py --clients 10 --rounds 3 --dp experiment=dp_ials   # ε = 8
    python scripts/federated_ials.py --engine local --clients 10 --rounds 4 experiment=federated_ials

``--no-central`` skips the trainer's own epochs (the reference, and the tables' max
difference): on 2 cores that reference can stall in jaxlib's LAPACK kernels
(experiments/federated_ials/README.md, "The ML-1M stall").

Prints each figure as ``name: value`` (experiments/federated_ials/README.md).
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
from hydra import compose, initialize_config_dir

from jaxreco import config as config_lib
from jaxreco.federated.simulate import simulate
from jaxreco.runtime import conf_dir, configure_xla


def main() -> None:
    configure_xla()   # before JAX starts: the central iALS reference wedged without it
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--dp", action="store_true", help="clip/sample at the clients, noise at "
                    "the server (the config's privacy=dp settings)")
    ap.add_argument("--no-central", action="store_true")
    ap.add_argument("--engine", choices=("flower", "local"), default="flower",
                    help="local: the same client/server code in a plain loop, no transport")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config_lib.register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose("train", overrides=["name=federated", *a.overrides])
    out = simulate(cfg, num_clients=a.clients, rounds=a.rounds, dp=a.dp,
                   central=not a.no_central, engine=a.engine)
    tag = "federated_dp" if a.dp else "federated"
    print(f"clients: {a.clients}")
    print(f"rounds: {a.rounds}")
    print(f"clients_per_round: {out['rounds'][0]['clients']}")
    print(f"bytes_per_client_per_round: {np.mean([r['bytes_per_client'] for r in out['rounds']]):.0f}")
    print(f"bytes_per_client_per_round_max: {max(r['bytes_per_client_max'] for r in out['rounds']):.0f}")
    print(f"seconds_per_round: {np.mean([r['seconds'] for r in out['rounds']]):.2f}")
    for k in ("test/hr@10", "test/ndcg@10", "test/full/hr@10", "perf/wall_seconds",
              "privacy/epsilon", "privacy/delta"):
        if k in out["federated"]:
            print(f"{tag}_{k}: {out['federated'][k]:.6g}")
    if "central" in out:
        for k in ("test/hr@10", "test/ndcg@10", "test/full/hr@10", "perf/wall_seconds"):
            print(f"central_{k}: {out['central'][k]:.6g}")
        for side in ("user", "item"):
            d = np.abs(out["tables"][side] - out["central_tables"][side]).max()
            print(f"max_abs_diff_{side}_table: {d:.3g}")


if __name__ == "__main__":
    main()
