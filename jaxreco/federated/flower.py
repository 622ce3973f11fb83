"""Federated iALS on Flower (``flwr``, ``pip install 'jaxreco[federated]'``): a real gRPC
server and clients on 127.0.0.1, one round per iALS epoch, no Ray.

Flower 1.42's engine for this is the gRPC server of ``flwr.server.start_server`` with a
:class:`flwr.server.strategy.Strategy` and ``flwr.client.start_client`` with a
``NumPyClient`` per simulated client (both marked deprecated in favour of the
SuperLink/SuperNode processes, which run apps from a ``flwr run`` project; the in-process
pair keeps the simulation one Python call). Each client thread holds one shard of users
(:class:`jaxreco.federated.ials.Client`); the strategy sends the item table, receives the
clients' item statistics (:class:`jaxreco.federated.ials.Statistics`, the only thing that
leaves a client) and solves the items (:func:`jaxreco.federated.ials.item_solve`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import numpy as np

from jaxreco.federated import ials as fed

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
import flwr  # noqa: E402
from flwr.common import (FitIns, FitRes, Parameters, ndarrays_to_parameters,  # noqa: E402
                         parameters_to_ndarrays)

log = logging.getLogger("jaxreco")


# One client computes at a time: the simulated clients share this process's CPU and its
# XLA intra-op thread pool (one thread per core). Two clients' batched Cholesky solves
# running at once each take a pool thread and block in jaxlib 0.10.2's ParallelBatchMap
# waiting for sub-tasks queued on that same pool: a deadlock at 0% CPU (Client.fit).
_COMPUTE = threading.Lock()


class _NumPyClient(flwr.client.NumPyClient):
    def __init__(self, client: fed.Client):
        self.client = client

    def get_parameters(self, config):
        return []

    def fit(self, parameters, config):
        with _COMPUTE:
            stats = self.client.fit(parameters[0])
        return stats.arrays(), int(self.client.n), {"bytes": stats.nbytes}


class IALSStrategy(flwr.server.strategy.Strategy):
    """Every client every round; ``aggregate_fit`` is the iALS item half-step."""

    def __init__(self, q0: np.ndarray, num_clients: int, *, num_users: int, alpha0: float,
                 reg: float, nu: float, privacy=None):
        self.q = np.asarray(q0, np.float32)
        self.num_clients = num_clients
        self.kw = dict(num_users=num_users, alpha0=alpha0, reg=reg, nu=nu, privacy=privacy)
        self.rounds: list[dict] = []

    def initialize_parameters(self, client_manager):
        return ndarrays_to_parameters([self.q])

    def configure_fit(self, server_round, parameters, client_manager):
        client_manager.wait_for(self.num_clients, timeout=120)
        clients = client_manager.sample(num_clients=self.num_clients,
                                        min_num_clients=self.num_clients)
        self._t0 = time.time()
        return [(c, FitIns(parameters, {"round": server_round})) for c in clients]

    def aggregate_fit(self, server_round, results: list[tuple[object, FitRes]], failures):
        if failures:
            raise RuntimeError(f"round {server_round}: {len(failures)} clients failed: "
                               f"{failures[0]!r}")
        stats = [fed.Statistics.from_arrays(parameters_to_ndarrays(r.parameters))
                 for _, r in results]
        num_items, d = self.q.shape
        g, b, n, ug = fed.aggregate(stats, num_items, d)
        self.q = fed.item_solve(g, b, n, ug, round_index=server_round - 1, previous=self.q,
                                **self.kw)
        sent = [s.nbytes for s in stats]
        self.rounds.append({"round": server_round, "clients": len(stats),
                            "bytes_per_client": float(np.mean(sent)),
                            "bytes_per_client_max": float(np.max(sent)),
                            "seconds": time.time() - self._t0})
        return ndarrays_to_parameters([self.q]), {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters: Parameters):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(clients: list[fed.Client], q0: np.ndarray, rounds: int, *, num_users: int,
        alpha0: float, reg: float, nu: float, privacy=None, timeout: float = 3600.0):
    """Runs ``rounds`` federated iALS rounds on a Flower gRPC server with one Flower client
    per :class:`~jaxreco.federated.ials.Client` (threads, 127.0.0.1). Returns ``(Q, per-round
    records)``; the clients keep their user vectors."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: must be >= 1")
    address = f"127.0.0.1:{_free_port()}"
    strategy = IALSStrategy(q0, len(clients), num_users=num_users, alpha0=alpha0, reg=reg,
                            nu=nu, privacy=privacy)
    errors: list[BaseException] = []

    def connect(c):
        try:
            flwr.client.start_client(server_address=address, client=_NumPyClient(c).to_client(),
                                     insecure=True, max_wait_time=120.0)
        except BaseException as e:       # noqa: BLE001  (reported below)
            errors.append(e)

    # clients retry until the server listens; the server runs here, in the main thread
    # (Flower installs signal handlers)
    workers = [threading.Thread(target=connect, args=(c,), daemon=True) for c in clients]
    for w in workers:
        w.start()
    flwr.server.start_server(server_address=address, strategy=strategy,
                             config=flwr.server.ServerConfig(num_rounds=rounds,
                                                             round_timeout=timeout))
    for w in workers:
        w.join(30)
    if errors:
        raise RuntimeError(f"Flower run failed: {errors[0]!r}") from errors[0]
    if len(strategy.rounds) != rounds:
        raise RuntimeError(f"Flower ran {len(strategy.rounds)} of {rounds} rounds")
    return strategy.q, strategy.rounds
