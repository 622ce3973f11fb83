"""Latency and throughput of ``POST /recommend`` (k=10), server and load in two processes.

    python scripts/bench_serve.py                      # exports a random ML-1M-sized model
    python scripts/bench_serve.py --model-dir models/ml1m --model-name ml1m
    python scripts/bench_serve.py --with-events           # served records logged (fsync)
    python scripts/bench_serve.py --session-events 50 --kind foldin      # sessions, MF fold-in
    python scripts/bench_serve.py --session-events 50 --kind sequential  # sessions, SASRec

Prints::

    p50_ms: ...                  at 100 requests/s, open loop (latency from the scheduled send)
    p99_ms: ...
    max_rps_p99_under_50ms: ...  highest offered rate whose p99 stayed <= 50 ms
    model_cpu_ms_per_request: ... one request's model work (scores, rules, top-k), CPU time
    model_wall_p50_ms: ...       the same, wall time (one process, no HTTP, after the load)

With ``--session-events N`` every request carries a session of N events (``{"session":
[{"item", "event", "ts"}...]}``, half of them with a known ``user`` whose training history
joins the session, half anonymous) and the figures are printed as
``<kind>_session<N>_p50_ms`` etc.

Without ``--model-dir`` it exports a model with random parameters and ML-1M's shape (6,040
users x 3,706 items, dim 64, ~1M training interactions excluded as "seen"): ``--kind mf``
(default) biased MF; ``foldin`` the same with the fold-in session signature (α₀ 0.3, λ 0.05,
ν 1); ``sequential`` a SASRec-shaped model (max_len 200, 2 blocks, 1 head, as
``ml1m_sasrec``) whose history is each user's latest 200 items. Latency does not depend on
training. The server (``jaxreco-serve``, TensorFlow only) runs
in one process, the load generator (asyncio, raw HTTP/1.1 keep-alive, no TensorFlow) in
another, both on 127.0.0.1; every loop is bounded in requests and seconds and stops itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only, ever


# ---------------------------------------------------------------------------- model
def export_random_ml1m(model_dir: Path, num_users=6040, num_items=3706, dim=64, seed=0,
                       kind: str = "mf") -> None:
    import numpy as np

    from jaxreco import foldin
    from jaxreco.export import SessionModel, biased_mf_functions, export_saved_model

    rng = np.random.default_rng(seed)
    params = {
        "user_embed": rng.normal(0, 0.1, (num_users, dim)).astype(np.float32),
        "item_embed": rng.normal(0, 0.1, (num_items, dim)).astype(np.float32),
        "user_bias": rng.normal(0, 0.1, (num_users, 1)).astype(np.float32),
        "item_bias": rng.normal(0, 0.1, (num_items, 1)).astype(np.float32),
        "global_bias": np.asarray(3.58, np.float32),
    }
    # ML-1M: 1,000,209 ratings, >= 20 per user, heavy tail (max 2,314).
    lens = np.clip(rng.lognormal(4.5, 1.0, num_users).astype(int) + 20, 20, 2314)
    lens = (lens * (1_000_209 / lens.sum())).astype(int).clip(20, 2314)
    indices = np.concatenate([np.sort(rng.choice(num_items, n, replace=False)) for n in lens])
    indptr = np.concatenate([[0], np.cumsum(lens)])

    users = [str(i + 1) for i in range(num_users)]
    items = [str(i + 1) for i in range(num_items)]
    info = {"note": f"random parameters, ML-1M shape, for benchmarking ({kind})"}
    if kind == "sequential":
        _export_random_sequential(model_dir, users, items, indptr, indices, dim, rng, info)
        return
    session = None
    if kind == "foldin":
        session = SessionModel("foldin", foldin=foldin.FoldIn(
            params["item_embed"], params["item_bias"][:, 0], None, alpha0=0.3, reg=0.05, nu=1.0))
    score, all_scores, _ = biased_mf_functions()
    export_saved_model(
        model_dir, 1, params=params, score_fn=score, user_item_scores_fn=all_scores,
        item_vectors_fn=lambda p: p["item_embed"], user_vocab=users, item_vocab=items,
        seen=(indptr, indices), model_info=info, session=session)


def _export_random_sequential(model_dir, users, items, indptr, indices, dim, rng, info,
                              max_len=200) -> None:
    import numpy as np
    from flax import nnx

    from jaxreco import export, export_models
    from jaxreco.models.layers import Table
    from jaxreco.models.sequential import Sequential
    from jaxreco.train.tasks.next_item import Sequences

    nu, ni = len(users), len(items)
    model = Sequential(ni, -(-ni // 128) * 128, max_len=max_len, dim=dim, num_blocks=2,
                       num_heads=1, dropout=0.2, rngs=nnx.Rngs(0))
    graphdef, tables, dense = nnx.split(model, Table, ...)
    user = np.repeat(np.arange(nu), np.diff(indptr))
    item = np.asarray(indices)
    ts = 978_300_000 + rng.permutation(len(user)).astype(np.int64)  # a random order in time
    seq = Sequences(user, item, nu, ts)
    it, ev, gp = seq.latest(max_len)
    fns = export_models.sequential_functions(
        graphdef, tables, dense, num_users=nu, num_items=ni,
        user_seq={"seq_item": it}, use_events=False, use_gaps=False)
    f = fns.functions
    export.export_saved_model(
        model_dir, 1, params=f.params, score_fn=f.score_fn,
        user_item_scores_fn=f.user_item_scores_fn, item_vectors_fn=f.item_vectors_fn,
        user_vocab=users, item_vocab=items, seen=(indptr, indices), model_info=info,
        session=export.SessionModel("sequential", encode_fn=fns.encode_fn,
                                    item_vectors=fns.item_vectors, max_len=max_len,
                                    history=export.history_csr(seq, user, ts, max_len)))


# ---------------------------------------------------------------------------- load generator
class _Conn:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer


async def _one(conn: _Conn, payload: bytes) -> int:
    conn.writer.write(payload)
    head = await conn.reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await conn.reader.readexactly(length)
    return status


async def _run_rate(port: int, rate: float, seconds: float, users: list[str], k: int,
                    max_conns: int = 256, timeout_s: float = 5.0, session_events: int = 0,
                    num_items: int = 3706) -> dict:
    """Open loop: request i is due at t0 + i/rate; latency counts from that due time."""
    n = max(1, int(rate * seconds))
    idle: list[_Conn] = []
    opened = 0
    lat, errors = [], 0
    rnd = random.Random(int(rate))

    def request_bytes() -> bytes:
        req: dict = {"user": rnd.choice(users), "k": k}
        if session_events:
            t = 1_767_225_600 + rnd.randrange(10**6)
            req["session"] = [{"item": str(rnd.randrange(num_items) + 1), "event": "click",
                               "ts": t + 30 * j} for j in range(session_events)]
            if rnd.random() < 0.5:       # an anonymous shopper
                del req["user"]
        body = json.dumps(req).encode()
        return (b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    async def fire(due: float, payload: bytes):
        nonlocal opened, errors
        conn = idle.pop() if idle else None
        if conn is None:
            if opened >= max_conns:
                errors += 1
                return
            opened += 1
            conn = _Conn(*await asyncio.open_connection(HOST, port))
        try:
            status = await asyncio.wait_for(_one(conn, payload), timeout_s)
        except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError):
            errors += 1
            conn.writer.close()
            opened -= 1
            return
        lat.append(time.perf_counter() - due)
        if status != 200:
            errors += 1
        idle.append(conn)

    t0 = time.perf_counter() + 0.05  # perf_counter: uvloop's loop.time() ticks in whole ms
    tasks = []
    for i in range(n):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(fire(due, request_bytes())))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout_s + 10)
    for c in idle:
        c.writer.close()
    lat.sort()

    def pct(p):
        return 1e3 * lat[min(len(lat) - 1, int(p / 100 * len(lat)))] if lat else float("inf")

    return {"rate": rate, "n": n, "ok": len(lat) - errors, "errors": errors,
            "p50_ms": pct(50), "p99_ms": pct(99),
            "achieved_rps": len(lat) / max(1e-9, (time.perf_counter() - t0))}


async def _loadgen(port: int, users: list[str], k: int, base_rate: float, base_seconds: float,
                   step_seconds: float, slo_ms: float, max_rate: float, budget_s: float,
                   session_events: int = 0) -> dict:
    deadline = time.monotonic() + budget_s
    kw = {"session_events": session_events}
    await _run_rate(port, 50, 2.0, users, k, **kw)  # warm-up: connections, caches
    base = await _run_rate(port, base_rate, base_seconds, users, k, **kw)
    print(f"# {base_rate:.0f} req/s for {base_seconds:.0f} s: {json.dumps(base)}", flush=True)

    def good(r):
        return r["p99_ms"] <= slo_ms and r["errors"] == 0

    best, bad, rate = 0.0, None, 200.0
    while rate <= max_rate and time.monotonic() + step_seconds + 5 < deadline:  # grow x1.5
        r = await _run_rate(port, rate, step_seconds, users, k, **kw)
        print(f"# {rate:.0f} req/s: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
              f"errors {r['errors']}", flush=True)
        await asyncio.sleep(1.0)  # let queues drain between steps
        if not good(r):
            bad = rate
            break
        best, rate = rate, rate * 1.5
    for _ in range(3):  # refine between the last good and the first bad rate
        if bad is None or bad - best < 0.05 * bad or time.monotonic() + step_seconds + 5 > deadline:
            break
        mid = (best + bad) / 2
        r = await _run_rate(port, mid, step_seconds, users, k, **kw)
        print(f"# {mid:.0f} req/s: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
              f"errors {r['errors']}", flush=True)
        await asyncio.sleep(1.0)
        best, bad = (mid, bad) if good(r) else (best, mid)
    return {"base": base, "max_rps_p99_under_50ms": best}


def loadgen_main(args) -> int:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    users = [str(i + 1) for i in range(args.num_users)]
    res = asyncio.run(_loadgen(args.port, users, args.k, args.rate, args.seconds,
                               args.step_seconds, 50.0, args.max_rate, args.budget,
                               args.session_events))
    print(json.dumps(res))
    return 0


# ---------------------------------------------------------------------------- model cost
def model_cost(model_dir: Path, session_events: int, k: int, n: int = 300,
               num_users: int = 6040, num_items: int = 3706) -> dict:
    """CPU and wall time of one request's model work, in this process (TensorFlow only):
    ``session_scores`` (or ``user_scores``) for one shopper, then the rules and top-k, as
    the server's worker runs them. Process CPU time counts every thread, so it barely
    depends on what else shares the cores; wall time does."""
    import numpy as np

    from jaxreco.serve.model import ModelManager
    from jaxreco.serve.rules import top_k

    mgr = ModelManager(model_dir)
    mgr.poll_once()
    m = mgr.current
    rnd = random.Random(0)
    cpu, wall = [], []
    for j in range(n + 20):
        user = str(rnd.randrange(num_users) + 1) if j % 2 else ""
        c0, w0 = time.process_time(), time.perf_counter()
        if session_events:
            t = 1_767_225_600.0
            sess = [(str(rnd.randrange(num_items) + 1), "click", t + 30 * e)
                    for e in range(session_events)][-m.session_cap:]
            scores, _, _ = m.session_scores([user], [sess])
        else:
            scores, _ = m.user_scores([user or "1"])
        top_k(scores, k, m.rules, None)
        if j >= 20:  # the first calls warm caches
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    return {"cpu_ms": 1e3 * float(np.median(cpu)), "wall_p50_ms": 1e3 * float(np.median(wall)),
            "wall_p99_ms": 1e3 * float(np.percentile(wall, 99))}


# ---------------------------------------------------------------------------- orchestration
def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            time.sleep(0.3)
    raise SystemExit("server not ready in time")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", help="an exported model directory (default: random ML-1M-sized)")
    p.add_argument("--model-name", default="jaxreco")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rate", type=float, default=100.0, help="rate for p50/p99 (req/s)")
    p.add_argument("--seconds", type=float, default=10.0, help="duration at --rate")
    p.add_argument("--step-seconds", type=float, default=5.0, help="duration of each search step")
    p.add_argument("--max-rate", type=float, default=5000.0)
    p.add_argument("--budget", type=float, default=150.0, help="seconds for the whole load run")
    p.add_argument("--num-users", type=int, default=6040)
    p.add_argument("--with-events", action="store_true",
                   help="run the server with an event log (--events-dir in the temp dir): every "
                        "answer is also written and fsynced as a served record")
    p.add_argument("--session-events", type=int, default=0,
                   help="events in each request's session (0: plain user requests)")
    p.add_argument("--kind", choices=("mf", "foldin", "sequential"), default=None,
                   help="the random model to export (default: mf; foldin with --session-events)")
    p.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cost", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--export-to", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.session_events < 0 or args.session_events > 1000:
        p.error(f"--session-events={args.session_events}: must be in [0, 1000]")
    kind = args.kind or ("foldin" if args.session_events else "mf")
    if args.loadgen:
        return loadgen_main(args)
    if args.export_to:
        sys.path.insert(0, str(REPO))
        export_random_ml1m(Path(args.export_to), kind=kind)
        return 0
    if args.cost:
        sys.path.insert(0, str(REPO))
        print(json.dumps(model_cost(Path(args.model_dir), args.session_events, args.k)))
        return 0
    prefix = f"{kind}_session{args.session_events}_" if args.session_events else ""

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        if args.model_dir:
            model_dir = Path(args.model_dir)
            print(f"model: {model_dir}")
        else:
            model_dir = Path(tmp) / "model"
            t = time.perf_counter()
            # exported in a child process, so this process stays light while measuring
            subprocess.run([sys.executable, __file__, "--export-to", str(model_dir),
                            "--kind", kind], check=True, env=env)
            what = {"mf": "biased MF", "foldin": "biased MF with fold-in sessions",
                    "sequential": "SASRec-shaped sequential (max_len 200, 2 blocks)"}[kind]
            print(f"model: {what} with RANDOM parameters, ML-1M shape: 6040 users x 3706 "
                  f"items, dim 64 (latency does not depend on training); exported in "
                  f"{time.perf_counter() - t:.0f} s")
        if args.session_events:
            print(f"requests: k={args.k}, a session of {args.session_events} events each, half "
                  "with a known user (history joins the session), half anonymous")
        port = _free_port()
        server_log = open(Path(tmp) / "server.log", "w")
        events = ["--events-dir", str(Path(tmp) / "events"), "--replica-id", "bench"] \
            if args.with_events else []
        server = subprocess.Popen(
            [sys.executable, "-m", "jaxreco.serve", "--model-dir", str(model_dir), "--host", HOST,
             "--port", str(port), "--model-name", args.model_name, "--log-level", "warning",
             # the load generator is many shoppers behind one address (it opens up to 256)
             "--max-connections-per-client", "1024",
             *events], env=env, cwd=str(REPO), stdout=server_log, stderr=subprocess.STDOUT)
        try:
            ready = _wait_ready(port, server)
            print(f"server: pid {server.pid}, {HOST}:{port}, model version {ready['model_version']}; "
                  f"load generator: separate process; {os.cpu_count()} CPU cores shared; "
                  f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
            out = subprocess.run(
                [sys.executable, __file__, "--loadgen", "--port", str(port), "--k", str(args.k),
                 "--rate", str(args.rate), "--seconds", str(args.seconds),
                 "--step-seconds", str(args.step_seconds), "--max-rate", str(args.max_rate),
                 "--budget", str(args.budget), "--num-users", str(args.num_users),
                 "--session-events", str(args.session_events)],
                env=env, check=True, capture_output=True, text=True, timeout=args.budget + 120)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
            server_log.close()
            cost = json.loads(subprocess.run(
                [sys.executable, __file__, "--cost", "--model-dir", str(model_dir), "--k",
                 str(args.k), "--session-events", str(args.session_events)],
                env=env, check=True, capture_output=True, text=True, timeout=600
            ).stdout.strip().splitlines()[-1])
            log_text = (Path(tmp) / "server.log").read_text(errors="replace")
            refused = sum(int(n) for n in re.findall(
                r"Exceeded concurrency limit: refused (\d+) request", log_text))
            if refused:  # past saturation the server answers 503 beyond --limit-concurrency
                print(f"# server refused at least {refused} requests over its concurrency limit (503) "
                      "during the overload steps")
            if "Traceback" in log_text:
                print("# server log has errors:\n" + log_text[-3000:])
            if args.with_events:
                segs = sorted((Path(tmp) / "events").glob("events-*"))
                print(f"# event log: {len(segs)} segment(s), "
                      f"{sum(f.stat().st_size for f in segs) / 2**20:.1f} MiB of served records")
    load = os.getloadavg()[0]
    if load > 1.5:  # the server and the load generator already fill both cores
        print(f"# WARNING: 1-minute load average {load:.1f} at the end: other processes shared "
              "the CPU, so these figures understate the server")
    lines = out.stdout.strip().splitlines()
    for line in lines[:-1]:
        print(line)
    res = json.loads(lines[-1])
    print(f"{prefix}p50_ms: {res['base']['p50_ms']:.2f}")
    print(f"{prefix}p99_ms: {res['base']['p99_ms']:.2f}")
    print(f"{prefix}max_rps_p99_under_50ms: {res['max_rps_p99_under_50ms']:.0f}")
    # one request's model work (scores, rules, top-k) in one process, no HTTP: CPU time
    # (all threads) is what the cores must supply per request whatever else runs
    print(f"{prefix}model_cpu_ms_per_request: {cost['cpu_ms']:.2f}")
    print(f"{prefix}model_wall_p50_ms: {cost['wall_p50_ms']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
